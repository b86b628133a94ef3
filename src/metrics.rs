//! Prometheus metrics, served as text at `/metrics` (README "Metrics" lists
//! each one). Built on prometheus-client with an explicit registry held in
//! `ServerState` — no global recorder, so several servers in one process
//! (the tests) keep separate numbers.
//!
//! Hooks elsewhere are single calls: `connection`, `session_bound` /
//! `session_closed`, `stanza_in`, `stanzas_out`, `routing_timer`,
//! `auth_failure`, `stanza_error`, `stream_error`. Store latency comes from
//! [`MeteredStore`], a `Store` wrapper; gauges that can be read off the
//! router (sessions, queue depths) are computed when scraped, and so is
//! the disk space (`crate::disk::refresh` from the `/metrics` handler).

use crate::router::Router;
use parking_lot::{Mutex, RwLock};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

type L1 = [(&'static str, &'static str); 1];
type L2 = [(&'static str, &'static str); 2];
type Hist = Family<L1, Histogram, fn() -> Histogram>;

/// Transports a session can use (`Transport::kind`).
pub const TRANSPORTS: [&str; 3] = ["tcp", "tls", "ws"];

fn latency_histogram() -> Histogram {
    // 50 µs … ~3.3 s
    Histogram::new(exponential_buckets(0.000_05, 3.0, 11))
}

/// What the admin listing shows about a bound session.
#[derive(Clone, Debug)]
pub struct SessionMeta {
    pub transport: &'static str,
    pub since: SystemTime,
}

pub struct Metrics {
    registry: Registry,
    started: Instant,
    connections: Family<L1, Gauge>,
    sessions: Family<L1, Gauge>,
    stanzas_in: Family<L1, Counter>,
    stanzas_out: Family<L1, Counter>,
    routing: Hist,
    /// The series of `stanzas_in`, `stanzas_out` and `routing` by kind.
    stanzas_in_kind: [Counter; 4],
    stanzas_out_kind: [Counter; 4],
    routing_kind: [Histogram; 4],
    store: Hist,
    /// `store`'s series by operation: the family's own lookup hashes the
    /// labels with SipHash and takes its lock, on every store call.
    /// Operations are the store traits' methods, so this stays small.
    store_by_op: RwLock<HashMap<&'static str, Histogram, foldhash::fast::FixedState>>,
    store_errors: Family<L1, Counter>,
    queue_depth: Gauge,
    queue_depth_max: Gauge,
    auth_failures: Family<L1, Counter>,
    errors: Family<L2, Counter>,
    uptime: Gauge,
    disk_free: Gauge,
    disk_size: Gauge,
    /// Bound sessions by router id (the sessions gauge and `natter admin sessions`).
    bound: Mutex<HashMap<u64, SessionMeta>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Stanza kinds as metric labels (client-chosen names never become labels):
/// the `kind` label's values of the per-stanza series.
const KINDS: [&str; 4] = ["message", "presence", "iq", "other"];

/// Index in [`KINDS`] of a stanza named `name`.
fn kind_index(name: &str) -> usize {
    match name {
        "message" => 0,
        "presence" => 1,
        "iq" => 2,
        _ => 3,
    }
}

/// A family's series for each of [`KINDS`], looked up once: `get_or_create`
/// hashes the labels and takes the family's lock, and these are counted for
/// every stanza.
fn per_kind<M: Clone, C: Fn() -> M>(f: &Family<L1, M, C>) -> [M; 4] {
    KINDS.map(|k| f.get_or_create(&[("kind", k)]).clone())
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("natter");
        let stanzas_in = Family::default();
        let stanzas_out = Family::default();
        let routing = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        let m = Metrics {
            registry: Registry::default(),
            started: Instant::now(),
            connections: Family::default(),
            sessions: Family::default(),
            stanzas_in_kind: per_kind(&stanzas_in),
            stanzas_out_kind: per_kind(&stanzas_out),
            routing_kind: per_kind(&routing),
            stanzas_in,
            stanzas_out,
            routing,
            store: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            store_errors: Family::default(),
            queue_depth: Gauge::default(),
            queue_depth_max: Gauge::default(),
            auth_failures: Family::default(),
            errors: Family::default(),
            uptime: Gauge::default(),
            disk_free: Gauge::default(),
            disk_size: Gauge::default(),
            store_by_op: RwLock::default(),
            bound: Mutex::new(HashMap::new()),
        };
        let r = &mut registry;
        r.register(
            "connections",
            "Open client connections (authenticated or not) by transport",
            m.connections.clone(),
        );
        r.register(
            "sessions",
            "Bound client sessions by transport",
            m.sessions.clone(),
        );
        r.register(
            "stanzas_in",
            "Stanzas received from bound clients by kind",
            m.stanzas_in.clone(),
        );
        r.register(
            "stanzas_out",
            "Stanzas written to clients by kind",
            m.stanzas_out.clone(),
        );
        r.register(
            "routing_seconds",
            "Time to handle and route one stanza from a client, by kind",
            m.routing.clone(),
        );
        r.register(
            "store_seconds",
            "Store call latency by operation",
            m.store.clone(),
        );
        r.register(
            "store_errors",
            "Store calls that failed in the backend, by operation",
            m.store_errors.clone(),
        );
        r.register(
            "queue_depth",
            "Stanzas waiting in all session queues",
            m.queue_depth.clone(),
        );
        r.register(
            "queue_depth_max",
            "Stanzas waiting in the fullest session queue",
            m.queue_depth_max.clone(),
        );
        r.register(
            "auth_failures",
            "Failed SASL authentications by condition",
            m.auth_failures.clone(),
        );
        r.register(
            "errors",
            "Stanza and stream errors sent, by level and condition",
            m.errors.clone(),
        );
        r.register(
            "uptime_seconds",
            "Seconds since the server started",
            m.uptime.clone(),
        );
        r.register(
            "disk_free_bytes",
            "Bytes free on the filesystem holding the database",
            m.disk_free.clone(),
        );
        r.register(
            "disk_size_bytes",
            "Size of the filesystem holding the database",
            m.disk_size.clone(),
        );
        let info: Family<L1, Gauge> = Family::default();
        info.get_or_create(&[("version", env!("CARGO_PKG_VERSION"))])
            .set(1);
        r.register("build_info", "natter version (value is always 1)", info);
        for t in TRANSPORTS {
            m.connections.get_or_create(&[("transport", t)]).set(0);
            m.sessions.get_or_create(&[("transport", t)]).set(0);
        }
        Metrics { registry, ..m }
    }

    /// A connection opened; the gauge goes down when the guard is dropped.
    pub fn connection(self: &Arc<Self>, transport: &'static str) -> ConnectionGuard {
        self.connections
            .get_or_create(&[("transport", transport)])
            .inc();
        ConnectionGuard {
            metrics: self.clone(),
            transport,
        }
    }

    pub fn session_bound(&self, id: u64, transport: &'static str) {
        self.bound.lock().insert(
            id,
            SessionMeta {
                transport,
                since: SystemTime::now(),
            },
        );
    }

    pub fn session_closed(&self, id: u64) {
        self.bound.lock().remove(&id);
    }

    pub fn session_meta(&self, id: u64) -> Option<SessionMeta> {
        self.bound.lock().get(&id).cloned()
    }

    pub fn stanza_in(&self, name: &str) {
        self.stanzas_in_kind[kind_index(name)].inc();
    }

    pub fn stanzas_out(&self, batch: &[crate::router::Outbound]) {
        for el in batch {
            self.stanzas_out_kind[kind_index(el.kind())].inc();
        }
    }

    /// Observes the time until the timer is dropped.
    pub fn routing_timer(&self, name: &str) -> RoutingTimer<'_> {
        RoutingTimer {
            metrics: self,
            kind: kind_index(name),
            start: Instant::now(),
        }
    }

    pub fn auth_failure(&self, condition: &'static str) {
        self.auth_failures
            .get_or_create(&[("condition", condition)])
            .inc();
    }

    pub fn stanza_error(&self, e: &crate::error::StanzaError) {
        self.errors
            .get_or_create(&[("level", "stanza"), ("condition", e.condition.name())])
            .inc();
    }

    pub fn stream_error(&self, e: &crate::error::StreamError) {
        self.errors
            .get_or_create(&[("level", "stream"), ("condition", e.condition.name())])
            .inc();
    }

    fn store_op(&self, op: &'static str, took: Duration, backend_error: bool) {
        // Not `if let … else`: its read guard would live into the else branch.
        let known = self.store_by_op.read().get(op).cloned();
        let h = known.unwrap_or_else(|| {
            let h = self.store.get_or_create(&[("op", op)]).clone();
            self.store_by_op.write().insert(op, h.clone());
            h
        });
        h.observe(took.as_secs_f64());
        if backend_error {
            self.store_errors.get_or_create(&[("op", op)]).inc();
        }
    }

    /// Bound sessions per transport.
    pub fn sessions_by_transport(&self) -> BTreeMap<&'static str, u64> {
        let mut by: BTreeMap<&'static str, u64> = TRANSPORTS.iter().map(|t| (*t, 0)).collect();
        for m in self.bound.lock().values() {
            *by.entry(m.transport).or_default() += 1;
        }
        by
    }

    /// Totals of a counter family, for `natter admin stats`.
    fn totals(f: &Family<L1, Counter>, keys: &[&'static str]) -> BTreeMap<&'static str, u64> {
        keys.iter()
            .map(|k| {
                let v = f.get(&[("kind", *k)]).map_or(0, |c| c.get());
                (*k, v)
            })
            .collect()
    }

    pub fn stanza_totals(&self) -> (BTreeMap<&'static str, u64>, BTreeMap<&'static str, u64>) {
        let keys = ["message", "presence", "iq", "other"];
        (
            Self::totals(&self.stanzas_in, &keys),
            Self::totals(&self.stanzas_out, &keys),
        )
    }

    pub fn disk_space(&self, s: crate::disk::Space) {
        self.disk_free
            .set(i64::try_from(s.free).unwrap_or(i64::MAX));
        self.disk_size
            .set(i64::try_from(s.size).unwrap_or(i64::MAX));
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Refresh the gauges read off live state, then encode everything.
    pub fn render(&self, router: &Router) -> String {
        for (t, n) in self.sessions_by_transport() {
            self.sessions
                .get_or_create(&[("transport", t)])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let (mut total, mut max) = (0usize, 0usize);
        for h in router.all() {
            let q = h.queued();
            total += q;
            max = max.max(q);
        }
        self.queue_depth.set(total as i64);
        self.queue_depth_max.set(max as i64);
        self.uptime.set(self.started.elapsed().as_secs() as i64);
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

pub struct ConnectionGuard {
    metrics: Arc<Metrics>,
    transport: &'static str,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.metrics
            .connections
            .get_or_create(&[("transport", self.transport)])
            .dec();
    }
}

pub struct RoutingTimer<'a> {
    metrics: &'a Metrics,
    kind: usize,
    start: Instant,
}

impl Drop for RoutingTimer<'_> {
    fn drop(&mut self) {
        self.metrics.routing_kind[self.kind].observe(self.start.elapsed().as_secs_f64());
    }
}

/// A `Store` that times every call into `natter_store_seconds{op}` (op: the
/// method's name) and counts backend failures: natter_store's `Observed`
/// wrapper, whose forwarding methods are generated with the store traits.
pub type MeteredStore = natter_store::Observed<Arc<Metrics>>;

impl natter_store::Observer for Metrics {
    fn observe(&self, op: &'static str, took: Duration, backend_failed: bool) {
        self.store_op(op, took, backend_failed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_prefix() {
        let m = Arc::new(Metrics::new());
        let _c = m.connection("ws");
        m.session_bound(1, "tls");
        m.stanza_in("message");
        m.stanza_in("bogus");
        drop(m.routing_timer("iq"));
        m.auth_failure("not-authorized");
        m.stanza_error(&crate::error::StanzaError::new(
            crate::error::Condition::ServiceUnavailable,
        ));
        let text = m.render(&Router::new());
        for needle in [
            "natter_connections{transport=\"ws\"} 1",
            "natter_sessions{transport=\"tls\"} 1",
            "natter_stanzas_in_total{kind=\"message\"} 1",
            "natter_stanzas_in_total{kind=\"other\"} 1",
            "natter_routing_seconds_count{kind=\"iq\"} 1",
            "natter_auth_failures_total{condition=\"not-authorized\"} 1",
            "natter_errors_total{level=\"stanza\",condition=\"service-unavailable\"} 1",
            "natter_queue_depth 0",
            "natter_build_info{version=",
        ] {
            assert!(text.contains(needle), "{needle} missing in:\n{text}");
        }
        m.session_closed(1);
        drop(_c);
        let text = m.render(&Router::new());
        assert!(text.contains("natter_connections{transport=\"ws\"} 0"));
        assert!(text.contains("natter_sessions{transport=\"tls\"} 0"));
    }

    #[test]
    fn store_calls_count_per_operation() {
        use natter_store::Observer;
        let m = Metrics::new();
        for _ in 0..3 {
            m.observe("archive_append", Duration::from_micros(70), false);
        }
        // The same name from another string is the same series.
        let other = String::from("archive_append").leak();
        m.observe(other, Duration::from_micros(70), true);
        m.observe("offline_push", Duration::from_millis(2), false);
        let text = m.render(&Router::new());
        for needle in [
            "natter_store_seconds_count{op=\"archive_append\"} 4",
            "natter_store_seconds_count{op=\"offline_push\"} 1",
            "natter_store_errors_total{op=\"archive_append\"} 1",
        ] {
            assert!(text.contains(needle), "{needle} missing in:\n{text}");
        }
    }
}
