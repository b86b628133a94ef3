//! Shared helpers for the integration tests: an in-process server on
//! 127.0.0.1:0 with a temporary data directory, and a raw XMPP test client
//! (TCP + STARTTLS, direct TLS, WebSocket) that asserts with clear messages.
//!
//! Keep this API stable: other test files build on it.
//!
//! ```ignore
//! let srv = common::start_server(|_| {}).await;
//! let alice = srv.add_user("alice", "secret1").await;
//! let mut a = Client::connect_tls(srv.c2s_tls).await;
//! let me = a.login(&alice, "secret1", "phone").await;   // "alice@localhost/phone"
//! let pong = a.iq(xml("<iq type='get'><ping xmlns='urn:xmpp:ping'/></iq>")).await;
//! srv.stop().await;
//! ```
#![allow(dead_code)]

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use futures::{SinkExt, StreamExt};
use natter::config::Config;
use natter_sasl::client::{ClientBinding, ScramClient};
use natter_sasl::{ChannelBinding, Hash, Mechanism};
use natter_xml::{Limits, StreamEvent, StreamParser, NS_CLIENT, NS_FRAMING, NS_STREAM};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;

pub use natter_xml::Element;

pub const DOMAIN: &str = "localhost";
pub const NS_TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
pub const NS_SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
pub const NS_BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
pub const NS_STREAMS: &str = "urn:ietf:params:xml:ns:xmpp-streams";
pub const NS_STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
pub const NS_PING: &str = "urn:xmpp:ping";
pub const NS_REGISTER: &str = "jabber:iq:register";
pub const NS_DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";

/// Default time `recv` waits before failing the test.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(5);

fn init_tracing() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // RUST_LOG=natter=debug cargo test … shows the server's logs.
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
    });
}

// ---------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------

pub struct TestServer {
    pub running: natter::Running,
    /// The data directory; removed when the server is dropped.
    pub dir: tempfile::TempDir,
    /// The server's PostgreSQL database (NATTER_TEST_STORE=postgres); dropped with it.
    pub db: Option<TestDb>,
    pub c2s: SocketAddr,
    pub c2s_tls: SocketAddr,
    pub http: SocketAddr,
    pub domain: String,
}

/// The store integration tests run on: env `NATTER_TEST_STORE`, `sqlite`
/// (default) or `postgres` (a fresh database per server on the server named by
/// `NATTER_TEST_PG_URL`, default postgres://postgres@127.0.0.1:5432/postgres).
pub fn test_backend() -> &'static str {
    match std::env::var("NATTER_TEST_STORE").as_deref() {
        Err(_) | Ok("") | Ok("sqlite") => "sqlite",
        Ok("postgres") => "postgres",
        Ok(other) => panic!("NATTER_TEST_STORE must be sqlite or postgres, not {other:?}"),
    }
}

/// A tweak for tests of the embedded mode (SQLite files under data_dir, the
/// disk filling up): they run on SQLite whatever NATTER_TEST_STORE says.
pub fn sqlite_only(c: &mut Config) {
    c.store.backend = "sqlite".into();
    c.store.url.clear();
}

/// A PostgreSQL database of one test server, dropped (with FORCE, closing
/// what still uses it) when this is dropped.
pub struct TestDb {
    server: String,
    pub name: String,
    pub url: String,
}

impl TestDb {
    fn pg_server() -> String {
        std::env::var("NATTER_TEST_PG_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
    }

    /// Creates `natter_test_<random>`; panics with the cause when the server
    /// is unreachable (a PostgreSQL run must fail then, not pass untested).
    pub async fn create() -> TestDb {
        let server = Self::pg_server();
        let name = format!("natter_test_{:016x}", rand::random::<u64>());
        if let Err(e) = natter_store::postgres::create_database(&server, &name).await {
            panic!(
                "NATTER_TEST_STORE=postgres needs a PostgreSQL server (NATTER_TEST_PG_URL): {e}"
            );
        }
        let url = natter_store::postgres::with_database(&server, &name);
        TestDb { server, name, url }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop runs outside any async context we could block on: a thread with
        // a runtime of its own.
        let (server, name) = (self.server.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(natter_store::postgres::drop_database(&server, &name))
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}

/// Points `config` at a fresh database when it is to use PostgreSQL without
/// one yet; the database lives as long as the returned guard.
pub async fn fresh_store(config: &mut Config) -> Option<TestDb> {
    if config.store.backend != "postgres" || !config.store.url.is_empty() {
        return None;
    }
    let db = TestDb::create().await;
    config.store.url = db.url.clone();
    Some(db)
}

/// The environment that makes a natter binary (CLI, `serve`) use the store
/// of `config`.
pub fn store_env(config: &Config) -> Vec<(&'static str, String)> {
    vec![
        ("NATTER_STORE_BACKEND", config.store.backend.clone()),
        ("NATTER_STORE_URL", config.store.url.clone()),
    ]
}

/// The configuration every test server starts from (before `tweak`): the
/// backend NATTER_TEST_STORE names (PostgreSQL without a database yet:
/// `start_server` and `fresh_store` create one).
pub fn test_config(dir: &std::path::Path) -> Config {
    let mut c = Config {
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    c.store.backend = test_backend().into();
    c.domains = vec![DOMAIN.into()];
    c.listen.c2s = "127.0.0.1:0".into();
    c.listen.c2s_tls = "127.0.0.1:0".into();
    c.listen.http = "127.0.0.1:0".into();
    c.listen.s2s_tls = "127.0.0.1:0".into();
    c.c2s.allow_plaintext_loopback = false;
    c.c2s.write_timeout_secs = 5;
    c.log.level = "warn".into();
    c
}

/// Start a server on 127.0.0.1:0 (all three listeners) with a fresh data
/// directory; `tweak` adjusts the configuration first.
pub async fn start_server(tweak: impl FnOnce(&mut Config)) -> TestServer {
    start_server_with(tweak, Vec::new()).await
}

/// `start_server`, with extra modules after the standard ones.
pub async fn start_server_with(
    tweak: impl FnOnce(&mut Config),
    extra: Vec<Arc<dyn natter::modules::Module>>,
) -> TestServer {
    init_tracing();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = test_config(dir.path());
    tweak(&mut config);
    let db = fresh_store(&mut config).await;
    let domain = config.domains[0].clone();
    let running = natter::start_with(config, extra)
        .await
        .expect("server starts");
    let b = running.bound.clone();
    TestServer {
        c2s: b.c2s.expect("c2s listener bound"),
        c2s_tls: b.c2s_tls.expect("c2s_tls listener bound"),
        http: b.http.expect("http listener bound"),
        running,
        dir,
        db,
        domain,
    }
}

impl TestServer {
    pub fn state(&self) -> &natter::state::ServerState {
        &self.running.state
    }

    /// Create an account `local@domain`; returns the bare JID as a string.
    pub async fn add_user(&self, local: &str, password: &str) -> String {
        let jid = format!("{local}@{}", self.domain);
        let bare = natter::accounts::parse_user(&jid, &self.state().config.domains)
            .unwrap_or_else(|e| panic!("add_user({jid}): {e}"));
        natter::accounts::create(self.state().store.as_ref(), &bare, password, 1, None)
            .await
            .unwrap_or_else(|e| panic!("add_user({jid}): {e}"));
        bare.to_string()
    }

    /// A logged-in client over direct TLS.
    pub async fn login(&self, user: &str, password: &str, resource: &str) -> Client {
        let mut c = Client::tls_raw(self.c2s_tls).await;
        // The stream goes to the server's own (first) domain.
        c.domain = self.domain.clone();
        c.open().await;
        c.login(user, password, resource).await;
        c
    }

    /// Two fresh accounts ("alice<n>", "bob<n>"), each logged in over direct TLS
    /// with resource "res". Passwords are "password".
    pub async fn logged_in_pair(&self) -> (Client, Client) {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let a = self.add_user(&format!("alice{n}"), "password").await;
        let b = self.add_user(&format!("bob{n}"), "password").await;
        let ca = self.login(&a, "password", "res").await;
        let cb = self.login(&b, "password", "res").await;
        (ca, cb)
    }

    /// The server's health check: a fresh account logs in and exchanges a
    /// message with another fresh account. Panics if that fails.
    pub async fn assert_healthy(&self) {
        let (mut a, mut b) = self.logged_in_pair().await;
        let to = b.jid().to_string();
        a.send(&message(&to, "still alive?")).await;
        let m = b.recv_until(|e| e.name == "message").await;
        assert_eq!(
            m.child_text("body", NS_CLIENT).as_deref(),
            Some("still alive?")
        );
        assert_eq!(m.attr("from"), Some(a.jid()));
        a.close().await;
        b.close().await;
    }

    pub async fn stop(self) {
        self.running.shutdown().await;
    }

    /// Shut down but keep the store (data directory and test database) for
    /// a restart with the same config; the store goes when the guard drops.
    pub async fn stop_keeping_store(self) -> KeptStore {
        self.running.shutdown().await;
        KeptStore {
            _dir: self.dir,
            _db: self.db,
        }
    }
}

/// The store of a stopped test server (`TestServer::stop_keeping_store`).
pub struct KeptStore {
    _dir: tempfile::TempDir,
    _db: Option<TestDb>,
}

/// Polls `cond` (every 25 ms, for up to 5 s) until it holds.
pub async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

/// The queue is deleted once the session has taken it over, which may be just
/// after the client saw the messages: wait (bounded) for the store to agree.
pub async fn queue_emptied(srv: &TestServer, user: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let n = srv.state().store.offline_count(user).await.unwrap();
        if n == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} messages still queued for {user} after delivery"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------
// Stanza helpers
// ---------------------------------------------------------------------------

/// Parse an XML snippet; unprefixed elements without `xmlns` are in
/// `jabber:client` (as they would be inside a c2s stream).
pub fn xml(s: &str) -> Element {
    let wrapped = format!("<wrap xmlns='{NS_CLIENT}'>{s}</wrap>");
    let w = natter_xml::parse_frame(wrapped.as_bytes(), &big_limits())
        .unwrap_or_else(|e| panic!("bad XML in test: {e}\n{s}"));
    let first = w.children().next().cloned();
    first.expect("one element")
}

pub fn message(to: &str, body: &str) -> Element {
    Element::new("message", NS_CLIENT)
        .with_attr("to", to)
        .with_attr("type", "chat")
        .with_attr("id", next_id())
        .with_child(Element::new("body", NS_CLIENT).with_text(body))
}

pub fn ping_iq(to: Option<&str>) -> Element {
    let mut iq = Element::new("iq", NS_CLIENT)
        .with_attr("type", "get")
        .with_child(Element::new("ping", NS_PING));
    if let Some(t) = to {
        iq.set_attr("to", t);
    }
    iq
}

/// The defined condition of a stanza error (`<error><cond xmlns=stanzas/>`).
pub fn stanza_error(el: &Element) -> Option<String> {
    el.get_child("error", NS_CLIENT)?
        .children()
        .find(|c| c.ns == NS_STANZAS && c.name != "text")
        .map(|c| c.name.clone())
}

/// A free loopback port (for servers that must know each other's
/// address before they start).
/// A port free now, for a listener another server must know before it
/// starts. Drawn below Linux's ephemeral range (32768–60999), where the
/// port-0 listeners of servers started meanwhile never land.
pub fn free_port() -> u16 {
    use rand::Rng;
    loop {
        let port = rand::thread_rng().gen_range(20_000..32_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub fn next_id() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("t{}", N.fetch_add(1, Ordering::Relaxed))
}

fn big_limits() -> Limits {
    Limits {
        max_stanza_bytes: 64 * 1024 * 1024,
        max_depth: 1000,
        max_attrs: 10_000,
        max_elements: usize::MAX,
    }
}

/// Resident memory of this process (the in-process server included), bytes.
pub fn rss_bytes() -> u64 {
    // Anonymous memory only: what queues and buffers take. File-backed pages
    // (the mmap'd SQLite file, the binary) are the kernel's page cache.
    let s = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = s
        .lines()
        .find(|l| l.starts_with("RssAnon:"))
        .expect("RssAnon line");
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("RssAnon value");
    kb * 1024
}

// ---------------------------------------------------------------------------
// TLS (test only: accepts the server's self-signed certificate)
// ---------------------------------------------------------------------------

pub fn tls_connector() -> tokio_rustls::TlsConnector {
    tokio_rustls::TlsConnector::from(natter::net::tls::unverified_client_config())
}

async fn tls_handshake(
    tcp: TcpStream,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let name = rustls::pki_types::ServerName::try_from(DOMAIN).expect("server name");
    tls_connector().connect(name, tcp).await
}

// ---------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Ws(Box<WebSocketStream<TcpStream>>),
    /// Closed or mid-upgrade.
    Gone,
}

/// What the server sent, one item at a time.
#[derive(Debug)]
pub enum Event {
    /// Stream header (`<stream:stream>` or WebSocket `<open/>`) with its attributes.
    Open(Vec<(String, String)>),
    Stanza(Element),
    /// `</stream:stream>` or WebSocket `<close/>`.
    Close,
    /// The connection ended (EOF, reset, WebSocket close frame).
    Eof,
}

/// A raw XMPP client for tests. Every wait has a timeout (`timeout`, 5 s by
/// default) and fails the test with a message saying what was awaited.
pub struct Client {
    io: Io,
    parser: StreamParser,
    /// Events read but not yet handed out.
    queue: VecDeque<Event>,
    /// Stanzas set aside by `iq`/`recv_matching`, handed out first by `recv`.
    buffered: VecDeque<Element>,
    buf: Vec<u8>,
    pub domain: String,
    pub timeout: Duration,
    /// The last `<stream:features/>` received.
    pub features: Option<Element>,
    /// Attributes of the last stream header received.
    pub stream_attrs: Vec<(String, String)>,
    /// Full JID once bound.
    pub full_jid: Option<String>,
    /// For messages: "tcp", "tls", "ws".
    pub kind: &'static str,
}

impl Client {
    fn new(io: Io, kind: &'static str) -> Self {
        Client {
            io,
            parser: StreamParser::new(big_limits()),
            queue: VecDeque::new(),
            buffered: VecDeque::new(),
            buf: vec![0; 64 * 1024],
            domain: DOMAIN.into(),
            timeout: RECV_TIMEOUT,
            features: None,
            stream_attrs: Vec::new(),
            full_jid: None,
            kind,
        }
    }

    // ---- connecting ----

    /// Plain TCP, nothing sent yet.
    pub async fn tcp_raw(addr: SocketAddr) -> Client {
        let tcp = TcpStream::connect(addr).await.expect("TCP connect");
        tcp.set_nodelay(true).ok();
        Client::new(Io::Plain(tcp), "tcp")
    }

    /// Direct TLS (XEP-0368), handshake done, nothing sent yet.
    pub async fn tls_raw(addr: SocketAddr) -> Client {
        let tcp = TcpStream::connect(addr).await.expect("TCP connect");
        tcp.set_nodelay(true).ok();
        let tls = tls_handshake(tcp).await.expect("TLS handshake");
        Client::new(Io::Tls(Box::new(tls)), "tls")
    }

    /// A TCP connection from a chosen loopback address (127.0.0.2, …), to
    /// test per-IP limits without locking out the other tests' clients.
    pub async fn tcp_from(addr: SocketAddr, local: std::net::IpAddr) -> TcpStream {
        let sock = match local {
            std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        }
        .expect("socket");
        sock.bind(SocketAddr::new(local, 0))
            .expect("bind local address");
        let tcp = sock.connect(addr).await.expect("TCP connect");
        tcp.set_nodelay(true).ok();
        tcp
    }

    /// Plain TCP from `local`, nothing sent yet.
    pub async fn tcp_raw_from(addr: SocketAddr, local: std::net::IpAddr) -> Client {
        Client::new(Io::Plain(Client::tcp_from(addr, local).await), "tcp")
    }

    /// Direct TLS from `local`, stream opened: ready for SASL.
    pub async fn connect_tls_from(addr: SocketAddr, local: std::net::IpAddr) -> Client {
        let tcp = Client::tcp_from(addr, local).await;
        let tls = tls_handshake(tcp).await.expect("TLS handshake");
        let mut c = Client::new(Io::Tls(Box::new(tls)), "tls");
        c.open().await;
        c
    }

    /// Wrap an already connected socket (e.g. one with a small receive buffer).
    pub async fn tls_over(tcp: TcpStream) -> Client {
        let tls = tls_handshake(tcp).await.expect("TLS handshake");
        Client::new(Io::Tls(Box::new(tls)), "tls")
    }

    /// WebSocket (RFC 7395, subprotocol "xmpp") on the HTTP listener,
    /// upgrade done, nothing sent yet.
    pub async fn ws_raw(addr: SocketAddr) -> Client {
        Client::try_ws_raw(addr)
            .await
            .unwrap_or_else(|e| panic!("WebSocket upgrade failed: {e}"))
    }

    /// Like `ws_raw`; a refused upgrade is returned as its HTTP status
    /// (or error text).
    pub async fn try_ws_raw(addr: SocketAddr) -> Result<Client, String> {
        let tcp = TcpStream::connect(addr).await.expect("TCP connect");
        tcp.set_nodelay(true).ok();
        let mut req = format!("ws://{addr}/xmpp-websocket")
            .into_client_request()
            .expect("ws request");
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", "xmpp".parse().unwrap());
        let (ws, resp) = match tokio_tungstenite::client_async(req, tcp).await {
            Ok(x) => x,
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                return Err(r.status().as_u16().to_string())
            }
            Err(e) => return Err(e.to_string()),
        };
        assert_eq!(
            resp.headers()
                .get("Sec-WebSocket-Protocol")
                .and_then(|v| v.to_str().ok()),
            Some("xmpp"),
            "server must select the xmpp subprotocol (RFC 7395 §3.3)"
        );
        Ok(Client::new(Io::Ws(Box::new(ws)), "ws"))
    }

    /// Plain TCP, stream opened, STARTTLS done, stream re-opened: ready for SASL.
    pub async fn connect_starttls(addr: SocketAddr) -> Client {
        let mut c = Client::tcp_raw(addr).await;
        let f = c.open().await;
        assert!(
            f.get_child("starttls", NS_TLS).is_some(),
            "STARTTLS not offered: {f}"
        );
        c.starttls().await;
        c.open().await;
        c
    }

    /// Direct TLS, stream opened: ready for SASL.
    pub async fn connect_tls(addr: SocketAddr) -> Client {
        let mut c = Client::tls_raw(addr).await;
        c.open().await;
        c
    }

    /// WebSocket, `<open/>` exchanged: ready for SASL.
    pub async fn connect_ws(addr: SocketAddr) -> Client {
        let mut c = Client::ws_raw(addr).await;
        c.open().await;
        c
    }

    pub fn jid(&self) -> &str {
        self.full_jid.as_deref().expect("client is not bound")
    }

    pub fn bare_jid(&self) -> &str {
        let j = self.jid();
        j.split('/').next().unwrap()
    }

    /// Send a stream header to `self.domain`, read the server's header and
    /// features; returns the features.
    pub async fn open(&mut self) -> Element {
        let domain = self.domain.clone();
        self.send_header(&domain).await;
        self.expect_header().await;
        let f = self.recv().await;
        assert!(
            f.is("features", NS_STREAM),
            "[{}] expected <stream:features/>, got {f}",
            self.kind
        );
        self.features = Some(f.clone());
        f
    }

    /// Only the client's stream header (or WebSocket `<open/>`) to `to`.
    pub async fn send_header(&mut self, to: &str) {
        if matches!(self.io, Io::Ws(_)) {
            let open =
                format!("<open xmlns='{NS_FRAMING}' to='{to}' version='1.0' xml:lang='en'/>");
            self.send_raw(open.as_bytes()).await;
        } else {
            let h = format!(
                "<?xml version='1.0'?><stream:stream xmlns='{NS_CLIENT}' \
                 xmlns:stream='{NS_STREAM}' to='{to}' version='1.0' xml:lang='en'>"
            );
            self.send_raw(h.as_bytes()).await;
        }
    }

    /// Wait for the server's stream header; returns its attributes.
    pub async fn expect_header(&mut self) -> Vec<(String, String)> {
        match self.next_event().await {
            Event::Open(attrs) => {
                self.stream_attrs = attrs.clone();
                attrs
            }
            other => panic!(
                "[{}] expected the server's stream header, got {other:?}",
                self.kind
            ),
        }
    }

    /// `<starttls/>`, `<proceed/>`, TLS handshake. The stream must be
    /// re-opened afterwards (`open`).
    pub async fn starttls(&mut self) {
        self.send_raw(format!("<starttls xmlns='{NS_TLS}'/>").as_bytes())
            .await;
        let p = self.recv().await;
        assert!(p.is("proceed", NS_TLS), "expected <proceed/>, got {p}");
        self.upgrade_tls()
            .await
            .expect("TLS handshake after STARTTLS");
    }

    /// Run the TLS handshake on the plain socket (after `<proceed/>`).
    pub async fn upgrade_tls(&mut self) -> std::io::Result<()> {
        let Io::Plain(tcp) = std::mem::replace(&mut self.io, Io::Gone) else {
            panic!("upgrade_tls on a stream that is not plain TCP");
        };
        let tls = tls_handshake(tcp).await?;
        self.io = Io::Tls(Box::new(tls));
        self.kind = "tls";
        self.parser = StreamParser::new(big_limits());
        self.queue.clear();
        Ok(())
    }

    /// A new stream starts (after SASL success): forget the old parser state.
    pub fn reset_stream(&mut self) {
        self.parser = StreamParser::new(big_limits());
    }

    /// RFC 9266 tls-exporter channel binding of this connection (TLS 1.3).
    pub fn tls_exporter(&self) -> Option<ChannelBinding> {
        let Io::Tls(s) = &self.io else { return None };
        let mut data = vec![0u8; 32];
        s.get_ref()
            .1
            .export_keying_material(&mut data, b"EXPORTER-Channel-Binding", Some(&[]))
            .ok()?;
        Some(ChannelBinding {
            kind: "tls-exporter",
            data,
        })
    }

    /// The SASL mechanisms offered in the last features.
    pub fn mechanisms(&self) -> Vec<String> {
        self.features
            .as_ref()
            .and_then(|f| f.get_child("mechanisms", NS_SASL))
            .map(|m| m.children().map(|c| c.text()).collect())
            .unwrap_or_default()
    }

    // ---- authentication ----

    /// Authenticate (SCRAM-SHA-256), restart the stream, bind `resource`
    /// ("" = let the server choose). `user` is a local part or a bare JID.
    /// Returns the full JID.
    pub async fn login(&mut self, user: &str, password: &str, resource: &str) -> String {
        self.login_with(Mechanism::ScramSha256, user, password, resource)
            .await
    }

    pub async fn login_with(
        &mut self,
        mech: Mechanism,
        user: &str,
        password: &str,
        resource: &str,
    ) -> String {
        if let Err(cond) = self.authenticate(mech, user, password, None).await {
            panic!(
                "[{}] login as {user} with {} failed: {cond}",
                self.kind,
                mech.name()
            );
        }
        self.bind(resource).await
    }

    /// SASL only. On success the stream is restarted (new features read);
    /// on failure returns the `<failure/>` condition.
    pub async fn authenticate(
        &mut self,
        mech: Mechanism,
        user: &str,
        password: &str,
        authzid: Option<&str>,
    ) -> Result<(), String> {
        let local = user.split('@').next().unwrap().to_string();
        match mech.hash() {
            None => {
                let mut msg = Vec::new();
                msg.extend_from_slice(authzid.unwrap_or("").as_bytes());
                msg.push(0);
                msg.extend_from_slice(local.as_bytes());
                msg.push(0);
                msg.extend_from_slice(password.as_bytes());
                self.send_auth(mech, &msg).await;
                let r = self.recv().await;
                self.sasl_outcome(r, None).await
            }
            Some(hash) => {
                let plus = matches!(mech, Mechanism::ScramSha1Plus | Mechanism::ScramSha256Plus);
                let binding = if plus {
                    ClientBinding::Use(self.tls_exporter().expect("-PLUS needs TLS 1.3"))
                } else {
                    ClientBinding::Unsupported
                };
                let mut scram = ScramClient::new(hash, &local, password, authzid, binding);
                self.send_auth(mech, &scram.client_first()).await;
                let r = self.recv().await;
                if !r.is("challenge", NS_SASL) {
                    return self.sasl_outcome(r, None).await;
                }
                let server_first = B64.decode(r.text().trim()).expect("challenge base64");
                let fin = scram
                    .client_final(&server_first)
                    .expect("server-first-message acceptable");
                self.send(&Element::new("response", NS_SASL).with_text(B64.encode(fin)))
                    .await;
                let r = self.recv().await;
                self.sasl_outcome(r, Some((scram, hash))).await
            }
        }
    }

    async fn send_auth(&mut self, mech: Mechanism, initial: &[u8]) {
        let auth = Element::new("auth", NS_SASL)
            .with_attr("mechanism", mech.name())
            .with_text(if initial.is_empty() {
                "=".to_string()
            } else {
                B64.encode(initial)
            });
        self.send(&auth).await;
    }

    async fn sasl_outcome(
        &mut self,
        r: Element,
        scram: Option<(ScramClient, Hash)>,
    ) -> Result<(), String> {
        if r.is("failure", NS_SASL) {
            let cond = r
                .children()
                .find(|c| c.name != "text")
                .map(|c| c.name.clone())
                .unwrap_or_default();
            return Err(cond);
        }
        assert!(
            r.is("success", NS_SASL),
            "[{}] unexpected SASL reply {r}",
            self.kind
        );
        if let Some((scram, _)) = scram {
            let v = B64.decode(r.text().trim()).expect("success base64");
            scram
                .verify_server_final(&v)
                .expect("server signature verifies");
        }
        self.reset_stream();
        self.open().await;
        Ok(())
    }

    /// Bind a resource ("" = server-generated); returns the full JID.
    pub async fn bind(&mut self, resource: &str) -> String {
        let mut bind = Element::new("bind", NS_BIND);
        if !resource.is_empty() {
            bind.append_child(Element::new("resource", NS_BIND).with_text(resource));
        }
        let iq = Element::new("iq", NS_CLIENT)
            .with_attr("type", "set")
            .with_child(bind);
        let r = self.iq(iq).await;
        assert_eq!(r.attr("type"), Some("result"), "bind failed: {r}");
        let jid = r
            .get_child("bind", NS_BIND)
            .and_then(|b| b.child_text("jid", NS_BIND))
            .unwrap_or_else(|| panic!("bind result without jid: {r}"));
        self.full_jid = Some(jid.clone());
        jid
    }

    // ---- sending ----

    /// Write bytes as they are (WebSocket: one text frame, or a binary frame
    /// when they are not UTF-8). Errors are ignored: the server may already
    /// have closed the connection, which the next read reports.
    pub async fn send_raw(&mut self, data: &[u8]) {
        let _ = self.try_send_raw(data).await;
    }

    pub async fn try_send_raw(&mut self, data: &[u8]) -> std::io::Result<()> {
        match &mut self.io {
            Io::Plain(s) => s.write_all(data).await,
            Io::Tls(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
            Io::Ws(ws) => {
                let msg = match std::str::from_utf8(data) {
                    Ok(t) => WsMessage::text(t.to_string()),
                    Err(_) => WsMessage::binary(data.to_vec()),
                };
                ws.send(msg).await.map_err(std::io::Error::other)
            }
            Io::Gone => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }

    /// Write `data` while reading whatever the server sends meanwhile
    /// (buffered for `recv`), like a real client: a big write to a server
    /// that answers each stanza would otherwise deadlock both sides.
    pub async fn send_raw_reading(&mut self, data: &[u8]) {
        match std::mem::replace(&mut self.io, Io::Gone) {
            Io::Plain(s) => {
                let s = self.pump(s, data).await;
                self.io = Io::Plain(s);
            }
            Io::Tls(s) => {
                let s = self.pump(*s, data).await;
                self.io = Io::Tls(Box::new(s));
            }
            other => {
                self.io = other;
                self.send_raw(data).await;
            }
        }
    }

    async fn pump<S>(&mut self, stream: S, data: &[u8]) -> S
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let (mut r, mut w) = tokio::io::split(stream);
        let mut buf = vec![0u8; 64 * 1024];
        {
            let write = async {
                w.write_all(data).await?;
                w.flush().await
            };
            tokio::pin!(write);
            let mut reading = true;
            loop {
                tokio::select! {
                    _ = &mut write => break,
                    n = r.read(&mut buf), if reading => match n {
                        Ok(0) | Err(_) => {
                            self.queue.push_back(Event::Eof);
                            reading = false;
                        }
                        Ok(n) => {
                            let evs = self.parser.feed(&buf[..n]).unwrap_or_else(|e| {
                                panic!("[{}] server sent bad XML: {e}", self.kind)
                            });
                            self.queue.extend(evs.into_iter().map(|ev| match ev {
                                StreamEvent::Open { attrs } => Event::Open(attrs),
                                StreamEvent::Stanza(el) => Event::Stanza(el),
                                StreamEvent::Close => Event::Close,
                            }));
                        }
                    },
                }
            }
        }
        r.unsplit(w)
    }

    /// Serialize and write one element (write errors are ignored like
    /// `send_raw`). Over WebSocket the frame declares its namespace.
    pub async fn send(&mut self, el: &Element) {
        let text = self.serialize(el);
        self.send_raw(text.as_bytes()).await;
    }

    pub fn serialize(&self, el: &Element) -> String {
        let mut out = String::new();
        if matches!(self.io, Io::Ws(_)) {
            el.write_to(&mut out, "", false);
        } else {
            el.write_to(&mut out, NS_CLIENT, true);
        }
        out
    }

    /// `</stream:stream>` (WebSocket `<close/>`), then wait for the server to
    /// close too.
    pub async fn close(&mut self) {
        if matches!(self.io, Io::Ws(_)) {
            self.send_raw(format!("<close xmlns='{NS_FRAMING}'/>").as_bytes())
                .await;
        } else {
            self.send_raw(b"</stream:stream>").await;
        }
        self.expect_closed().await;
    }

    // ---- receiving ----

    async fn read_more(&mut self) -> std::io::Result<Vec<Event>> {
        match &mut self.io {
            Io::Plain(_) | Io::Tls(_) => {
                let n = match &mut self.io {
                    Io::Plain(s) => s.read(&mut self.buf).await,
                    Io::Tls(s) => s.read(&mut self.buf).await,
                    _ => unreachable!(),
                };
                let n = match n {
                    Ok(0) => return Ok(vec![Event::Eof]),
                    Ok(n) => n,
                    // A reset after the server closed counts as the end.
                    Err(e) if is_disconnect(&e) => return Ok(vec![Event::Eof]),
                    Err(e) => return Err(e),
                };
                let evs = self.parser.feed(&self.buf[..n]).map_err(|e| {
                    std::io::Error::other(format!(
                        "server sent bad XML: {e}: {}",
                        String::from_utf8_lossy(&self.buf[..n])
                    ))
                })?;
                Ok(evs
                    .into_iter()
                    .map(|ev| match ev {
                        StreamEvent::Open { attrs } => Event::Open(attrs),
                        StreamEvent::Stanza(el) => Event::Stanza(el),
                        StreamEvent::Close => Event::Close,
                    })
                    .collect())
            }
            Io::Ws(ws) => loop {
                let msg = match ws.next().await {
                    None => return Ok(vec![Event::Eof]),
                    Some(Err(_)) => return Ok(vec![Event::Eof]),
                    Some(Ok(m)) => m,
                };
                match msg {
                    WsMessage::Text(t) => {
                        let el =
                            natter_xml::parse_frame(t.as_bytes(), &big_limits()).map_err(|e| {
                                std::io::Error::other(format!("server sent bad XML: {e}: {t}"))
                            })?;
                        let ev = if el.is("open", NS_FRAMING) {
                            Event::Open(el.attrs)
                        } else if el.is("close", NS_FRAMING) {
                            Event::Close
                        } else {
                            Event::Stanza(el)
                        };
                        return Ok(vec![ev]);
                    }
                    WsMessage::Close(_) => return Ok(vec![Event::Eof]),
                    WsMessage::Binary(b) => {
                        return Err(std::io::Error::other(format!(
                            "server sent a binary frame ({} bytes)",
                            b.len()
                        )))
                    }
                    _ => continue,
                }
            },
            Io::Gone => Ok(vec![Event::Eof]),
        }
    }

    /// Next raw event (buffered stanzas first), waiting at most `timeout`.
    pub async fn next_event(&mut self) -> Event {
        if let Some(el) = self.buffered.pop_front() {
            return Event::Stanza(el);
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            if let Some(ev) = self.queue.pop_front() {
                if matches!(ev, Event::Eof) {
                    self.io = Io::Gone;
                }
                return ev;
            }
            let kind = self.kind;
            let timeout = self.timeout;
            match tokio::time::timeout_at(deadline, self.read_more()).await {
                Ok(Ok(evs)) => self.queue.extend(evs),
                Ok(Err(e)) => panic!("[{kind}] read failed: {e}"),
                Err(_) => panic!("[{kind}] nothing received from the server within {timeout:?}"),
            }
        }
    }

    /// Next stanza (or other top-level element such as features or SASL
    /// replies). Panics on timeout, stream end, or a stream error.
    pub async fn recv(&mut self) -> Element {
        match self.next_event().await {
            Event::Stanza(el) => {
                if el.is("error", NS_STREAM) {
                    panic!(
                        "[{}] expected a stanza, got stream error {}: {el}",
                        self.kind,
                        stream_error_condition(&el)
                    );
                }
                el
            }
            other => panic!("[{}] expected a stanza, got {other:?}", self.kind),
        }
    }

    /// Receive until `pred` matches; non-matching stanzas are dropped.
    pub async fn recv_until(&mut self, pred: impl Fn(&Element) -> bool) -> Element {
        loop {
            let el = self.recv().await;
            if pred(&el) {
                return el;
            }
        }
    }

    /// Receive until `pred` matches; non-matching stanzas are kept and
    /// returned first by later `recv` calls.
    pub async fn recv_matching(&mut self, pred: impl Fn(&Element) -> bool) -> Element {
        if let Some(i) = self.buffered.iter().position(&pred) {
            return self.buffered.remove(i).unwrap();
        }
        let mut kept = Vec::new();
        let found = loop {
            // Read past `buffered` (already checked above).
            let saved = std::mem::take(&mut self.buffered);
            let el = self.recv().await;
            self.buffered = saved;
            if pred(&el) {
                break el;
            }
            kept.push(el);
        };
        self.buffered.extend(kept);
        found
    }

    /// Every stanza already received but not yet handed out (set aside by
    /// `iq`, or read during `send_raw_reading`), without waiting. Stream
    /// events other than stanzas stay queued.
    pub fn drain_received(&mut self) -> Vec<Element> {
        let mut out: Vec<Element> = self.buffered.drain(..).collect();
        let mut rest = VecDeque::new();
        for ev in self.queue.drain(..) {
            match ev {
                Event::Stanza(el) if !el.is("error", NS_STREAM) && rest.is_empty() => out.push(el),
                ev => rest.push_back(ev),
            }
        }
        self.queue = rest;
        out
    }

    /// Everything the server sent until the connection ends (EOF, a reset,
    /// or bytes that cannot be read whole: a TLS record or a stanza cut
    /// off mid-write is not a stanza), each top-level element once.
    pub async fn read_to_end(&mut self, per_read: Duration) -> Vec<Element> {
        let mut out: Vec<Element> = self.buffered.drain(..).collect();
        loop {
            for ev in self.queue.drain(..) {
                match ev {
                    Event::Stanza(el) => out.push(el),
                    Event::Eof => return out,
                    _ => {}
                }
            }
            match tokio::time::timeout(per_read, self.read_more()).await {
                Ok(Ok(evs)) => self.queue.extend(evs),
                Ok(Err(_)) | Err(_) => {
                    self.io = Io::Gone;
                    return out;
                }
            }
        }
    }

    /// Stanzas set aside by `iq`/`recv_matching` and not yet received.
    pub fn take_buffered(&mut self) -> Vec<Element> {
        self.buffered.drain(..).collect()
    }

    /// Send an IQ with a fresh id (unless it has one) and wait for the
    /// result/error with that id; other stanzas are buffered for `recv`.
    pub async fn iq(&mut self, mut el: Element) -> Element {
        let id = match el.attr("id") {
            Some(id) => id.to_string(),
            None => {
                let id = next_id();
                el.set_attr("id", id.clone());
                id
            }
        };
        self.send(&el).await;
        self.recv_matching(|e| {
            e.name == "iq"
                && e.attr("id") == Some(id.as_str())
                && matches!(e.attr("type"), Some("result") | Some("error"))
        })
        .await
    }

    /// Round-trip a ping to the server and return every stanza that arrived
    /// before its reply. The server handles a session's stanzas in order, so
    /// anything a previous stanza caused has arrived by then: the way to
    /// assert that something did *not* happen without sleeping.
    pub async fn sync(&mut self) -> Vec<Element> {
        let id = next_id();
        let iq = ping_iq(None).with_attr("id", id.clone());
        self.send(&iq).await;
        let mut before: Vec<Element> = self.buffered.drain(..).collect();
        loop {
            let el = self.recv().await;
            if el.name == "iq" && el.attr("id") == Some(id.as_str()) {
                assert_eq!(el.attr("type"), Some("result"), "ping failed: {el}");
                return before;
            }
            before.push(el);
        }
    }

    /// Wait for a stream error; stanzas before it are skipped. Returns the
    /// condition name (e.g. "policy-violation") and checks the stream then ends.
    pub async fn expect_stream_error(&mut self) -> String {
        loop {
            match self.next_event().await {
                Event::Stanza(el) if el.is("error", NS_STREAM) => {
                    let cond = stream_error_condition(&el);
                    self.expect_closed().await;
                    return cond;
                }
                Event::Stanza(_) | Event::Open(_) => continue,
                ev => panic!(
                    "[{}] expected a stream error, got {ev:?} instead",
                    self.kind
                ),
            }
        }
    }

    /// Wait for the server to end the stream (`</stream:stream>`, WebSocket
    /// `<close/>`, or the connection closing). Stanzas before it are skipped;
    /// a stream error is a failure (use `expect_stream_error`).
    pub async fn expect_closed(&mut self) {
        loop {
            match self.next_event().await {
                Event::Close | Event::Eof => return,
                Event::Stanza(el) if el.is("error", NS_STREAM) => panic!(
                    "[{}] expected a clean close, got stream error {}",
                    self.kind,
                    stream_error_condition(&el)
                ),
                _ => continue,
            }
        }
    }

    /// Wait for the TCP connection itself to end (EOF), skipping everything.
    pub async fn expect_eof(&mut self) {
        loop {
            if let Event::Eof = self.next_event().await {
                return;
            }
        }
    }
}

fn is_disconnect(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
    )
}

/// The condition name of a `<stream:error/>`.
pub fn stream_error_condition(el: &Element) -> String {
    el.children()
        .find(|c| c.ns == NS_STREAMS && c.name != "text")
        .map(|c| c.name.clone())
        .unwrap_or_else(|| panic!("stream error without condition: {el}"))
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

/// One HTTP/1.1 request (`headers`: extra lines, each ending in `\r\n`):
/// (status, response head, body).
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
) -> (u16, String, String) {
    let (status, head, body) = http_bytes(addr, method, path, headers, b"").await;
    (status, head, String::from_utf8_lossy(&body).to_string())
}

/// One HTTP/1.1 request with a body (sent with its Content-Length unless
/// `headers` has one): (status, response head, body bytes).
pub async fn http_bytes(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.expect("HTTP connect");
    let length = if headers.to_ascii_lowercase().contains("content-length:") {
        String::new()
    } else {
        format!("Content-Length: {}\r\n", body.len())
    };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}{length}Connection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("HTTP request");
    // The server may answer (and close) before the whole body is sent.
    let _ = s.write_all(body).await;
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw).await;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("HTTP head");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head, raw[split + 4..].to_vec())
}

/// A real S3-compatible server on loopback for the upload service's S3
/// backend: moto (`moto[server]` from PyPI, installed into `.venv` by
/// scripts/test-all and .ci/run; `NATTER_TEST_MOTO` names another
/// binary). Killed when dropped. Missing moto fails the test, naming the
/// cause: the S3 suite must not pass untested.
pub struct S3Server {
    child: std::process::Child,
    pub endpoint: String,
    pub addr: SocketAddr,
}

impl S3Server {
    pub async fn start() -> S3Server {
        let bin = std::env::var("NATTER_TEST_MOTO")
            .unwrap_or_else(|_| format!("{}/.venv/bin/moto_server", env!("CARGO_MANIFEST_DIR")));
        // A listener of another test may take the port between our pick and
        // moto's bind; moto then exits while the port still answers. So the
        // port counts as moto's only once moto itself answers on it.
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            let child = std::process::Command::new(&bin)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "the S3 tests need moto_server ({bin}: {e}); run scripts/test-all, \
                         or pip install 'moto[server]' into .venv"
                    )
                });
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let mut server = S3Server {
                child,
                endpoint: format!("http://{addr}"),
                addr,
            };
            match server.answers().await {
                Ok(()) => return server,
                Err(why) => last = why,
            }
        }
        panic!("moto_server ({bin}) did not start on a port of its own in 5 tries: {last}");
    }

    /// Wait until moto listens and answers S3's ListBuckets as itself.
    async fn answers(&mut self) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(self.addr).await.is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("exited at start: {status}"));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err("did not listen within 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (status, head, body) = http_request(self.addr, "GET", "/", "").await;
        if status == 200 && body.contains("ListAllMyBucketsResult") {
            Ok(())
        } else {
            Err(format!("another server answered on {}: {head}", self.addr))
        }
    }

    /// A new empty bucket; returns its name.
    pub async fn bucket(&self) -> String {
        let name = format!("natter-{:016x}", rand::random::<u64>());
        let (status, head, _) = http_request(self.addr, "PUT", &format!("/{name}"), "").await;
        assert_eq!(status, 200, "creating bucket {name}: {head}");
        name
    }

    /// Point `c`'s upload service at `bucket` of this server.
    pub fn use_in(&self, c: &mut Config, bucket: String) {
        c.upload.storage = "s3".into();
        c.upload.s3.endpoint = self.endpoint.clone();
        c.upload.s3.bucket = bucket;
        c.upload.s3.allow_http = true;
        c.upload.s3.access_key_id = "test".into();
        c.upload.s3.secret_access_key = "test".into();
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub const NS_ACCEPT: &str = "jabber:component:accept";

/// Where the server's XEP-0114 listener is bound.
pub fn component_addr(srv: &TestServer) -> SocketAddr {
    srv.running
        .bound
        .modules
        .iter()
        .find(|(what, _)| what.contains("XEP-0114"))
        .map(|(_, a)| *a)
        .expect("component listener bound")
}

/// A component stream to `domain`, up to the server's header; returns the
/// connection and the stream id.
pub async fn component_open(addr: SocketAddr, domain: &str) -> (Client, String) {
    let mut c = Client::tcp_raw(addr).await;
    c.send_raw(
        format!(
            "<?xml version='1.0'?><stream:stream xmlns='{NS_ACCEPT}' \
             xmlns:stream='http://etherx.jabber.org/streams' to='{domain}'>"
        )
        .as_bytes(),
    )
    .await;
    let Event::Open(attrs) = c.next_event().await else {
        panic!("no stream header");
    };
    let id = attrs
        .iter()
        .find(|(k, _)| k == "id")
        .map(|(_, v)| v.clone())
        .expect("stream id");
    (c, id)
}

/// XEP-0114 §3: SHA-1 of stream id and secret, in hex.
pub fn component_handshake(id: &str, secret: &str) -> String {
    use sha1::{Digest, Sha1};
    let digest = Sha1::digest(format!("{id}{secret}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("<handshake>{hex}</handshake>")
}

/// A component logged in to `domain`.
pub async fn component_connect(addr: SocketAddr, domain: &str, secret: &str) -> Client {
    let (mut c, id) = component_open(addr, domain).await;
    c.send_raw(component_handshake(&id, secret).as_bytes())
        .await;
    let ok = c.recv().await;
    assert!(ok.is("handshake", NS_ACCEPT), "{ok}");
    c
}

/// The NATS server (JetStream on) the cluster tests use.
pub fn nats_url() -> String {
    std::env::var("NATTER_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A cluster of its own per test (they share the NATS server).
pub fn cluster_name() -> String {
    format!("t{:012x}", rand::random::<u64>() >> 16)
}

/// Cluster settings for node `node` of cluster `name` on the database at
/// `db_url` (leases of 3 s, so a killed node leaves quickly).
pub fn clustered(c: &mut Config, name: &str, node: &str, db_url: &str) {
    c.store.backend = "postgres".into();
    c.store.url = db_url.into();
    c.cluster.enabled = true;
    c.cluster.nats_url = nats_url();
    c.cluster.name = name.into();
    c.cluster.node_name = node.into();
    c.cluster.lease_secs = 3;
}
