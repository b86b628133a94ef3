//! XEP-0092: Software Version.

use super::{Cx, Iq, IqResult, Module, Target};
use crate::error::{Condition, StanzaError};
use async_trait::async_trait;
use natter_xml::Element;

pub const NS: &str = "jabber:iq:version";

pub struct Version;

#[async_trait]
impl Module for Version {
    fn name(&self) -> &'static str {
        "version"
    }
    fn features(&self) -> &'static [&'static str] {
        &[NS]
    }
    fn iq_payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[(NS, "query")]
    }
    async fn handle_iq(&self, _cx: &Cx<'_>, iq: &Iq) -> IqResult {
        if !matches!(iq.target, Target::Server(_)) {
            return Err(StanzaError::new(Condition::ServiceUnavailable));
        }
        Ok(Some(
            Element::new("query", NS)
                .with_child(Element::new("name", NS).with_text("natter"))
                .with_child(Element::new("version", NS).with_text(env!("CARGO_PKG_VERSION"))),
        ))
    }
}
