//! The data directory (issue 9, items 4 and 9): a store that heals by itself after the
//! disk fills, `/ready` telling a load balancer while it can't write, a free-space
//! gauge; and the directory and everything natter keeps in it private (0700 / 0600)
//! whatever the umask.

mod common;

use common::*;
use natter_store::ArchiveQuery;
use natter_xml::NS_CLIENT;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// (status, body) of one HTTP/1.1 GET.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (
        head.split(' ').nth(1).unwrap().parse().unwrap(),
        body.to_string(),
    )
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// A small tmpfs mounted for the test; unmounted on drop (lazily if files are still
/// open, e.g. after a failed assertion).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "natter-test"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let p = self.dir.path();
        let ok = Command::new("umount")
            .arg(p)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(p).status();
        }
    }
}

/// Fills the filesystem of `dir` with one file, until the write fails for lack of space.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 16 * 1024];
    loop {
        if let Err(e) = f.write_all(&chunk).and_then(|()| f.flush()) {
            assert_eq!(e.raw_os_error(), Some(28), "expected ENOSPC, got {e}");
            break;
        }
    }
    // Byte by byte for the last partial chunk.
    while f.write_all(&[0]).is_ok() {}
    path
}

/// Sends one message and reports whether it was accepted (the recipient got it) or
/// refused: then it must be a `wait` internal-server-error.
async fn try_send(a: &mut Client, b: &mut Client, body: &str) -> bool {
    // The full JID: a session without initial presence gets no bare-JID messages.
    let to = b.jid().to_string();
    let msg = message(&to, body);
    let id = msg.attr("id").unwrap().to_string();
    a.send(&msg).await;
    // The session handles stanzas in order: a refusal has arrived before the pong.
    let before = a.sync().await;
    if let Some(err) = before
        .iter()
        .find(|e| e.name == "message" && e.attr("id") == Some(id.as_str()))
    {
        assert_eq!(err.attr("type"), Some("error"), "{err}");
        assert_eq!(stanza_error(err).as_deref(), Some("internal-server-error"));
        let kind = err
            .get_child("error", NS_CLIENT)
            .and_then(|e| e.attr("type"));
        assert_eq!(kind, Some("wait"), "{err}");
        return false;
    }
    let got = b.recv_until(|e| e.name == "message").await;
    assert_eq!(got.child_text("body", NS_CLIENT).as_deref(), Some(body));
    true
}

#[tokio::test]
async fn store_heals_after_disk_full() {
    let tmpfs = match Tmpfs::mount("4m") {
        Ok(t) => t,
        // CI runs as root and must run this for real.
        Err(e) if std::env::var_os("CI").is_some() => panic!("cannot mount a tmpfs in CI: {e}"),
        Err(e) => {
            eprintln!("SKIPPED store_heals_after_disk_full: cannot mount a tmpfs here ({e})");
            return;
        }
    };
    let data = tmpfs.path().join("data");
    // The embedded store's disk filling up: SQLite whatever NATTER_TEST_STORE says.
    let srv = start_server(|c| {
        sqlite_only(c);
        c.data_dir = data.clone();
    })
    .await;
    let alice = srv.add_user("alice", "password").await;
    let bob = srv.add_user("bob", "password").await;
    let mut a = srv.login(&alice, "password", "phone").await;
    let mut b = srv.login(&bob, "password", "phone").await;

    let mut accepted = Vec::new();
    for n in 0..3 {
        let body = format!("before {n}");
        assert!(try_send(&mut a, &mut b, &body).await, "{body} refused");
        accepted.push(body);
    }
    assert_eq!(get(srv.http, "/ready").await, (200, "ready\n".into()));
    let free = |m: &str| metric(m, "natter_disk_free_bytes");
    let room = free(&get(srv.http, "/metrics").await.1);
    assert!(room > 1e6, "free space gauge before filling: {room}");

    // The disk fills: messages get a wait error once the WAL can't grow.
    let filler = fill(tmpfs.path());
    let padding = "x".repeat(8 * 1024);
    let mut refused = 0;
    for n in 0..200 {
        let body = format!("full {n} {padding}");
        if try_send(&mut a, &mut b, &body).await {
            accepted.push(body);
        } else {
            refused += 1;
            if refused == 3 {
                break;
            }
        }
    }
    assert_eq!(refused, 3, "the full disk never refused a message");
    let (status, reason) = get(srv.http, "/ready").await;
    assert_eq!(status, 503, "{reason}");
    assert!(reason.contains("disk is full"), "{reason}");
    assert!(free(&get(srv.http, "/metrics").await.1) < 64e3);
    // Without traffic /ready probes by itself, and the disk is still full.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, reason) = get(srv.http, "/ready").await;
    assert_eq!(status, 503, "probe while full: {reason}");

    // Space comes back: ready again without a message or a restart, then messages pass.
    std::fs::remove_file(&filler).unwrap();
    let mut ready = get(srv.http, "/ready").await;
    for _ in 0..50 {
        if ready.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        ready = get(srv.http, "/ready").await;
    }
    assert_eq!(
        ready,
        (200, "ready\n".into()),
        "not ready after space was freed"
    );
    for n in 0..3 {
        let body = format!("after {n}");
        assert!(
            try_send(&mut a, &mut b, &body).await,
            "{body} refused after healing"
        );
        accepted.push(body);
    }
    assert!(free(&get(srv.http, "/metrics").await.1) > 1e6);

    // Every accepted message is in the archive, in order; no refused one is.
    let archived: Vec<String> = srv
        .state()
        .store
        .archive_query(
            &alice,
            &ArchiveQuery {
                max: 1000,
                ..ArchiveQuery::default()
            },
        )
        .await
        .unwrap()
        .items
        .iter()
        .map(|m| {
            let el = xml(&m.stanza);
            el.child_text("body", NS_CLIENT).unwrap_or_default()
        })
        .collect();
    assert_eq!(archived, accepted);

    a.close().await;
    b.close().await;
    srv.stop().await;
    drop(tmpfs);
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

/// What natter keeps in its data directory, with the mode each must have.
fn private_paths(data: &Path) -> Vec<(PathBuf, u32)> {
    vec![
        (data.to_path_buf(), 0o700),
        (data.join("natter.db"), 0o600),
        (data.join("natter.db-wal"), 0o600),
        (data.join("natter.db-shm"), 0o600),
        (data.join("tls"), 0o700),
        (data.join("tls/cert.pem"), 0o600),
        (data.join("tls/key.pem"), 0o600),
        (data.join("admin.token"), 0o600),
    ]
}

#[tokio::test]
async fn data_files_are_private() {
    // The most permissive umask: the modes must come from natter, not from it. (Only
    // loosens what other tests in this binary create.)
    rustix::process::umask(rustix::fs::Mode::empty());
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    // The SQLite files are among them: SQLite whatever NATTER_TEST_STORE says.
    let srv = start_server(|c| {
        sqlite_only(c);
        c.data_dir = data.clone();
    })
    .await;
    srv.assert_healthy().await;
    for (p, want) in private_paths(&data) {
        assert_eq!(mode(&p), want, "{} is {:o}", p.display(), mode(&p));
    }
    let config = srv.state().config.as_ref().clone();
    srv.stop().await;

    // Files left readable by an older version (or a careless copy) are tightened.
    // (A clean stop removes the WAL and SHM; leftovers of a crash are empty ones here.)
    for (p, want) in private_paths(&data) {
        let loose = if want == 0o700 { 0o755 } else { 0o644 };
        if !p.exists() {
            std::fs::write(&p, b"").unwrap();
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(loose)).unwrap();
    }
    let running = natter::start(config).await.expect("restart");
    for (p, want) in private_paths(&data) {
        assert_eq!(mode(&p), want, "{} not tightened", p.display());
    }
    running.shutdown().await;
}
