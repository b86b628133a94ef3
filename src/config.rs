//! Configuration: a TOML file with documented defaults, overridden by
//! environment variables `NATTER_<SECTION>_<KEY>` (e.g. `NATTER_LISTEN_C2S`,
//! `NATTER_DATA_DIR`, `NATTER_DOMAINS=a.example,b.example`).

use serde::Deserialize;
use std::path::{Path, PathBuf};

mod errors;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Virtual hosts served.
    pub domains: Vec<String>,
    /// Where the database, generated certificate and blobs live.
    pub data_dir: PathBuf,
    pub listen: Listen,
    pub http: Http,
    pub tls: Tls,
    pub c2s: C2s,
    pub registration: Registration,
    pub limits: Limits,
    pub store: StoreConfig,
    pub log: Log,
    pub contact: Contact,
    /// XEP-0215 external services (STUN/TURN servers, …) offered to users.
    pub external_services: Vec<ExternalService>,
    /// XEP-0114 external components, by the domain they serve.
    pub components: std::collections::BTreeMap<String, ComponentConfig>,
    /// XEP-0045 group chats.
    pub muc: Muc,
    /// XEP-0363 HTTP File Upload.
    pub upload: UploadConfig,
    /// 24-hour statuses (stories) on PEP.
    pub stories: StoriesConfig,
    /// XEP-0357 push notifications.
    pub push: PushConfig,
    /// RFC 6120 server-to-server federation.
    pub s2s: S2sConfig,
    /// Several nodes on PostgreSQL and NATS (`[cluster]`).
    pub cluster: ClusterConfig,
}

/// Cluster mode (`[cluster]`): nodes share PostgreSQL and a NATS server
/// (JetStream on).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    pub enabled: bool,
    /// The NATS server (or one of its cluster), e.g. nats://10.0.0.5:4222.
    pub nats_url: String,
    /// This node's name, unique among the live nodes. Empty: the host name.
    pub node_name: String,
    /// The cluster's name: its NATS key-value buckets and subjects start
    /// with it, so several clusters can share one NATS.
    pub name: String,
    /// Seconds a node's registry entry lives without a heartbeat: a dead
    /// node disappears after this long (heartbeats every third of it).
    pub lease_secs: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            enabled: false,
            nats_url: "nats://127.0.0.1:4222".into(),
            node_name: String::new(),
            name: "natter".into(),
            lease_secs: 15,
        }
    }
}

/// Federation with other XMPP servers (`[s2s]`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S2sConfig {
    /// Unset: on when some served domain is not `localhost`.
    pub enabled: Option<bool>,
    /// Only these remote domains (empty: any not denied).
    pub allow: Vec<String>,
    /// Never these remote domains.
    pub deny: Vec<String>,
    /// Static addresses of remote domains, used instead of DNS:
    /// "host:port" (STARTTLS) or "tls://host:port" (direct TLS, XEP-0368).
    pub hosts: std::collections::BTreeMap<String, String>,
    /// PEM file of extra certificate authorities (beside the system's) that
    /// peers' certificates may chain to for SASL EXTERNAL (XEP-0178):
    /// private networks and tests. Empty: the system's roots only.
    pub ca_file: String,
    /// Seconds an unused server-to-server connection stays open.
    pub idle_timeout_secs: u64,
    /// Seconds to connect and authenticate before queued stanzas bounce.
    pub connect_timeout_secs: u64,
    /// Most stanzas queued for one remote domain while connecting.
    pub max_queue: usize,
    /// Most bytes queued for one remote domain while connecting.
    pub max_queue_bytes: usize,
    /// Bytes per second read from one incoming server-to-server stream;
    /// past the burst, reading pauses (the peer's TCP window fills up).
    pub rate_bytes_per_sec: u64,
    pub rate_burst_bytes: u64,
}

impl Default for S2sConfig {
    fn default() -> Self {
        S2sConfig {
            enabled: None,
            allow: Vec::new(),
            deny: Vec::new(),
            hosts: Default::default(),
            ca_file: String::new(),
            idle_timeout_secs: 600,
            connect_timeout_secs: 30,
            max_queue: 1024,
            max_queue_bytes: 1024 * 1024,
            rate_bytes_per_sec: 8 * 1024 * 1024,
            rate_burst_bytes: 8 * 1024 * 1024,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoriesConfig {
    /// Seconds a story lives: the stories node's `pubsub#item_expire`, and the
    /// most a user may set there.
    pub item_expire_secs: u64,
    /// Stories one user may have live at once.
    pub max_live: u32,
    /// Largest story item (its serialized payload), in bytes.
    pub max_item_bytes: usize,
}

impl Default for StoriesConfig {
    fn default() -> Self {
        StoriesConfig {
            item_expire_secs: 86_400,
            max_live: 30,
            max_item_bytes: 16 * 1024,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UploadConfig {
    /// Serve uploads at `<subdomain>.<domain>` for every domain.
    pub enabled: bool,
    pub subdomain: String,
    /// Largest file, in bytes.
    pub max_file_size: u64,
    /// Bytes one user may upload per 24 hours (0: no limit).
    pub daily_quota: u64,
    /// Bytes one user may have stored (0: no limit).
    pub user_quota: u64,
    /// Bytes of all uploads together (0: no limit).
    pub global_quota: u64,
    /// How long a slot may be used for its upload.
    pub slot_ttl_secs: u64,
    /// Delete uploads older than this many days (0: keep).
    pub expire_days: u64,
    /// Content types accepted (`image/*` for a family); empty: any.
    pub allowed_types: Vec<String>,
    /// Key that signs upload slots; set the same on every node of a
    /// cluster. Empty: derived from this node's data_dir/fake-salt.key.
    pub secret: String,
    /// Where the bytes live: "disk" (data_dir/blobs) or "s3".
    pub storage: String,
    pub s3: S3Config,
}

/// XEP-0357 push notifications to app servers.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushConfig {
    pub enabled: bool,
    /// A burst of messages within this many milliseconds is one push.
    pub coalesce_ms: u64,
    /// Pushes per device per minute, at most.
    pub max_per_minute: usize,
    /// Send message bodies to the app server (off: it learns only that
    /// and from whom a message came).
    pub include_body: bool,
    /// The body an important push (a message with a body, an OMEMO
    /// payload or a call proposal) carries instead of the real one.
    pub important_body: String,
    /// Web Push (RFC 8030) subscriptions of the chat page's service worker.
    pub webpush: bool,
    /// PEM file of the VAPID (RFC 8292) P-256 private key; the same on
    /// every node of a cluster. Empty: data_dir/vapid.key, created once.
    pub vapid_private_key: String,
    /// Who push services may contact (`mailto:` or `https:`). Empty: the
    /// page's URL (`http.public_url`, else `https://<first domain>`).
    pub vapid_subject: String,
    /// Accept `http://` subscription endpoints on loopback (tests only).
    pub webpush_allow_http: bool,
    /// Seconds a push service has to accept a push.
    pub webpush_timeout_secs: u64,
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            enabled: true,
            coalesce_ms: 1000,
            max_per_minute: 6,
            include_body: false,
            important_body: "New message".into(),
            webpush: true,
            vapid_private_key: String::new(),
            vapid_subject: String::new(),
            webpush_allow_http: false,
            webpush_timeout_secs: 10,
        }
    }
}

/// S3-compatible object storage for uploads (`upload.storage = "s3"`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    pub bucket: String,
    pub region: String,
    /// Empty: AWS; else the storage's URL (MinIO, Ceph, R2, ...).
    pub endpoint: String,
    /// Empty: credentials from the environment (AWS_ACCESS_KEY_ID, ...).
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Accept an `http://` endpoint.
    pub allow_http: bool,
    /// Key prefix inside the bucket.
    pub prefix: String,
    /// "proxy": downloads pass through natter; "redirect": natter answers
    /// GET with a presigned URL of the storage's.
    pub downloads: String,
    /// Lifetime of a presigned download URL.
    pub url_ttl_secs: u64,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            bucket: String::new(),
            region: "us-east-1".into(),
            endpoint: String::new(),
            access_key_id: String::new(),
            secret_access_key: String::new(),
            allow_http: false,
            prefix: String::new(),
            downloads: "proxy".into(),
            url_ttl_secs: 3600,
        }
    }
}

impl Default for UploadConfig {
    fn default() -> Self {
        UploadConfig {
            enabled: true,
            subdomain: "upload".into(),
            max_file_size: 100 * 1024 * 1024,
            daily_quota: 1024 * 1024 * 1024,
            user_quota: 0,
            global_quota: 0,
            slot_ttl_secs: 300,
            expire_days: 0,
            allowed_types: Vec::new(),
            secret: String::new(),
            storage: "disk".into(),
            s3: S3Config::default(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Muc {
    /// Serve group chats at `<subdomain>.<domain>` for every domain.
    pub enabled: bool,
    pub subdomain: String,
    /// Most members (owners, admins, members) of one room, and most occupants.
    pub max_members: usize,
    /// Most rooms one user may own.
    pub max_rooms_per_user: usize,
    /// Sustained groupchat messages per minute one occupant may send.
    pub messages_per_minute: u32,
    /// Burst allowance for that rate, in messages.
    pub burst: u32,
    /// History messages sent on join when the client does not say.
    pub history: usize,
    /// Rooms one session may be joined to at once.
    pub max_joined_per_session: usize,
}

impl Default for Muc {
    fn default() -> Self {
        Muc {
            enabled: true,
            subdomain: "conference".into(),
            max_members: 1024,
            max_rooms_per_user: 100,
            messages_per_minute: 120,
            burst: 30,
            history: 20,
            max_joined_per_session: 100,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// Client-to-server with STARTTLS (RFC 6120). Empty disables.
    pub c2s: String,
    /// Client-to-server with direct TLS (XEP-0368). Empty disables.
    pub c2s_tls: String,
    /// HTTP: WebSocket (RFC 7395) at /xmpp-websocket, health. Empty disables.
    pub http: String,
    /// XEP-0114 external components; opened only when `components` are configured.
    pub component: String,
    /// Server-to-server (RFC 6120); opened only when s2s is enabled.
    pub s2s: String,
    /// Server-to-server with direct TLS (XEP-0368, `_xmpps-server._tcp`);
    /// opened only when s2s is enabled. Empty disables.
    pub s2s_tls: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Http {
    /// Directory of the web chat page's npm project (`web/` in the source tree): the
    /// Converse.js assets are served from `<web_root>/node_modules/converse.js/dist`.
    /// Relative paths are relative to the working directory.
    pub web_root: PathBuf,
    /// The URL clients reach this listener at (through a TLS proxy), e.g.
    /// `https://chat.example.org`: XEP-0156 host-meta then points to its
    /// `/xmpp-websocket` over wss. Empty: taken from each request's Host header.
    pub public_url: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tls {
    /// PEM certificate chain; empty = self-signed, generated in data_dir/tls.
    pub cert: String,
    /// PEM private key; empty = generated with the self-signed certificate.
    pub key: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct C2s {
    /// Allow SASL (SCRAM only) without TLS on loopback connections.
    pub allow_plaintext_loopback: bool,
    /// Seconds of silence before the server pings a client (XEP-0199).
    pub ping_interval_secs: u64,
    /// Seconds a client has to answer a ping (or send anything) before it is dropped.
    pub ping_timeout_secs: u64,
    /// Seconds a connection may stay unauthenticated.
    pub preauth_timeout_secs: u64,
    /// Unauthenticated connections one address (IPv4, IPv6 /64) may hold
    /// while more than half of `max_preauth_total` is in use; below that,
    /// any number (a carrier-grade NAT's login storm gets through).
    pub max_preauth_per_ip: usize,
    /// Unauthenticated connections at once, over every transport: bounds
    /// their memory (each holds at most a preauth stanza and TLS buffers).
    pub max_preauth_total: usize,
    /// Stanzas queued for one session before it is treated as stuck and closed.
    pub max_queue: usize,
    /// Bytes (serialized size) one session may hold for its client: in its
    /// queue, and again in its unacknowledged (XEP-0198) and held-back
    /// (XEP-0352) stanzas. Past it, the session counts as not reading.
    pub max_queue_bytes: usize,
    /// Bytes held for all of one user's sessions together.
    pub max_user_bytes: usize,
    /// Seconds a write to a client may block before the session is closed.
    pub write_timeout_secs: u64,
    /// Resources (devices) per account at once.
    pub max_resources: usize,
    /// Seconds a session with XEP-0198 resumption stays detached (routable,
    /// queueing) after its connection died, waiting to be resumed.
    pub resume_timeout_secs: u64,
    /// Stanzas sent to a stream-managed session but not yet acknowledged
    /// before the session is closed (they go to offline storage).
    pub max_unacked: usize,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Registration {
    /// In-band registration (XEP-0077). Unset: on only when the server
    /// serves nothing but `localhost`.
    pub enabled: Option<bool>,
    /// Seconds a deleted username stays reserved (prevents account takeover).
    pub reserve_deleted_secs: u64,
    /// Minimum password length for new accounts and password changes.
    pub min_password_len: usize,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest stanza after authentication, in bytes.
    pub max_stanza_bytes: usize,
    /// Largest stanza before authentication, in bytes.
    pub max_stanza_bytes_preauth: usize,
    /// Deepest element nesting inside a stanza.
    pub max_depth: usize,
    /// Most attributes on one element.
    pub max_attrs: usize,
    /// Most elements (and text runs) in one stanza: a parsed element costs
    /// far more memory than its bytes on the wire.
    pub max_elements: usize,
    /// Sustained bytes per second a session may send (token bucket).
    pub rate_bytes_per_sec: u64,
    /// Burst allowance for the rate limit, in bytes.
    pub rate_burst_bytes: u64,
    /// Failed logins on one name (existing or not) within `auth_window_secs`
    /// after which its failure replies are delayed, more each time. Never
    /// refuses a login: the right password works from any unthrottled address.
    pub auth_failures_per_account: u32,
    /// Failed logins from one address (IPv4, IPv6 /64) within
    /// `auth_window_secs` before it is refused new attempts for that long.
    pub auth_failures_per_ip: u32,
    /// The same for a range (IPv4 /24, IPv6 /56).
    pub auth_failures_per_range: u32,
    pub auth_window_secs: u64,
    /// Longest a failure reply is held back, in milliseconds.
    pub auth_max_delay_ms: u64,
    /// Most distinct recipients of one XEP-0033 multicast message.
    pub max_multicast_recipients: usize,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// "sqlite" (embedded, one node) or "postgres" (shared by every node of a cluster).
    pub backend: String,
    /// SQLite file; empty = data_dir/natter.db.
    pub path: String,
    /// PostgreSQL connection URL (backend "postgres"), e.g.
    /// postgres://natter@127.0.0.1:5432/natter.
    pub url: String,
    /// Connections to PostgreSQL this node opens at most.
    pub pool_size: u32,
    /// "normal": durable across process crashes (kill -9);
    /// "full": also across power loss (fsync per commit).
    pub sync: String,
    /// Days a message stays in the archive (XEP-0313); 0 keeps messages forever.
    pub archive_retention_days: u32,
    /// Messages queued per user while no device is online (XEP-0160);
    /// beyond it senders get an error.
    pub offline_limit: usize,
    /// Warn in the log when the store's filesystem has less than this percentage of its
    /// size free; 0 disables the warning.
    pub disk_free_warn_percent: u8,
}

/// One `[components."bot.example.org"]` entry.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ComponentConfig {
    /// The shared secret of the XEP-0114 handshake.
    pub secret: String,
}

/// One `[[external_services]]` entry (XEP-0215 `<service/>` attributes).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ExternalService {
    /// "stun", "turn", "turns", …
    #[serde(rename = "type")]
    pub kind: String,
    pub host: String,
    pub port: Option<u16>,
    /// "udp" or "tcp".
    pub transport: Option<String>,
    /// A human-readable name.
    pub name: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Credentials are handed out only on a `<credentials/>` request.
    pub restricted: bool,
}

/// XEP-0157 contact addresses (URIs: `mailto:…`, `xmpp:…`, `https://…`),
/// published in the server's disco#info.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Contact {
    pub abuse: Vec<String>,
    pub admin: Vec<String>,
    pub feedback: Vec<String>,
    pub sales: Vec<String>,
    pub security: Vec<String>,
    pub support: Vec<String>,
}

impl Contact {
    /// (kind, addresses) for each kind, in XEP-0157's field order.
    pub fn all(&self) -> [(&'static str, &[String]); 6] {
        [
            ("abuse", &self.abuse),
            ("admin", &self.admin),
            ("feedback", &self.feedback),
            ("sales", &self.sales),
            ("security", &self.security),
            ("support", &self.support),
        ]
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// tracing filter, e.g. "info" or "natter=debug".
    pub level: String,
    /// "text" or "json".
    pub format: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            domains: vec!["localhost".into()],
            data_dir: PathBuf::from("./data"),
            listen: Listen::default(),
            http: Http::default(),
            tls: Tls::default(),
            c2s: C2s::default(),
            registration: Registration::default(),
            limits: Limits::default(),
            store: StoreConfig::default(),
            log: Log::default(),
            contact: Contact::default(),
            external_services: Vec::new(),
            components: Default::default(),
            muc: Muc::default(),
            upload: UploadConfig::default(),
            stories: StoriesConfig::default(),
            push: PushConfig::default(),
            s2s: S2sConfig::default(),
            cluster: ClusterConfig::default(),
        }
    }
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            c2s: "0.0.0.0:5222".into(),
            c2s_tls: "0.0.0.0:5223".into(),
            http: "0.0.0.0:5280".into(),
            component: "127.0.0.1:5347".into(),
            s2s: "0.0.0.0:5269".into(),
            s2s_tls: "0.0.0.0:5270".into(),
        }
    }
}

impl Default for Http {
    fn default() -> Self {
        Http {
            web_root: PathBuf::from("web"),
            public_url: String::new(),
        }
    }
}

impl Default for C2s {
    fn default() -> Self {
        C2s {
            allow_plaintext_loopback: false,
            ping_interval_secs: 60,
            ping_timeout_secs: 30,
            preauth_timeout_secs: 10,
            max_preauth_per_ip: 20,
            max_preauth_total: 4096,
            // A join to a full room (muc.max_members) queues one presence
            // per occupant at once.
            max_queue: 2048,
            max_queue_bytes: 4 * 1024 * 1024,
            max_user_bytes: 16 * 1024 * 1024,
            write_timeout_secs: 30,
            max_resources: 10,
            resume_timeout_secs: 3600,
            max_unacked: 2048,
        }
    }
}

impl Default for Registration {
    fn default() -> Self {
        Registration {
            enabled: None,
            reserve_deleted_secs: 7 * 24 * 3600,
            min_password_len: 6,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_stanza_bytes: 256 * 1024,
            max_stanza_bytes_preauth: 10 * 1024,
            max_depth: 32,
            max_attrs: 64,
            max_elements: 5_000,
            rate_bytes_per_sec: 1024 * 1024,
            rate_burst_bytes: 4 * 1024 * 1024,
            auth_failures_per_account: 5,
            auth_failures_per_ip: 10,
            auth_failures_per_range: 50,
            auth_window_secs: 300,
            auth_max_delay_ms: 4000,
            max_multicast_recipients: 100,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: "sqlite".into(),
            path: String::new(),
            url: String::new(),
            pool_size: 16,
            sync: "normal".into(),
            archive_retention_days: 0,
            offline_limit: 10_000,
            disk_free_warn_percent: 10,
        }
    }
}

impl Default for Log {
    fn default() -> Self {
        Log {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

const SECTIONS: &[&str] = &[
    "listen",
    "http",
    "tls",
    "c2s",
    "registration",
    "limits",
    "store",
    "log",
    "contact",
    "muc",
    "upload",
    "stories",
    "push",
    "s2s",
    "cluster",
];

impl Config {
    /// Load from an optional file, then apply `NATTER_*` environment overrides.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", p.display()))?,
            None => String::new(),
        };
        let env: Vec<(String, String)> = std::env::vars().collect();
        let file = path.map_or("config file".into(), |p| {
            format!("config file {}", p.display())
        });
        Self::from_source(&file, &text, &env)
    }

    /// Parse TOML text and overlay `NATTER_*` variables from `env`.
    pub fn from_parts(text: &str, env: &[(String, String)]) -> anyhow::Result<Config> {
        Self::from_source("config file", text, env)
    }

    /// `from_parts`, with errors naming the key and where its value came
    /// from: `file` (and the line) or the environment variable.
    fn from_source(file: &str, text: &str, env: &[(String, String)]) -> anyhow::Result<Config> {
        let mut root: toml::Table =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
        let mut from_env = Vec::new();
        for (name, value) in env {
            let Some(rest) = name.strip_prefix("NATTER_") else {
                continue;
            };
            let rest = rest.to_ascii_lowercase();
            // Variables that are not configuration (the test harness's binary path and
            // its NATTER_TEST_* settings, …).
            if matches!(rest.as_str(), "bin" | "config") || rest.starts_with("test_") {
                continue;
            }
            let (section, key) = match SECTIONS.iter().find(|s| rest.starts_with(&format!("{s}_")))
            {
                Some(s) => (Some(*s), rest[s.len() + 1..].to_string()),
                None => (None, rest),
            };
            let v = env_value(&key, value);
            let table = match section {
                Some(s) => root
                    .entry(s)
                    .or_insert_with(|| toml::Value::Table(Default::default()))
                    .as_table_mut()
                    .ok_or_else(|| anyhow::anyhow!("[{s}] must be a table"))?,
                None => &mut root,
            };
            let dotted = section.map_or(key.clone(), |s| format!("{s}.{key}"));
            from_env.push((name.as_str(), value.as_str(), dotted));
            table.insert(key, v);
        }
        let cfg: Config = toml::Value::Table(root)
            .try_into()
            .map_err(|e| errors::explain(file, text, &from_env, e))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.domains.is_empty() {
            anyhow::bail!("`domains` must name at least one domain");
        }
        for d in &self.domains {
            jid::BareJid::new(d).map_err(|e| anyhow::anyhow!("domain {d:?} is not valid: {e}"))?;
        }
        match self.store.backend.as_str() {
            "sqlite" if !self.store.url.is_empty() => anyhow::bail!(
                "store.url is for store.backend = \"postgres\"; with \"sqlite\" the \
                 database is store.path"
            ),
            "sqlite" => {}
            "postgres" => {
                if self.store.url.is_empty() {
                    anyhow::bail!(
                        "store.url must be set when store.backend is \"postgres\" \
                         (e.g. postgres://natter@127.0.0.1:5432/natter)"
                    );
                }
                if !self.store.url.starts_with("postgres://")
                    && !self.store.url.starts_with("postgresql://")
                {
                    anyhow::bail!(
                        "store.url must be a postgres:// URL, not {:?}",
                        natter_store::postgres::redacted(&self.store.url)
                    );
                }
                if self.store.pool_size < 2 {
                    anyhow::bail!(
                        "store.pool_size must be at least 2, not {}",
                        self.store.pool_size
                    );
                }
            }
            other => {
                anyhow::bail!("store.backend must be \"sqlite\" or \"postgres\", not {other:?}")
            }
        }
        if !matches!(self.store.sync.as_str(), "normal" | "full") {
            anyhow::bail!(
                "store.sync must be \"normal\" or \"full\", not {:?}",
                self.store.sync
            );
        }
        if self.store.disk_free_warn_percent > 100 {
            anyhow::bail!(
                "store.disk_free_warn_percent must be 0 to 100, not {}",
                self.store.disk_free_warn_percent
            );
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            anyhow::bail!(
                "log.format must be \"text\" or \"json\", not {:?}",
                self.log.format
            );
        }
        let url = &self.http.public_url;
        if !(url.is_empty() || url.starts_with("https://") || url.starts_with("http://")) {
            anyhow::bail!("http.public_url must start with https:// or http://, not {url:?}");
        }
        for (kind, addresses) in self.contact.all() {
            if let Some(a) = addresses.iter().find(|a| !a.contains(':')) {
                anyhow::bail!("contact.{kind}: {a:?} is not a URI (mailto:…, xmpp:…, https://…)");
            }
        }
        for (domain, c) in &self.components {
            let valid = jid::BareJid::new(domain).is_ok_and(|j| j.node().is_none());
            if !valid || self.serves(domain) {
                anyhow::bail!("components.{domain:?}: not a domain of its own");
            }
            if c.secret.is_empty() {
                anyhow::bail!("components.{domain:?}: a secret is needed");
            }
        }
        for s in &self.external_services {
            if s.kind.is_empty() || s.host.is_empty() {
                anyhow::bail!("every [[external_services]] entry needs a type and a host");
            }
        }
        if self.muc.enabled {
            let valid = jid::BareJid::new(&format!("{}.x", self.muc.subdomain))
                .is_ok_and(|j| j.node().is_none());
            if self.muc.subdomain.is_empty() || !valid {
                anyhow::bail!(
                    "muc.subdomain: {:?} is not a domain label",
                    self.muc.subdomain
                );
            }
            if self.muc.max_members == 0
                || self.muc.messages_per_minute == 0
                || self.muc.burst == 0
                || self.muc.max_joined_per_session == 0
            {
                anyhow::bail!(
                    "muc.max_members, muc.messages_per_minute, muc.burst and \
                     muc.max_joined_per_session must be at least 1"
                );
            }
            let burst = self.muc.max_members + 64;
            if self.c2s.max_queue < burst || self.c2s.max_unacked < burst {
                anyhow::bail!(
                    "c2s.max_queue and c2s.max_unacked must be at least muc.max_members + 64 \
                     ({burst}): joining a full room sends one presence per occupant at once"
                );
            }
            for d in &self.domains {
                let service = format!("{}.{d}", self.muc.subdomain);
                if self.serves(&service) || self.components.contains_key(&service) {
                    anyhow::bail!("muc.subdomain: {service} is already a domain or a component");
                }
            }
        }
        if self.upload.enabled {
            let label = &self.upload.subdomain;
            let valid = jid::BareJid::new(&format!("{label}.x")).is_ok_and(|j| j.node().is_none());
            if label.is_empty() || !valid || (self.muc.enabled && *label == self.muc.subdomain) {
                anyhow::bail!("upload.subdomain: {label:?} is not a domain label of its own");
            }
            if self.upload.max_file_size == 0 || self.upload.slot_ttl_secs == 0 {
                anyhow::bail!("upload.max_file_size and upload.slot_ttl_secs must be at least 1");
            }
            match self.upload.storage.as_str() {
                "disk" => {}
                "s3" => {
                    let s3 = &self.upload.s3;
                    if !matches!(s3.downloads.as_str(), "proxy" | "redirect") {
                        anyhow::bail!(
                            "upload.s3.downloads: {:?} is neither \"proxy\" nor \"redirect\"",
                            s3.downloads
                        );
                    }
                    if s3.access_key_id.is_empty() != s3.secret_access_key.is_empty() {
                        anyhow::bail!(
                            "upload.s3.access_key_id and upload.s3.secret_access_key must be given together"
                        );
                    }
                    if s3.url_ttl_secs == 0 || s3.url_ttl_secs > 7 * 86_400 {
                        anyhow::bail!(
                            "upload.s3.url_ttl_secs must be between 1 and 604800 (S3's limit)"
                        );
                    }
                    crate::modules::upload::blobs::open(self)?;
                }
                other => anyhow::bail!("upload.storage: {other:?} is neither \"disk\" nor \"s3\""),
            }
        }
        if self.stories.item_expire_secs == 0 {
            anyhow::bail!("stories.item_expire_secs must be at least 1: stories always expire");
        }
        if self.stories.max_live == 0 || self.stories.max_live > 1000 {
            anyhow::bail!("stories.max_live must be between 1 and 1000 (a PEP node's most items)");
        }
        if self.stories.max_item_bytes < 256 {
            anyhow::bail!("stories.max_item_bytes must be at least 256");
        }
        if self.push.max_per_minute == 0 || self.push.coalesce_ms > 60_000 {
            anyhow::bail!(
                "push.max_per_minute must be at least 1 and push.coalesce_ms at most 60000"
            );
        }
        let sub = &self.push.vapid_subject;
        if !sub.is_empty() && !sub.starts_with("mailto:") && !sub.starts_with("https://") {
            anyhow::bail!("push.vapid_subject must be a mailto: or https: URI, not {sub:?}");
        }
        if !(1..=120).contains(&self.push.webpush_timeout_secs) {
            anyhow::bail!("push.webpush_timeout_secs must be between 1 and 120");
        }
        self.validate_s2s()?;
        self.validate_cluster()?;
        if self.tls.cert.is_empty() != self.tls.key.is_empty() {
            anyhow::bail!("tls.cert and tls.key must be given together");
        }
        if self.limits.max_stanza_bytes_preauth > self.limits.max_stanza_bytes {
            anyhow::bail!(
                "limits.max_stanza_bytes_preauth must not exceed limits.max_stanza_bytes"
            );
        }
        Ok(())
    }

    pub fn registration_enabled(&self) -> bool {
        self.registration
            .enabled
            .unwrap_or(self.domains.len() == 1 && self.domains[0] == "localhost")
    }

    fn validate_s2s(&self) -> anyhow::Result<()> {
        let s = &self.s2s;
        let domain = |d: &str| jid::BareJid::new(d).is_ok_and(|j| j.node().is_none());
        for (key, list) in [("s2s.allow", &s.allow), ("s2s.deny", &s.deny)] {
            if let Some(d) = list.iter().find(|d| !domain(d)) {
                anyhow::bail!("{key}: {d:?} is not a domain");
            }
        }
        for (d, addr) in &s.hosts {
            if !domain(d) || self.serves(d) {
                anyhow::bail!("s2s.hosts: {d:?} is not a remote domain");
            }
            if addr
                .trim_start_matches("tls://")
                .rsplit_once(':')
                .is_none_or(|(_, p)| p.parse::<u16>().is_err())
            {
                anyhow::bail!("s2s.hosts.{d:?}: {addr:?} is not host:port or tls://host:port");
            }
        }
        if s.rate_bytes_per_sec == 0 || s.rate_burst_bytes < self.limits.max_stanza_bytes as u64 {
            anyhow::bail!(
                "s2s.rate_bytes_per_sec must be at least 1 and s2s.rate_burst_bytes at least \
                 limits.max_stanza_bytes ({})",
                self.limits.max_stanza_bytes
            );
        }
        if s.idle_timeout_secs == 0 || s.connect_timeout_secs == 0 {
            anyhow::bail!("s2s.idle_timeout_secs and s2s.connect_timeout_secs must be at least 1");
        }
        if s.max_queue == 0 || s.max_queue_bytes < self.limits.max_stanza_bytes {
            anyhow::bail!(
                "s2s.max_queue must be at least 1 and s2s.max_queue_bytes at least \
                 limits.max_stanza_bytes ({})",
                self.limits.max_stanza_bytes
            );
        }
        Ok(())
    }

    fn validate_cluster(&self) -> anyhow::Result<()> {
        let c = &self.cluster;
        if !c.enabled {
            return Ok(());
        }
        if self.store.backend != "postgres" {
            anyhow::bail!(
                "cluster.enabled needs store.backend = \"postgres\": a SQLite file belongs to one node"
            );
        }
        // NATS key-value keys and subject tokens.
        let token = |v: &str| {
            !v.is_empty()
                && v.chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
        };
        if !token(&c.name) {
            anyhow::bail!(
                "cluster.name {:?}: use letters, digits, '-' and '_'",
                c.name
            );
        }
        if !c.node_name.is_empty() && !token(&c.node_name) {
            anyhow::bail!(
                "cluster.node_name {:?}: use letters, digits, '-' and '_'",
                c.node_name
            );
        }
        if c.lease_secs < 3 {
            anyhow::bail!("cluster.lease_secs must be at least 3");
        }
        if c.nats_url.is_empty() {
            anyhow::bail!("cluster.nats_url must name the NATS server");
        }
        Ok(())
    }

    /// This node's name in the cluster: `cluster.node_name`, else the host
    /// name (with anything NATS can't take replaced by '-').
    pub fn node_name(&self) -> String {
        if !self.cluster.node_name.is_empty() {
            return self.cluster.node_name.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::env::var("HOSTNAME"))
            .unwrap_or_else(|_| "node".into());
        host.trim()
            .chars()
            .map(|ch| {
                if ch.is_ascii_alphanumeric() || ch == '_' {
                    ch
                } else {
                    '-'
                }
            })
            .collect()
    }

    /// Whether federation runs: `s2s.enabled`, else on unless every
    /// served domain is `localhost` (a local test server talks to no one).
    pub fn s2s_enabled(&self) -> bool {
        self.s2s
            .enabled
            .unwrap_or(self.domains.iter().any(|d| d != "localhost"))
    }

    /// Whether stanzas may go to (or come from) `domain` over s2s.
    pub fn s2s_allows(&self, domain: &str) -> bool {
        let s = &self.s2s;
        !s.deny.iter().any(|d| d == domain)
            && (s.allow.is_empty() || s.allow.iter().any(|d| d == domain))
    }

    pub fn serves(&self, domain: &str) -> bool {
        self.domains.iter().any(|d| d == domain)
    }

    pub fn store_path(&self) -> PathBuf {
        if self.store.path.is_empty() {
            self.data_dir.join("natter.db")
        } else {
            PathBuf::from(&self.store.path)
        }
    }
}

fn env_value(key: &str, value: &str) -> toml::Value {
    if key == "domains" {
        return toml::Value::Array(
            value
                .split(',')
                .map(|d| toml::Value::String(d.trim().to_string()))
                .collect(),
        );
    }
    if let Ok(i) = value.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    match value {
        "true" => toml::Value::Boolean(true),
        "false" => toml::Value::Boolean(false),
        _ => toml::Value::String(value.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_room_fits_in_a_session_queue() {
        let c = Config::from_parts("[muc]\nmax_members = 4000\n", &[]).unwrap_err();
        let msg = format!("{c:#}");
        assert!(
            msg.contains("c2s.max_queue") && msg.contains("4064"),
            "{msg}"
        );
        let ok = "[muc]\nmax_members = 4000\n[c2s]\nmax_queue = 4064\nmax_unacked = 4064\n";
        assert!(Config::from_parts(ok, &[]).is_ok());
    }

    #[test]
    fn defaults_serve_localhost_with_registration() {
        let c = Config::from_parts("", &[]).unwrap();
        assert_eq!(c.domains, vec!["localhost"]);
        assert!(c.registration_enabled());
        assert_eq!(c.listen.c2s, "0.0.0.0:5222");
    }

    #[test]
    fn a_cluster_needs_postgres_and_names_nats_can_take() {
        let err = |text: &str| format!("{:#}", Config::from_parts(text, &[]).unwrap_err());
        assert!(
            err("[cluster]\nenabled = true\n").contains("store.backend = \"postgres\""),
            "a cluster on SQLite"
        );
        let pg = "[store]\nbackend = \"postgres\"\nurl = \"postgres://x/y\"\n";
        assert!(err(&format!(
            "{pg}[cluster]\nenabled = true\nnode_name = \"a.b\"\n"
        ))
        .contains("cluster.node_name"));
        assert!(
            err(&format!("{pg}[cluster]\nenabled = true\nlease_secs = 1\n"))
                .contains("cluster.lease_secs")
        );
        let env = vec![("NATTER_CLUSTER_NODE_NAME".into(), "n-7".into())];
        let c = Config::from_parts(&format!("{pg}[cluster]\nenabled = true\n"), &env).unwrap();
        assert_eq!(c.node_name(), "n-7");
    }

    #[test]
    fn env_overrides_file() {
        let env = vec![
            ("NATTER_LISTEN_C2S_TLS".into(), "127.0.0.1:1".into()),
            ("NATTER_DOMAINS".into(), "a.example,b.example".into()),
            ("NATTER_LIMITS_MAX_DEPTH".into(), "7".into()),
            ("NATTER_UPLOAD_MAX_FILE_SIZE".into(), "2048".into()),
            ("NATTER_MUC_MAX_MEMBERS".into(), "50".into()),
            ("NATTER_S2S_ENABLED".into(), "false".into()),
        ];
        let c = Config::from_parts("[listen]\nc2s_tls = \"x:2\"\n", &env).unwrap();
        assert_eq!(c.upload.max_file_size, 2048);
        assert_eq!(c.muc.max_members, 50);
        assert_eq!(c.s2s.enabled, Some(false));
        assert_eq!(c.listen.c2s_tls, "127.0.0.1:1");
        assert_eq!(c.domains, vec!["a.example", "b.example"]);
        assert_eq!(c.limits.max_depth, 7);
        assert!(!c.registration_enabled());
    }

    #[test]
    fn store_backend_and_url_are_checked_together() {
        let err = |text: &str| Config::from_parts(text, &[]).unwrap_err().to_string();
        let e = err("[store]\nbackend = \"postgres\"\n");
        assert!(e.contains("store.url must be set"), "{e}");
        let e = err("[store]\nbackend = \"postgres\"\nurl = \"mysql://u:pw@h/db\"\n");
        assert!(e.contains("store.url must be a postgres:// URL"), "{e}");
        assert!(!e.contains("pw"), "the password is not shown: {e}");
        let e = err("[store]\nurl = \"postgres://h/db\"\n");
        assert!(e.contains("store.url is for store.backend"), "{e}");
        let e = err("[store]\nbackend = \"mysql\"\n");
        assert!(e.contains("store.backend must be"), "{e}");
        let e = err("[store]\nbackend = \"postgres\"\nurl = \"postgres://h/db\"\npool_size = 1\n");
        assert!(e.contains("store.pool_size"), "{e}");
        let env = vec![
            ("NATTER_STORE_BACKEND".into(), "postgres".into()),
            (
                "NATTER_STORE_URL".into(),
                "postgresql://natter@db:5432/natter".into(),
            ),
            // The test harness's own variables are not configuration.
            ("NATTER_TEST_STORE".into(), "postgres".into()),
        ];
        let c = Config::from_parts("", &env).unwrap();
        assert_eq!(c.store.backend, "postgres");
        assert_eq!(c.store.url, "postgresql://natter@db:5432/natter");
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::from_parts("[listen]\nc2z = \"x\"\n", &[]).unwrap_err();
        assert!(e.to_string().contains("c2z"), "{e}");
    }
}
