//! RFC 6121 §8: message routing between local accounts, with XEP-0280
//! carbons for multi-device. Offline storage and archiving arrive with the
//! delivery issue; until then a chat to an account with no available
//! resource is answered with `service-unavailable` (RFC 6121 §8.5.2.2.1),
//! never dropped silently.

use super::{carbons, parse_to, Cx, Module};
use crate::error::{Condition, StanzaError};
use async_trait::async_trait;
use jid::{BareJid, Jid};
use natter_xml::Element;

pub struct Messages;

#[async_trait]
impl Module for Messages {}

pub async fn route(cx: &Cx<'_>, msg: Element) -> Result<(), StanzaError> {
    let kind = msg.attr("type").unwrap_or("normal").to_string();
    if !matches!(
        kind.as_str(),
        "chat" | "normal" | "headline" | "groupchat" | "error"
    ) {
        return Err(StanzaError::with_text(
            Condition::BadRequest,
            "unknown message type",
        ));
    }
    // No `to`: the sender's own account (RFC 6120 §10.3.1).
    let to = parse_to(&msg)?.unwrap_or_else(|| Jid::from(cx.session.bare.clone()));
    if !cx.state.serves(to.domain().as_str()) {
        return Err(StanzaError::new(Condition::RemoteServerNotFound));
    }
    if to.node().is_none() {
        // Messages to the server itself carry nothing we act on.
        return Ok(());
    }
    let bare = to.to_bare();

    if let Ok(full) = to.try_as_full() {
        if let Some(h) = cx.state.router.session(full) {
            h.send(msg.clone());
            carbons::copy_sent(cx, &msg, &kind);
            carbons::copy_received(cx, &bare, Some(h.id), &msg, &kind);
            return Ok(());
        }
        // RFC 6121 §8.5.3.2: resource gone.
        match kind.as_str() {
            "groupchat" => return Err(StanzaError::new(Condition::ServiceUnavailable)),
            "headline" | "error" => return Ok(()),
            _ => {}
        }
    }
    deliver_to_bare(cx, &bare, msg, &kind).await
}

/// RFC 6121 §8.5.2: all available resources with non-negative priority get
/// chat/normal/headline (WhatsApp-style: every device sees the chat).
async fn deliver_to_bare(
    cx: &Cx<'_>,
    bare: &BareJid,
    msg: Element,
    kind: &str,
) -> Result<(), StanzaError> {
    if kind == "groupchat" {
        return Err(StanzaError::new(Condition::ServiceUnavailable));
    }
    let targets: Vec<_> = cx
        .state
        .router
        .resources(bare)
        .into_iter()
        .filter(|h| h.is_available() && h.priority() >= 0)
        .collect();
    if !targets.is_empty() {
        for h in &targets {
            h.send(msg.clone());
        }
        carbons::copy_sent(cx, &msg, kind);
        return Ok(());
    }
    if kind == "error" || kind == "headline" {
        return Ok(());
    }
    let exists = cx.state.store.credentials(bare.as_str()).await?.is_some();
    Err(if exists {
        StanzaError::with_text(Condition::ServiceUnavailable, "recipient is offline")
    } else {
        StanzaError::new(Condition::ServiceUnavailable)
    })
}
