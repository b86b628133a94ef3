//! XEP-0191 Blocking Command (1.3): a user's block list, synced to every
//! resource that fetched it, and enforced on every stanza between accounts.
//!
//! - `<blocklist/>` get, `<block/>` (one or more items) and `<unblock/>`
//!   (items, or none = everything) sets; each change is pushed to every
//!   resource of the user that fetched the list (§3.3–3.5), the requesting
//!   one included.
//! - Items match like XEP-0016 §2.1: `user@domain/res` only that resource,
//!   `user@domain` any of its resources, `domain/res` only that JID,
//!   `domain` the domain and every JID at it.
//! - Inbound (from a blocked JID to the blocker): presence is dropped
//!   silently, messages and IQ get/set get `service-unavailable` (the
//!   blocker looks offline), IQ results/errors are dropped.
//! - Outbound (from the blocker to a blocked JID): messages and IQ get/set
//!   get `not-acceptable` + `<blocked xmlns='urn:xmpp:blocking:errors'/>`,
//!   presence is dropped.
//! - On block, each available resource of the blocker sends unavailable to
//!   the blocked contact's resources (when the contact may see the
//!   blocker's presence), and the contact's resources go unavailable for
//!   the blocker; on unblock, current presence is sent again both ways
//!   where subscriptions allow.
//!
//! The checks run on every stanza, so each user's list is cached in memory
//! (loaded on first use, replaced on every change under one writer lock so
//! the cache never goes stale). A store error while loading fails closed:
//! the stanza is treated as blocked.
//!
//! Invariant: an account never blocks itself: stanzas within one bare JID
//! are never filtered, whatever the list says (a user may block their own
//! domain).

use super::cache::UserCache;
use super::{
    api, Cx, Event, EventKind, Flow, Hook, HookStanza, Iq, IqResult, IqType, Kind, Module, Shared,
};
use crate::error::{Condition, StanzaError};
use crate::jids::Bare;
use crate::router::SessionHandle;
use crate::state::ServerState;
use async_trait::async_trait;
use jid::{BareJid, Jid};
use natter_store::Subscription;
use natter_xml::{Element, NS_CLIENT};
use parking_lot::Mutex;
use std::collections::HashSet;
use std::sync::Arc;

pub const NS: &str = "urn:xmpp:blocking";
pub const NS_ERRORS: &str = "urn:xmpp:blocking:errors";

/// Most JIDs one block list may hold.
pub const MAX_ITEMS: usize = 1000;

#[derive(Default)]
pub struct Blocking {
    /// Each user's list, parsed.
    lists: UserCache<Vec<Jid>>,
    /// Sessions (by id) that fetched their list and so get pushes.
    interested: Mutex<HashSet<u64>>,
    /// Serializes block/unblock so the cache always ends up with the
    /// store's latest list.
    write: tokio::sync::Mutex<()>,
}

#[async_trait]
impl Module for Blocking {
    fn name(&self) -> &'static str {
        "blocking"
    }
    fn features(&self) -> &'static [&'static str] {
        &[NS]
    }
    /// Before anything else routes a stanza: nothing passes between a
    /// blocker and a blocked JID.
    fn hooks(&self) -> &'static [(Hook, i32)] {
        &[
            (Hook::PreRoute(Kind::Message), 100),
            (Hook::PreRoute(Kind::Presence), 100),
            (Hook::PreRoute(Kind::Iq), 100),
        ]
    }
    fn events(&self) -> &'static [(EventKind, i32)] {
        &[(EventKind::Closed, 0), (EventKind::StoredDataChanged, 0)]
    }
    fn provide(self: Arc<Self>, shared: &mut Shared) {
        shared.provide::<Blocking>(self.clone());
        shared.provide::<dyn api::Blocklist>(self);
    }
    async fn on_stanza(
        &self,
        _hook: Hook,
        cx: &Cx<'_>,
        s: &HookStanza<'_>,
    ) -> Result<Flow, StanzaError> {
        match s.to {
            Some(to) if gate(cx, s.stanza, to).await? => Ok(Flow::Stop),
            _ => Ok(Flow::Continue),
        }
    }
    async fn on_event(
        &self,
        state: &ServerState,
        session: Option<&Arc<SessionHandle>>,
        event: &Event<'_>,
    ) {
        match (event, session) {
            (Event::Closed, Some(h)) => {
                self.interested.lock().remove(&h.id);
                self.lists
                    .forget_unless_online(&*state.routing, &h.bare, h.id);
            }
            (Event::StoredDataChanged { user, module }, _) if *module == self.name() => {
                self.lists.forget(user);
            }
            _ => {}
        }
    }
    fn iq_payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[(NS, "blocklist"), (NS, "block"), (NS, "unblock")]
    }
    async fn handle_iq(&self, cx: &Cx<'_>, iq: &Iq) -> IqResult {
        if !iq.is_own_account() {
            return Err(StanzaError::new(Condition::Forbidden));
        }
        let p = iq.payload();
        match (iq.kind, p.name.as_str()) {
            (IqType::Get, "blocklist") => {
                let list = list(cx.state, &cx.session.bare).await?;
                self.interested.lock().insert(cx.session.id);
                let mut el = Element::new("blocklist", NS);
                for j in list.iter() {
                    el.append_child(Element::new("item", NS).with_attr("jid", j.to_string()));
                }
                Ok(Some(el))
            }
            (IqType::Set, "block") => self.block(cx, p).await.map(|()| None),
            (IqType::Set, "unblock") => self.unblock(cx, p).await.map(|()| None),
            _ => Err(StanzaError::new(Condition::BadRequest)),
        }
    }
}

#[async_trait]
impl api::Blocklist for Blocking {
    async fn presence_allowed(&self, state: &ServerState, from: &Jid, to: &SessionHandle) -> bool {
        presence_allowed(state, from, to).await
    }
    async fn allowed(&self, state: &ServerState, from: &Jid, to: &Jid) -> bool {
        check(state, from, to).await.is_none()
    }
}

/// The JIDs of a block/unblock request (normalized, deduplicated).
fn items(p: &Element) -> Result<Vec<Jid>, StanzaError> {
    let mut out: Vec<Jid> = Vec::new();
    for it in p.children().filter(|c| c.is("item", NS)) {
        let j = it
            .attr("jid")
            .ok_or_else(|| StanzaError::with_text(Condition::BadRequest, "item without jid"))?;
        let j = Jid::new(j).map_err(|_| StanzaError::new(Condition::JidMalformed))?;
        if !out.contains(&j) {
            out.push(j);
        }
    }
    Ok(out)
}

impl Blocking {
    async fn block(&self, cx: &Cx<'_>, p: &Element) -> Result<(), StanzaError> {
        let jids = items(p)?;
        if jids.is_empty() {
            return Err(StanzaError::with_text(
                Condition::BadRequest,
                "block needs at least one item",
            ));
        }
        let user = &cx.session.bare;
        let state = cx.state;
        let newly: Vec<Jid> = {
            let _w = self.write.lock().await;
            let before = list(state, user).await?;
            let newly: Vec<Jid> = jids
                .iter()
                .filter(|j| !before.contains(j))
                .cloned()
                .collect();
            if before.len() + newly.len() > MAX_ITEMS {
                return Err(StanzaError::with_text(
                    Condition::ResourceConstraint,
                    "block list full",
                ));
            }
            let strings: Vec<String> = jids.iter().map(|j| j.to_string()).collect();
            state.store.block(user.as_str(), &strings).await?;
            self.reload(state, user).await?;
            newly
        };
        self.push(cx, p.clone());
        // §3.3: the blocked contacts see the user go offline (and the user
        // sees them go offline: no later presence will get through).
        for j in &newly {
            presence_cut(state, user, j).await;
        }
        Ok(())
    }

    async fn unblock(&self, cx: &Cx<'_>, p: &Element) -> Result<(), StanzaError> {
        let jids = items(p)?;
        let user = &cx.session.bare;
        let state = cx.state;
        let removed: Vec<Jid> = {
            let _w = self.write.lock().await;
            let before = list(state, user).await?;
            let removed: Vec<Jid> = if jids.is_empty() {
                state.store.unblock(user.as_str(), None).await?;
                before.to_vec()
            } else {
                let strings: Vec<String> = jids.iter().map(|j| j.to_string()).collect();
                state.store.unblock(user.as_str(), Some(&strings)).await?;
                jids.into_iter().filter(|j| before.contains(j)).collect()
            };
            let after = self.reload(state, user).await?;
            // Only JIDs nothing else in the list still blocks come back.
            removed
                .into_iter()
                .filter(|j| !after.iter().any(|b| matches(b, j)))
                .collect()
        };
        self.push(cx, p.clone());
        // §3.4: the user's current presence goes to the contact again.
        for j in &removed {
            presence_restore(state, user, j).await;
        }
        Ok(())
    }

    /// Replace the cached list with the store's.
    async fn reload(
        &self,
        state: &ServerState,
        user: &BareJid,
    ) -> Result<Arc<Vec<Jid>>, StanzaError> {
        let fresh = Arc::new(load(state, user).await?);
        self.lists.set(user, fresh.clone());
        super::cluster::stored_data_changed(state, self.name(), user).await;
        Ok(fresh)
    }

    /// §3.3–3.5: the change to every resource that fetched the list.
    fn push(&self, cx: &Cx<'_>, payload: Element) {
        let interested = self.interested.lock().clone();
        for h in cx.state.routing.resources(&cx.session.bare) {
            if !interested.contains(&h.id) {
                continue;
            }
            h.send(
                Element::new("iq", NS_CLIENT)
                    .with_attr("type", "set")
                    .with_attr("id", format!("block-{}", super::new_id()))
                    .with_attr("to", h.jid.to_string())
                    .with_child(payload.clone()),
            );
        }
    }
}

async fn load(state: &ServerState, user: &BareJid) -> Result<Vec<Jid>, StanzaError> {
    Ok(state
        .store
        .blocklist(user.as_str())
        .await?
        .iter()
        .filter_map(|s| Jid::new(s).ok())
        .collect())
}

/// `user`'s block list, from the cache or loaded into it.
pub async fn list(state: &ServerState, user: &BareJid) -> Result<Arc<Vec<Jid>>, StanzaError> {
    let b = state.modules.api::<Blocking>();
    if let Some(l) = b.lists.get(user) {
        return Ok(l);
    }
    let pending = b.lists.load(user);
    let loaded = Arc::new(load(state, user).await?);
    // A block/unblock that raced this load has put the newer list in (or
    // it was dropped since): the old one read here is not cached.
    Ok(pending.fill(&*state.routing, loaded))
}

/// XEP-0016 §2.1 matching of one block-list item against an entity.
pub fn matches(item: &Jid, entity: &Jid) -> bool {
    match (item.node().is_some(), item.resource().is_some()) {
        (true, true) => item == entity,
        (true, false) => item.node() == entity.node() && item.domain() == entity.domain(),
        (false, true) => entity.node().is_none() && item == entity,
        (false, false) => item.domain() == entity.domain(),
    }
}

/// Whether `owner` (a local account) blocks `entity`. Fails closed.
pub async fn blocks(state: &ServerState, owner: &BareJid, entity: &Jid) -> bool {
    blocks_or_unreadable(state, owner, entity).await != Some(false)
}

/// Whether `owner` blocks `entity`; None when the list cannot be read
/// (the store is down), which callers treat as blocked — nothing slips
/// past a block list that could not be checked.
async fn blocks_or_unreadable(state: &ServerState, owner: &BareJid, entity: &Jid) -> Option<bool> {
    if owner.node().is_none() || same_account(entity, owner) {
        return Some(false);
    }
    list(state, owner)
        .await
        .ok()
        .map(|l| l.iter().any(|i| matches(i, entity)))
}

/// Whether `a` and `b` are the same account (or both the same domain),
/// whatever their resources. Compared part by part: `Jid::to_bare` formats
/// a new JID, and this runs for every stanza.
fn same_account(a: &Jid, b: &Jid) -> bool {
    a.node() == b.node() && a.domain() == b.domain()
}

/// Which side of a stanza from `from` to `to` blocks the other, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blocked {
    /// The sender blocked the recipient (outbound, XEP-0191 §3.3 last ¶).
    BySender,
    /// The recipient blocked the sender (inbound).
    ByRecipient,
    /// A block list could not be read (the store is down): held back.
    Unreadable,
}

/// The blocking relation for a stanza between two JIDs of this server.
pub async fn check(state: &ServerState, from: &Jid, to: &Jid) -> Option<Blocked> {
    // The server itself is never blocked (a user may block their own domain).
    let server = |j: &Jid| j.node().is_none() && state.serves(j.domain().as_str());
    if same_account(from, to) || server(from) || server(to) {
        return None;
    }
    if from.node().is_some() {
        match blocks_or_unreadable(state, &from.bare(), to).await {
            Some(true) => return Some(Blocked::BySender),
            None => return Some(Blocked::Unreadable),
            Some(false) => {}
        }
    }
    if to.node().is_some() && state.serves(to.domain().as_str()) {
        match blocks_or_unreadable(state, &to.bare(), from).await {
            Some(true) => return Some(Blocked::ByRecipient),
            None => return Some(Blocked::Unreadable),
            Some(false) => {}
        }
    }
    None
}

/// The error for a message or IQ get/set that blocking stops.
pub fn error(b: Blocked) -> StanzaError {
    match b {
        Blocked::BySender => {
            StanzaError::new(Condition::NotAcceptable).with_app("blocked", NS_ERRORS)
        }
        Blocked::ByRecipient => StanzaError::new(Condition::ServiceUnavailable),
        Blocked::Unreadable => StanzaError::with_text(
            Condition::InternalServerError,
            "the block list could not be read; retry later",
        )
        .with_type(crate::error::ErrorType::Wait),
    }
}

/// Gate for a message, IQ or addressed presence from a session: Err when it
/// must not be routed (Ok(true) = drop silently, Ok(false) = go on).
async fn gate(cx: &Cx<'_>, stanza: &Element, to: &Jid) -> Result<bool, StanzaError> {
    let from = Jid::from(cx.session.jid.clone());
    let Some(b) = check(cx.state, &from, to).await else {
        return Ok(false);
    };
    // §3.3: presence, IQ results and errors vanish; the rest gets an error.
    let silent = match stanza.name.as_str() {
        "presence" => true,
        "iq" => matches!(stanza.attr("type"), Some("result") | Some("error")),
        _ => stanza.attr("type") == Some("error"),
    };
    if silent {
        Ok(true)
    } else {
        Err(error(b))
    }
}

/// Whether presence (or a PEP notification) from `from` may reach session `to`.
pub async fn presence_allowed(state: &ServerState, from: &Jid, to: &SessionHandle) -> bool {
    check(state, from, &Jid::from(to.jid.clone()))
        .await
        .is_none()
}

/// Resources of `of` that match block-list item `item` (all of them for a
/// bare or domain item).
fn sessions_matching(state: &ServerState, item: &Jid) -> Vec<Arc<SessionHandle>> {
    match item.node() {
        Some(_) => state
            .routing
            .resources(&item.to_bare())
            .into_iter()
            .filter(|h| matches(item, &Jid::from(h.jid.clone())))
            .collect(),
        // A domain item: every session at that domain.
        None => state
            .router
            .all()
            .into_iter()
            .filter(|h| matches(item, &Jid::from(h.jid.clone())))
            .collect(),
    }
}

fn has_from(s: Subscription) -> bool {
    matches!(s, Subscription::From | Subscription::Both)
}

/// Whether `contact` may see `user`'s presence (RFC 6121: subscription
/// from/both on the user's side).
async fn may_see(state: &ServerState, user: &BareJid, contact: &BareJid) -> bool {
    matches!(
        state.store.roster_item(user.as_str(), contact.as_str()).await,
        Ok(Some(i)) if has_from(i.subscription)
    )
}

fn unavailable(from: &SessionHandle, to: &SessionHandle) -> Element {
    Element::new("presence", NS_CLIENT)
        .with_attr("from", from.jid.to_string())
        .with_attr("to", to.jid.to_string())
        .with_attr("type", "unavailable")
}

/// On block: unavailable from each of `user`'s available resources to the
/// blocked sessions that may see them, and from those sessions to `user`.
async fn presence_cut(state: &ServerState, user: &BareJid, item: &Jid) {
    let mine: Vec<_> = state
        .routing
        .resources(user)
        .into_iter()
        .filter(|h| h.is_available())
        .collect();
    for theirs in sessions_matching(state, item) {
        if theirs.bare == *user {
            continue;
        }
        if may_see(state, user, &theirs.bare).await {
            for m in &mine {
                theirs.send(unavailable(m, &theirs));
            }
        }
        if theirs.is_available() && may_see(state, &theirs.bare, user).await {
            for m in &mine {
                m.send(unavailable(&theirs, m));
            }
        }
    }
}

/// On unblock: current presence again, both ways, where subscriptions allow.
async fn presence_restore(state: &ServerState, user: &BareJid, item: &Jid) {
    let current = |h: &SessionHandle| h.available_presence();
    let mine = state.routing.resources(user);
    for theirs in sessions_matching(state, item) {
        if theirs.bare == *user {
            continue;
        }
        // Still blocked by the other side: nothing flows.
        if blocks(state, &theirs.bare, &Jid::from(user.clone())).await {
            continue;
        }
        if theirs.is_available() && may_see(state, user, &theirs.bare).await {
            for m in &mine {
                if let Some(mut p) = current(m) {
                    p.set_attr("to", theirs.jid.to_string());
                    theirs.send(p);
                }
            }
        }
        if may_see(state, &theirs.bare, user).await {
            if let Some(p) = current(&theirs) {
                for m in mine.iter().filter(|m| m.is_available()) {
                    let mut p = p.clone();
                    p.set_attr("to", m.jid.to_string());
                    m.send(p);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn j(s: &str) -> Jid {
        Jid::new(s).unwrap()
    }

    #[test]
    fn xep0016_matching() {
        // Full JID item: only that resource.
        assert!(matches(&j("a@x/r"), &j("a@x/r")));
        assert!(!matches(&j("a@x/r"), &j("a@x/s")));
        assert!(!matches(&j("a@x/r"), &j("a@x")));
        // Bare: any resource.
        assert!(matches(&j("a@x"), &j("a@x/r")));
        assert!(matches(&j("a@x"), &j("a@x")));
        assert!(!matches(&j("a@x"), &j("b@x/r")));
        // Domain/resource: only that JID.
        assert!(matches(&j("x/r"), &j("x/r")));
        assert!(!matches(&j("x/r"), &j("a@x/r")));
        // Domain: everything there.
        assert!(matches(&j("x"), &j("a@x/r")));
        assert!(matches(&j("x"), &j("x")));
        assert!(!matches(&j("x"), &j("a@y")));
        // Case-normalized by the jid crate.
        assert!(matches(&j("A@X"), &j("a@x/r")));
    }
}
