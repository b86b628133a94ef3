//! RFC 6121 §2: roster management, with XEP-0237 roster versioning.
//!
//! The roster lives in the store; every change bumps its version, and the
//! changed item is pushed (with the new `ver`) to each *interested* resource
//! of the owner, i.e. each resource that requested the roster (§2.1.6).
//! Subscription state is changed only by presence subscription stanzas
//! (`presence.rs`); a roster set touches name and groups, a roster remove
//! also cancels the subscriptions in both directions (§2.5.2, §3.5).
//!
//! Invariants:
//! - An inbound subscription request from someone the user never added is
//!   kept as a *request-only* item: `pending_in`, no name, no groups,
//!   subscription `none`, no `ask`/`approved` (RFC 6121 §3.1.3: the request
//!   does not add the contact to the roster). Such items are hidden from
//!   roster results and pushes. Every item a client can see is stored with
//!   `name: Some(..)` (empty when unnamed), so a contact the user added can
//!   never turn into a request-only item.
//! - Roster writes of one account are serialized by [`lock`], so a
//!   read-modify-write of an item never loses a concurrent change.

use super::{new_id, Cx, Iq, IqResult, IqType, Module, Shared, Target};
use crate::error::{Condition, StanzaError};
use crate::state::ServerState;
use async_trait::async_trait;
use jid::BareJid;
use natter_store::{RosterItem, StoreError, Subscription};
use natter_xml::{Element, NS_CLIENT};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

pub const NS: &str = "jabber:iq:roster";
pub const NS_VER: &str = "urn:xmpp:features:rosterver";

/// Longest accepted item name or group name, in bytes.
pub const MAX_TEXT: usize = 1024;
/// Most groups one item may be in.
pub const MAX_GROUPS: usize = 64;
/// Most items one roster may hold (request-only items included).
pub const MAX_ITEMS: usize = 5000;

/// Striped locks serializing roster changes per account in this process
/// (on N nodes the user's owner node takes them: see ARCHITECTURE.md).
pub struct Roster {
    locks: Vec<Arc<tokio::sync::Mutex<()>>>,
}

impl Default for Roster {
    fn default() -> Self {
        Roster {
            locks: (0..64).map(|_| Arc::default()).collect(),
        }
    }
}

#[async_trait]
impl Module for Roster {
    fn name(&self) -> &'static str {
        "roster"
    }
    fn provide(self: Arc<Self>, shared: &mut Shared) {
        shared.provide::<Roster>(self);
    }
    // Prosody and Tigase advertise the roster namespace; the versioning
    // feature is a stream feature only (XEP-0237 §3).
    fn features(&self) -> &'static [&'static str] {
        &[NS]
    }
    fn iq_payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[(NS, "query")]
    }
    fn stream_features(&self) -> Vec<Element> {
        vec![Element::new("ver", NS_VER)]
    }
    async fn handle_iq(&self, cx: &Cx<'_>, iq: &Iq) -> IqResult {
        if !iq.is_own_account() {
            // RFC 6121 §2.1.5 / §2.3.3: nobody reads or edits another
            // account's roster.
            return Err(match iq.target {
                Target::Account(_) => StanzaError::new(Condition::Forbidden),
                Target::Server(_) => StanzaError::new(Condition::ServiceUnavailable),
            });
        }
        match iq.kind {
            IqType::Get => get(cx, iq).await,
            IqType::Set => set(cx, iq).await,
        }
    }
}

/// RFC 6121 §2.2 + §2.6: the roster, or an empty result when the client's
/// cached version is current.
async fn get(cx: &Cx<'_>, iq: &Iq) -> IqResult {
    let user = &cx.session.bare;
    cx.session.set_interested();
    let (version, items) = cx.state.store.roster(user.as_str()).await?;
    let ver = version.to_string();
    if iq.payload().attr("ver") == Some(ver.as_str()) {
        return Ok(None);
    }
    let mut q = Element::new("query", NS).with_attr("ver", ver);
    for item in items.iter().filter(|i| visible(i)) {
        q.append_child(item_element(item));
    }
    Ok(Some(q))
}

/// RFC 6121 §2.3–2.5: add, update or remove one item.
async fn set(cx: &Cx<'_>, iq: &Iq) -> IqResult {
    let user = cx.session.bare.clone();
    let mut items = iq.payload().children().filter(|c| c.is("item", NS));
    let (Some(el), None) = (items.next(), items.next()) else {
        return Err(StanzaError::with_text(
            Condition::BadRequest,
            "a roster set carries exactly one item",
        ));
    };
    let contact = el
        .attr("jid")
        .ok_or_else(|| StanzaError::with_text(Condition::BadRequest, "item without jid"))
        .and_then(|j| {
            BareJid::new(j).map_err(|_| {
                StanzaError::with_text(Condition::JidMalformed, "roster items are bare JIDs")
            })
        })?;
    if contact == user {
        return Err(StanzaError::with_text(
            Condition::NotAllowed,
            "your own JID cannot be in your roster",
        ));
    }
    if el.attr("subscription") == Some("remove") {
        remove(cx, &user, &contact).await?;
        return Ok(None);
    }
    // §2.1.2.5: any other 'subscription' value, and 'ask', are ignored.
    let name = el.attr("name").unwrap_or_default().to_string();
    if name.len() > MAX_TEXT {
        return Err(StanzaError::with_text(
            Condition::NotAcceptable,
            "name too long",
        ));
    }
    let mut groups: Vec<String> = Vec::new();
    for g in el.children().filter(|c| c.is("group", NS)) {
        let g = g.text();
        if g.is_empty() || g.len() > MAX_TEXT {
            return Err(StanzaError::with_text(
                Condition::NotAcceptable,
                "group names are 1 to 1024 bytes",
            ));
        }
        if groups.contains(&g) {
            return Err(StanzaError::with_text(
                Condition::BadRequest,
                "duplicate group",
            ));
        }
        groups.push(g);
    }
    if groups.len() > MAX_GROUPS {
        return Err(StanzaError::with_text(
            Condition::NotAcceptable,
            "too many groups",
        ));
    }
    let _guard = lock(cx.state, &[&user]).await;
    let old = cx
        .state
        .store
        .roster_item(user.as_str(), contact.as_str())
        .await?;
    let mut item = old
        .clone()
        .unwrap_or_else(|| RosterItem::new(contact.as_str()));
    // `Some` even when empty: the user added this contact (module docs).
    item.name = Some(name);
    item.groups = groups;
    commit(cx.state, &user, old.as_ref(), item, true).await?;
    Ok(None)
}

/// RFC 6121 §2.5.2 / §3.5: remove the item, push the removal, and cancel
/// the subscriptions in both directions.
async fn remove(cx: &Cx<'_>, user: &BareJid, contact: &BareJid) -> Result<(), StanzaError> {
    let _guard = lock(cx.state, &[user, contact]).await;
    let store = &cx.state.store;
    let Some(old) = store.roster_item(user.as_str(), contact.as_str()).await? else {
        return Err(StanzaError::new(Condition::ItemNotFound));
    };
    let version = match store
        .remove_roster_item(user.as_str(), contact.as_str())
        .await
    {
        Ok(v) => v,
        Err(StoreError::NotFound) => return Err(StanzaError::new(Condition::ItemNotFound)),
        Err(e) => return Err(e.into()),
    };
    push(cx.state, user, removed_element(contact), version);
    let remote = super::remote_for(cx.state, &jid::Jid::from(contact.clone())).is_some();
    if !cx.state.serves(contact.domain().as_str()) && !remote {
        // Not reachable (federation off): nobody to tell.
        return Ok(());
    }
    let had_to = matches!(old.subscription, Subscription::To | Subscription::Both);
    let had_from = matches!(old.subscription, Subscription::From | Subscription::Both);
    if had_to || old.ask {
        super::presence::route_locked(
            cx.state,
            user,
            contact,
            super::presence::Sub::Unsubscribe,
            None,
        )
        .await?;
    }
    if had_from {
        // While the contact is still subscribed: our resources go offline
        // for it (§3.2.2), then the cancellation.
        super::presence::send_unavailable(cx.state, user, contact);
    }
    if had_from || old.pending_in {
        super::presence::route_locked(
            cx.state,
            user,
            contact,
            super::presence::Sub::Unsubscribed,
            None,
        )
        .await?;
    }
    Ok(())
}

/// A request-only item (module docs) is not part of the roster clients see.
pub fn visible(item: &RosterItem) -> bool {
    !(item.pending_in
        && item.subscription == Subscription::None
        && !item.ask
        && !item.approved
        && item.name.is_none()
        && item.groups.is_empty())
}

/// Nothing left worth keeping for an item the user never saw.
fn blank(item: &RosterItem) -> bool {
    item.subscription == Subscription::None
        && !item.ask
        && !item.pending_in
        && !item.approved
        && item.name.is_none()
        && item.groups.is_empty()
}

/// Store `new` (the item `old` after a change) and push it to the owner's
/// interested resources when what they see changed (always, with `force`).
/// Takes care of request-only items: they are never pushed, dropped when
/// nothing is pending any more, and pushed as removed when a visible item
/// becomes one. The caller holds [`lock`] for `owner`.
pub(crate) async fn commit(
    state: &ServerState,
    owner: &BareJid,
    old: Option<&RosterItem>,
    mut new: RosterItem,
    force: bool,
) -> Result<(), StanzaError> {
    let store = &state.store;
    let was_visible = old.is_some_and(visible);
    if blank(&new) && !was_visible {
        if old.is_some() {
            match store.remove_roster_item(owner.as_str(), &new.jid).await {
                Ok(_) | Err(StoreError::NotFound) => {}
                Err(e) => return Err(e.into()),
            }
        }
        return Ok(());
    }
    let now_visible = visible(&new);
    if now_visible && new.name.is_none() {
        new.name = Some(String::new());
    }
    if old == Some(&new) && !force {
        return Ok(());
    }
    if old.is_none() {
        let (_, items) = store.roster(owner.as_str()).await?;
        if items.len() >= MAX_ITEMS {
            return Err(StanzaError::with_text(
                Condition::ResourceConstraint,
                "roster full",
            ));
        }
    }
    let version = store.put_roster_item(owner.as_str(), &new).await?;
    let shown = |i: &RosterItem| Some(item_element(i)).filter(|_| visible(i));
    let before = old.and_then(shown);
    let after = shown(&new);
    match after {
        Some(el) if force || before.as_ref() != Some(&el) => push(state, owner, el, version),
        None if before.is_some() => {
            let contact = BareJid::new(&new.jid)
                .map_err(|_| StanzaError::new(Condition::InternalServerError))?;
            push(state, owner, removed_element(&contact), version);
        }
        _ => {}
    }
    Ok(())
}

/// `<item/>` as clients see it (RFC 6121 §2.1.2).
pub fn item_element(item: &RosterItem) -> Element {
    let mut el = Element::new("item", NS)
        .with_attr("jid", item.jid.clone())
        .with_attr("subscription", item.subscription.as_str());
    if let Some(name) = item.name.as_deref().filter(|n| !n.is_empty()) {
        el.set_attr("name", name);
    }
    if item.ask {
        el.set_attr("ask", "subscribe");
    }
    if item.approved {
        el.set_attr("approved", "true");
    }
    for g in &item.groups {
        el.append_child(Element::new("group", NS).with_text(g.clone()));
    }
    el
}

fn removed_element(contact: &BareJid) -> Element {
    Element::new("item", NS)
        .with_attr("jid", contact.to_string())
        .with_attr("subscription", "remove")
}

/// RFC 6121 §2.1.6: a roster push to every interested resource of `owner`.
pub fn push(state: &ServerState, owner: &BareJid, item: Element, version: u64) {
    for h in state.routing.resources(owner) {
        if !h.interested() {
            continue;
        }
        let iq = Element::new("iq", NS_CLIENT)
            .with_attr("type", "set")
            .with_attr("id", format!("push-{}", new_id()))
            .with_attr("from", owner.to_string())
            .with_attr("to", h.jid.to_string())
            .with_child(
                Element::new("query", NS)
                    .with_attr("ver", version.to_string())
                    .with_child(item.clone()),
            );
        h.send(iq);
    }
}

pub(crate) struct RosterGuard {
    _guards: Vec<tokio::sync::OwnedMutexGuard<()>>,
}

/// Lock the rosters of `users` (taken in a fixed order, so two tasks
/// locking the same pair cannot deadlock). Never lock twice in one task.
pub(crate) async fn lock(state: &ServerState, users: &[&BareJid]) -> RosterGuard {
    let locks = &state.modules.api::<Roster>().locks;
    let mut idx: Vec<usize> = users
        .iter()
        .map(|u| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            u.as_str().hash(&mut h);
            (h.finish() % locks.len() as u64) as usize
        })
        .collect();
    idx.sort_unstable();
    idx.dedup();
    let mut guards = Vec::with_capacity(idx.len());
    for i in idx {
        guards.push(locks[i].clone().lock_owned().await);
    }
    RosterGuard { _guards: guards }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_only_items_are_hidden() {
        let mut it = RosterItem::new("bob@x");
        it.pending_in = true;
        assert!(!visible(&it));
        // Added by the user (even without a name): shown.
        it.name = Some(String::new());
        assert!(visible(&it));
        let mut it = RosterItem::new("bob@x");
        assert!(visible(&it) && blank(&it));
        it.ask = true;
        assert!(visible(&it) && !blank(&it));
    }

    #[test]
    fn item_element_shows_state() {
        let mut it = RosterItem::new("bob@x");
        it.name = Some(String::new());
        it.subscription = Subscription::From;
        it.ask = true;
        it.approved = false;
        it.groups = vec!["A".into()];
        let el = item_element(&it);
        assert_eq!(el.attr("name"), None);
        assert_eq!(el.attr("subscription"), Some("from"));
        assert_eq!(el.attr("ask"), Some("subscribe"));
        assert_eq!(el.attr("approved"), None);
        assert_eq!(el.children().map(|g| g.text()).collect::<Vec<_>>(), ["A"]);
    }
}
