//! XEP-0157 Contact Addresses for XMPP Services: the `[contact]` addresses
//! as a `http://jabber.org/network/serverinfo` form in the server's
//! disco#info (XEP-0128). No addresses configured: no form.

use super::vocab::NS_DATA;
use super::Module;
use crate::config::Config;
use natter_xml::Element;

pub const FORM_TYPE: &str = "http://jabber.org/network/serverinfo";

pub struct ContactAddresses;

impl Module for ContactAddresses {
    fn name(&self) -> &'static str {
        "contact"
    }
    fn server_info_forms(&self, config: &Config) -> Vec<Element> {
        let all = config.contact.all();
        if all.iter().all(|(_, a)| a.is_empty()) {
            return Vec::new();
        }
        let field = |var: String| Element::new("field", NS_DATA).with_attr("var", var);
        let value = |v: &str| Element::new("value", NS_DATA).with_text(v);
        let mut x = Element::new("x", NS_DATA)
            .with_attr("type", "result")
            .with_child(
                field("FORM_TYPE".into())
                    .with_attr("type", "hidden")
                    .with_child(value(FORM_TYPE)),
            );
        for (kind, addresses) in all.iter().filter(|(_, a)| !a.is_empty()) {
            let mut f = field(format!("{kind}-addresses")).with_attr("type", "list-multi");
            for a in addresses.iter() {
                f.append_child(value(a));
            }
            x.append_child(f);
        }
        vec![x]
    }
}
