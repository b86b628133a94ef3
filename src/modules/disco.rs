//! XEP-0030 Service Discovery and XEP-0115 Entity Capabilities for the
//! server. Features come from each module's declaration, so disco lists
//! exactly what is implemented.

use super::{Cx, Identity, Iq, IqResult, IqType, Module, Modules, Target};
use crate::error::{Condition, StanzaError};
use async_trait::async_trait;
use base64::Engine;
use natter_xml::Element;
use sha1::{Digest, Sha1};

pub use super::vocab::{NS_CAPS, NS_DISCO_INFO as NS_INFO, NS_DISCO_ITEMS as NS_ITEMS};
pub const CAPS_NODE: &str = "https://github.com/natter-im/natter";

pub struct Disco;

fn info(identities: &[(&str, &str, &str)], features: &[&str], node: Option<&str>) -> Element {
    let mut q = Element::new("query", NS_INFO);
    if let Some(n) = node {
        q.set_attr("node", n);
    }
    for identity in identities {
        let mut id = Element::new("identity", NS_INFO)
            .with_attr("category", identity.0)
            .with_attr("type", identity.1);
        if !identity.2.is_empty() {
            id.set_attr("name", identity.2);
        }
        q.append_child(id);
    }
    for f in features {
        q.append_child(Element::new("feature", NS_INFO).with_attr("var", *f));
    }
    q
}

/// XEP-0115 §5.1 verification string hash for identities and features.
pub fn caps_ver(identities: &[(&str, &str, &str)], features: &[&str]) -> String {
    let mut ids: Vec<String> = identities
        .iter()
        .map(|i| format!("{}/{}//{}<", i.0, i.1, i.2))
        .collect();
    ids.sort_unstable();
    let mut s = ids.concat();
    let mut f = features.to_vec();
    f.sort_unstable();
    for x in f {
        s.push_str(x);
        s.push('<');
    }
    base64::engine::general_purpose::STANDARD.encode(Sha1::digest(s.as_bytes()))
}

/// `<c/>` advertised in stream features (XEP-0115 §6.3).
pub fn caps_element(modules: &Modules) -> Element {
    Element::new("c", NS_CAPS)
        .with_attr("hash", "sha-1")
        .with_attr("node", CAPS_NODE)
        .with_attr("ver", caps_ver(&modules.identities(), &modules.features()))
}

/// XEP-0030 items of the server: the services hosted on their own domains.
fn service_items(modules: &Modules) -> Element {
    let mut q = Element::new("query", NS_ITEMS);
    for s in modules.services().filter(|s| s.listed) {
        let mut item = Element::new("item", NS_ITEMS).with_attr("jid", s.domain.clone());
        if !s.identity.2.is_empty() {
            item.set_attr("name", s.identity.2.clone());
        }
        q.append_child(item);
    }
    q
}

#[async_trait]
impl Module for Disco {
    fn name(&self) -> &'static str {
        "disco"
    }
    fn identities(&self) -> &'static [Identity] {
        &[("server", "im", "natter")]
    }
    fn account_identities(&self) -> &'static [Identity] {
        &[("account", "registered", "")]
    }
    fn features(&self) -> &'static [&'static str] {
        &[NS_INFO, NS_ITEMS]
    }
    fn account_features(&self) -> &'static [&'static str] {
        &[NS_INFO, NS_ITEMS]
    }
    fn iq_payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[(NS_INFO, "query"), (NS_ITEMS, "query")]
    }
    async fn handle_iq(&self, cx: &Cx<'_>, iq: &Iq) -> IqResult {
        if iq.kind != IqType::Get {
            return Err(StanzaError::new(Condition::NotAllowed));
        }
        let q = iq.payload();
        let node = q.attr("node");
        if q.ns == NS_ITEMS {
            let modules = &cx.state.modules;
            if node.is_some() {
                return Err(StanzaError::new(Condition::ItemNotFound));
            }
            return match &iq.target {
                // XEP-0060 §5.2: e.g. an account's PEP nodes.
                Target::Account(bare) => {
                    let mut q = Element::new("query", NS_ITEMS);
                    for item in modules.account_items(cx, bare).await? {
                        q.append_child(item);
                    }
                    Ok(Some(q))
                }
                Target::Server(_) => Ok(Some(service_items(modules))),
            };
        }
        match &iq.target {
            Target::Server(_) => {
                let modules = &cx.state.modules;
                let features = modules.features();
                let identities = modules.identities();
                if let Some(n) = node {
                    // Only our own caps node is known.
                    let expected = format!("{CAPS_NODE}#{}", caps_ver(&identities, &features));
                    if n != expected {
                        return Err(StanzaError::new(Condition::ItemNotFound));
                    }
                }
                Ok(Some(info(&identities, &features, node)))
            }
            Target::Account(bare) => {
                if let Some(n) = node {
                    // XEP-0060 §5.3: one of the account's PEP nodes.
                    return cx.state.modules.account_node_info(cx, bare, n).await;
                }
                if cx.state.store.credentials(bare.as_str()).await?.is_none() {
                    return Err(StanzaError::new(Condition::ServiceUnavailable));
                }
                Ok(Some(info(
                    &cx.state.modules.account_identities(),
                    &cx.state.modules.account_features(),
                    None,
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_ver_matches_xep0115_example() {
        // XEP-0115 §5.2 simple example.
        let ver = caps_ver(
            &[("client", "pc", "Exodus 0.9.1")],
            &[
                "http://jabber.org/protocol/caps",
                "http://jabber.org/protocol/disco#info",
                "http://jabber.org/protocol/disco#items",
                "http://jabber.org/protocol/muc",
            ],
        );
        assert_eq!(ver, "QgayPKawpkPSDYmwT/WM94uAlu0=");
    }
}
