//! RFC 6121 §3–4: presence (placeholder, being written).

use super::{Cx, Module};
use crate::error::StanzaError;
use async_trait::async_trait;
use natter_xml::Element;

pub struct Presence;

#[async_trait]
impl Module for Presence {}

pub async fn handle(_cx: &Cx<'_>, _stanza: Element) -> Result<(), StanzaError> {
    Ok(())
}
