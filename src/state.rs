//! The cheap-to-clone handle every task gets: configuration, store, router,
//! modules, TLS, limits. Passed explicitly; there are no globals.

use crate::c2s::throttle::{AuthThrottle, PreauthLimiter};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::modules::Modules;
use crate::router::{Router, Routing};
use natter_store::Store;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// One pointer, so every session and task holds 8 bytes of it.
#[derive(Clone)]
pub struct ServerState(Arc<Shared>);

impl ServerState {
    pub fn new(shared: Shared) -> Self {
        ServerState(Arc::new(shared))
    }
}

impl std::ops::Deref for ServerState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

pub struct Shared {
    pub config: Arc<Config>,
    pub store: Arc<dyn Store>,
    /// This process's session table (c2s binds, parks and unbinds here).
    pub router: Arc<Router>,
    /// How modules reach sessions (the same table in embedded mode).
    pub routing: Arc<dyn Routing>,
    pub modules: Arc<Modules>,
    pub tls: Arc<rustls::ServerConfig>,
    pub throttle: Arc<AuthThrottle>,
    pub preauth: Arc<PreauthLimiter>,
    /// What SCRAM salts of names that are not accounts derive from
    /// (`data_dir/fake-salt.key`, kept across restarts).
    pub fake_salt: natter_sasl::FakeSaltKey,
    /// Cancelled on SIGTERM/SIGINT: sessions close their streams and exit.
    pub shutdown: CancellationToken,
    /// Connection tasks and the requeues of sessions that ended abnormally;
    /// `Running::shutdown` waits for them before closing the store.
    pub tasks: TaskTracker,
    /// Prometheus metrics (`/metrics`), also read by the admin endpoint.
    pub metrics: Arc<Metrics>,
    /// Bearer token of the admin endpoint (`data_dir/admin.token`).
    pub admin_token: Arc<String>,
    /// Where the HTTP listener is bound (its real port when configured
    /// with port 0), for URLs modules hand out.
    pub http_addr: Option<std::net::SocketAddr>,
    /// Cluster membership (`cluster.enabled`).
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

impl Shared {
    /// The server's own domain for a JID's domain part, if we serve it.
    pub fn serves(&self, domain: &str) -> bool {
        self.config.serves(domain)
    }
}
