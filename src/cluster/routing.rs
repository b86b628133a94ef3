//! Routing between nodes (the NATS implementation of the `Routing` seam).
//!
//! **Session registry.** Every bound session has an entry in the JetStream
//! key-value bucket `<cluster>_sessions`, key `<node>.<hash of full JID>`,
//! value its routing attributes (`RemoteEntry`: availability, priority,
//! carbons, roster interest, last available presence) and its node's
//! incarnation. The node that holds the session writes it: on bind, on
//! each change (`router::Changes`, coalesced) and on unbind, and rewrites
//! all of its entries every `REFRESH` — the bucket's `max_age` is three
//! refreshes, so entries of a node that died and never came back expire.
//!
//! **Mirror.** Every node watches the bucket and keeps a copy in memory, so
//! routing a stanza costs no NATS round trip. An entry counts only while
//! its node is live: its membership entry (`<cluster>_nodes`) was renewed
//! within the lease and carries the entry's incarnation. A node killed with
//! `kill -9` drops out of every lookup a lease later; its entries are
//! forgotten after two leases (and expire from the bucket later).
//!
//! **Proxies.** Each remote session in the mirror is a detached
//! `SessionHandle` on this node, its attributes copied from the entry, so
//! modules (presence, carbons, PEP, roster pushes, offline delivery) treat
//! it as any session. What they queue on it is published, in order, on the
//! holding node's subject `<cluster>.node.<node>` with the full JID and
//! acceptance order in headers; that node hands it to the session, or —
//! when the session went away meanwhile — routes a message again through
//! the offline queue (`OfflineQueue::requeue`), so an accepted message is
//! never dropped between nodes (it is in the recipient's archive before it
//! travels: see `modules::message`). A message is acknowledged to its
//! sender only once NATS confirmed everything sent before it
//! (`Outbox::settle`), so a node killed after an acknowledgement has
//! nothing of that message in flight.
//!
//! **Bounces.** Core NATS drops a stanza published to a node that is not
//! subscribed at that moment — one cut off from NATS, or still
//! reconnecting after NATS restarted — while its lease still runs. So
//! each goes out with a reply subject of its own
//! (`<cluster>.bounce.<node>.<seq>`), where NATS answers "no responders"
//! when nobody took it; the writer keeps what it published for `RETAIN`
//! to look bounces up. Bounced stanzas are held, in order, and what
//! follows for that node waits behind them; they go again once the node
//! writes its registry entry again (a write it makes after its
//! subscriptions are back), or are dropped once it has been silent for two
//! leases (killed: its users' devices reconnect elsewhere and find the
//! messages in their archives). A node that reconnects to NATS catches its
//! sessions up on their offline queues, since pokes sent meanwhile were
//! lost.
//!
//! **Pokes.** A message queued offline on one node may be for a user whose
//! session on another node came online a moment ago (the mirror lags by a
//! NATS round trip): the queuing node publishes the user on
//! `<cluster>.poke`, and nodes with an available session of that user hand
//! it the queue (`OfflineQueue::catch_up_now`).

use super::Cluster;
use crate::router::SessionHandle;
use crate::router::{Changes, Deliver, Forwarder, Outbound, Resource, Router, Routing};
use crate::state::ServerState;
use async_nats::jetstream::kv;
use futures::StreamExt;
use jid::{BareJid, FullJid};
use natter_xml::Element;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use smallvec::SmallVec;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a node rewrites all of its registry entries.
const REFRESH: Duration = Duration::from_secs(20 * 60);
/// Header names on forwarded stanzas.
const H_TO: &str = "Natter-To";
const H_ORD: &str = "Natter-Ord";
const H_CLOSE: &str = "Natter-Close";
/// On a stanza for a service entity this node owns (`Routing::owner`).
const H_SERVICE: &str = "Natter-Service";
/// Bytes of stanzas waiting to be published before proxies refuse more;
/// also the bound on those published and not yet confirmed, and on those
/// held after a bounce.
const OUTBOX_BYTES: usize = 64 << 20;
/// How long a published stanza is kept for NATS to bounce it.
const RETAIN: Duration = Duration::from_secs(2);
/// How long a sender's acknowledgement waits for NATS to take what it
/// sent to other nodes.
const SETTLE: Duration = Duration::from_secs(5);

/// Stanzas on their way to sessions on other nodes, in the order they
/// were sent: one writer task publishes them and then flushes, so
/// `settle` can tell a sender that everything it sent is in NATS — a
/// node killed after acknowledging a message has nothing of it in flight.
#[derive(Default)]
pub struct Outbox {
    queue: Mutex<OutboxQueue>,
    notify: tokio::sync::Notify,
    /// Sequence number of the last stanza queued.
    pushed: AtomicU64,
    /// Sequence number of the last stanza NATS confirmed (flush).
    flushed: tokio::sync::watch::Sender<u64>,
    /// Subjects of nodes heard of again: stanzas held for them go now.
    back: Mutex<Vec<String>>,
}

#[derive(Default)]
struct OutboxQueue {
    items: VecDeque<Outgoing>,
    bytes: usize,
}

struct Outgoing {
    seq: u64,
    subject: Arc<str>,
    /// The full JID of the session it is for.
    to: Box<str>,
    /// A stanza's acceptance order, or the condition closing the session.
    what: Forwarded,
    payload: bytes::Bytes,
}

enum Forwarded {
    Stanza { ord: i64 },
    Close(&'static str),
}

impl Outgoing {
    fn headers(&self) -> async_nats::HeaderMap {
        let mut h = async_nats::HeaderMap::new();
        h.insert(H_TO, &*self.to);
        match self.what {
            Forwarded::Stanza { ord } => h.insert(H_ORD, ord.to_string().as_str()),
            Forwarded::Close(cond) => h.insert(H_CLOSE, cond),
        }
        h
    }
}

impl Outbox {
    fn push(
        &self,
        subject: &Arc<str>,
        to: &FullJid,
        what: Forwarded,
        payload: bytes::Bytes,
    ) -> bool {
        let mut q = self.queue.lock();
        if q.bytes + payload.len() > OUTBOX_BYTES {
            return false;
        }
        let seq = self.pushed.fetch_add(1, Ordering::SeqCst) + 1;
        q.bytes += payload.len();
        q.items.push_back(Outgoing {
            seq,
            subject: subject.clone(),
            to: to.as_str().into(),
            what,
            payload,
        });
        drop(q);
        self.notify.notify_one();
        true
    }

    /// Wait until everything queued so far is confirmed by NATS; false
    /// after `SETTLE` (NATS unreachable).
    pub async fn settle(&self) -> bool {
        let target = self.pushed.load(Ordering::SeqCst);
        if *self.flushed.borrow() >= target {
            return true;
        }
        let mut rx = self.flushed.subscribe();
        let reached = tokio::time::timeout(SETTLE, rx.wait_for(|v| *v >= target))
            .await
            .is_ok_and(|r| r.is_ok());
        reached
    }
}

/// Stanzas NATS bounced, per node subject, in order, until that node is
/// heard of again (then they go first) or is gone (then they are
/// dropped: messages among them are in their users' archives).
#[derive(Default)]
struct Held {
    by_subject: HashMap<Arc<str>, VecDeque<Outgoing>>,
    bytes: usize,
}

impl Held {
    /// A bounced stanza, in sequence order among those held for its node.
    fn put_back(&mut self, o: Outgoing) {
        self.bytes += o.payload.len();
        let q = self.by_subject.entry(o.subject.clone()).or_default();
        let at = q.partition_point(|h| h.seq < o.seq);
        q.insert(at, o);
    }

    fn take(&mut self, subject: &str) -> VecDeque<Outgoing> {
        let q = self.by_subject.remove(subject).unwrap_or_default();
        self.bytes -= q.iter().map(|o| o.payload.len()).sum::<usize>();
        q
    }
}

/// Stanzas published lately, by sequence number: what a bounce may name.
/// NATS bounces within a round trip; they are kept `RETAIN`.
#[derive(Default)]
struct Recent {
    by_seq: HashMap<u64, Outgoing>,
    order: VecDeque<(Instant, u64)>,
    bytes: usize,
}

impl Recent {
    fn add(&mut self, o: Outgoing) {
        self.bytes += o.payload.len();
        self.order.push_back((Instant::now(), o.seq));
        self.by_seq.insert(o.seq, o);
        while let Some(&(at, seq)) = self.order.front() {
            if at.elapsed() < RETAIN && self.bytes <= OUTBOX_BYTES {
                break;
            }
            self.order.pop_front();
            self.take(seq);
        }
    }

    fn take(&mut self, seq: u64) -> Option<Outgoing> {
        let o = self.by_seq.remove(&seq)?;
        self.bytes -= o.payload.len();
        Some(o)
    }
}

/// What NATS bounced (nobody subscribed on its node's subject) is held.
fn note_bounce(m: async_nats::Message, prefix: &str, recent: &mut Recent, held: &mut Held) {
    if m.status != Some(async_nats::StatusCode::NO_RESPONDERS) {
        return;
    }
    let Some(seq) = m
        .subject
        .as_str()
        .strip_prefix(prefix)
        .and_then(|s| s.parse::<u64>().ok())
    else {
        return;
    };
    match recent.take(seq) {
        Some(o) => {
            if !held.by_subject.contains_key(&o.subject) {
                tracing::warn!(subject = %o.subject, "cluster: NATS bounced stanzas (their node is not subscribed); held until it is heard of again");
            }
            held.put_back(o);
        }
        None => tracing::warn!(seq, "cluster: a stanza bounced too late to be held"),
    }
}

/// Publish what proxies queued, in order, and flush after each batch.
/// Each stanza carries its own reply subject, where NATS bounces it when
/// nobody is subscribed on its node's subject; what bounced is held, and
/// what follows for that node waits behind it.
async fn write_outbox(
    state: ServerState,
    c: Arc<Cluster>,
    routing: Arc<ClusterRouting>,
    mut bounces: async_nats::Subscriber,
) {
    use futures::FutureExt;
    let outbox = &c.outbox;
    let bounce_prefix = format!("{}.", bounce_subject(&c.name, &c.node));
    // A node's subject is this prefix and its name.
    let node_prefix = subject_of(&c.name, "");
    let mut recent = Recent::default();
    let mut held = Held::default();
    let mut sweep = tokio::time::interval(routing.lease);
    let mut ending = false;
    loop {
        if !ending {
            tokio::select! {
                // Sessions ending at shutdown give back what they held,
                // some of it for other nodes: keep publishing until they
                // are all gone, then once more.
                _ = drained(&state) => ending = true,
                _ = outbox.notify.notified() => {}
                Some(m) = bounces.next() => note_bounce(m, &bounce_prefix, &mut recent, &mut held),
                _ = sweep.tick() => drop_held_for_gone_nodes(&routing, &node_prefix, &mut held),
            }
        }
        loop {
            while let Some(Some(m)) = bounces.next().now_or_never() {
                note_bounce(m, &bounce_prefix, &mut recent, &mut held);
            }
            if held.bytes > OUTBOX_BYTES {
                drop_held(&mut held, "more held than the outbox holds");
            }
            let batch: Vec<Outgoing> = {
                let mut q = outbox.queue.lock();
                q.bytes = 0;
                q.items.drain(..).collect()
            };
            // Nodes heard of since their stanzas bounced: those go first.
            let back: Vec<String> = std::mem::take(&mut *outbox.back.lock());
            let mut out: Vec<Outgoing> = Vec::new();
            for subject in back {
                out.extend(held.take(&subject));
            }
            let last = batch.last().map(|o| o.seq);
            for o in batch {
                if held.by_subject.contains_key(&o.subject) {
                    held.put_back(o);
                } else {
                    out.push(o);
                }
            }
            if out.is_empty() {
                if let Some(last) = last {
                    outbox.flushed.send_replace(last);
                    continue;
                }
                break;
            }
            for o in out {
                let reply = format!("{bounce_prefix}{}", o.seq);
                if let Err(e) = c
                    .client
                    .publish_with_reply_and_headers(
                        o.subject.to_string(),
                        reply,
                        o.headers(),
                        o.payload.clone(),
                    )
                    .await
                {
                    tracing::warn!(error = %e, "cluster: stanza not forwarded");
                }
                recent.add(o);
            }
            match c.client.flush().await {
                Ok(()) => {
                    if let Some(last) = last {
                        outbox.flushed.send_replace(last);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cluster: NATS flush failed"),
            }
        }
        if ending {
            return;
        }
    }
}

/// Drop what is held for nodes silent for two leases (killed, or cut off
/// for long): their sessions are gone or will catch up from the archive.
fn drop_held_for_gone_nodes(routing: &ClusterRouting, node_prefix: &str, held: &mut Held) {
    if held.by_subject.is_empty() {
        return;
    }
    let gone: Vec<Arc<str>> = {
        let m = routing.mirror.read();
        held.by_subject
            .keys()
            .filter(|subject| {
                let node = subject.strip_prefix(node_prefix).unwrap_or_default();
                m.nodes
                    .get(node)
                    .is_none_or(|s| s.at.elapsed() > routing.lease * 2)
            })
            .cloned()
            .collect()
    };
    for subject in gone {
        let n = held.take(&subject).len();
        tracing::warn!(%subject, stanzas = n, "cluster: dropped stanzas held for a node gone silent; messages among them are in their users' archives");
    }
}

fn drop_held(held: &mut Held, why: &str) {
    let n: usize = held.by_subject.values().map(VecDeque::len).sum();
    tracing::warn!(
        stanzas = n,
        why,
        "cluster: dropped held stanzas; messages among them are in their users' archives"
    );
    *held = Held::default();
}

fn bounce_subject(cluster: &str, node: &str) -> String {
    format!("{cluster}.bounce.{node}")
}

/// Shutdown began and every session task (and requeue) has ended.
async fn drained(state: &ServerState) {
    state.shutdown.cancelled().await;
    state.tasks.wait().await;
}

/// The way to one node's sessions: proxies of them forward here.
struct NodeLink {
    subject: Arc<str>,
    outbox: Arc<Outbox>,
}

impl Forwarder for NodeLink {
    fn forward(&self, to: &FullJid, d: Deliver) -> bool {
        let (what, payload) = match d {
            // The form with `jabber:client` declared: it parses alone.
            Deliver::Stanza(out) => (
                Forwarded::Stanza { ord: out.ord() },
                bytes::Bytes::from(out.ws_frame()),
            ),
            Deliver::Close(err) => (Forwarded::Close(err.condition.name()), bytes::Bytes::new()),
            Deliver::Overflow | Deliver::Shutdown => return false,
        };
        self.outbox.push(&self.subject, to, what, payload)
    }
}

/// A session's registry entry.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RemoteEntry {
    pub jid: String,
    pub node: String,
    pub incarnation: u64,
    pub available: bool,
    pub priority: i8,
    pub carbons: bool,
    pub interested: bool,
    /// The last available presence it broadcast (re-sent to new
    /// subscribers and probes).
    pub presence: Option<String>,
}

/// The registry key of `jid`'s session on `node` (NATS keys allow only a
/// few characters, and JIDs are long: a hash).
pub fn key(node: &str, jid: &str) -> String {
    let h = Sha256::digest(jid.as_bytes());
    format!("{node}.{}", hex::encode(&h[..16]))
}

fn subject_of(cluster: &str, node: &str) -> String {
    format!("{cluster}.node.{node}")
}

fn poke_subject(cluster: &str) -> String {
    format!("{cluster}.poke")
}

fn changed_subject(cluster: &str) -> String {
    format!("{cluster}.changed")
}

fn auth_failure_subject(cluster: &str) -> String {
    format!("{cluster}.authfail")
}

/// A session on another node, seen through the mirror.
struct Remote {
    key: String,
    node: String,
    incarnation: u64,
    handle: Arc<SessionHandle>,
    /// Modules were told it is gone (its node went silent).
    reported: bool,
}

/// When a node was last heard of, and which run of it that was.
struct Seen {
    incarnation: u64,
    at: Instant,
    /// The registry entry's revision heard last.
    revision: u64,
}

#[derive(Default)]
struct Mirror {
    nodes: HashMap<String, Seen>,
    by_key: HashMap<String, BareJid>,
    users: HashMap<BareJid, SmallVec<[Remote; 1]>>,
}

impl Mirror {
    fn live(&self, r: &Remote, lease: Duration) -> bool {
        self.nodes
            .get(&r.node)
            .is_some_and(|s| s.incarnation == r.incarnation && s.at.elapsed() < lease)
    }

    fn remove_key(&mut self, key: &str) -> Option<Remote> {
        let bare = self.by_key.remove(key)?;
        let list = self.users.get_mut(&bare)?;
        let i = list.iter().position(|r| r.key == key)?;
        let r = list.remove(i);
        if list.is_empty() {
            self.users.remove(&bare);
        }
        Some(r)
    }
}

/// `Routing` across the cluster: this node's table first, then the
/// mirror of the others'.
pub struct ClusterRouting {
    local: Arc<Router>,
    node: String,
    lease: Duration,
    /// When this node started following the cluster.
    started: Instant,
    mirror: RwLock<Mirror>,
}

impl ClusterRouting {
    pub fn new(local: Arc<Router>, cluster: &Cluster) -> Self {
        ClusterRouting {
            local,
            node: cluster.node.clone(),
            started: Instant::now(),
            lease: cluster.lease,
            mirror: Default::default(),
        }
    }

    /// Remote sessions in the mirror that count now (admin, tests).
    pub fn remote_count(&self) -> usize {
        let m = self.mirror.read();
        m.users
            .values()
            .flatten()
            .filter(|r| m.live(r, self.lease))
            .count()
    }
}

/// Rendezvous hashing: the weight of `node` for `entity`.
fn weight(node: &str, entity: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(node.as_bytes());
    h.update([0]);
    h.update(entity.as_bytes());
    h.finalize().into()
}

impl Routing for ClusterRouting {
    fn describe(&self) -> String {
        let m = self.mirror.read();
        let nodes: Vec<String> = m
            .nodes
            .iter()
            .map(|(n, s)| {
                format!(
                    "{n} (run {}, heard {:?} ago)",
                    s.incarnation,
                    s.at.elapsed()
                )
            })
            .collect();
        let sessions: Vec<String> = m
            .users
            .values()
            .flatten()
            .map(|r| {
                format!(
                    "{} on {} (run {}, live {}, available {})",
                    r.handle.jid,
                    r.node,
                    r.incarnation,
                    m.live(r, self.lease),
                    r.handle.is_available()
                )
            })
            .collect();
        format!("nodes: {nodes:?}; remote sessions: {sessions:?}")
    }

    fn owner(&self, entity: &str) -> Option<String> {
        let m = self.mirror.read();
        let lease = self.lease;
        let live = m
            .nodes
            .iter()
            .filter(|(_, s)| s.at.elapsed() < lease)
            .map(|(n, _)| n.as_str());
        // This node counts even before its own heartbeat came back.
        let best = live
            .chain(std::iter::once(self.node.as_str()))
            .max_by_key(|n| weight(n, entity))?;
        (best != self.node).then(|| best.to_string())
    }

    fn session(&self, full: &FullJid) -> Option<Arc<SessionHandle>> {
        if let Some(h) = self.local.session(full) {
            return Some(h);
        }
        let m = self.mirror.read();
        m.users
            .get(&full.to_bare())?
            .iter()
            .find(|r| &r.handle.jid == full && m.live(r, self.lease))
            .map(|r| r.handle.clone())
    }

    fn resources(&self, bare: &BareJid) -> Vec<Arc<SessionHandle>> {
        let mut out = self.local.resources(bare);
        let m = self.mirror.read();
        if let Some(list) = m.users.get(bare) {
            let here = out.len();
            for r in list {
                // A resource bound here wins over a stale remote entry.
                if m.live(r, self.lease) && !out[..here].iter().any(|h| h.jid == r.handle.jid) {
                    out.push(r.handle.clone());
                }
            }
        }
        out
    }
}

/// Open (or create) a bucket of the cluster.
async fn bucket(c: &Cluster, name: String, max_age: Duration) -> anyhow::Result<kv::Store> {
    let js = async_nats::jetstream::new(c.client.clone());
    match js.get_key_value(&name).await {
        Ok(s) => Ok(s),
        Err(_) => Ok(js
            .create_key_value(kv::Config {
                bucket: name,
                history: 1,
                max_age,
                ..Default::default()
            })
            .await?),
    }
}

/// A bucket's current entries and then its changes, as one watch
/// (last value per key first). None when the bucket is empty: async-nats
/// ends a history watch of an empty bucket at once, so the caller polls
/// until something is there (a cluster with no sessions at all).
async fn follow(store: &kv::Store) -> anyhow::Result<Option<(kv::Entry, kv::Watch)>> {
    let mut watch = store.watch_with_history(">").await?;
    match watch.next().await {
        None => Ok(None),
        Some(first) => Ok(Some((first?, watch))),
    }
}

/// Wait `d`, or less if shutting down; false when shutting down.
async fn pause(state: &ServerState, d: Duration) -> bool {
    tokio::select! {
        _ = state.shutdown.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// Everything routing between nodes needs running: the registry writer,
/// the two watches, the inbound subject and pokes. Called once at start,
/// after the router tracks changes.
pub async fn start(
    state: ServerState,
    cluster: Arc<Cluster>,
    routing: Arc<ClusterRouting>,
    changes: Arc<Changes>,
) -> anyhow::Result<()> {
    let sessions = bucket(&cluster, format!("{}_sessions", cluster.name), REFRESH * 3).await?;
    let inbound = cluster
        .client
        .subscribe(subject_of(&cluster.name, &cluster.node))
        .await?;
    let pokes = cluster
        .client
        .subscribe(poke_subject(&cluster.name))
        .await?;
    let changes_elsewhere = cluster
        .client
        .subscribe(changed_subject(&cluster.name))
        .await?;
    let auth_failures = cluster
        .client
        .subscribe(auth_failure_subject(&cluster.name))
        .await?;
    tokio::spawn(write_registry(
        state.clone(),
        cluster.clone(),
        sessions.clone(),
        changes,
    ));
    tokio::spawn(watch_nodes(state.clone(), cluster.clone(), routing.clone()));
    tokio::spawn(watch_sessions(
        state.clone(),
        cluster.clone(),
        routing.clone(),
        sessions,
    ));
    tokio::spawn(receive(state.clone(), inbound));
    let bounces = cluster
        .client
        .subscribe(format!(
            "{}.*",
            bounce_subject(&cluster.name, &cluster.node)
        ))
        .await?;
    tokio::spawn(write_outbox(
        state.clone(),
        cluster.clone(),
        routing.clone(),
        bounces,
    ));
    tokio::spawn(catch_up_after_reconnects(state.clone(), cluster.clone()));
    tokio::spawn(receive_pokes(state.clone(), cluster.clone(), pokes));
    tokio::spawn(receive_changes(
        state.clone(),
        cluster.clone(),
        changes_elsewhere,
    ));
    tokio::spawn(receive_auth_failures(state, cluster, auth_failures));
    Ok(())
}

fn entry_of(h: &SessionHandle, c: &Cluster) -> RemoteEntry {
    let r = h.snapshot();
    RemoteEntry {
        jid: r.jid.to_string(),
        node: c.node.clone(),
        incarnation: c.incarnation,
        available: r.available,
        priority: r.priority,
        carbons: r.carbons,
        interested: r.interested,
        presence: h.available_presence().map(|p| p.to_string()),
    }
}

/// Publish this node's session changes (and everything every `REFRESH`).
async fn write_registry(
    state: ServerState,
    c: Arc<Cluster>,
    sessions: kv::Store,
    changes: Arc<Changes>,
) {
    let mut refresh = tokio::time::interval(REFRESH);
    refresh.tick().await;
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => break,
            _ = changes.notify.notified() => {}
            _ = refresh.tick() => {
                for h in state.router.all() {
                    changes.restore(HashMap::from([(h.id, h.jid.clone())]));
                }
            }
        }
        let pending = changes.take();
        let mut failed = HashMap::new();
        for (id, jid) in pending {
            let k = key(&c.node, jid.as_str());
            let r = match state.router.session(&jid) {
                Some(h) => match serde_json::to_vec(&entry_of(&h, &c)) {
                    Ok(v) => sessions
                        .put(&k, v.into())
                        .await
                        .map(drop)
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                },
                None => sessions.delete(&k).await.map_err(|e| e.to_string()),
            };
            if let Err(e) = r {
                tracing::warn!(%jid, error = %e, "cluster: session registry not updated; retrying");
                failed.insert(id, jid);
            }
        }
        if !failed.is_empty() {
            changes.restore(failed);
            tokio::time::sleep(Duration::from_secs(1)).await;
            changes.notify.notify_one();
        }
    }
    // Leaving: this node's sessions are gone.
    for h in state.router.all() {
        let _ = sessions.delete(key(&c.node, h.jid.as_str())).await;
    }
}

/// Unix nanoseconds now.
fn now_nanos() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

/// Follow node membership: who is live, and since when. A watch that
/// ends (NATS lost it) is opened again from a fresh snapshot.
async fn watch_nodes(state: ServerState, c: Arc<Cluster>, routing: Arc<ClusterRouting>) {
    let mut sweep = tokio::time::interval(routing.lease);
    loop {
        let mut watch = match follow(&c.nodes).await {
            Ok(Some((first, watch))) => {
                note_node(&c, &routing, first);
                watch
            }
            // Not even this node's entry (NATS lost it): poll.
            Ok(None) if pause(&state, Duration::from_millis(100)).await => continue,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cluster: cannot watch the nodes; retrying");
                if pause(&state, Duration::from_secs(1)).await {
                    continue;
                }
                return;
            }
        };
        loop {
            tokio::select! {
                _ = state.shutdown.cancelled() => return,
                _ = sweep.tick() => {
                    for h in forget_dead(&routing) {
                        session_gone(&state, &routing, h).await;
                    }
                }
                e = watch.next() => match e {
                    Some(Ok(e)) => note_node(&c, &routing, e),
                    Some(Err(e)) => tracing::warn!(error = %e, "cluster: node watch"),
                    None => break,
                },
            }
        }
    }
}

fn note_node(c: &Cluster, routing: &ClusterRouting, e: kv::Entry) {
    let (cluster, outbox) = (&c.name, &c.outbox);
    let mut m = routing.mirror.write();
    match e.operation {
        kv::Operation::Put => {
            let Ok(info) = serde_json::from_slice::<super::NodeInfo>(&e.value) else {
                return;
            };
            // An entry written a while ago (read at start) is that old.
            let age_ns = (now_nanos() - e.created.unix_timestamp_nanos()).max(0);
            let age = Duration::from_nanos(age_ns.min(u64::MAX as i128) as u64);
            let at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
            // A new write (not a watch opened again replaying the entry it
            // saw) shows the node is subscribed: what bounced goes again.
            if m.nodes.get(&e.key).is_none_or(|s| s.revision != e.revision) {
                outbox.back.lock().push(subject_of(cluster, &e.key));
                outbox.notify.notify_one();
            }
            m.nodes.insert(
                e.key,
                Seen {
                    incarnation: info.incarnation,
                    at,
                    revision: e.revision,
                },
            );
        }
        kv::Operation::Delete | kv::Operation::Purge => {
            m.nodes.remove(&e.key);
        }
    }
}

/// Sessions of nodes silent for two leases are reported gone (once:
/// rooms let their occupants go) but kept, in case the node was only cut
/// off from NATS for a while and comes back; they are forgotten when the
/// node runs again under a new incarnation (it deletes its old entries
/// too) or has been silent as long as the registry keeps entries.
fn forget_dead(routing: &ClusterRouting) -> Vec<Arc<SessionHandle>> {
    let mut m = routing.mirror.write();
    let lease = routing.lease;
    let keep = REFRESH * 3;
    let nodes = std::mem::take(&mut m.nodes);
    let mut gone = Vec::new();
    let mut dead = Vec::new();
    for r in m.users.values_mut().flatten() {
        let seen = nodes.get(&r.node);
        let silent = seen.is_none_or(|s| s.at.elapsed() > lease * 2);
        if silent && !r.reported {
            r.reported = true;
            gone.push(r.handle.clone());
        }
        // A node unknown once every live one has had time to be heard of
        // has been silent for longer than `nodes` remembers.
        let forgotten = routing.started.elapsed() > lease * 2;
        let stale = match seen {
            None => forgotten,
            Some(s) => {
                s.at.elapsed() > keep || (s.incarnation != r.incarnation && s.at.elapsed() < lease)
            }
        };
        if stale {
            dead.push(r.key.clone());
        }
    }
    m.nodes = nodes;
    m.nodes.retain(|_, s| s.at.elapsed() < keep * 2);
    for k in dead {
        m.remove_key(&k);
    }
    gone
}

/// Follow the session registry into the mirror. A watch opened again
/// replays every key's last value, which the mirror takes as it is.
async fn watch_sessions(
    state: ServerState,
    c: Arc<Cluster>,
    routing: Arc<ClusterRouting>,
    sessions: kv::Store,
) {
    loop {
        let mut watch = match follow(&sessions).await {
            Ok(Some((first, watch))) => {
                apply(&state, &c, &routing, &sessions, first).await;
                watch
            }
            Ok(None) => {
                // No session anywhere: nothing to mirror; look again soon.
                let gone: Vec<Arc<SessionHandle>> = {
                    let mut m = routing.mirror.write();
                    let keys: Vec<String> = m.by_key.keys().cloned().collect();
                    keys.iter()
                        .filter_map(|k| m.remove_key(k))
                        .map(|r| r.handle)
                        .collect()
                };
                for h in gone {
                    session_gone(&state, &routing, h).await;
                }
                if pause(&state, Duration::from_millis(100)).await {
                    continue;
                }
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cluster: cannot watch the session registry; retrying");
                if pause(&state, Duration::from_secs(1)).await {
                    continue;
                }
                return;
            }
        };
        loop {
            let e = tokio::select! {
                _ = state.shutdown.cancelled() => return,
                e = watch.next() => e,
            };
            match e {
                Some(Ok(e)) => apply(&state, &c, &routing, &sessions, e).await,
                Some(Err(e)) => tracing::warn!(error = %e, "cluster: session watch"),
                None => break,
            }
        }
    }
}

/// One registry change into the mirror.
async fn apply(
    state: &ServerState,
    c: &Arc<Cluster>,
    routing: &ClusterRouting,
    sessions: &kv::Store,
    e: kv::Entry,
) {
    if e.key.starts_with(&format!("{}.", c.node)) {
        // Our own: the table is the truth. An entry of an earlier run of
        // this node is stale (the run ended without deleting it).
        if e.operation == kv::Operation::Put
            && serde_json::from_slice::<RemoteEntry>(&e.value)
                .is_ok_and(|r| r.incarnation != c.incarnation)
        {
            let _ = sessions.delete(&e.key).await;
        }
        return;
    }
    match e.operation {
        kv::Operation::Put => match serde_json::from_slice::<RemoteEntry>(&e.value) {
            Ok(r) => upsert(state, c, routing, e.key, r),
            Err(err) => tracing::warn!(key = %e.key, error = %err, "cluster: bad registry entry"),
        },
        kv::Operation::Delete | kv::Operation::Purge => {
            let gone = routing.mirror.write().remove_key(&e.key);
            if let Some(r) = gone {
                session_gone(state, routing, r.handle).await;
            }
        }
    }
}

/// Tell modules here that a remote session ended — unless its full JID is
/// bound again meanwhile (here or on another node), which then stays.
async fn session_gone(state: &ServerState, routing: &ClusterRouting, h: Arc<SessionHandle>) {
    if routing.session(&h.jid).is_none() {
        let ev = crate::modules::Event::RemoteSessionGone;
        state.modules.emit(state, Some(&h), &ev).await;
    }
}

fn upsert(
    state: &ServerState,
    c: &Arc<Cluster>,
    routing: &ClusterRouting,
    key: String,
    r: RemoteEntry,
) {
    let Ok(jid) = FullJid::new(&r.jid) else {
        return;
    };
    let res = Resource {
        id: 0,
        jid: jid.clone(),
        available: r.available,
        priority: r.priority,
        carbons: r.carbons,
        interested: r.interested,
    };
    let presence = r
        .presence
        .as_deref()
        .and_then(|p| natter_xml::parse_frame(p.as_bytes(), &natter_xml::Limits::default()).ok());
    let mut m = routing.mirror.write();
    let bare = jid.to_bare();
    if let Some(list) = m.users.get_mut(&bare) {
        if let Some(x) = list.iter_mut().find(|x| x.key == key) {
            if x.handle.jid == jid && x.node == r.node {
                x.incarnation = r.incarnation;
                x.handle.set_remote(&res, presence);
                return;
            }
        }
    }
    m.remove_key(&key);
    let link = Arc::new(NodeLink {
        subject: subject_of(&c.name, &r.node).into(),
        outbox: c.outbox.clone(),
    });
    let handle = state.router.proxy(jid, link);
    handle.set_remote(&res, presence);
    m.by_key.insert(key.clone(), bare.clone());
    m.users.entry(bare).or_default().push(Remote {
        key,
        node: r.node,
        incarnation: r.incarnation,
        handle,
        reported: false,
    });
}

/// The next message on `sub`; None once shutting down or unsubscribed.
async fn next(
    state: &ServerState,
    sub: &mut async_nats::Subscriber,
) -> Option<async_nats::Message> {
    // While sessions end at shutdown, what other nodes still send them is
    // taken (and given back through the offline queue).
    tokio::select! {
        _ = drained(state) => None,
        m = sub.next() => m,
    }
}

/// Stanzas other nodes forward to sessions here.
async fn receive(state: ServerState, mut sub: async_nats::Subscriber) {
    loop {
        let Some(msg) = next(&state, &mut sub).await else {
            return;
        };
        deliver_here(&state, msg).await;
    }
}

async fn deliver_here(state: &ServerState, msg: async_nats::Message) {
    let Some(headers) = msg.headers.as_ref() else {
        return;
    };
    if headers.get(H_SERVICE).is_some() {
        // Its sender waits for the answer, so it has nothing else in
        // flight: served beside other traffic, not in front of it.
        let Some(c) = &state.cluster else { return };
        tokio::spawn(serve_here(state.clone(), c.client.clone(), msg));
        return;
    }
    let Some(to) = headers
        .get(H_TO)
        .and_then(|v| FullJid::new(v.as_str()).ok())
    else {
        return;
    };
    let session = state.router.session(&to);
    if let Some(cond) = headers.get(H_CLOSE) {
        if let Some(h) = session {
            let cond = crate::error::StreamCondition::from_name(cond.as_str());
            h.close(crate::error::StreamError::new(cond));
        }
        return;
    }
    let ord = headers
        .get(H_ORD)
        .and_then(|v| v.as_str().parse::<i64>().ok())
        .unwrap_or(0);
    let el: Element = match natter_xml::parse_frame(&msg.payload, &unlimited()) {
        Ok(el) => el,
        Err(e) => {
            tracing::warn!(%to, error = %e, "cluster: forwarded stanza does not parse");
            return;
        }
    };
    let out = Outbound::new(&el, ord);
    if session.is_some_and(|h| h.send_out(&out)) {
        return;
    }
    // The session went away (or refuses): a message takes the way of one
    // its session gave back — other devices, or the offline queue.
    if out.is_message() {
        let offline = state.modules.api::<dyn crate::modules::api::OfflineQueue>();
        offline.requeue(state, vec![out]).await;
    }
}

/// Hand `stanza` (for an entity `owner` serves) to that node and wait
/// until it was served there — a room message archived and fanned out —
/// so the sender's acknowledgement comes after (a NATS request; the
/// sender's session waits for it, so its stanzas keep their order). An
/// error the owner answered goes to the sender from here.
pub async fn forward_to_service(
    state: &ServerState,
    c: &Cluster,
    owner: &str,
    stanza: &Element,
) -> Result<(), crate::error::StanzaError> {
    let mut h = async_nats::HeaderMap::new();
    h.insert(H_SERVICE, "1");
    let req = async_nats::Request::new()
        .headers(h)
        .payload(stanza.to_string().into())
        .timeout(Some(SETTLE));
    let reply = match c.client.send_request(subject_of(&c.name, owner), req).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(%owner, error = %e, "cluster: service stanza not served by its owner");
            return Err(crate::error::StanzaError::with_text(
                crate::error::Condition::InternalServerError,
                "the node serving this entity did not answer; retry later",
            )
            .with_type(crate::error::ErrorType::Wait));
        }
    };
    if !reply.payload.is_empty() {
        if let (Ok(err), Some(from)) = (
            natter_xml::parse_frame(&reply.payload, &unlimited()),
            stanza.attr("from").and_then(|f| FullJid::new(f).ok()),
        ) {
            state.routing.deliver(&from, &Outbound::new(&err, 0));
        }
    }
    Ok(())
}

/// A stanza for a service entity this node owns, from another node:
/// served as if it came in here; the reply is empty, or the error stanza
/// for its sender.
async fn serve_here(state: ServerState, client: async_nats::Client, msg: async_nats::Message) {
    let el = match natter_xml::parse_frame(&msg.payload, &unlimited()) {
        Ok(el) => el,
        Err(e) => {
            tracing::warn!(error = %e, "cluster: forwarded service stanza does not parse");
            return;
        }
    };
    let r = state.modules.to_service_here(&state, el.clone()).await;
    let answer = match r {
        Some(Err(e)) if el.attr("type") != Some("error") => e.reply_to(&el).to_string(),
        _ => String::new(),
    };
    if let Some(reply) = msg.reply {
        if let Err(e) = client.publish(reply, answer.into()).await {
            tracing::warn!(error = %e, "cluster: service stanza served, answer not sent");
        }
    }
}

/// Stanzas from other nodes were checked there; parse them whole.
fn unlimited() -> natter_xml::Limits {
    natter_xml::Limits {
        max_stanza_bytes: usize::MAX,
        max_depth: usize::MAX,
        max_attrs: usize::MAX,
        max_elements: usize::MAX,
    }
}

/// After NATS comes back, pokes sent while this node was cut off are
/// lost: every session here catches up on its offline queue — once NATS
/// took this node's subscriptions again (a flush), so pokes from then on
/// arrive.
async fn catch_up_after_reconnects(state: ServerState, c: Arc<Cluster>) {
    let mut connects = c.connects.subscribe();
    connects.mark_unchanged();
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            r = connects.changed() => if r.is_err() { return },
        }
        // The first connection is the one made at start.
        if *connects.borrow_and_update() <= 1 {
            continue;
        }
        if c.client.flush().await.is_err() {
            continue;
        }
        let offline = state.modules.api::<dyn crate::modules::api::OfflineQueue>();
        let sessions = state.router.all();
        tracing::info!(
            sessions = sessions.len(),
            "cluster: back on NATS; sessions here catch up on their offline queues"
        );
        for h in sessions {
            offline.catch_up_now(&state, &h);
        }
    }
}

/// A node queued messages offline for a user: catch its sessions here up.
async fn receive_pokes(state: ServerState, c: Arc<Cluster>, mut sub: async_nats::Subscriber) {
    loop {
        let Some(msg) = next(&state, &mut sub).await else {
            return;
        };
        let Some(f) = from_elsewhere(&c, &msg.payload, 1) else {
            continue;
        };
        let Ok(bare) = BareJid::new(f[0]) else {
            continue;
        };
        let offline = state.modules.api::<dyn crate::modules::api::OfflineQueue>();
        for h in state.router.resources(&bare) {
            offline.catch_up_now(&state, &h);
        }
    }
}

/// The fields of a notice another node published ("node\nfield\n…",
/// `n` fields); None for our own notices and malformed ones.
fn from_elsewhere<'a>(c: &Cluster, payload: &'a [u8], n: usize) -> Option<Vec<&'a str>> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut parts = text.splitn(n + 1, '\n');
    let node = parts.next()?;
    let fields: Vec<&str> = parts.collect();
    (node != c.node && fields.len() == n).then_some(fields)
}

/// Tell the other nodes that `user` has messages queued offline.
pub async fn poke(c: &Cluster, user: &BareJid) {
    let payload = format!("{}\n{}", c.node, user);
    if let Err(e) = c
        .client
        .publish(poke_subject(&c.name), payload.into())
        .await
    {
        tracing::warn!(%user, error = %e, "cluster: offline poke not sent");
    }
}

/// Tell the other nodes that `module`'s cached data of `user` changed.
pub async fn announce_change(c: &Cluster, module: &str, user: &BareJid) {
    let payload = format!("{}\n{module}\n{user}", c.node);
    if let Err(e) = c
        .client
        .publish(changed_subject(&c.name), payload.into())
        .await
    {
        tracing::warn!(%user, module, error = %e, "cluster: cache invalidation not sent");
    }
}

/// Another node changed cached data: the module here drops its copy.
async fn receive_changes(state: ServerState, c: Arc<Cluster>, mut sub: async_nats::Subscriber) {
    loop {
        let Some(msg) = next(&state, &mut sub).await else {
            return;
        };
        let Some(f) = from_elsewhere(&c, &msg.payload, 2) else {
            continue;
        };
        let (module, Ok(user)) = (f[0], BareJid::new(f[1])) else {
            continue;
        };
        let ev = crate::modules::Event::StoredDataChanged {
            user: &user,
            module,
        };
        state.modules.emit(&state, None, &ev).await;
    }
}

/// Tell the other nodes about a failed login, so the login throttle
/// (`c2s::throttle`) counts every node's failures.
pub async fn announce_auth_failure(c: &Cluster, ip: std::net::IpAddr, account: Option<&str>) {
    let payload = format!("{}\n{ip}\n{}", c.node, account.unwrap_or_default());
    if let Err(e) = c
        .client
        .publish(auth_failure_subject(&c.name), payload.into())
        .await
    {
        tracing::warn!(error = %e, "cluster: failed login not announced");
    }
}

/// Another node's failed login counts here too.
async fn receive_auth_failures(
    state: ServerState,
    c: Arc<Cluster>,
    mut sub: async_nats::Subscriber,
) {
    loop {
        let Some(msg) = next(&state, &mut sub).await else {
            return;
        };
        let Some(f) = from_elsewhere(&c, &msg.payload, 2) else {
            continue;
        };
        if let Ok(ip) = f[0].parse() {
            let account = (!f[1].is_empty()).then_some(f[1]);
            state.throttle.failure(ip, account);
        }
    }
}
