//! The session table: which resources of which account are connected here,
//! and a bounded queue into each. In embedded mode this is all the routing
//! there is; cluster mode adds a registry on NATS behind the same calls.
//!
//! Invariant: a session's queue is bounded (`c2s.max_queue`). A session that
//! cannot keep up is flagged and closed by its own task; the router never
//! blocks on a slow reader.
//!
//! A session whose connection dropped but may be resumed (XEP-0198) stays
//! here, routable, while detached; `resumable` finds it by SM-ID. A session
//! that is ending is marked `closing` first: lookups skip it, so what is
//! re-routed from its queue cannot come back to it.

use crate::error::StreamError;
use crate::jids::Bare;
use jid::{BareJid, FullJid};
use natter_xml::Element;
use parking_lot::{Mutex, RwLock};
use smallvec::SmallVec;
use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

pub mod outbound;
pub mod queue;
pub use outbound::{Holdable, Outbound};
pub use queue::{QueueLimits, QueueRx, QueueTx, UserBytes};

/// What the router hands to a session task.
#[derive(Debug)]
pub enum Deliver {
    Stanza(Outbound),
    /// Close the stream with this error (e.g. `conflict` when replaced).
    Close(StreamError),
    /// Never queued: `QueueRx::recv` reports that a push was refused.
    Overflow,
    /// Never queued: `QueueRx::recv` reports `Router::shutdown`.
    Shutdown,
}

/// Presence-related state of one bound resource, changed by its own session
/// and read by others when they route to it.
#[derive(Debug, Default)]
struct SessionState {
    /// Sent initial presence and not yet unavailable (RFC 6121 §4.2).
    pub available: bool,
    pub priority: i8,
    /// The last available presence broadcast, re-sent to new subscribers.
    pub presence: Option<Element>,
    /// Requested the roster (RFC 6121 §2.1.3: gets roster pushes and probes).
    pub interested: bool,
    /// Message carbons enabled (XEP-0280).
    pub carbons: bool,
    /// Entities that got directed presence and must get unavailable at logout.
    pub directed: HashSet<String>,
    /// Close the stream once the reply to the current IQ is queued
    /// (account removal: XEP-0077 §3.2 sends the result first).
    pub close_after_reply: Option<StreamError>,
}

pub struct SessionHandle {
    pub id: u64,
    pub jid: FullJid,
    pub bare: BareJid,
    /// Its queue; a refused push flags it, and the session closes itself.
    tx: QueueTx,
    /// The session is ending: routing no longer finds it.
    closing: AtomicBool,
    /// Private: other tasks read a snapshot or change one field through
    /// the methods below, never hold the lock across anything.
    state: Mutex<SessionState>,
    /// In a cluster: where changes to its routing attributes are noted
    /// for the session registry (`cluster::routing`).
    changes: Option<Arc<Changes>>,
    /// A session on another node: what is sent to it goes here instead
    /// of a queue.
    forward: Option<Arc<dyn Forwarder>>,
}

/// Where a proxy of a session on another node hands what is sent to it.
pub trait Forwarder: Send + Sync {
    /// Pass `d` (a stanza or a close) on to `to`; false when refused.
    fn forward(&self, to: &FullJid, d: Deliver) -> bool;
}

/// Sessions whose routing attributes changed since the cluster registry
/// last published them (by id, with the full JID its key derives from):
/// a burst of changes to one session is published once.
#[derive(Default)]
pub struct Changes {
    pending: Mutex<HashMap<u64, FullJid>>,
    pub notify: tokio::sync::Notify,
}

impl Changes {
    fn note(&self, id: u64, jid: &FullJid) {
        let fresh = self.pending.lock().insert(id, jid.clone()).is_none();
        if fresh {
            self.notify.notify_one();
        }
    }

    /// Take what changed since the last call.
    pub fn take(&self) -> HashMap<u64, FullJid> {
        std::mem::take(&mut *self.pending.lock())
    }

    /// Put back what could not be published (NATS unreachable).
    pub fn restore(&self, back: HashMap<u64, FullJid>) {
        let mut p = self.pending.lock();
        for (id, jid) in back {
            p.entry(id).or_insert(jid);
        }
    }
}

/// What the rest of the server sees of a bound resource (a copy).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resource {
    pub id: u64,
    pub jid: FullJid,
    pub available: bool,
    pub priority: i8,
    pub carbons: bool,
    /// Requested the roster (gets roster pushes).
    pub interested: bool,
}

/// A directed presence could not be recorded: the session holds too many.
#[derive(Debug, PartialEq, Eq)]
pub struct TooManyDirected;

impl SessionHandle {
    /// Queue a stanza. Returns false when the session is gone or stuck; a
    /// stuck session is flagged and will close itself.
    pub fn send(&self, stanza: Element) -> bool {
        self.send_out(&Outbound::new(&stanza, 0))
    }

    /// Queue a serialized stanza (shared with other recipients).
    pub fn send_out(&self, stanza: &Outbound) -> bool {
        if let Some(f) = &self.forward {
            return f.forward(&self.jid, Deliver::Stanza(stanza.clone()));
        }
        match self.tx.try_send(Deliver::Stanza(stanza.clone())) {
            Ok(()) => true,
            Err(queue::PushError::Full) => {
                if self.tx.overflow() {
                    tracing::warn!(jid = %self.jid, "session queue full, closing it");
                }
                false
            }
            Err(queue::PushError::Closed) => false,
        }
    }

    /// Ask the session to close its stream with `err`.
    pub fn close(&self, err: StreamError) {
        if let Some(f) = &self.forward {
            f.forward(&self.jid, Deliver::Close(err));
            return;
        }
        if self.tx.try_send(Deliver::Close(err)).is_err() {
            self.tx.overflow();
        }
    }

    /// Stanzas waiting in this session's queue (the queue-depth metrics).
    pub fn queued(&self) -> usize {
        self.tx.len()
    }

    /// Bytes waiting in this session's queue.
    pub fn queued_bytes(&self) -> usize {
        self.tx.bytes()
    }

    /// The queue refused a stanza and takes nothing until the session
    /// catches up from offline storage (after a resumption) or ends.
    pub fn refusing(&self) -> bool {
        self.tx.overflowed()
    }

    pub fn queue_limits(&self) -> QueueLimits {
        self.tx.limits()
    }

    /// Stop routing to this session (it is ending).
    pub fn mark_closing(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.changed();
    }

    /// Note a change for the cluster registry (nothing in embedded mode).
    fn changed(&self) {
        if let Some(c) = &self.changes {
            c.note(self.id, &self.jid);
        }
    }

    /// A session on another node, as the cluster registry describes it:
    /// its routing attributes are copied in here (see `cluster::routing`).
    pub(crate) fn set_remote(&self, r: &Resource, presence: Option<Element>) {
        let mut st = self.state.lock();
        st.available = r.available;
        st.priority = r.priority;
        st.carbons = r.carbons;
        st.interested = r.interested;
        st.presence = presence;
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    pub fn is_available(&self) -> bool {
        self.state.lock().available
    }

    /// A copy of the resource's routing attributes.
    pub fn snapshot(&self) -> Resource {
        let st = self.state.lock();
        Resource {
            id: self.id,
            jid: self.jid.clone(),
            available: st.available,
            priority: st.priority,
            carbons: st.carbons,
            interested: st.interested,
        }
    }

    /// The last available presence it broadcast, while it is available.
    pub fn available_presence(&self) -> Option<Element> {
        let st = self.state.lock();
        st.available.then(|| st.presence.clone()).flatten()
    }

    /// Not yet available, or only with a negative priority: an available
    /// presence now brings it online (XEP-0160 catch-up).
    pub fn offline_for_messages(&self) -> bool {
        let st = self.state.lock();
        !st.available || st.priority < 0
    }

    /// It broadcast available presence `p`. True when it was unavailable
    /// (initial presence).
    pub fn set_available(&self, priority: i8, p: Element) -> bool {
        let mut st = self.state.lock();
        let initial = !st.available;
        st.available = true;
        st.priority = priority;
        st.presence = Some(p);
        drop(st);
        self.changed();
        initial
    }

    /// It went unavailable: whether it was available, and the entities it
    /// had sent directed presence to.
    pub fn set_unavailable(&self) -> (bool, HashSet<String>) {
        let mut st = self.state.lock();
        let was = st.available;
        st.available = false;
        st.priority = 0;
        st.presence = None;
        let directed = std::mem::take(&mut st.directed);
        drop(st);
        self.changed();
        (was, directed)
    }

    /// Record a directed presence to `to` (at most `max` entities).
    pub fn add_directed(&self, to: String, max: usize) -> Result<(), TooManyDirected> {
        let mut st = self.state.lock();
        if !st.directed.contains(&to) && st.directed.len() >= max {
            return Err(TooManyDirected);
        }
        st.directed.insert(to);
        Ok(())
    }

    pub fn remove_directed(&self, to: &str) {
        self.state.lock().directed.remove(to);
    }

    pub fn set_carbons(&self, on: bool) {
        self.state.lock().carbons = on;
        self.changed();
    }

    /// It requested the roster (RFC 6121 §2.1.3).
    pub fn set_interested(&self) {
        let was = std::mem::replace(&mut self.state.lock().interested, true);
        if !was {
            self.changed();
        }
    }

    pub fn interested(&self) -> bool {
        self.state.lock().interested
    }

    /// Close the stream with `err` once the reply to the IQ being handled
    /// is queued.
    pub fn close_after_reply(&self, err: StreamError) {
        self.state.lock().close_after_reply = Some(err);
    }

    pub fn take_close_after_reply(&self) -> Option<StreamError> {
        self.state.lock().close_after_reply.take()
    }

    pub fn priority(&self) -> i8 {
        self.state.lock().priority
    }

    pub fn carbons(&self) -> bool {
        self.state.lock().carbons
    }
}

/// How modules reach users' sessions: the routing seam. `Router` (this
/// process's session table) implements it alone; in a cluster,
/// `cluster::routing::ClusterRouting` answers the same calls for sessions
/// on other nodes too. Modules hold an `Arc<dyn Routing>` (`ServerState::routing`)
/// and never lock a session: they read `Resource` snapshots and change a
/// resource's attributes through `SessionHandle`'s methods.
pub trait Routing: Send + Sync {
    /// The session bound to `full`, unless it is ending.
    fn session(&self, full: &FullJid) -> Option<Arc<SessionHandle>>;
    /// The user's bound sessions that are not ending.
    fn resources(&self, bare: &BareJid) -> Vec<Arc<SessionHandle>>;
    /// Snapshots of the user's resources.
    fn resource_list(&self, bare: &BareJid) -> Vec<Resource> {
        self.resources(bare).iter().map(|h| h.snapshot()).collect()
    }
    /// Queue `stanza` for the session bound to `to`; false when there is
    /// none or it refuses.
    fn deliver(&self, to: &FullJid, stanza: &Outbound) -> bool {
        self.session(to).is_some_and(|h| h.send_out(stanza))
    }
    /// Queue `stanza` for every available resource of `to` with a
    /// non-negative priority (RFC 6121 §8.5.2.1); the sessions it reached.
    fn deliver_available(&self, to: &BareJid, stanza: &Outbound) -> Vec<u64> {
        self.resources(to)
            .iter()
            .filter(|h| h.is_available() && h.priority() >= 0 && h.send_out(stanza))
            .map(|h| h.id)
            .collect()
    }
    /// In a cluster, the node that handles stanzas to `entity` (a room) for
    /// services that keep it in memory — one writer per entity; None: this
    /// node (always, on one node).
    fn owner(&self, _entity: &str) -> Option<String> {
        None
    }
    /// What this routing knows beyond this node, for diagnostics.
    fn describe(&self) -> String {
        String::new()
    }
    /// The session with id `id` among `bare`'s.
    fn session_by_id(&self, bare: &BareJid, id: u64) -> Option<Arc<SessionHandle>> {
        self.resources(bare).into_iter().find(|h| h.id == id)
    }
}

impl Routing for Router {
    fn session(&self, full: &FullJid) -> Option<Arc<SessionHandle>> {
        Router::session(self, full)
    }
    fn resources(&self, bare: &BareJid) -> Vec<Arc<SessionHandle>> {
        Router::resources(self, bare)
    }
}

/// The bound resources whose bare JIDs hash to one key (almost always one
/// account, and one resource): kept inline, so an entry is one slot of the
/// table and no key string of its own (the handles hold the JIDs).
type Slot = SmallVec<[Arc<SessionHandle>; 1]>;

#[derive(Default)]
pub struct Router {
    /// Keyed by [`Router::key`], already a keyed hash: the table hashes it
    /// again with foldhash, not a second SipHash.
    sessions: RwLock<HashMap<u64, Slot, foldhash::fast::FixedState>>,
    keys: RandomState,
    next_id: AtomicU64,
    /// XEP-0198 resumable sessions by SM-ID.
    pub resumable: crate::c2s::sm::Registry,
    /// Stanzas handed to `modules::offline::requeue` by ending sessions.
    requeued: AtomicU64,
    /// Set in a cluster: bound sessions note their changes here.
    changes: std::sync::OnceLock<Arc<Changes>>,
    /// Bytes of stanzas ending sessions let go of since the last trim.
    freed: AtomicU64,
}

/// A new session: its handle, its queue's receiving end, and the session
/// it replaced (same full JID), if any.
pub type Bound = (Arc<SessionHandle>, QueueRx, Option<Arc<SessionHandle>>);

/// Why a bind failed.
#[derive(Debug, PartialEq, Eq)]
pub enum BindError {
    TooManyResources,
}

impl Router {
    pub fn new() -> Self {
        Self::default()
    }

    /// The table key of a bare JID (`bare` as text).
    fn key(&self, bare: &str) -> u64 {
        self.keys.hash_one(bare)
    }

    /// Register a bound resource. A session already using the same full JID
    /// is returned so the caller can close it with `conflict` (RFC 6120
    /// §7.7.2.2: the newer session wins).
    pub fn bind(
        &self,
        jid: FullJid,
        limits: QueueLimits,
        max_resources: usize,
    ) -> Result<Bound, BindError> {
        let bare = jid.bare();
        let key = self.key(bare.as_str());
        let mut map = self.sessions.write();
        // The user's byte quota is shared by all of the user's sessions.
        let user = map
            .get(&key)
            .and_then(|l| l.iter().find(|h| h.bare == bare))
            .map(|h| h.tx.user_bytes().clone())
            .unwrap_or_default();
        let (tx, rx) = queue::queue(limits, user);
        let handle = Arc::new(SessionHandle {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            jid,
            bare,
            tx,
            closing: AtomicBool::new(false),
            state: Mutex::new(SessionState::default()),
            changes: self.changes.get().cloned(),
            forward: None,
        });
        let list = map.entry(key).or_default();
        let replaced = list
            .iter()
            .position(|h| h.jid == handle.jid)
            .map(|i| list.remove(i));
        if replaced.is_none()
            && list.iter().filter(|h| h.bare == handle.bare).count() >= max_resources
        {
            if list.is_empty() {
                map.remove(&key);
            }
            return Err(BindError::TooManyResources);
        }
        list.push(handle.clone());
        drop(map);
        handle.changed();
        Ok((handle, rx, replaced))
    }

    /// A handle for an entity with no session here (a remote sender over
    /// s2s): never in the table, so routing never finds it; what modules
    /// send it arrives on the returned queue.
    pub fn detached(&self, jid: FullJid, limits: QueueLimits) -> (Arc<SessionHandle>, QueueRx) {
        let (tx, rx) = queue::queue(limits, UserBytes::default());
        (self.unbound(jid, tx, None), rx)
    }

    /// A proxy of a session on another node: never in the table; what is
    /// sent to it goes to `forward` (its queue stays empty).
    pub fn proxy(&self, jid: FullJid, forward: Arc<dyn Forwarder>) -> Arc<SessionHandle> {
        let limits = QueueLimits {
            items: 1,
            bytes: 0,
            user_bytes: 0,
        };
        let (tx, _rx) = queue::queue(limits, UserBytes::default());
        self.unbound(jid, tx, Some(forward))
    }

    /// A handle that is not in the table (`detached`, `proxy`).
    fn unbound(
        &self,
        jid: FullJid,
        tx: QueueTx,
        forward: Option<Arc<dyn Forwarder>>,
    ) -> Arc<SessionHandle> {
        Arc::new(SessionHandle {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            bare: jid.bare(),
            jid,
            tx,
            closing: AtomicBool::new(false),
            state: Mutex::new(SessionState::default()),
            changes: None,
            forward,
        })
    }

    /// Remove a session (only this exact one: a replacement under the same
    /// JID stays).
    pub fn unbind(&self, handle: &SessionHandle) {
        let key = self.key(handle.bare.as_str());
        let mut map = self.sessions.write();
        if let Some(list) = map.get_mut(&key) {
            list.retain(|h| h.id != handle.id);
            if list.is_empty() {
                map.remove(&key);
            }
        }
        drop(map);
        handle.changed();
    }

    /// Track changes to bound sessions for the cluster registry (once, at
    /// start, before any session binds).
    pub fn track_changes(&self) -> Arc<Changes> {
        self.changes.get_or_init(Default::default).clone()
    }

    pub fn resources(&self, bare: &BareJid) -> Vec<Arc<SessionHandle>> {
        self.sessions
            .read()
            .get(&self.key(bare.as_str()))
            .map(|l| {
                l.iter()
                    .filter(|h| &h.bare == bare && !h.is_closing())
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn session(&self, full: &FullJid) -> Option<Arc<SessionHandle>> {
        // The bare JID is the full one up to the first '/'.
        let s = full.as_str();
        let bare = s.split_once('/').map_or(s, |(b, _)| b);
        self.sessions
            .read()
            .get(&self.key(bare))?
            .iter()
            .find(|h| &h.jid == full && !h.is_closing())
            .cloned()
    }

    /// Count stanzas an ending session handed to offline requeueing.
    pub fn count_requeued(&self, n: usize) {
        self.requeued.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Stanzas requeued by ending sessions since start.
    pub fn requeued(&self) -> u64 {
        self.requeued.load(Ordering::Relaxed)
    }

    /// An ending session let go of `bytes` of stanzas (see `trim_task`).
    pub fn note_freed(&self, bytes: usize) {
        self.freed.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Every bound session (admin listing, shutdown).
    pub fn all(&self) -> Vec<Arc<SessionHandle>> {
        self.sessions.read().values().flatten().cloned().collect()
    }

    /// The server is shutting down: every bound session closes its stream
    /// (through its queue, so an idle session waits on nothing else).
    pub fn shutdown(&self) {
        for h in self.all() {
            h.tx.shutdown();
        }
    }

    pub fn count(&self) -> usize {
        self.sessions.read().values().map(|l| l.len()).sum()
    }
}

/// Bytes freed before the allocator is asked to give memory back.
const TRIM_AFTER: u64 = 4 << 20;

/// glibc's malloc keeps freed memory in its arenas: after a flood into a
/// stuck session the process would stay at its peak. Once sessions freed
/// more than `TRIM_AFTER` bytes of stanzas, ask it to return what is free
/// (checked every 2 s; one call costs about a millisecond). In the `natter`
/// binary glibc holds only C code's memory (SQLite's): Rust's is jemalloc's,
/// which returns it by itself. In-process tests keep everything in glibc.
pub async fn trim_task(state: crate::state::ServerState) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if state.router.freed.load(Ordering::Relaxed) >= TRIM_AFTER {
            state.router.freed.store(0, Ordering::Relaxed);
            natter_malloc_trim::trim();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim(items: usize) -> QueueLimits {
        QueueLimits {
            items,
            bytes: 1 << 20,
            user_bytes: 1 << 22,
        }
    }

    #[test]
    fn rebind_same_resource_replaces_and_unbind_keeps_replacement() {
        let r = Router::new();
        let j = FullJid::new("a@x/phone").unwrap();
        let (h1, _rx1, rep) = r.bind(j.clone(), lim(4), 10).unwrap();
        assert!(rep.is_none());
        let (h2, _rx2, rep) = r.bind(j.clone(), lim(4), 10).unwrap();
        assert_eq!(rep.unwrap().id, h1.id);
        r.unbind(&h1);
        assert_eq!(r.session(&j).unwrap().id, h2.id);
        assert_eq!(r.resources(&j.to_bare()).len(), 1);
        r.unbind(&h2);
        assert_eq!(r.count(), 0);
        assert!(r.sessions.read().is_empty());
    }

    #[test]
    fn accounts_sharing_a_key_stay_apart() {
        let r = Router::new();
        let (a, _ra, _) = r.bind(FullJid::new("a@x/1").unwrap(), lim(4), 2).unwrap();
        let (b, _rb, _) = r.bind(FullJid::new("b@x/1").unwrap(), lim(4), 2).unwrap();
        // Put b in a's slot, as if their keys collided.
        {
            let mut map = r.sessions.write();
            let mut moved = map.remove(&r.key("b@x")).unwrap();
            map.get_mut(&r.key("a@x")).unwrap().append(&mut moved);
        }
        let bare_a = BareJid::new("a@x").unwrap();
        let found = r.resources(&bare_a);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].id, a.id);
        // b's resource does not count against a's cap.
        let (a2, _ra2, rep) = r.bind(FullJid::new("a@x/2").unwrap(), lim(4), 2).unwrap();
        assert!(rep.is_none());
        assert_eq!(
            r.bind(FullJid::new("a@x/3").unwrap(), lim(4), 2).err(),
            Some(BindError::TooManyResources)
        );
        assert_eq!(r.count(), 3);
        r.unbind(&a);
        r.unbind(&a2);
        assert_eq!(r.count(), 1);
        assert_eq!(r.all()[0].id, b.id);
    }

    #[test]
    fn resource_cap_and_full_queue() {
        let r = Router::new();
        let (h, _rx, _) = r.bind(FullJid::new("a@x/1").unwrap(), lim(1), 1).unwrap();
        assert_eq!(
            r.bind(FullJid::new("a@x/2").unwrap(), lim(1), 1).err(),
            Some(BindError::TooManyResources)
        );
        assert!(h.send(Element::new("message", "jabber:client")));
        assert!(!h.send(Element::new("message", "jabber:client")));
    }
}
