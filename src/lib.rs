//! natter: a WhatsApp-class XMPP messaging server. See ARCHITECTURE.md.
#![forbid(unsafe_code)]

pub mod accounts;
pub mod admin;
pub mod backup;
pub mod c2s;
pub mod cluster;
pub mod config;
pub mod disk;
pub mod error;
pub mod jids;
pub mod metrics;
pub mod modules;
pub mod net;
pub mod progress;
pub mod router;
pub mod state;

use anyhow::Context;
use config::Config;
use natter_store::Store;
use state::ServerState;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub fn c2s_limits(config: &Config, authed: bool) -> natter_xml::Limits {
    natter_xml::Limits {
        max_stanza_bytes: if authed {
            config.limits.max_stanza_bytes
        } else {
            config.limits.max_stanza_bytes_preauth
        },
        max_depth: config.limits.max_depth,
        max_attrs: config.limits.max_attrs,
        max_elements: config.limits.max_elements,
    }
}

/// Open the configured store (SQLite under `data_dir`, or PostgreSQL at `store.url`),
/// creating the data directory (0700) either way; fails with the cause.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    natter_store::files::private_dir(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    if config.store.backend == "postgres" {
        let store =
            natter_store::postgres::PgStore::open(&config.store.url, config.store.pool_size)
                .await
                .context("cannot open the store (store.backend = \"postgres\")")?;
        return Ok(Arc::new(store));
    }
    let path = config.store_path();
    let store = natter_store::sqlite::SqliteStore::open(&path, config.store.sync == "full")
        .await
        .with_context(|| format!("cannot open the store at {}", path.display()))?;
    Ok(Arc::new(store))
}

/// Addresses the listeners actually bound (useful with port 0).
#[derive(Clone, Debug, Default)]
pub struct Bound {
    pub c2s: Option<SocketAddr>,
    pub c2s_tls: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    /// Listeners modules asked for (`Module::listeners`), by what they are.
    pub modules: Vec<(&'static str, SocketAddr)>,
}

/// The start-up line's list: "c2s (STARTTLS) on 127.0.0.1:5222, …".
impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let listeners = [
            ("c2s (STARTTLS)", self.c2s),
            ("c2s direct TLS", self.c2s_tls),
            ("HTTP/WebSocket", self.http),
        ];
        let on: Vec<String> = listeners
            .iter()
            .filter_map(|(name, a)| a.map(|a| format!("{name} on {a}")))
            .chain(
                self.modules
                    .iter()
                    .map(|(name, a)| format!("{name} on {a}")),
            )
            .collect();
        if on.is_empty() {
            return f.write_str("no listeners");
        }
        f.write_str(&on.join(", "))
    }
}

/// A started server. Drop does not stop it: call `shutdown`.
pub struct Running {
    pub bound: Bound,
    pub state: ServerState,
    tasks: JoinSet<()>,
}

impl Running {
    /// Close every session with `</stream>`, stop listeners, wait for the
    /// connection tasks (and the requeues of sessions that ended
    /// abnormally), flush the store.
    pub async fn shutdown(mut self) {
        self.state.shutdown.cancel();
        let sessions = self.state.tasks.clone();
        let wait = async {
            while self.tasks.join_next().await.is_some() {}
            // No listener is left to add connections; a session's end may
            // still add its requeue, which `wait` covers too.
            sessions.close();
            sessions.wait().await;
        };
        if tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .is_err()
        {
            tracing::warn!(
                tasks = sessions.len(),
                "sessions still ending 10 s after shutdown began"
            );
        }
        self.state.store.close().await;
    }
}

/// Keep this node's registry entry alive (with its session count) until
/// shutdown, then remove it.
async fn cluster_heartbeat(
    state: ServerState,
    c: Arc<cluster::Cluster>,
    mut info: cluster::NodeInfo,
) {
    loop {
        info.sessions = state.router.count();
        if let Err(e) = c.heartbeat(&info).await {
            tracing::warn!(error = %e, "cluster heartbeat failed");
        }
        tokio::select! {
            _ = state.shutdown.cancelled() => break,
            _ = tokio::time::sleep(c.heartbeat_every()) => {}
        }
    }
    c.leave().await;
}

/// Start everything the config describes. Fails fast, naming the cause:
/// bad certificate, port in use, unreachable store.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    start_with(config, Vec::new()).await
}

/// `start`, with `extra` modules after the standard ones (tests use it to
/// add handlers of their own).
pub async fn start_with(
    config: Config,
    extra: Vec<Arc<dyn modules::Module>>,
) -> anyhow::Result<Running> {
    let metrics = Arc::new(metrics::Metrics::new());
    let store: Arc<dyn Store> = Arc::new(metrics::MeteredStore::new(
        open_store(&config).await?,
        metrics.clone(),
    ));
    let tls = net::tls::load(&config)?;
    let c2s = net::bind(&config.listen.c2s, "c2s").await?;
    let c2s_tls = net::bind(&config.listen.c2s_tls, "c2s direct TLS").await?;
    let http = net::bind(&config.listen.http, "HTTP").await?;
    let admin_token = admin::create_token(&config.data_dir)?;
    let fake_salt = c2s::fake_salt::load_or_create(&config.data_dir)?;
    let modules = Arc::new(modules::Modules::with(&config, extra));
    modules.prepare(&config)?;
    let router = Arc::new(router::Router::new());
    let mut module_listeners = Vec::new();
    for (m, i, what, addr) in modules.listeners(&config) {
        if let Some(l) = net::bind(&addr, what).await? {
            module_listeners.push((m, i, what, l));
        }
    }
    // Joined once the listeners are bound (a port in use fails first, and
    // leaves no registry entry behind).
    let cluster = match config.cluster.enabled {
        true => {
            let info = cluster::NodeInfo {
                name: config.node_name(),
                started: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                version: env!("CARGO_PKG_VERSION").into(),
                incarnation: rand::random(),
                ..Default::default()
            };
            let c = cluster::Cluster::join(&config, &info).await?;
            Some((Arc::new(c), info))
        }
        false => None,
    };
    // In a cluster, modules route through the registry of every node's
    // sessions; this node's table stays the one c2s binds in.
    let remote = cluster.as_ref().map(|(c, _)| {
        let changes = router.track_changes();
        let r = Arc::new(cluster::routing::ClusterRouting::new(router.clone(), c));
        (r, changes)
    });
    let routing: Arc<dyn router::Routing> = match &remote {
        Some((r, _)) => r.clone(),
        None => router.clone(),
    };
    let l = &config.limits;
    let state = ServerState::new(state::Shared {
        throttle: Arc::new(c2s::throttle::AuthThrottle::new(
            l.auth_failures_per_ip,
            l.auth_failures_per_range,
            l.auth_failures_per_account,
            Duration::from_secs(l.auth_window_secs),
            Duration::from_millis(l.auth_max_delay_ms),
        )),
        preauth: Arc::new(c2s::throttle::PreauthLimiter::new(
            config.c2s.max_preauth_total,
            config.c2s.max_preauth_per_ip,
        )),
        fake_salt,
        config: Arc::new(config),
        store,
        routing,
        router,
        modules,
        tls,
        shutdown: CancellationToken::new(),
        tasks: TaskTracker::new(),
        metrics,
        admin_token: Arc::new(admin_token),
        http_addr: http.as_ref().and_then(|l| l.local_addr().ok()),
        cluster: cluster.as_ref().map(|(c, _)| c.clone()),
    });
    let mut bound = Bound::default();
    let mut tasks = JoinSet::new();
    // Bound sessions learn of the shutdown through their queues.
    let st = state.clone();
    tasks.spawn(async move {
        st.shutdown.cancelled().await;
        st.router.shutdown();
    });
    // XEP-0313 retention: prune old archived messages (if configured).
    for t in state.modules.tasks(&state) {
        tasks.spawn(t);
    }
    // Memory a stuck or flooded session freed goes back to the system.
    tasks.spawn(router::trim_task(state.clone()));
    tasks.spawn(disk::watch(state.clone()));
    if let Some(l) = c2s {
        bound.c2s = l.local_addr().ok();
        tasks.spawn(net::accept_c2s(l, state.clone(), false));
    }
    if let Some(l) = c2s_tls {
        bound.c2s_tls = l.local_addr().ok();
        tasks.spawn(net::accept_c2s(l, state.clone(), true));
    }
    if let Some(l) = http {
        bound.http = l.local_addr().ok();
        tasks.spawn(net::http::serve(l, state.clone()));
    }
    for (m, i, what, l) in module_listeners {
        if let Ok(a) = l.local_addr() {
            bound.modules.push((what, a));
        }
        tasks.spawn(net::accept_module(l, state.clone(), m, i));
    }
    if let (Some((c, _)), Some((r, changes))) = (&cluster, remote) {
        // Not in `tasks`: they outlive the sessions at shutdown (what
        // ending sessions give back may be for other nodes) and end once
        // every session task has.
        cluster::routing::start(state.clone(), c.clone(), r, changes).await?;
    }
    if let Some((c, mut info)) = cluster {
        info.listeners = bound.to_string();
        tasks.spawn(cluster_heartbeat(state.clone(), c, info));
    }
    tracing::info!(
        "natter started for {}: {bound}",
        state.config.domains.join(", ")
    );
    if bound.http.is_some() {
        let root = &state.config.http.web_root;
        if !net::http::assets_installed(root) {
            tracing::warn!(
                "web chat page assets missing ({} not found): run `cd {} && npm ci` \
                 (http.web_root) to serve the chat page at /",
                net::http::converse_dist(root).display(),
                root.display()
            );
        }
    }
    Ok(Running {
        bound,
        state,
        tasks,
    })
}
