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

fn addr_after(log: &str, key: &str) -> Option<SocketAddr> {
    let i = log.find(&format!("{key}: Some("))? + key.len() + 7;
    let end = log[i..].find(')')? + i;
    log[i..end].parse().ok()
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

    let mut child = command(dir.path())
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
        if let (Some(t), Some(h)) = (addr_after(&l, "c2s_tls"), addr_after(&l, "http")) {
            break (t, h);
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no start:\n{l}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

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
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();

    all_logs.push_str(&log.lock().unwrap());
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
