//! Logs never contain message bodies or passwords, even at `trace` (issue 5):
//! the real binary runs with NATTER_LOG_LEVEL=trace while accounts are
//! created on the command line, users log in (PLAIN and SCRAM, over TLS and
//! WebSocket) and exchange a message; its whole stderr is then searched.

mod common;

use common::*;
use natter_sasl::Mechanism;
use std::io::Read;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PASSWORD_A: &str = "Pa55-alice-Zq81xT";
const PASSWORD_B: &str = "Pa55-bob-Kv93wR";
const BODY: &str = "secret-body-7f3a9c1e the plans are in the blue folder";
const BODY_WORD: &str = "7f3a9c1e";

fn command(dir: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_natter"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("NATTER_DATA_DIR", dir)
        .env("NATTER_DOMAINS", DOMAIN)
        .env("NATTER_LISTEN_C2S", "127.0.0.1:0")
        .env("NATTER_LISTEN_C2S_TLS", "127.0.0.1:0")
        .env("NATTER_LISTEN_HTTP", "127.0.0.1:0")
        .env("NATTER_LOG_LEVEL", "trace")
        .env("NATTER_LOG_FORMAT", "json");
    c
}

/// The address the start-up line gives for listener `name` ("… on ADDR").
fn addr_after(log: &str, name: &str) -> Option<SocketAddr> {
    let i = log.find(&format!("{name} on "))? + name.len() + 4;
    let end = log[i..]
        .find(|c: char| !(c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']')))
        .map_or(log.len(), |e| e + i);
    log[i..end].parse().ok()
}

/// `natter serve` run by `cmd`, its stderr collected.
struct Serve {
    child: std::process::Child,
    log: Arc<Mutex<String>>,
    reader: std::thread::JoinHandle<()>,
    tls: SocketAddr,
    http: SocketAddr,
}

impl Serve {
    /// Start and wait for the start-up line.
    fn start(mut cmd: Command) -> Serve {
        let mut child = cmd
            .arg("serve")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let started = Instant::now();
        let (tls, http) = loop {
            let l = log.lock().unwrap().clone();
            if let (Some(t), Some(h)) = (
                addr_after(&l, "c2s direct TLS"),
                addr_after(&l, "HTTP/WebSocket"),
            ) {
                break (t, h);
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "no start:\n{l}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        Serve {
            child,
            log,
            reader,
            tls,
            http,
        }
    }

    /// Stop the server; everything it logged.
    fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = self.reader.join();
        let log = self.log.lock().unwrap().clone();
        log
    }
}

#[tokio::test]
async fn trace_logs_hold_no_bodies_or_passwords() {
    let dir = tempfile::tempdir().unwrap();
    let mut all_logs = String::new();
    for (user, pw) in [("alice", PASSWORD_A), ("bob", PASSWORD_B)] {
        let out = command(dir.path())
            .args(["user", "add", &format!("{user}@{DOMAIN}"), pw])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        all_logs.push_str(&String::from_utf8_lossy(&out.stderr));
    }

    let srv = Serve::start(command(dir.path()));
    let (tls, http) = (srv.tls, srv.http);

    let alice = format!("alice@{DOMAIN}");
    let bob = format!("bob@{DOMAIN}");
    let mut a = Client::connect_tls(tls).await;
    a.login_with(Mechanism::Plain, &alice, PASSWORD_A, "desk")
        .await;
    let mut b = Client::connect_ws(http).await;
    b.login_with(Mechanism::ScramSha256, &bob, PASSWORD_B, "web")
        .await;
    // A failed login with a wrong password is logged too, without it.
    let mut c = Client::connect_tls(tls).await;
    assert!(c
        .authenticate(Mechanism::Plain, &alice, "wrong-Pa55-9x8y7z", None)
        .await
        .is_err());
    a.send(&xml("<presence/>")).await;
    b.send(&xml("<presence/>")).await;
    a.send(&message(b.jid(), BODY)).await;
    let m = b.recv_until(|e| e.name == "message").await;
    assert_eq!(
        m.child_text("body", natter_xml::NS_CLIENT).as_deref(),
        Some(BODY)
    );
    a.close().await;
    b.close().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    all_logs.push_str(&srv.stop());
    assert!(
        all_logs.contains("authenticated") && all_logs.contains("TRACE"),
        "trace logging did not happen:\n{all_logs}"
    );
    use base64::Engine;
    let plain_b64 =
        base64::engine::general_purpose::STANDARD.encode(format!("\0alice\0{PASSWORD_A}"));
    for secret in [
        PASSWORD_A,
        PASSWORD_B,
        "wrong-Pa55-9x8y7z",
        BODY_WORD,
        &plain_b64,
    ] {
        let hit = all_logs.lines().find(|l| l.contains(secret));
        assert!(hit.is_none(), "{secret:?} appears in the logs: {hit:?}");
    }
}

/// `natter serve` logging as a new user would run it: text at `info`.
fn info_command(dir: &std::path::Path) -> Command {
    let mut c = command(dir);
    c.env("NATTER_LOG_LEVEL", "info")
        .env("NATTER_LOG_FORMAT", "text")
        .env("NATTER_HTTP_WEB_ROOT", dir.join("web"));
    c
}

/// A TLS login and a WebSocket stream that is closed: what made rustls
/// and tungstenite log at debug while the filter said `info`.
async fn connect_and_close(srv: &Serve, dir: &std::path::Path) {
    let out = command(dir)
        .args(["user", "add", &format!("carol@{DOMAIN}"), PASSWORD_A])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut a = Client::connect_tls(srv.tls).await;
    a.login_with(
        Mechanism::ScramSha256,
        &format!("carol@{DOMAIN}"),
        PASSWORD_A,
        "x",
    )
    .await;
    let mut w = Client::connect_ws(srv.http).await;
    w.close().await;
    a.close().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn info_level_does_not_raise_tls_and_websocket_crates_to_debug() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Serve::start(info_command(dir.path()));
    connect_and_close(&srv, dir.path()).await;
    let log = srv.stop();
    let verbose: Vec<_> = log
        .lines()
        .filter(|l| l.contains("DEBUG") || l.contains("TRACE"))
        .collect();
    assert!(verbose.is_empty(), "below info at level info: {verbose:#?}");
    assert!(log.contains("INFO"), "{log}");
}

#[tokio::test]
async fn logs_written_to_a_file_have_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    // stderr is a pipe here, as it is for a file or the journal.
    let srv = Serve::start(info_command(dir.path()));
    connect_and_close(&srv, dir.path()).await;
    let log = srv.stop();
    assert!(log.contains("INFO"), "{log}");
    assert!(!log.contains('\x1b'), "ANSI escape codes in: {log:?}");
}

#[tokio::test]
async fn start_up_line_lists_the_listeners_not_a_debug_dump() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Serve::start(info_command(dir.path()));
    let (tls, http) = (srv.tls, srv.http);
    let log = srv.stop();
    let line = log
        .lines()
        .find(|l| l.contains("natter started"))
        .expect("a start-up line");
    assert!(
        line.ends_with(&format!(
            "natter started for {DOMAIN}: c2s (STARTTLS) on 127.0.0.1:{}, \
             c2s direct TLS on {tls}, HTTP/WebSocket on {http}",
            addr_after(line, "c2s (STARTTLS)").unwrap().port()
        )),
        "{line}"
    );
    assert!(!line.contains("Some(") && !line.contains("Bound"), "{line}");
}

#[tokio::test]
async fn missing_web_assets_are_warned_about_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Serve::start(info_command(dir.path()));
    let log = srv.stop();
    let warning = log
        .lines()
        .find(|l| l.contains("WARN") && l.contains("web chat page assets missing"));
    let warning = warning.unwrap_or_else(|| panic!("no warning in:\n{log}"));
    assert!(warning.contains("npm ci"), "{warning}");
    assert!(
        warning.contains(&dir.path().join("web").display().to_string()),
        "names the directory: {warning}"
    );

    // Installed assets: no warning.
    let dist = dir.path().join("web/node_modules/converse.js/dist");
    std::fs::create_dir_all(&dist).unwrap();
    std::fs::write(dist.join("converse.min.js"), "").unwrap();
    let log = Serve::start(info_command(dir.path())).stop();
    assert!(log.contains("natter started"), "{log}");
    assert!(!log.contains("assets missing"), "{log}");
}
