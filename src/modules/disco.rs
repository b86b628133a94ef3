//! XEP-0030 Service Discovery and XEP-0115 Entity Capabilities for the
//! server. Features come from each module's declaration, so disco lists
//! exactly what is implemented.

use super::{Cx, Iq, IqResult, IqType, Module, Target};
use crate::error::{Condition, StanzaError};
use async_trait::async_trait;
use base64::Engine;
use natter_xml::Element;
use sha1::{Digest, Sha1};

pub const NS_INFO: &str = "http://jabber.org/protocol/disco#info";
pub const NS_ITEMS: &str = "http://jabber.org/protocol/disco#items";
pub const NS_CAPS: &str = "http://jabber.org/protocol/caps";
pub const CAPS_NODE: &str = "https://github.com/natter-im/natter";

pub struct Disco;

type Identity = (&'static str, &'static str, &'static str);

/// XEP-0223 §4 / XEP-0163 §6: the server and every account are PEP services too.
const SERVER_IDENTITIES: &[Identity] = &[("server", "im", "natter"), super::pep::IDENTITY];
const ACCOUNT_IDENTITIES: &[Identity] = &[("account", "registered", ""), super::pep::IDENTITY];

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

/// The server's features including disco's own.
fn server_features(cx: &Cx<'_>) -> Vec<&'static str> {
    cx.state.modules.features()
}

/// `<c/>` advertised in stream features (XEP-0115 §6.3).
pub fn caps_element(features: &[&'static str]) -> Element {
    Element::new("c", NS_CAPS)
        .with_attr("hash", "sha-1")
        .with_attr("node", CAPS_NODE)
        .with_attr("ver", caps_ver(SERVER_IDENTITIES, features))
}

#[async_trait]
impl Module for Disco {
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
            // XEP-0060 §5.2: an account's PEP nodes.
            if let (Target::Account(bare), None) = (&iq.target, node) {
                return super::pep::disco_items(cx.state, bare, &cx.session.bare).await;
            }
            if node.is_some() {
                return Err(StanzaError::new(Condition::ItemNotFound));
            }
            return Ok(Some(Element::new("query", NS_ITEMS)));
        }
        match &iq.target {
            Target::Server(_) => {
                let features = server_features(cx);
                if let Some(n) = node {
                    // Only our own caps node is known.
                    let expected =
                        format!("{CAPS_NODE}#{}", caps_ver(SERVER_IDENTITIES, &features));
                    if n != expected {
                        return Err(StanzaError::new(Condition::ItemNotFound));
                    }
                }
                Ok(Some(info(SERVER_IDENTITIES, &features, node)))
            }
            Target::Account(bare) => {
                if let Some(n) = node {
                    // XEP-0060 §5.3: one of the account's PEP nodes.
                    return super::pep::disco_node_info(cx.state, bare, n, &cx.session.bare).await;
                }
                if cx.state.store.credentials(bare.as_str()).await?.is_none() {
                    return Err(StanzaError::new(Condition::ServiceUnavailable));
                }
                Ok(Some(info(
                    ACCOUNT_IDENTITIES,
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
