//! RFC 6121 §3–4: presence subscriptions and presence broadcast between
//! local accounts.
//!
//! - Subscriptions (§3, state tables in Appendix A): a `subscribe`,
//!   `subscribed`, `unsubscribe` or `unsubscribed` from a user is applied
//!   to the user's roster item (the *outbound* table), then, when the table
//!   says to route it, to the contact's item (the *inbound* table), with
//!   roster pushes on both sides and the stanza, stamped from the sender's
//!   bare JID, delivered to the contact's available resources. A request
//!   nobody saw stays `pending_in` and is delivered again with the
//!   contact's next initial presence. Pre-approvals (§3.4) are supported.
//! - Broadcast (§4.2–4.5): available presence goes to contacts whose
//!   subscription is `from`/`both` and to the user's own available
//!   resources; initial presence also fetches ("probes") the presence of
//!   every contact the user is subscribed to. Unavailable presence, or the
//!   session ending, goes to the same set plus every entity that got
//!   directed presence (§4.6).
//! - XEP-0115 `<c/>`, XEP-0153 `<x/>` and any other payload of a presence
//!   travel untouched.
//!
//! - Federation: a contact on another server gets the same stanzas through
//!   `api::Remote` (subscriptions stamped with the bare JID, broadcasts
//!   addressed to the contact's bare JID, probes sent from the user's bare
//!   JID at initial presence). What a remote server sends (`from_remote`)
//!   is applied to the *local* user's roster only, through the inbound
//!   tables; a remote probe is answered when the local user's roster says
//!   the prober is subscribed, else with `unsubscribed` (§4.3.2).
//!
//! Invariant: presence reaches only subscribers, the user's own resources,
//! or the addressee of a directed presence — never anyone else. A remote
//! sender's stanza changes only the addressed local user's item for that
//! sender, as RFC 6121 Appendix A.3 says.

use super::hooks::Hold;
use super::roster;
use super::vocab::priority;
use super::{
    api, parse_to, presence_allowed, presence_allowed_to, remote_for, Cx, Event, EventKind, Flow,
    Hook, HookStanza, Kind, Module,
};
use crate::error::{Condition, StanzaError};
use crate::router::SessionHandle;
use crate::state::ServerState;
use async_trait::async_trait;
use jid::{BareJid, Jid};
use natter_store::{RosterItem, Subscription};
use natter_xml::{Element, NS_CLIENT};
use std::collections::HashSet;
use std::sync::Arc;

pub const NS_PREAPPROVAL: &str = "urn:xmpp:features:pre-approval";

/// Most entities one session may hold directed presence with.
pub const MAX_DIRECTED: usize = 1000;

pub struct Presence;

#[async_trait]
impl Module for Presence {
    fn name(&self) -> &'static str {
        "presence"
    }
    // Roster and presence are one RFC (6121): they share subscription
    // handling and roster locks, so they call each other directly.
    fn depends(&self) -> &'static [&'static str] {
        &["roster"]
    }
    /// RFC 6121 §3.4: pre-approvals are supported.
    fn stream_features(&self) -> Vec<Element> {
        vec![Element::new("sub", NS_PREAPPROVAL)]
    }
    fn hooks(&self) -> &'static [(Hook, i32)] {
        &[(Hook::Route(Kind::Presence), 0)]
    }
    /// First at the end of a session: contacts see it go before other
    /// modules forget it.
    fn events(&self) -> &'static [(EventKind, i32)] {
        &[(EventKind::Closed, 100)]
    }
    async fn on_stanza(
        &self,
        _hook: Hook,
        cx: &Cx<'_>,
        s: &HookStanza<'_>,
    ) -> Result<Flow, StanzaError> {
        handle(cx, s.stanza.clone()).await?;
        Ok(Flow::Stop)
    }

    async fn on_event(
        &self,
        state: &ServerState,
        session: Option<&Arc<SessionHandle>>,
        event: &Event<'_>,
    ) {
        let (Event::Closed, Some(me)) = (event, session) else {
            return;
        };
        // Replaced by a new session under the same full JID that is already
        // online: contacts must not see that resource go away.
        let replaced = state
            .routing
            .session(&me.jid)
            .is_some_and(|h| h.id != me.id && h.is_available());
        let p = Element::new("presence", NS_CLIENT)
            .with_attr("from", me.jid.to_string())
            .with_attr("type", "unavailable");
        if let Err(e) = go_unavailable(state, me, p, false, !replaced).await {
            tracing::warn!(jid = %me.jid, error = ?e, "unavailable broadcast at logout failed");
        }
    }
}

/// The four subscription stanza types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sub {
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
}

impl Sub {
    pub fn parse(s: &str) -> Option<Sub> {
        Some(match s {
            "subscribe" => Sub::Subscribe,
            "subscribed" => Sub::Subscribed,
            "unsubscribe" => Sub::Unsubscribe,
            "unsubscribed" => Sub::Unsubscribed,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Sub::Subscribe => "subscribe",
            Sub::Subscribed => "subscribed",
            Sub::Unsubscribe => "unsubscribe",
            Sub::Unsubscribed => "unsubscribed",
        }
    }
}

/// A presence stanza from a bound session (`from` already stamped; the
/// pre-route hooks, blocking among them, let it through).
async fn handle(cx: &Cx<'_>, stanza: Element) -> Result<(), StanzaError> {
    let to = parse_to(&stanza)?;
    let own = &cx.session.bare;
    if !cx.state.serves(own.domain().as_str()) {
        return from_remote(cx.state, stanza, to).await;
    }
    match stanza.attr("type") {
        None | Some("unavailable") => {
            let available = stanza.attr("type").is_none();
            match to {
                // §4.2 / §4.4 / §4.5: broadcast (to one's own bare JID too).
                None => broadcast(cx, stanza, available).await,
                Some(t) if t.is_bare() && t.to_bare() == *own => {
                    broadcast(cx, stanza, available).await
                }
                // §4.6: directed presence.
                Some(t) => directed(cx, stanza, t, available).await,
            }
        }
        Some(t @ ("subscribe" | "subscribed" | "unsubscribe" | "unsubscribed")) => {
            let kind = Sub::parse(t).expect("matched above");
            let Some(to) = to else {
                return Err(StanzaError::with_text(
                    Condition::BadRequest,
                    "a subscription stanza needs a 'to'",
                ));
            };
            let contact = to.to_bare();
            if !cx.state.serves(contact.domain().as_str()) && !is_remote(cx.state, &contact) {
                return Err(StanzaError::new(Condition::RemoteServerNotFound));
            }
            if contact == *own {
                // One is implicitly subscribed to oneself; nothing to change.
                return Ok(());
            }
            outbound(cx.state, own, &contact, kind, &stanza).await
        }
        Some("probe") => match to {
            Some(to) => probe(cx, to).await,
            None => Err(StanzaError::with_text(
                Condition::BadRequest,
                "a probe needs a 'to'",
            )),
        },
        // RFC 6121 §4.7.1 / RFC 6120 §8.3: errors go back to the full JID
        // that caused them; anything else is dropped.
        Some("error") => {
            if let Some(Ok(full)) = to.map(Jid::try_into_full) {
                if let Some(h) = cx.state.routing.session(&full) {
                    h.send(stanza);
                } else if let Some(r) = remote_for(cx.state, &Jid::from(full)) {
                    r.send(cx.state, &stanza)?;
                }
            }
            Ok(())
        }
        Some(_) => Err(StanzaError::with_text(
            Condition::BadRequest,
            "unknown presence type",
        )),
    }
}

fn has_to(s: Subscription) -> bool {
    matches!(s, Subscription::To | Subscription::Both)
}

fn has_from(s: Subscription) -> bool {
    matches!(s, Subscription::From | Subscription::Both)
}

fn with_to(s: Subscription, on: bool) -> Subscription {
    match (has_from(s), on) {
        (true, true) => Subscription::Both,
        (true, false) => Subscription::From,
        (false, true) => Subscription::To,
        (false, false) => Subscription::None,
    }
}

fn with_from(s: Subscription, on: bool) -> Subscription {
    match (has_to(s), on) {
        (true, true) => Subscription::Both,
        (true, false) => Subscription::To,
        (false, true) => Subscription::From,
        (false, false) => Subscription::None,
    }
}

/// Resources of `bare` that sent initial presence.
fn available(state: &ServerState, bare: &BareJid) -> Vec<Arc<SessionHandle>> {
    state
        .routing
        .resources(bare)
        .into_iter()
        .filter(|h| h.is_available())
        .collect()
}

/// The last available presence of a session, if it is available.
fn current_presence(h: &SessionHandle) -> Option<Element> {
    h.available_presence()
}

/// Sessions to send one presence to, each once.
#[derive(Default)]
struct Targets {
    seen: HashSet<u64>,
    list: Vec<Arc<SessionHandle>>,
    /// Contacts on other servers (bare JIDs, or the full JID of a directed
    /// presence), each once.
    remote: Vec<Jid>,
}

impl Targets {
    fn add(&mut self, h: Arc<SessionHandle>) {
        if self.seen.insert(h.id) {
            self.list.push(h);
        }
    }

    fn add_available(&mut self, state: &ServerState, bare: &BareJid) {
        for h in available(state, bare) {
            self.add(h);
        }
    }

    fn add_remote(&mut self, jid: Jid) {
        if !self.remote.contains(&jid) {
            self.remote.push(jid);
        }
    }

    /// Subscribers (`from`/`both`) of a roster, here or on other servers.
    fn add_subscribers(&mut self, state: &ServerState, roster: &[RosterItem]) {
        for item in roster.iter().filter(|i| has_from(i.subscription)) {
            if let Ok(b) = BareJid::new(&item.jid) {
                if is_remote(state, &b) {
                    self.add_remote(Jid::from(b));
                } else {
                    self.add_available(state, &b);
                }
            }
        }
    }

    /// Send `p` to every target, addressed to its full JID (XEP-0191:
    /// except where blocking stands between sender and target).
    async fn send(&self, state: &ServerState, p: &Element) {
        let from = p.attr("from").and_then(|f| Jid::new(f).ok());
        for h in &self.list {
            if let Some(f) = &from {
                if !presence_allowed(state, f, h).await {
                    continue;
                }
            }
            let mut p = p.clone();
            p.set_attr("to", h.jid.to_string());
            h.send(p);
        }
        for to in &self.remote {
            if let Some(f) = &from {
                if !presence_allowed_to(state, f, to).await {
                    continue;
                }
            }
            let mut p = p.clone();
            p.set_attr("to", to.to_string());
            send_remote(state, &p);
        }
    }
}

/// Whether `jid` is on another server that federation can reach.
fn is_remote(state: &ServerState, jid: &BareJid) -> bool {
    remote_for(state, &Jid::from(jid.clone())).is_some()
}

/// `<presence type=kind/>` from/to, built by the server.
fn typed(from: &str, to: &str, kind: &str) -> Element {
    Element::new("presence", NS_CLIENT)
        .with_attr("from", from)
        .with_attr("to", to)
        .with_attr("type", kind)
}

/// Presence to another server (its `to` decides which). Best effort: a
/// refused stanza is logged, and an unreachable server bounces it later.
fn send_remote(state: &ServerState, p: &Element) {
    let Some(to) = p.attr("to").and_then(|t| Jid::new(t).ok()) else {
        return;
    };
    if let Some(r) = remote_for(state, &to) {
        if let Err(e) = r.send(state, p) {
            tracing::debug!(%to, error = ?e, "presence to a remote server refused");
        }
    }
}

/// RFC 6121 §4.2 (initial presence), §4.4 (updates), §4.5 (unavailable).
async fn broadcast(cx: &Cx<'_>, mut p: Element, available: bool) -> Result<(), StanzaError> {
    p.remove_attr("to");
    let me = cx.session;
    let state = cx.state;
    if !available {
        return go_unavailable(state, me, p, true, true).await;
    }
    // Listeners (the offline queue) act before the broadcast and may hold
    // a guard until it is done.
    let hold = Hold::default();
    if me.offline_for_messages() {
        let ev = Event::ComingOnline {
            presence: &p,
            hold: &hold,
        };
        state.modules.emit(state, Some(me), &ev).await;
    }
    let initial = me.set_available(priority(&p), p.clone());
    let (_, items) = state.store.roster(me.bare.as_str()).await?;
    let mut targets = Targets::default();
    targets.add_subscribers(state, &items);
    // §4.2.2: one is implicitly subscribed to oneself, this resource included.
    targets.add_available(state, &me.bare);
    targets.send(state, &p).await;
    // XEP-0163: learn the resource's caps, send it the last PEP items.
    let ev = Event::Available {
        presence: &p,
        initial,
    };
    state.modules.emit(state, Some(me), &ev).await;
    if !initial {
        return Ok(());
    }
    // §4.2.2 / §4.3: the presence of everyone the user is subscribed to.
    // They are local, so the server answers the probes itself.
    let deliver = |from: &SessionHandle| {
        if let Some(mut pres) = current_presence(from) {
            pres.set_attr("to", me.jid.to_string());
            me.send(pres);
        }
    };
    for item in items.iter().filter(|i| has_to(i.subscription)) {
        if let Ok(contact) = BareJid::new(&item.jid) {
            if is_remote(state, &contact) {
                // §4.3.1: their server answers, to the user's bare JID.
                send_remote(state, &typed(me.bare.as_str(), contact.as_str(), "probe"));
                continue;
            }
            for h in state.routing.resources(&contact) {
                if presence_allowed(state, &Jid::from(h.jid.clone()), me).await {
                    deliver(&h);
                }
            }
        }
    }
    // ... and of the user's other resources.
    for h in state.routing.resources(&me.bare) {
        if h.id != me.id {
            deliver(&h);
        }
    }
    // §3.1.3: subscription requests that arrived while nobody was online.
    for item in items.iter().filter(|i| i.pending_in) {
        me.send(typed(&item.jid, me.bare.as_str(), "subscribe"));
    }
    Ok(())
}

/// Mark `me` unavailable and send `p` (type unavailable) to subscribers and
/// own resources (when it was available and `to_contacts`; itself only if
/// `include_self`) and to every entity that got directed presence.
async fn go_unavailable(
    state: &ServerState,
    me: &Arc<SessionHandle>,
    mut p: Element,
    include_self: bool,
    to_contacts: bool,
) -> Result<(), StanzaError> {
    p.remove_attr("to");
    let (was_available, directed) = me.set_unavailable();
    let mut targets = Targets::default();
    if was_available && to_contacts {
        let (_, items) = state.store.roster(me.bare.as_str()).await?;
        targets.add_subscribers(state, &items);
        targets.add_available(state, &me.bare);
        if include_self {
            targets.add(me.clone());
        }
    }
    if was_available {
        // XEP-0012: last seen = now, with this presence's status.
        let ev = Event::Unavailable { presence: &p };
        state.modules.emit(state, Some(me), &ev).await;
    }
    for d in directed {
        match Jid::new(&d).map(Jid::try_into_full) {
            Ok(Ok(full)) if is_remote(state, &full.to_bare()) => targets.add_remote(full.into()),
            Ok(Err(bare)) if is_remote(state, &bare) => targets.add_remote(bare.into()),
            Ok(Ok(full)) => {
                if let Some(h) = state.routing.session(&full) {
                    targets.add(h);
                }
            }
            Ok(Err(bare)) => targets.add_available(state, &bare),
            Err(_) => {}
        }
    }
    targets.send(state, &p).await;
    Ok(())
}

/// RFC 6121 §4.6: presence to one entity, remembered so it gets
/// unavailable when the user goes offline.
async fn directed(cx: &Cx<'_>, p: Element, to: Jid, online: bool) -> Result<(), StanzaError> {
    let state = cx.state;
    let remote = remote_for(state, &to);
    if !state.serves(to.domain().as_str()) && remote.is_none() {
        return Err(StanzaError::new(Condition::RemoteServerNotFound));
    }
    if to.node().is_none() && remote.is_none() {
        // Presence for the server itself: nothing here acts on it.
        return Ok(());
    }
    let me = cx.session;
    let bare = to.to_bare();
    let key = to.to_string();
    if online {
        // Subscribers and own resources get broadcasts anyway.
        let broadcast_anyway = bare == me.bare
            || state
                .store
                .roster_item(me.bare.as_str(), bare.as_str())
                .await?
                .is_some_and(|i| has_from(i.subscription));
        if !broadcast_anyway && me.add_directed(key, MAX_DIRECTED).is_err() {
            return Err(StanzaError::with_text(
                Condition::ResourceConstraint,
                "too many directed presences",
            ));
        }
    } else {
        me.remove_directed(&key);
    }
    if let Some(r) = remote {
        return r.send(state, &p);
    }
    // RFC 6121 §8.5.2.1.1 / §8.5.3.1: bare → every available resource,
    // full → that resource; an unknown account or resource drops it.
    match to.try_as_full() {
        Ok(full) => {
            if let Some(h) = state.routing.session(full) {
                h.send(p);
            }
        }
        Err(bare) => {
            for h in available(state, bare) {
                h.send(p.clone());
            }
        }
    }
    Ok(())
}

/// RFC 6121 §4.3: a probe from a client. Answered only when the prober is
/// subscribed to the contact (or probes itself); otherwise nothing leaks.
async fn probe(cx: &Cx<'_>, to: Jid) -> Result<(), StanzaError> {
    let state = cx.state;
    if !state.serves(to.domain().as_str()) {
        // The contact's server decides what to answer.
        return match remote_for(state, &to) {
            Some(r) => {
                let p = typed(cx.session.bare.as_str(), to.as_str(), "probe");
                r.send(state, &p)
            }
            None => Err(StanzaError::new(Condition::RemoteServerNotFound)),
        };
    }
    let contact = to.to_bare();
    if contact.node().is_none() {
        return Ok(());
    }
    let me = cx.session;
    let subscribed = contact == me.bare
        || state
            .store
            .roster_item(contact.as_str(), me.bare.as_str())
            .await?
            .is_some_and(|i| has_from(i.subscription));
    if !subscribed {
        return Ok(());
    }
    let sessions = match to.try_as_full() {
        Ok(full) => state.routing.session(full).into_iter().collect(),
        Err(_) => state.routing.resources(&contact),
    };
    let mut sent = false;
    for h in sessions {
        if let Some(mut p) = current_presence(&h) {
            p.set_attr("to", me.jid.to_string());
            me.send(p);
            sent = true;
        }
    }
    if !sent {
        me.send(typed(to.as_str(), me.jid.as_str(), "unavailable"));
    }
    Ok(())
}

/// Current presence of each available resource of `from` to each
/// available resource of `to` (a new subscriber, §3.1.5).
pub(crate) fn send_presences(state: &ServerState, from: &BareJid, to: &BareJid) {
    // XEP-0163 §4.3.1: the new subscriber also gets `from`'s last PEP items.
    if let Some(pep) = state.modules.try_api::<dyn api::Pep>() {
        pep.new_subscriber(state, from, to);
    }
    if is_remote(state, to) {
        for h in state.routing.resources(from) {
            if let Some(mut p) = current_presence(&h) {
                p.set_attr("to", to.to_string());
                send_remote(state, &p);
            }
        }
        return;
    }
    let recipients = available(state, to);
    for h in state.routing.resources(from) {
        if let Some(p) = current_presence(&h) {
            for r in &recipients {
                let mut p = p.clone();
                p.set_attr("to", r.jid.to_string());
                r.send(p);
            }
        }
    }
}

/// Unavailable from each available resource of `from` to each available
/// resource of `to` (a subscription ending, §3.2.2 / §3.3.3).
pub(crate) fn send_unavailable(state: &ServerState, from: &BareJid, to: &BareJid) {
    if is_remote(state, to) {
        for h in available(state, from) {
            send_remote(state, &typed(h.jid.as_str(), to.as_str(), "unavailable"));
        }
        return;
    }
    let recipients = available(state, to);
    for h in available(state, from) {
        for r in &recipients {
            r.send(typed(h.jid.as_str(), r.jid.as_str(), "unavailable"));
        }
    }
}

/// A subscription stanza as routed: the client's payload (status, nick…)
/// kept, from/to the bare JIDs (§3.1.2: stamped with the bare JID).
fn subscription_stanza(
    original: Option<&Element>,
    from: &BareJid,
    to: &BareJid,
    kind: Sub,
) -> Element {
    let mut p = original
        .cloned()
        .unwrap_or_else(|| Element::new("presence", NS_CLIENT));
    p.set_attr("from", from.to_string());
    p.set_attr("to", to.to_string());
    p.set_attr("type", kind.as_str());
    p
}

/// `user` sent a subscription stanza to `contact` (both local domains):
/// RFC 6121 Appendix A.2 on the user's side, then routing.
async fn outbound(
    state: &ServerState,
    user: &BareJid,
    contact: &BareJid,
    kind: Sub,
    original: &Element,
) -> Result<(), StanzaError> {
    let _guard = roster::lock(state, &[user, contact]).await;
    let old = state
        .store
        .roster_item(user.as_str(), contact.as_str())
        .await?;
    let mut item = old
        .clone()
        .unwrap_or_else(|| RosterItem::new(contact.as_str()));
    let route = match kind {
        // A.2.1: always routed; the contact's server auto-replies when the
        // subscription already exists.
        Sub::Subscribe => {
            if !has_to(item.subscription) {
                item.ask = true;
            }
            true
        }
        // A.2.3 / §3.4: approve a pending request, or pre-approve.
        Sub::Subscribed => {
            if item.pending_in {
                item.pending_in = false;
                item.approved = false;
                item.subscription = with_from(item.subscription, true);
                true
            } else if has_from(item.subscription) {
                false
            } else {
                item.approved = true;
                false
            }
        }
        // A.2.2.
        Sub::Unsubscribe => {
            item.ask = false;
            item.subscription = with_to(item.subscription, false);
            true
        }
        // A.2.4: deny a request, cancel a subscription or a pre-approval.
        Sub::Unsubscribed => {
            let from = has_from(item.subscription);
            let route = from || item.pending_in;
            item.pending_in = false;
            item.approved = false;
            item.subscription = with_from(item.subscription, false);
            if from {
                // §3.2.2: while the contact is still subscribed.
                send_unavailable(state, user, contact);
            }
            route
        }
    };
    roster::commit(state, user, old.as_ref(), item, false).await?;
    if route {
        route_locked(state, user, contact, kind, Some(original)).await?;
        if kind == Sub::Subscribed {
            // §3.1.5: the new subscriber gets the user's presence.
            send_presences(state, user, contact);
        }
    }
    Ok(())
}

/// What the contact's server does back after an inbound stanza.
enum Reply {
    /// Auto-reply `subscribed` and send the contact's presence (§3.1.3
    /// already subscribed, §3.4 pre-approved).
    Subscribed,
    /// Auto-reply `unsubscribed` (no such account).
    Unsubscribed,
    /// Unavailable from the contact's resources (§3.3.3).
    Unavailable,
}

/// Deliver a subscription stanza from `from` to `to` and apply it to
/// `to`'s roster (RFC 6121 Appendix A.3), with the automatic replies; a
/// party on another server gets its stanza through federation instead. The
/// caller holds the roster lock for the local parties.
pub(crate) async fn route_locked(
    state: &ServerState,
    from: &BareJid,
    to: &BareJid,
    kind: Sub,
    original: Option<&Element>,
) -> Result<(), StanzaError> {
    let stanza = subscription_stanza(original, from, to, kind);
    let reply = inbound_or_remote(state, to, from, kind, stanza).await?;
    match reply {
        None => {}
        Some(Reply::Subscribed) => {
            let back = subscription_stanza(None, to, from, Sub::Subscribed);
            inbound_or_remote(state, from, to, Sub::Subscribed, back).await?;
            send_presences(state, to, from);
        }
        Some(Reply::Unsubscribed) => {
            let back = subscription_stanza(None, to, from, Sub::Unsubscribed);
            inbound_or_remote(state, from, to, Sub::Unsubscribed, back).await?;
        }
        Some(Reply::Unavailable) => send_unavailable(state, to, from),
    }
    Ok(())
}

/// `inbound` for a local `owner`; for a remote one, the stanza goes to its
/// server, which applies its own tables (and replies on its own).
async fn inbound_or_remote(
    state: &ServerState,
    owner: &BareJid,
    peer: &BareJid,
    kind: Sub,
    stanza: Element,
) -> Result<Option<Reply>, StanzaError> {
    match remote_for(state, &Jid::from(owner.clone())) {
        Some(r) => r.send(state, &stanza).map(|()| None),
        None => inbound(state, owner, peer, kind, stanza).await,
    }
}

/// A presence stanza a remote server sent (`from` in the domain its stream
/// authenticated, `to` a domain served here): only the addressed local
/// user's roster item for the sender may change, by the inbound tables.
async fn from_remote(
    state: &ServerState,
    stanza: Element,
    to: Option<Jid>,
) -> Result<(), StanzaError> {
    let from = stanza
        .attr("from")
        .and_then(|f| Jid::new(f).ok())
        .ok_or_else(|| StanzaError::new(Condition::JidMalformed))?;
    let Some(to) = to else {
        return Err(StanzaError::with_text(
            Condition::BadRequest,
            "presence between servers needs a 'to'",
        ));
    };
    let user = to.to_bare();
    match stanza.attr("type") {
        // §4.2.3 / §4.6.3: broadcast or directed presence for the user.
        None | Some("unavailable") | Some("error") => {
            if user.node().is_none() {
                return Ok(());
            }
            let targets = match to.try_as_full() {
                Ok(full) => state.routing.session(full).into_iter().collect(),
                // An error goes only to the resource that caused it.
                Err(_) if stanza.attr("type") == Some("error") => Vec::new(),
                Err(bare) => available(state, bare),
            };
            for h in targets {
                if presence_allowed(state, &from, &h).await {
                    h.send(stanza.clone());
                }
            }
            Ok(())
        }
        Some(t @ ("subscribe" | "subscribed" | "unsubscribe" | "unsubscribed")) => {
            let kind = Sub::parse(t).expect("matched above");
            let contact = from.to_bare();
            let _guard = roster::lock(state, &[&user]).await;
            route_locked(state, &contact, &user, kind, Some(&stanza)).await
        }
        Some("probe") => remote_probe(state, &from, &user).await,
        Some(_) => Err(StanzaError::with_text(
            Condition::BadRequest,
            "unknown presence type",
        )),
    }
}

/// §4.3.2: a probe from `prober`'s server. Answered with the user's current
/// presence (or unavailable) when the user's roster has the prober
/// subscribed; otherwise `unsubscribed`, and nothing about the user leaks.
async fn remote_probe(
    state: &ServerState,
    prober: &Jid,
    user: &BareJid,
) -> Result<(), StanzaError> {
    if user.node().is_none() {
        return Ok(());
    }
    let peer = prober.to_bare();
    let item = match state.store.credentials(user.as_str()).await? {
        Some(_) => {
            state
                .store
                .roster_item(user.as_str(), peer.as_str())
                .await?
        }
        None => None,
    };
    let reply = |kind: &str| typed(user.as_str(), prober.as_str(), kind);
    match item {
        Some(i) if has_from(i.subscription) => {}
        // A request waits for the user's answer: say nothing yet.
        Some(i) if i.pending_in => return Ok(()),
        _ => {
            send_remote(state, &reply("unsubscribed"));
            return Ok(());
        }
    }
    let mut sent = false;
    for h in state.routing.resources(user) {
        if let Some(mut p) = current_presence(&h) {
            if presence_allowed_to(state, &Jid::from(h.jid.clone()), prober).await {
                p.set_attr("to", prober.to_string());
                send_remote(state, &p);
                sent = true;
            }
        }
    }
    if !sent {
        send_remote(state, &reply("unavailable"));
    }
    Ok(())
}

/// The inbound tables (A.3) on `owner`'s item for `peer`. Replies come back
/// only for `subscribe` and `unsubscribe`, so this never recurses.
async fn inbound(
    state: &ServerState,
    owner: &BareJid,
    peer: &BareJid,
    kind: Sub,
    stanza: Element,
) -> Result<Option<Reply>, StanzaError> {
    if !state.serves(owner.domain().as_str()) {
        return Ok(None);
    }
    // §3.1.3 / §8.5.1: no such account.
    if owner.node().is_none() || state.store.credentials(owner.as_str()).await?.is_none() {
        return Ok((kind == Sub::Subscribe).then_some(Reply::Unsubscribed));
    }
    let old = state
        .store
        .roster_item(owner.as_str(), peer.as_str())
        .await?;
    let mut item = old
        .clone()
        .unwrap_or_else(|| RosterItem::new(peer.as_str()));
    let mut deliver = false;
    let mut reply = None;
    match kind {
        // A.3.1.
        Sub::Subscribe => {
            if has_from(item.subscription) {
                reply = Some(Reply::Subscribed);
            } else if item.approved {
                // §3.4: pre-approved.
                item.approved = false;
                item.pending_in = false;
                item.subscription = with_from(item.subscription, true);
                reply = Some(Reply::Subscribed);
            } else if !item.pending_in {
                item.pending_in = true;
                deliver = true;
            }
        }
        // A.3.3.
        Sub::Subscribed => {
            if item.ask {
                item.ask = false;
                item.subscription = with_to(item.subscription, true);
                deliver = true;
            }
        }
        // A.3.2.
        Sub::Unsubscribe => {
            let from = has_from(item.subscription);
            deliver = from || item.pending_in;
            item.pending_in = false;
            item.subscription = with_from(item.subscription, false);
            if from {
                reply = Some(Reply::Unavailable);
            }
        }
        // A.3.4.
        Sub::Unsubscribed => {
            deliver = item.ask || has_to(item.subscription);
            item.ask = false;
            item.subscription = with_to(item.subscription, false);
        }
    }
    roster::commit(state, owner, old.as_ref(), item, false).await?;
    if deliver {
        for h in available(state, owner) {
            h.send(stanza.clone());
        }
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_priority(p: &str) -> Element {
        Element::new("presence", NS_CLIENT)
            .with_child(Element::new("priority", NS_CLIENT).with_text(p))
    }

    #[test]
    fn priority_is_clamped_and_garbage_is_zero() {
        assert_eq!(priority(&Element::new("presence", NS_CLIENT)), 0);
        assert_eq!(priority(&with_priority(" 5 ")), 5);
        assert_eq!(priority(&with_priority("-128")), -128);
        assert_eq!(priority(&with_priority("1000")), 127);
        assert_eq!(priority(&with_priority("-1000")), -128);
        assert_eq!(priority(&with_priority("high")), 0);
    }

    #[test]
    fn subscription_directions_combine() {
        use Subscription::*;
        assert_eq!(with_to(None, true), To);
        assert_eq!(with_to(From, true), Both);
        assert_eq!(with_to(Both, false), From);
        assert_eq!(with_from(To, true), Both);
        assert_eq!(with_from(Both, false), To);
        assert_eq!(with_from(From, false), None);
    }
}
