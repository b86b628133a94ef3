//! XEP-0160 offline messages: a chat/normal message with content for an
//! account with no available resource (non-negative priority) is queued
//! durably — with its XEP-0359 stanza-id and a XEP-0203 `<delay/>` — and
//! delivered, in order and once, when a resource of the account next sends
//! available presence with a non-negative priority; then it is deleted.
//!
//! Acceptance order: every message routed to a user gets an `ord` (unix
//! µs, strictly increasing per server: [`Offline::next_ord`]) when it is
//! accepted, carried with it into session queues and back. The queue is
//! read in `ord` order, so a message a session gave back (it ended before
//! delivering it: [`requeue`]) comes before everything accepted after it,
//! though it was inserted last.
//!
//! Ordering: a session that comes online is marked as *catching up* before
//! it becomes available; while it is, new messages for it join the end of
//! the queue instead of overtaking it. Each push and the end of a catch-up
//! are decided under one lock per server ([`Offline`]), so no message can
//! slip into the queue after the catch-up ended and sit there.
//!
//! Hand-over: queued messages are handed to the session's outgoing queue in
//! batches (never more than half of `c2s.max_queue` waiting), and a batch
//! is deleted from the store once it is in the session's queue. From then
//! on the session is responsible for it: stream management re-sends what
//! the client did not acknowledge, and a session that ends with unacked
//! stanzas gives them back through [`requeue`]. A crash between hand-over
//! and delete delivers a batch twice (same stanza-ids, which clients use to
//! drop duplicates); nothing is lost.
//!
//! Archive-aware clients (Conversations and others catch up with a MAM
//! query right after login): a session that queried its archive *before*
//! its initial presence gets no offline message that was archived for it
//! before that query — those rows are deleted unsent, as Prosody's mod_mam
//! does (it skips the offline broadcast for sessions that queried the
//! archive). Messages queued after the query, or not archived (MAM
//! preferences), are still delivered.

use super::vocab::{self as mam, priority};
use super::{api, Event, EventKind, Module, Shared};
use crate::error::{Condition, StanzaError};
use crate::router::{Outbound, QueueRx, SessionHandle};
use crate::state::ServerState;
use async_trait::async_trait;
use jid::{BareJid, FullJid, Jid};
use natter_store::StoreError;
use natter_xml::Element;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// XEP-0160 §5 disco feature.
pub const FEATURE: &str = "msgoffline";
/// Messages taken off the queue at a time.
const BATCH: usize = 100;

/// The XEP-0160 module: its disco feature, the catch-up when a session
/// comes online, and the queue other modules deliver through
/// (`api::OfflineQueue`).
#[async_trait]
impl Module for Offline {
    fn name(&self) -> &'static str {
        "offline"
    }
    fn features(&self) -> &'static [&'static str] {
        &[FEATURE]
    }
    fn events(&self) -> &'static [(EventKind, i32)] {
        &[
            (EventKind::ComingOnline, 0),
            (EventKind::ArchiveQueried, 0),
            (EventKind::Closed, 0),
        ]
    }
    fn provide(self: Arc<Self>, shared: &mut Shared) {
        shared.provide::<Offline>(self.clone());
        shared.provide::<dyn api::OfflineQueue>(self);
    }
    async fn on_event(
        &self,
        state: &ServerState,
        session: Option<&Arc<SessionHandle>>,
        event: &Event<'_>,
    ) {
        let Some(h) = session else { return };
        match event {
            Event::ComingOnline { presence, hold } => {
                if let Some(g) = catch_up(state, h, presence) {
                    hold.keep(g);
                }
            }
            Event::ArchiveQueried => note_archive_query(self, h),
            Event::Closed => {
                self.archive_queried.lock().remove(&h.id);
            }
            _ => {}
        }
    }
}

#[async_trait]
impl api::OfflineQueue for Offline {
    fn storable(&self, msg: &Element, kind: &str) -> bool {
        storable(msg, kind)
    }
    fn online(&self, state: &ServerState, bare: &BareJid) -> bool {
        online(state, bare)
    }
    fn queue_full(&self) -> StanzaError {
        queue_full()
    }
    async fn deliver(
        &self,
        state: &ServerState,
        bare: &BareJid,
        full: Option<&FullJid>,
        msg: &Element,
        archive_id: Option<&str>,
        limit: usize,
        ord: Option<i64>,
    ) -> Result<Vec<Arc<SessionHandle>>, StanzaError> {
        deliver(state, bare, full, msg, archive_id, limit, ord).await
    }
    async fn requeue(&self, state: &ServerState, stanzas: Vec<Outbound>) {
        requeue(state, stanzas).await
    }
    fn resumed(&self, state: &ServerState, h: &Arc<SessionHandle>, rx: &QueueRx) {
        resumed(state, h, rx)
    }
    fn catch_up_now(&self, state: &ServerState, h: &Arc<SessionHandle>) {
        if h.is_available() && h.priority() >= 0 {
            mark_catching_up(self, h);
            state.tasks.spawn(drain(state.clone(), h.clone()));
        }
    }
}

/// Offline-queue coordination shared by message routing and catch-ups.
#[derive(Default)]
pub struct Offline {
    /// Looked up for every message delivered: foldhash, seeded (users
    /// choose the keys).
    users: Mutex<Gates>,
    /// Sessions that queried their archive before their initial presence,
    /// and when (unix µs).
    archive_queried: Mutex<HashMap<u64, i64>>,
    /// The last acceptance position handed out.
    last_ord: AtomicI64,
}

type Gates = HashMap<BareJid, Gate, foldhash::quality::RandomState>;

#[derive(Default)]
struct Gate {
    /// Sessions of this user catching up on the queue.
    catching_up: Vec<u64>,
    /// Pushes to this user's queue in flight.
    pushing: usize,
    /// Pushes completed (a catch-up only ends when none completed since its
    /// last fetch).
    pushed: u64,
    /// Held by the catch-up taking messages off the queue: one at a time.
    drain: Arc<tokio::sync::Mutex<()>>,
}

impl Offline {
    /// A new acceptance position: the current unix µs, or one more than
    /// the last one if the clock has not moved (or went back).
    pub fn next_ord(&self) -> i64 {
        let now = mam::now_micros();
        let prev = self
            .last_ord
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
                Some(now.max(last + 1))
            })
            .unwrap_or(now);
        now.max(prev + 1)
    }

    /// Whether no session of `user` is catching up on the queue and no push
    /// to it is in flight: a message to `user` now goes straight to their
    /// available sessions, not behind a catch-up.
    pub fn settled(&self, user: &BareJid) -> bool {
        !self.users.lock().contains_key(user)
    }

    fn release(&self, users: &mut Gates, user: &BareJid) {
        if let Some(g) = users.get(user) {
            if g.catching_up.is_empty() && g.pushing == 0 && Arc::strong_count(&g.drain) == 1 {
                users.remove(user);
            }
        }
    }
}

/// Chat/normal messages with content are kept for offline users (XEP-0160
/// §4), unless hinted `<no-store/>` (XEP-0334); chat states alone are not.
fn storable(msg: &Element, kind: &str) -> bool {
    matches!(kind, "chat" | "normal")
        && msg.get_child("no-store", mam::NS_HINTS).is_none()
        && !mam::is_wrapper(msg)
        && mam::has_content(msg)
}

/// Available resources with non-negative priority (RFC 6121 §8.5.2.1).
fn available(state: &ServerState, bare: &BareJid) -> Vec<Arc<SessionHandle>> {
    state
        .routing
        .resources(bare)
        .into_iter()
        .filter(|h| h.is_available() && h.priority() >= 0)
        .collect()
}

/// Whether `bare` has a resource that would get a message to the bare JID now.
fn online(state: &ServerState, bare: &BareJid) -> bool {
    !available(state, bare).is_empty()
}

/// The error a sender gets when the recipient's queue is full.
fn queue_full() -> StanzaError {
    StanzaError::with_text(Condition::ServiceUnavailable, "offline queue full")
}

/// Deliver `stanza` for `bare` — to the session `full` if given, else to
/// every available resource — or queue it when there is none (or the
/// session catches up on its queue). Returns the sessions it went to
/// directly (empty: queued). `limit` caps the queue; `archive_id` is the
/// recipient's stanza-id of it, if archived; `ord` its acceptance position
/// (None: accepted now).
async fn deliver(
    state: &ServerState,
    bare: &BareJid,
    full: Option<&FullJid>,
    stanza: &Element,
    archive_id: Option<&str>,
    limit: usize,
    ord: Option<i64>,
) -> Result<Vec<Arc<SessionHandle>>, StanzaError> {
    let off = state.modules.api::<Offline>();
    let ord = ord.unwrap_or_else(|| off.next_ord());
    let (live, mut queue) = {
        let mut users = off.users.lock();
        let targets = match full {
            Some(f) => state.routing.session(f).into_iter().collect(),
            None => available(state, bare),
        };
        let catching: &[u64] = users.get(bare).map_or(&[], |g| &g.catching_up);
        let live: Vec<_> = targets
            .iter()
            .filter(|h| !catching.contains(&h.id))
            .cloned()
            .collect();
        let queue = live.len() != targets.len() || targets.is_empty();
        if queue {
            users.entry(bare.clone()).or_default().pushing += 1;
        }
        (live, queue)
    };
    // Serialized once, shared by every session it goes to.
    let out = (!live.is_empty()).then(|| Outbound::new(stanza, ord));
    let sent: Vec<_> = live
        .into_iter()
        .filter(|h| out.as_ref().is_some_and(|o| h.send_out(o)))
        .collect();
    if sent.is_empty() && !queue {
        // Every session went away meanwhile.
        off.users.lock().entry(bare.clone()).or_default().pushing += 1;
        queue = true;
    }
    if !queue {
        return Ok(sent);
    }
    let mut queued = stanza.clone();
    let domain = bare.domain().as_str();
    if !queued
        .children()
        .any(|c| c.is("delay", mam::NS_DELAY) && c.attr("from") == Some(domain))
    {
        queued.append_child(mam::delay(mam::now_micros(), Some(domain)));
    }
    let r = state
        .store
        .offline_push(bare.as_str(), &queued.to_string(), archive_id, limit, ord)
        .await;
    {
        let mut users = off.users.lock();
        if let Some(g) = users.get_mut(bare) {
            g.pushing -= 1;
            g.pushed += 1;
        }
        off.release(&mut users, bare);
    }
    if r.is_ok() {
        let ev = Event::OfflineQueued {
            user: bare,
            stanza: &queued,
        };
        state.modules.emit(state, None, &ev).await;
    }
    match r {
        Ok(_) => Ok(sent),
        // A device got it: the queue was for another one.
        Err(_) if !sent.is_empty() => Ok(sent),
        Err(StoreError::QuotaExceeded) => Err(queue_full()),
        Err(StoreError::NotFound) => Err(StanzaError::new(Condition::ServiceUnavailable)),
        Err(e) => Err(e.into()),
    }
}

/// Remember that this session queried its archive before coming online.
fn note_archive_query(off: &Offline, h: &SessionHandle) {
    if h.is_available() {
        return;
    }
    off.archive_queried
        .lock()
        .entry(h.id)
        .or_insert_with(mam::now_micros);
}

/// Start a catch-up if `presence` (available, from this session) brings
/// it online with a non-negative priority. Call it *before* the session is
/// marked available; the queue is delivered when the returned guard is
/// dropped (after the presence broadcast).
fn catch_up(state: &ServerState, h: &Arc<SessionHandle>, presence: &Element) -> Option<CatchUp> {
    if !h.offline_for_messages() || priority(presence) < 0 {
        return None;
    }
    mark_catching_up(&state.modules.api::<Offline>(), h);
    Some(CatchUp {
        state: state.clone(),
        session: h.clone(),
    })
}

/// Delivers the offline queue to its session when dropped.
pub struct CatchUp {
    state: ServerState,
    session: Arc<SessionHandle>,
}

impl Drop for CatchUp {
    fn drop(&mut self) {
        // Tracked: shutdown waits for a catch-up in progress.
        let tasks = self.state.tasks.clone();
        tasks.spawn(drain(self.state.clone(), self.session.clone()));
    }
}

/// Hand `h` its queued messages, batch by batch, then end its catch-up.
async fn drain(state: ServerState, h: Arc<SessionHandle>) {
    let off = state.modules.api::<Offline>();
    let user = h.bare.clone();
    let lock = {
        let mut users = off.users.lock();
        users.entry(user.clone()).or_default().drain.clone()
    };
    let guard = lock.lock().await;
    let queried = off.archive_queried.lock().remove(&h.id);
    let budget = (state.config.c2s.max_queue / 2).max(1);
    let (mut delivered, mut skipped) = (0usize, 0usize);
    loop {
        let seen = off.users.lock().get(&user).map_or(0, |g| g.pushed);
        let batch = match state.store.offline_fetch(user.as_str(), BATCH).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(%user, error = %e, "offline queue unreadable; left for later");
                break;
            }
        };
        if batch.is_empty() {
            let done = {
                let mut users = off.users.lock();
                let g = users.entry(user.clone()).or_default();
                let done = g.pushing == 0 && g.pushed == seen;
                if done {
                    g.catching_up.retain(|id| *id != h.id);
                }
                done
            };
            if done {
                break;
            }
            // A push is committing: fetch again once it is in.
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        let mut handed = Vec::with_capacity(batch.len());
        let mut gone = false;
        for m in &batch {
            // Archived before this session caught up from the archive.
            if m.archive_id.is_some() && queried.is_some_and(|t| m.ts_micros <= t) {
                handed.push(m.seq);
                skipped += 1;
                continue;
            }
            let limits = natter_xml::Limits {
                max_stanza_bytes: usize::MAX,
                max_depth: usize::MAX,
                max_attrs: usize::MAX,
                max_elements: usize::MAX,
            };
            let el = match natter_xml::parse_frame(m.stanza.as_bytes(), &limits) {
                Ok(el) => el,
                Err(e) => {
                    tracing::error!(%user, seq = m.seq, error = %e, "queued stanza does not parse; dropped");
                    handed.push(m.seq);
                    continue;
                }
            };
            let out = Outbound::new(&el, m.ord);
            drop(el);
            if !room(&state, &h, budget, out.size()).await || !h.send_out(&out) {
                gone = true;
                break;
            }
            handed.push(m.seq);
            delivered += 1;
        }
        if !handed.is_empty() {
            if let Err(e) = state.store.offline_delete(user.as_str(), &handed).await {
                tracing::error!(%user, error = %e, "delivered offline messages not deleted");
                gone = true;
            }
        }
        if gone {
            break;
        }
    }
    drop(guard);
    drop(lock);
    let mut users = off.users.lock();
    if let Some(g) = users.get_mut(&user) {
        g.catching_up.retain(|id| *id != h.id);
    }
    off.release(&mut users, &user);
    if delivered + skipped > 0 {
        tracing::debug!(jid = %h.jid, delivered, skipped, "offline queue delivered");
    }
}

/// Wait until `h`'s outgoing queue has room for more (half its bounds in
/// stanzas and bytes, or empty); false once the session is gone.
async fn room(state: &ServerState, h: &Arc<SessionHandle>, budget: usize, size: usize) -> bool {
    let bytes = h.queue_limits().bytes / 2;
    loop {
        let here = state.routing.session(&h.jid).is_some_and(|s| s.id == h.id);
        if !here {
            return false;
        }
        let queued = h.queued();
        if queued == 0 || (queued < budget && h.queued_bytes() + size <= bytes) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Stanzas that were routed to a session which went away before the client
/// acknowledged them (stream management) or before they wholly reached its
/// socket. Messages worth keeping are routed again — to the user's other
/// sessions, or to the offline queue (beyond its limit if need be: they
/// were accepted already) at their original acceptance position — and
/// never archived a second time. Carbon copies and archive results are
/// dropped (the archive holds the originals); so is everything else
/// (presence, IQs, chat states, headlines). Call it after the session left
/// the router.
async fn requeue(state: &ServerState, stanzas: Vec<Outbound>) {
    for out in stanzas {
        if !out.is_message() {
            continue;
        }
        let Some(el) = out.to_element() else { continue };
        let kind = el.attr("type").unwrap_or("normal");
        if !storable(&el, kind) {
            continue;
        }
        let Some(bare) = el
            .attr("to")
            .and_then(|t| Jid::new(t).ok())
            .map(Jid::into_bare)
            .filter(|b| b.node().is_some() && state.serves(b.domain().as_str()))
        else {
            continue;
        };
        let archive_id = mam::stanza_id_of(&el, &bare).map(str::to_owned);
        let ord = (out.ord() != 0).then_some(out.ord());
        if let Err(e) = deliver(
            state,
            &bare,
            None,
            &el,
            archive_id.as_deref(),
            usize::MAX,
            ord,
        )
        .await
        {
            tracing::warn!(user = %bare, condition = e.condition.name(), "unacknowledged message not requeued");
        }
    }
}

/// From now on, messages for `h` join the end of the offline queue.
fn mark_catching_up(off: &Offline, h: &SessionHandle) {
    let mut users = off.users.lock();
    let g = users.entry(h.bare.clone()).or_default();
    if !g.catching_up.contains(&h.id) {
        g.catching_up.push(h.id);
    }
}

/// A parked session was resumed after its queue refused stanzas (they went
/// to offline storage, after everything the session still holds): it
/// catches up on the offline queue now, as a session coming online does,
/// so those come next and nothing newer overtakes them.
fn resumed(state: &ServerState, h: &Arc<SessionHandle>, rx: &QueueRx) {
    let available = h.is_available() && h.priority() >= 0;
    if available {
        mark_catching_up(&state.modules.api::<Offline>(), h);
    }
    // Marked first: from here new messages join the offline queue's end.
    rx.clear_overflow();
    if available {
        state.tasks.spawn(drain(state.clone(), h.clone()));
    }
}
