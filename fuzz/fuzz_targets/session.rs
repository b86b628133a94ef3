//! A whole authenticated c2s stream fed into a real session.
//!
//! Once per process the harness starts natter in process (`natter::start`,
//! c2s on 127.0.0.1:0, a fresh data directory, plaintext SCRAM allowed on
//! loopback) with two accounts, and keeps a second user ("peer") logged in
//! and reading, so stanzas to it are routed to a live session. For each
//! input it connects over TCP, logs in as "fuzz" with SCRAM-SHA-256 and
//! restarts the stream; the input is then everything the client sends
//! after the new stream header (resource binding included, so unbound
//! states are explored too), followed by the client closing its side.
//!
//! Checks, besides "no panic anywhere in the server" (libFuzzer's panic hook
//! aborts on a panic in any thread, so a panicking session task is a
//! crash): everything the server writes is well-formed XML within one
//! stream, the server ends the session once the client has closed its side,
//! and it answers the next login (a stuck session or lock shows up as a
//! time-out panic).
#![no_main]

#[path = "common/mod.rs"]
mod common;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use libfuzzer_sys::fuzz_target;
use natter_sasl::client::{ClientBinding, ScramClient};
use natter_sasl::{derive_credentials, Hash};
use natter_store::{AccountCredentials, Store, StoredCredentials};
use natter_xml::{Element, StreamEvent, StreamParser};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DOMAIN: &str = "localhost";
const USER: &str = "fuzz";
const PEER: &str = "peer";
const PASSWORD: &str = "fuzz-password";
const NS_SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
const NS_BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
/// A login and bind must finish within this; the server answers in
/// milliseconds, so only a stuck server takes longer.
const STEP_TIMEOUT: Duration = Duration::from_secs(20);

/// libFuzzer calls the target once per input with no context argument, so
/// the server the inputs go to lives for the process.
struct Harness {
    rt: tokio::runtime::Runtime,
    addr: SocketAddr,
    store: Arc<dyn Store>,
}

static HARNESS: OnceLock<Harness> = OnceLock::new();

/// Data directory of this process; ones left by dead fuzzing processes are
/// removed (libFuzzer exits without running destructors).
fn data_dir() -> PathBuf {
    let base = std::env::var_os("NATTER_FUZZ_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("natter-fuzz"));
    if let Ok(entries) = std::fs::read_dir(&base) {
        for e in entries.flatten() {
            let name = e.file_name();
            let pid = name.to_string_lossy().parse::<u32>().ok();
            if pid.is_some_and(|p| !std::path::Path::new(&format!("/proc/{p}")).exists()) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let dir = base.join(std::process::id().to_string());
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("fuzz data directory");
    dir
}

fn credentials() -> AccountCredentials {
    // One PBKDF2 iteration: logins cost microseconds, not milliseconds.
    let make = |h| {
        let c = derive_credentials(h, PASSWORD, b"natter-fuzz-salt", 1).unwrap();
        StoredCredentials {
            salt: c.salt,
            iterations: c.iterations,
            stored_key: c.stored_key,
            server_key: c.server_key,
        }
    };
    AccountCredentials {
        sha1: make(Hash::Sha1),
        sha256: make(Hash::Sha256),
    }
}

/// Make sure the account exists with the harness's password: a fuzz input
/// may have changed the password or removed the account in band.
async fn restore_account(store: &dyn Store, local: &str) {
    let jid = format!("{local}@{DOMAIN}");
    let creds = credentials();
    if store.set_credentials(&jid, &creds).await.is_err() {
        store
            .create_account(&jid, &creds)
            .await
            .expect("create fuzz account");
    }
}

fn harness() -> &'static Harness {
    HARNESS.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let mut config = natter::config::Config {
            data_dir: data_dir(),
            ..Default::default()
        };
        config.domains = vec![DOMAIN.into()];
        config.listen.c2s = "127.0.0.1:0".into();
        config.listen.c2s_tls = String::new();
        config.listen.http = String::new();
        config.c2s.allow_plaintext_loopback = true;
        config.c2s.resume_timeout_secs = 1;
        let running = rt.block_on(natter::start(config)).expect("natter starts");
        let addr = running.bound.c2s.expect("c2s bound");
        let store = running.state.store.clone();
        rt.block_on(async {
            restore_account(store.as_ref(), USER).await;
            restore_account(store.as_ref(), PEER).await;
        });
        // The server runs until the process exits.
        std::mem::forget(running);
        rt.spawn(peer_loop(addr, store.clone()));
        Harness { rt, addr, store }
    })
}

/// One side of a client connection: the socket and a parser for what the
/// server writes (natter's own stream parser, with roomy limits).
struct Conn {
    sock: TcpStream,
    parser: StreamParser,
    pending: std::collections::VecDeque<StreamEvent>,
}

impl Conn {
    async fn connect(addr: SocketAddr) -> Conn {
        let sock = TcpStream::connect(addr).await.expect("connect to natter");
        sock.set_nodelay(true).ok();
        Conn {
            sock,
            parser: StreamParser::new(common::ROOMY),
            pending: Default::default(),
        }
    }

    async fn send(&mut self, data: &[u8]) {
        self.sock.write_all(data).await.expect("write to natter");
    }

    async fn open(&mut self) {
        self.parser = StreamParser::new(common::ROOMY);
        self.pending.clear();
        let header = format!(
            "<?xml version='1.0'?><stream:stream to='{DOMAIN}' version='1.0' \
             xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>"
        );
        self.send(header.as_bytes()).await;
        assert!(matches!(self.next().await, StreamEvent::Open { .. }));
        let features = self.stanza().await;
        assert_eq!(features.name, "features", "{features}");
    }

    async fn next(&mut self) -> StreamEvent {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return ev;
            }
            let n = self.sock.read(&mut buf).await.expect("read from natter");
            assert!(n > 0, "natter closed the connection during login");
            let evs = self
                .parser
                .feed(&buf[..n])
                .unwrap_or_else(|e| panic!("natter sent malformed XML: {e}"));
            self.pending.extend(evs);
        }
    }

    async fn stanza(&mut self) -> Element {
        match self.next().await {
            StreamEvent::Stanza(el) => el,
            other => panic!("expected a stanza during login, got {other:?}"),
        }
    }

    /// SCRAM-SHA-256; false if the server refused the password.
    async fn login(&mut self, local: &str) -> bool {
        let mut scram = ScramClient::with_nonce(
            Hash::Sha256,
            local,
            PASSWORD,
            None,
            ClientBinding::Unsupported,
            "natter-fuzz-client-nonce",
        );
        let auth = format!(
            "<auth xmlns='{NS_SASL}' mechanism='SCRAM-SHA-256'>{}</auth>",
            B64.encode(scram.client_first())
        );
        self.send(auth.as_bytes()).await;
        let challenge = self.stanza().await;
        if challenge.name != "challenge" {
            return false;
        }
        let server_first = B64
            .decode(challenge.text().trim())
            .expect("challenge base64");
        let fin = scram.client_final(&server_first).expect("server-first");
        let response = format!("<response xmlns='{NS_SASL}'>{}</response>", B64.encode(fin));
        self.send(response.as_bytes()).await;
        let outcome = self.stanza().await;
        if outcome.name != "success" {
            return false;
        }
        let v = B64.decode(outcome.text().trim()).expect("success base64");
        scram.verify_server_final(&v).expect("server signature");
        self.open().await;
        true
    }
}

async fn logged_in(addr: SocketAddr, store: &dyn Store, local: &str) -> Conn {
    for _ in 0..2 {
        let mut c = Conn::connect(addr).await;
        c.open().await;
        if c.login(local).await {
            return c;
        }
        restore_account(store, local).await;
    }
    panic!("natter refuses the fuzz account's password even after resetting it");
}

/// The peer account stays online and reads everything sent to it.
async fn peer_loop(addr: SocketAddr, store: Arc<dyn Store>) {
    loop {
        let mut c = logged_in(addr, store.as_ref(), PEER).await;
        let bind = format!(
            "<iq type='set' id='b'><bind xmlns='{NS_BIND}'><resource>r</resource></bind></iq>\
             <presence/>"
        );
        c.send(bind.as_bytes()).await;
        let mut buf = vec![0u8; 64 * 1024];
        while matches!(c.sock.read(&mut buf).await, Ok(n) if n > 0) {}
    }
}

/// Send the input, close our side, and read what the server writes until it
/// closes the connection. Everything it writes must be well-formed XML.
async fn feed(c: Conn, input: &[u8]) {
    let (mut rd, mut wr) = c.sock.into_split();
    let mut parser = c.parser;
    let writer = async move {
        // The server may close first (stream error): the rest is not read.
        let _ = wr.write_all(input).await;
        let _ = wr.shutdown().await;
        wr
    };
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if let Err(e) = parser.feed(&buf[..n]) {
                        panic!(
                            "natter sent malformed XML: {e}\nin: {:?}",
                            String::from_utf8_lossy(&buf[..n])
                        );
                    }
                }
            }
        }
    };
    let (_wr, ()) = tokio::join!(writer, reader);
}

fuzz_target!(|data: &[u8]| {
    let h = harness();
    h.rt.block_on(async {
        let c = tokio::time::timeout(STEP_TIMEOUT, logged_in(h.addr, h.store.as_ref(), USER))
            .await
            .expect("natter did not complete a login within 20 s");
        tokio::time::timeout(STEP_TIMEOUT, feed(c, data))
            .await
            .expect("natter kept the session open 20 s after the client closed its side");
    });
});
