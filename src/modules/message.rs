//! RFC 6121 §8: message routing between local accounts, with XEP-0280
//! carbons for multi-device, XEP-0313 archiving and XEP-0160 offline
//! storage.
//!
//! Durable acceptance: a chat/normal message with content (body, receipt,
//! marker, correction, reaction, retraction, …; not bare chat states) is
//! appended to both parties' archives (per their MAM preferences) in one
//! group-committed `archive_append` *before* it is routed, and the
//! recipient's copy carries `<stanza-id by='recipient'/>` (XEP-0359). If no
//! device of the recipient is online, it is queued offline (also durably)
//! before `route` returns. So when `dispatch` returns — and a stream
//! management ack or any later reply reaches the sender — the message
//! survives a crash. A store failure is answered with
//! `internal-server-error` (type wait), never a silent drop.
//!
//! Everything else (headlines, errors, groupchat, chat states alone,
//! `<no-store/>`) is routed as before: to available resources, or answered
//! with `service-unavailable` (RFC 6121 §8.5.2.2.1) when nobody is there —
//! except chat states, which are dropped (XEP-0160 §4).

use super::{carbons, mam, offline, parse_to, Cx, Module};
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
    // XEP-0191: blocked either way → an error (or dropped, for errors).
    if super::blocking::gate(cx, &msg, &to).await? {
        return Ok(());
    }
    let bare = to.to_bare();
    if offline::storable(&msg, &kind) {
        return accept(cx, &to, &bare, msg, &kind).await;
    }

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

/// A message worth keeping: archive it for both parties, then deliver it
/// or queue it offline; return once all of that is durable.
async fn accept(
    cx: &Cx<'_>,
    to: &Jid,
    bare: &BareJid,
    msg: Element,
    kind: &str,
) -> Result<(), StanzaError> {
    let state = cx.state;
    let sender = &cx.session.bare;
    let limit = state.config.store.offline_limit;
    let full = to
        .try_as_full()
        .ok()
        .filter(|f| state.router.session(f).is_some());
    if full.is_none() && !offline::online(state, bare) {
        // It would be queued: refuse early (before archiving) when it can't be.
        if state.store.credentials(bare.as_str()).await?.is_none() {
            return Err(StanzaError::new(Condition::ServiceUnavailable));
        }
        if state.store.offline_count(bare.as_str()).await? >= limit as u64 {
            return Err(offline::queue_full());
        }
    }
    let mut delivered = msg.clone();
    let mut sent_copy = msg.clone();
    let mut archive_id = None;
    if mam::archivable(&msg, kind) {
        let (entries, sent_ix, recv_ix) =
            mam::archive_entries(state, sender, bare, &msg.to_string()).await?;
        if !entries.is_empty() {
            let ids = match state.store.archive_append(&entries).await {
                Ok(ids) => ids,
                Err(natter_store::StoreError::NotFound) => {
                    // The recipient's account is gone.
                    return Err(StanzaError::new(Condition::ServiceUnavailable));
                }
                Err(e) => return Err(e.into()),
            };
            if let Some(id) = recv_ix.and_then(|i| ids.get(i)) {
                delivered.append_child(mam::stanza_id(id, bare));
                archive_id = Some(id.clone());
            }
            // XEP-0313 "Communicating the archive ID": the sender's id goes only to the sender's own
            // devices (in the sent carbon), never to the recipient.
            if let Some(id) = sent_ix.and_then(|i| ids.get(i)) {
                sent_copy.append_child(mam::stanza_id(id, sender));
            }
        }
    }
    let got = offline::deliver(state, bare, full, &delivered, archive_id.as_deref(), limit).await?;
    carbons::copy_sent(cx, &sent_copy, kind);
    if full.is_some() {
        let to_id = got.first().map(|h| h.id);
        carbons::copy_received(cx, bare, to_id, &delivered, kind);
    }
    Ok(())
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
    if exists && !mam::has_content(&msg) {
        // Chat states alone are not worth an error (XEP-0160 §4).
        return Ok(());
    }
    Err(if exists {
        StanzaError::with_text(Condition::ServiceUnavailable, "recipient is offline")
    } else {
        StanzaError::new(Condition::ServiceUnavailable)
    })
}
