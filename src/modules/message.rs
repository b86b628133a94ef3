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
//! To a user on another server (federation): the same acceptance — the
//! sender's archive copy is written first, sent carbons go to the sender's
//! other devices — then the message is queued for the remote server with
//! `api::Remote`. What "accepted" promises there is less: the archive has
//! the message before the sender's ack, but the s2s hop has no stream
//! management (XEP-0198 for s2s is not built), so a stream that breaks
//! after the write may lose it on the way; an unreachable server bounces
//! it back to the sender (`remote-server-not-found`/`-timeout`), and the
//! sender's archive keeps it either way.
//!
//! Everything else (headlines, errors, groupchat, chat states alone,
//! `<no-store/>`) is routed as before: to available resources, or answered
//! with `service-unavailable` (RFC 6121 §8.5.2.2.1) when nobody is there —
//! except chat states, which are dropped (XEP-0160 §4).

use super::{api, remote_for, vocab, Cx, Flow, Hook, HookStanza, Kind, Module, SentCopy, Shared};
use crate::error::{Condition, StanzaError};
use crate::jids::Bare;
use async_trait::async_trait;
use jid::{BareJid, Jid};
use natter_xml::Element;
use std::sync::Arc;

pub struct Messages;

#[async_trait]
impl Module for Messages {
    fn name(&self) -> &'static str {
        "message"
    }
    fn depends(&self) -> &'static [&'static str] {
        &["offline"]
    }
    fn hooks(&self) -> &'static [(Hook, i32)] {
        &[(Hook::Route(Kind::Message), 0)]
    }
    fn provide(self: Arc<Self>, shared: &mut Shared) {
        shared.provide::<dyn api::MessageBatch>(self);
    }
    async fn on_stanza(
        &self,
        _hook: Hook,
        cx: &Cx<'_>,
        s: &HookStanza<'_>,
    ) -> Result<Flow, StanzaError> {
        route(cx, s.stanza.clone(), s.to.cloned()).await?;
        settled(cx).await?;
        Ok(Flow::Stop)
    }
}

#[async_trait]
impl api::MessageBatch for Messages {
    async fn route_many(
        &self,
        cx: &Cx<'_>,
        msgs: Vec<(Element, Option<Jid>)>,
    ) -> Vec<Result<(), StanzaError>> {
        let mut out = route_many(cx, msgs).await;
        if let Err(e) = settled(cx).await {
            for r in out.iter_mut().filter(|r| r.is_ok()) {
                *r = Err(e.clone());
            }
        }
        out
    }
}

/// In a cluster: wait until what went to sessions on other nodes is in
/// NATS, so the sender's acknowledgement (the reply, or the stream
/// management count) comes after it — a node killed after acknowledging
/// has nothing in flight. The message is archived either way; the error
/// (type wait) says it may not have reached the recipient's devices.
async fn settled(cx: &Cx<'_>) -> Result<(), StanzaError> {
    match &cx.state.cluster {
        Some(c) if !c.outbox.settle().await => Err(StanzaError::with_text(
            Condition::InternalServerError,
            "the cluster's message bus did not confirm delivery; retry later",
        )
        .with_type(crate::error::ErrorType::Wait)),
        _ => Ok(()),
    }
}

/// Tell the `Delivered` hooks (carbons) where a message went.
async fn delivered(
    cx: &Cx<'_>,
    msg: &Element,
    sent_copy: Option<SentCopy<'_>>,
    recipient: &BareJid,
    to_resource: bool,
    delivered_to: Option<u64>,
) -> Result<(), StanzaError> {
    let mut s = HookStanza::new(msg, None);
    s.sent_copy = sent_copy;
    s.recipient = Some(recipient);
    s.to_resource = to_resource;
    s.delivered_to = delivered_to;
    cx.state.modules.run(Hook::Delivered, cx, &s).await?;
    Ok(())
}

/// What routing decided for one message before anything was written.
/// Both plans are boxed, and the futures take them boxed: `route`'s future
/// is part of every message's, and an allocation past 1 KiB costs glibc
/// several times a small one.
enum Plan {
    /// Nothing more to do (to the server, blocked, …).
    Done,
    /// Route as is, no durable write (chat states, headlines, errors, …).
    Direct(Box<Direct>),
    /// Archive (these entries, maybe none) and then deliver or queue it.
    Accept(Box<Accept>),
}

struct Direct {
    to: Jid,
    msg: Element,
    kind: String,
}

struct Accept {
    /// On another server: handed to federation after the sender's copy.
    remote: Option<Arc<dyn api::Remote>>,
    bare: BareJid,
    full: Option<jid::FullJid>,
    msg: Element,
    entries: Vec<natter_store::NewArchiveEntry>,
    sent_ix: Option<usize>,
    recv_ix: Option<usize>,
}

async fn route(cx: &Cx<'_>, msg: Element, to: Option<Jid>) -> Result<(), StanzaError> {
    let plan = plan(cx, msg, to).await?;
    match plan {
        Plan::Done => Ok(()),
        Plan::Direct(d) => direct(cx, d).await,
        Plan::Accept(a) => {
            let ids = append(cx, &a.entries).await?;
            finish(cx, a, &ids).await
        }
    }
}

/// Route several messages from one session, in order, with one durable
/// archive write for all of them (one group commit instead of one per
/// message: a session's throughput is not bound by commit latency).
/// Returns each message's outcome, in order.
async fn route_many(
    cx: &Cx<'_>,
    msgs: Vec<(Element, Option<Jid>)>,
) -> Vec<Result<(), StanzaError>> {
    let mut plans = Vec::with_capacity(msgs.len());
    for (m, to) in msgs {
        plans.push(plan(cx, m, to).await);
    }
    // One append for every accepted message's entries, remembering where
    // each message's ids start.
    let mut all = Vec::new();
    let mut offsets = Vec::with_capacity(plans.len());
    for p in &plans {
        offsets.push(all.len());
        if let Ok(Plan::Accept(a)) = p {
            all.extend(a.entries.iter().cloned());
        }
    }
    let batch = if all.is_empty() {
        Ok(Vec::new())
    } else {
        append(cx, &all).await
    };
    let mut out = Vec::with_capacity(plans.len());
    for (p, off) in plans.into_iter().zip(offsets) {
        out.push(match p {
            Err(e) => Err(e),
            Ok(Plan::Done) => Ok(()),
            Ok(Plan::Direct(d)) => direct(cx, d).await,
            Ok(Plan::Accept(a)) => match &batch {
                Ok(ids) => {
                    let n = a.entries.len();
                    finish(cx, a, &ids[off..off + n]).await
                }
                // The batch is all-or-nothing (e.g. one recipient's account
                // was deleted meanwhile): fall back to one write each, so
                // only the affected message fails.
                Err(_) => match append(cx, &a.entries).await {
                    Ok(ids) => finish(cx, a, &ids).await,
                    Err(e) => Err(e),
                },
            },
        });
    }
    out
}

/// `to` is the message's parsed `to` (parsed once, by the caller).
async fn plan(cx: &Cx<'_>, msg: Element, to: Option<Jid>) -> Result<Plan, StanzaError> {
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
    let to = to.unwrap_or_else(|| Jid::from(cx.session.bare.clone()));
    let remote = if cx.state.serves(to.domain().as_str()) {
        None
    } else {
        let r = remote_for(cx.state, &to);
        Some(r.ok_or_else(|| StanzaError::new(Condition::RemoteServerNotFound))?)
    };
    if to.node().is_none() && remote.is_none() {
        // Messages to the server itself carry nothing we act on.
        return Ok(Plan::Done);
    }
    let offline = cx.state.modules.api::<dyn api::OfflineQueue>();
    if !offline.storable(&msg, &kind) || (remote.is_some() && to.node().is_none()) {
        return Ok(Plan::Direct(Box::new(Direct { to, msg, kind })));
    }
    let state = cx.state;
    let bare = to.bare();
    let full = to
        .try_as_full()
        .ok()
        .filter(|f| state.routing.session(f).is_some())
        .cloned();
    if remote.is_none() && full.is_none() && !offline.online(state, &bare) {
        // It would be queued: refuse early (before archiving) when it can't be.
        if state.store.credentials(bare.as_str()).await?.is_none() {
            return Err(StanzaError::new(Condition::ServiceUnavailable));
        }
        let limit = state.config.store.offline_limit;
        if state.store.offline_count(bare.as_str()).await? >= limit as u64 {
            return Err(offline.queue_full());
        }
    }
    let (entries, sent_ix, recv_ix) = match state.modules.try_api::<dyn api::Archive>() {
        Some(a) if a.archivable(&msg, &kind) => {
            a.entries(state, &cx.session.bare, &bare, &msg.to_xml())
                .await?
        }
        _ => (Vec::new(), None, None),
    };
    Ok(Plan::Accept(Box::new(Accept {
        remote,
        bare,
        full,
        msg,
        entries,
        sent_ix,
        recv_ix,
    })))
}

/// The durable write; ids in the order of `entries`.
async fn append(
    cx: &Cx<'_>,
    entries: &[natter_store::NewArchiveEntry],
) -> Result<Vec<String>, StanzaError> {
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    match cx.state.store.archive_append(entries).await {
        Ok(ids) => Ok(ids),
        // The recipient's account is gone.
        Err(natter_store::StoreError::NotFound) => {
            Err(StanzaError::new(Condition::ServiceUnavailable))
        }
        Err(e) => Err(e.into()),
    }
}

async fn direct(cx: &Cx<'_>, d: Box<Direct>) -> Result<(), StanzaError> {
    let Direct { to, msg, kind } = *d;
    let bare = to.bare();
    if let Some(r) = remote_for(cx.state, &to) {
        r.send(cx.state, &msg)?;
        return delivered(cx, &msg, None, &bare, false, None).await;
    }
    if let Ok(full) = to.try_as_full() {
        if let Some(h) = cx.state.routing.session(full) {
            h.send(msg.clone());
            return delivered(cx, &msg, None, &bare, true, Some(h.id)).await;
        }
        // RFC 6121 §8.5.3.2: resource gone.
        match kind.as_str() {
            "groupchat" => return Err(StanzaError::new(Condition::ServiceUnavailable)),
            "headline" | "error" => return Ok(()),
            _ => {}
        }
    }
    // Boxed: not in the future of every message that is archived.
    Box::pin(deliver_to_bare(cx, &bare, msg, &kind)).await
}

/// A message worth keeping, once its archive entries are written (`ids`,
/// in the order of its entries): deliver it or queue it offline; return
/// once all of that is durable.
async fn finish(cx: &Cx<'_>, mut a: Box<Accept>, ids: &[String]) -> Result<(), StanzaError> {
    let state = cx.state;
    let sender = &cx.session.bare;
    let limit = state.config.store.offline_limit;
    let archive_id = a.recv_ix.and_then(|i| ids.get(i)).map(String::as_str);
    if let Some(id) = archive_id {
        let stanza_id = vocab::stanza_id(id, &a.bare);
        a.msg.append_child(stanza_id);
    }
    let a = &*a;
    // XEP-0313 "Communicating the archive ID": the sender's id goes only to
    // the sender's own devices (in the sent carbon), never to the recipient.
    let sent_copy = a.sent_ix.and_then(|i| ids.get(i)).map(|id| SentCopy {
        delivered: &a.msg,
        recipient_id_by: archive_id.map(|_| &a.bare),
        stanza_id: id,
        by: sender,
    });
    if let Some(r) = &a.remote {
        // The sender's copy is durable; the remote server archives its own.
        r.send(state, &a.msg)?;
        return self::delivered(cx, &a.msg, sent_copy, &a.bare, false, None).await;
    }
    let offline = state.modules.api::<dyn api::OfflineQueue>();
    let got = offline
        .deliver(
            state,
            &a.bare,
            a.full.as_ref(),
            &a.msg,
            archive_id,
            limit,
            None,
        )
        .await?;
    let to_id = got.first().map(|h| h.id);
    self::delivered(cx, &a.msg, sent_copy, &a.bare, a.full.is_some(), to_id).await
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
        .routing
        .resources(bare)
        .into_iter()
        .filter(|h| h.is_available() && h.priority() >= 0)
        .collect();
    if !targets.is_empty() {
        for h in &targets {
            h.send(msg.clone());
        }
        return delivered(cx, &msg, None, bare, false, None).await;
    }
    if kind == "error" || kind == "headline" {
        return Ok(());
    }
    let exists = cx.state.store.credentials(bare.as_str()).await?.is_some();
    if exists && !vocab::has_content(&msg) {
        // Chat states alone are not worth an error (XEP-0160 §4).
        return Ok(());
    }
    Err(if exists {
        StanzaError::with_text(Condition::ServiceUnavailable, "recipient is offline")
    } else {
        StanzaError::new(Condition::ServiceUnavailable)
    })
}
