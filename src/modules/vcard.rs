//! XEP-0054 vcard-temp (and with it XEP-0153 avatars, whose PHOTO lives in
//! the vCard): anyone may read an account's vCard, only its owner writes it.

use super::{Cx, Iq, IqResult, IqType, Module, Target};
use crate::error::{Condition, StanzaError};
use async_trait::async_trait;
use natter_xml::{parse_frame, Element, Limits};

pub const NS: &str = "vcard-temp";

pub struct VCard;

#[async_trait]
impl Module for VCard {
    fn name(&self) -> &'static str {
        "vcard"
    }
    fn features(&self) -> &'static [&'static str] {
        &[NS]
    }
    fn account_features(&self) -> &'static [&'static str] {
        &[NS]
    }
    fn iq_payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[(NS, "vCard")]
    }
    async fn handle_iq(&self, cx: &Cx<'_>, iq: &Iq) -> IqResult {
        let owner = match &iq.target {
            Target::Account(b) => b.clone(),
            Target::Server(_) if iq.is_own_account() => iq.from.to_bare(),
            Target::Server(_) => return Err(StanzaError::new(Condition::ServiceUnavailable)),
        };
        match iq.kind {
            IqType::Get => {
                let stored = cx.state.store.vcard(owner.as_str()).await?;
                let el = match stored {
                    Some(xml) => parse_frame(xml.as_bytes(), &Limits::default()).map_err(|e| {
                        tracing::error!(error = %e, "stored vCard does not parse");
                        StanzaError::new(Condition::InternalServerError)
                    })?,
                    None => Element::new("vCard", NS),
                };
                Ok(Some(el))
            }
            IqType::Set => {
                if owner != iq.from.to_bare() {
                    return Err(StanzaError::new(Condition::Forbidden));
                }
                cx.state
                    .store
                    .set_vcard(owner.as_str(), &iq.payload().to_string())
                    .await?;
                Ok(None)
            }
        }
    }
}
