//! XEP-0030 Service Discovery and XEP-0115 Entity Capabilities for the
//! server. Features come from each module's declaration, so disco lists
//! exactly what is implemented.

use super::{Cx, Identity, Iq, IqResult, IqType, Module, Modules, Target};
use crate::error::{Condition, StanzaError};
use async_trait::async_trait;
use base64::Engine;
use natter_xml::Element;
use sha1::{Digest, Sha1};

use super::vocab::NS_DATA;
pub use super::vocab::{NS_CAPS, NS_DISCO_INFO as NS_INFO, NS_DISCO_ITEMS as NS_ITEMS};
pub const CAPS_NODE: &str = "https://github.com/natter-im/natter";

pub struct Disco;

fn info(
    identities: &[(&str, &str, &str)],
    features: &[&str],
    forms: &[Element],
    node: Option<&str>,
) -> Element {
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
    for x in forms {
        q.append_child(x.clone());
    }
    q
}

/// XEP-0115 §5.1 verification string of the server's disco#info.
pub fn caps_ver(identities: &[(&str, &str, &str)], features: &[&str], forms: &[Element]) -> String {
    caps_verification_string(&info(identities, features, forms, None))
        .expect("the server's own disco#info is well-formed")
}

/// One extended form (XEP-0128): FORM_TYPE, then (var, values) sorted.
type HashForm = (String, Vec<(String, Vec<String>)>);

/// XEP-0115 §5.4 verification string (SHA-1) of a disco#info result,
/// extended service discovery forms (XEP-0128) included. None when the
/// result is malformed (duplicate identities or features, a form without
/// a FORM_TYPE, …), which §5.4 says must not be cached.
pub fn caps_verification_string(query: &Element) -> Option<String> {
    let mut identities: Vec<String> = query
        .children()
        .filter(|c| c.is("identity", NS_INFO))
        .map(|i| {
            format!(
                "{}/{}/{}/{}",
                i.attr("category").unwrap_or_default(),
                i.attr("type").unwrap_or_default(),
                i.attr("xml:lang").unwrap_or_default(),
                i.attr("name").unwrap_or_default()
            )
        })
        .collect();
    let mut features: Vec<String> = query
        .children()
        .filter(|c| c.is("feature", NS_INFO))
        .filter_map(|f| f.attr("var").map(str::to_string))
        .collect();
    identities.sort();
    features.sort();
    let dup = |v: &[String]| v.windows(2).any(|w| w[0] == w[1]);
    if dup(&identities) || dup(&features) {
        return None;
    }
    let mut forms: Vec<HashForm> = Vec::new();
    for x in query
        .children()
        .filter(|c| c.is("x", NS_DATA) && c.attr("type") == Some("result"))
    {
        let mut form_type = None;
        let mut fields = Vec::new();
        for f in x.children().filter(|c| c.is("field", NS_DATA)) {
            let var = f.attr("var").unwrap_or_default().to_string();
            let mut values: Vec<String> = f
                .children()
                .filter(|v| v.is("value", NS_DATA))
                .map(Element::text)
                .collect();
            if var == "FORM_TYPE" {
                if form_type.is_some() || values.len() != 1 {
                    return None;
                }
                form_type = values.pop();
                continue;
            }
            values.sort();
            fields.push((var, values));
        }
        let form_type = form_type?;
        fields.sort();
        forms.push((form_type, fields));
    }
    forms.sort_by(|a, b| a.0.cmp(&b.0));
    if forms.windows(2).any(|w| w[0].0 == w[1].0) {
        return None;
    }
    let mut s = String::new();
    for i in &identities {
        s.push_str(i);
        s.push('<');
    }
    for f in &features {
        s.push_str(f);
        s.push('<');
    }
    for (form_type, fields) in &forms {
        s.push_str(form_type);
        s.push('<');
        for (var, values) in fields {
            s.push_str(var);
            s.push('<');
            for v in values {
                s.push_str(v);
                s.push('<');
            }
        }
    }
    Some(base64::engine::general_purpose::STANDARD.encode(Sha1::digest(s.as_bytes())))
}

/// `<c/>` advertised in stream features (XEP-0115 §6.3).
pub fn caps_element(modules: &Modules) -> Element {
    Element::new("c", NS_CAPS)
        .with_attr("hash", "sha-1")
        .with_attr("node", CAPS_NODE)
        .with_attr(
            "ver",
            caps_ver(
                &modules.identities(),
                &modules.features(),
                modules.server_info_forms(),
            ),
        )
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
                    let forms = modules.server_info_forms();
                    let expected =
                        format!("{CAPS_NODE}#{}", caps_ver(&identities, &features, forms));
                    if n != expected {
                        return Err(StanzaError::new(Condition::ItemNotFound));
                    }
                }
                Ok(Some(info(
                    &identities,
                    &features,
                    modules.server_info_forms(),
                    node,
                )))
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
                    &[],
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
            &[],
        );
        assert_eq!(ver, "QgayPKawpkPSDYmwT/WM94uAlu0=");
    }

    #[test]
    fn caps_ver_matches_xep0115_complex_example() {
        use natter_xml::Limits;
        // XEP-0115 §5.3.
        let q = natter_xml::parse_frame(
            br#"<query xmlns='http://jabber.org/protocol/disco#info' node='http://psi-im.org#q07IKJEyjvHSyhy//CH0CxmKi8w='>
  <identity xml:lang='en' category='client' name='Psi 0.11' type='pc'/>
  <identity xml:lang='el' category='client' name='&#x03A8; 0.11' type='pc'/>
  <feature var='http://jabber.org/protocol/caps'/>
  <feature var='http://jabber.org/protocol/disco#info'/>
  <feature var='http://jabber.org/protocol/disco#items'/>
  <feature var='http://jabber.org/protocol/muc'/>
  <x xmlns='jabber:x:data' type='result'>
    <field var='FORM_TYPE' type='hidden'><value>urn:xmpp:dataforms:softwareinfo</value></field>
    <field var='ip_version' type='text-multi'><value>ipv4</value><value>ipv6</value></field>
    <field var='os'><value>Mac</value></field>
    <field var='os_version'><value>10.5.1</value></field>
    <field var='software'><value>Psi</value></field>
    <field var='software_version'><value>0.11</value></field>
  </x>
</query>"#,
            &Limits {
                max_stanza_bytes: 1 << 20,
                max_depth: 100,
                max_attrs: 100,
                max_elements: 10_000,
            },
        )
        .unwrap();
        assert_eq!(
            caps_verification_string(&q).as_deref(),
            Some("q07IKJEyjvHSyhy//CH0CxmKi8w=")
        );
    }
}
