//! `natter backup` taken from a running server restores into a fresh data
//! directory with accounts (SCRAM keys), rosters, vCards and archives intact
//! (issue 5). The CLI runs as its own process against the live store (the
//! SQLite file, or the server's PostgreSQL database with NATTER_TEST_STORE).

mod common;

use common::*;
use natter::config::Config;
use natter_store::{
    ArchiveQuery, ArchivedMessage, NewArchiveEntry, PepNodeConfig, RosterItem, Store, Subscription,
};
use std::process::Command;

/// The CLI on the store of `cfg` (its data directory, or its database).
fn natter_command(cfg: &Config, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_natter"));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("NATTER_DATA_DIR", &cfg.data_dir)
        .envs(store_env(cfg))
        .env("NATTER_DOMAINS", DOMAIN)
        .env("NATTER_LOG_LEVEL", "warn");
    cmd
}

fn natter_cli(cfg: &Config, args: &[&str]) -> String {
    let out = natter_command(cfg, args).output().expect("run natter");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "natter {args:?} failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

async fn everything(store: &dyn Store) -> Vec<String> {
    let mut out = Vec::new();
    for u in store.list_accounts(None).await.unwrap() {
        out.push(format!("account {u}"));
        out.push(format!("creds {:?}", store.credentials(&u).await.unwrap()));
        let (_, roster) = store.roster(&u).await.unwrap();
        out.push(format!("roster {roster:?}"));
        out.push(format!("vcard {:?}", store.vcard(&u).await.unwrap()));
        let q = ArchiveQuery {
            max: 1000,
            ..Default::default()
        };
        let mut page = store.archive_query(&u, &q).await.unwrap();
        // Attribute order is not significant in XML (the parser normalizes it).
        for m in &mut page.items {
            let limits = natter_xml::Limits::default();
            m.stanza = natter_xml::parse_frame(m.stanza.as_bytes(), &limits)
                .unwrap()
                .to_string();
        }
        out.push(format!("archive {:?}", page.items));
        out.push(format!("prefs {:?}", store.mam_prefs(&u).await.unwrap()));
        out.push(format!("blocked {:?}", store.blocklist(&u).await.unwrap()));
        for node in store.pep_nodes(&u).await.unwrap() {
            let cfg = store.pep_node(&u, &node).await.unwrap();
            let items = store.pep_items(&u, &node, None, None).await.unwrap();
            let ids: Vec<_> = items.iter().map(|i| (&i.id, &i.payload)).collect();
            out.push(format!("pep {node} {cfg:?} {ids:?}"));
        }
    }
    out
}

#[tokio::test]
async fn backup_from_a_running_server_restores_into_a_fresh_data_dir() {
    let server = start_server(|_| {}).await;
    let alice = server.add_user("alice", "alice-password").await;
    let bob = server.add_user("bob", "bob-password").await;
    let carol = server.add_user("carol", "carol-password").await;
    let store = server.state().store.clone();

    // Rosters: alice <-> bob mutual, carol waiting for alice's approval.
    let mut ab = RosterItem::new(&bob);
    ab.name = Some("Bob".into());
    ab.subscription = Subscription::Both;
    ab.groups = vec!["Friends".into(), "Work & <stuff>".into()];
    store.put_roster_item(&alice, &ab).await.unwrap();
    let mut ac = RosterItem::new(&carol);
    ac.pending_in = true;
    store.put_roster_item(&alice, &ac).await.unwrap();
    let mut ba = RosterItem::new(&alice);
    ba.subscription = Subscription::Both;
    store.put_roster_item(&bob, &ba).await.unwrap();
    let mut ca = RosterItem::new(&alice);
    ca.ask = true;
    store.put_roster_item(&carol, &ca).await.unwrap();
    store
        .set_vcard(
            &alice,
            "<vCard xmlns='vcard-temp'><FN>Alice Liddell</FN><NICKNAME>al</NICKNAME></vCard>",
        )
        .await
        .unwrap();
    store
        .block(&bob, &["spam@example.net".into()])
        .await
        .unwrap();
    // A PEP node with options off their defaults.
    let cfg = PepNodeConfig {
        access_model: "whitelist".into(),
        max_items: 5,
        persist_items: true,
        send_last_published_item: "never".into(),
        notify_retract: false,
        notify_delete: false,
        ..PepNodeConfig::default()
    };
    store
        .pep_create_or_configure(&alice, "urn:xmpp:bookmarks:1", &cfg)
        .await
        .unwrap();
    store
        .pep_publish(
            &alice,
            "urn:xmpp:bookmarks:1",
            "room@conf.example",
            "<conference xmlns='urn:xmpp:bookmarks:1' name='Room'/>",
        )
        .await
        .unwrap();

    // Live traffic while the backup runs, and archive entries written directly
    // (so the test doesn't depend on which module archives what).
    let (mut ca_, mut cb_) = (
        server.login(&alice, "alice-password", "web").await,
        server.login(&bob, "bob-password", "phone").await,
    );
    for i in 0..3 {
        let body = format!("message {i} from alice");
        let stanza = format!(
            "<message xmlns='jabber:client' from='{alice}/web' to='{bob}' type='chat'><body>{body}</body></message>"
        );
        store
            .archive_append(&[
                NewArchiveEntry {
                    owner: alice.clone(),
                    with: bob.clone(),
                    stanza: stanza.clone(),
                    outgoing: true,
                },
                NewArchiveEntry {
                    owner: bob.clone(),
                    with: alice.clone(),
                    stanza,
                    outgoing: false,
                },
            ])
            .await
            .unwrap();
        ca_.send(&message(cb_.jid(), &body)).await;
        cb_.recv_until(|e| e.name == "message").await;
    }

    let keep = tempfile::tempdir().unwrap();
    let file = keep.path().join("natter-backup.xml");
    let out = natter_cli(&server.state().config, &["backup", file.to_str().unwrap()]);
    assert!(out.contains("3 accounts"), "{out}");
    let before = everything(store.as_ref()).await;
    server.assert_healthy().await; // the server kept serving
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.contains("<server-data xmlns='urn:xmpp:pie:0'>"),
        "{text}"
    );
    assert!(text.contains("urn:xmpp:pie:0#scram"));
    assert!(!text.contains("alice-password"));
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "backup must not be world-readable");
    }
    ca_.close().await;
    cb_.close().await;
    server.stop().await;

    // Restore into a fresh data directory with the CLI, then compare.
    let fresh = tempfile::tempdir().unwrap();
    let mut fresh_cfg = test_config(fresh.path());
    let _fresh_db = fresh_store(&mut fresh_cfg).await;
    let out = natter_cli(&fresh_cfg, &["restore", file.to_str().unwrap()]);
    assert!(out.contains("3 accounts"), "{out}");
    // Restoring twice is refused: accounts exist now.
    let again = natter_command(&fresh_cfg, &["restore", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    let restored = start_server(|c| c.clone_from(&fresh_cfg)).await;
    let after = everything(restored.state().store.as_ref()).await;
    // Identical, archive ids and timestamps included.
    assert_eq!(before.len(), after.len());
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(b, a);
    }
    // SCRAM keys survived: the old passwords log in, on every mechanism.
    let mut c = restored.login(&alice, "alice-password", "again").await;
    c.close().await;
    let mut c = restored.login(&bob, "bob-password", "again").await;
    c.close().await;
    restored.stop().await;
}

/// Runs the natter CLI to completion, sampling its anonymous RSS (its own
/// heap: the SQLite file it maps is page cache and not counted) every 10 ms.
/// Returns stdout and the peak in bytes.
fn natter_cli_peak_heap(cfg: &Config, args: &[&str]) -> (String, u64) {
    use std::io::Read;
    let mut child = natter_command(cfg, args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run natter");
    let status = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0u64;
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        let anon = std::fs::read_to_string(&status).ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("RssAnon:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        });
        peak_kib = peak_kib.max(anon.unwrap_or(0));
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let (mut out, mut err) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(exit.success(), "natter {args:?} failed: {out}\n{err}");
    assert!(peak_kib > 0, "no RssAnon sample of natter {args:?}");
    (out, peak_kib * 1024)
}

/// Issue 9: a 101 MB backup took 776 MB to restore (the file was read into
/// one string, then parsed into one tree). Backup and restore now stream:
/// here a backup several times larger than what either command may hold
/// in its heap, with many accounts and two huge archives, round-trips.
#[tokio::test(flavor = "multi_thread")]
async fn restore_of_a_large_backup_does_not_hold_the_file_in_memory() {
    const SMALL_USERS: usize = 200;
    const BIG_ARCHIVE: usize = 6000;
    let body = "x".repeat(2000);
    let src = tempfile::tempdir().unwrap();
    let mut src_cfg = test_config(src.path());
    let _src_db = fresh_store(&mut src_cfg).await;
    {
        let store = natter::open_store(&src_cfg).await.unwrap();
        let creds = natter::accounts::derive("large-backup-pw", 0).unwrap();
        let users: Vec<String> = (0..SMALL_USERS + 2)
            .map(|i| format!("u{i:03}@{DOMAIN}"))
            .collect();
        for u in &users {
            store.create_account(u, &creds).await.unwrap();
        }
        // The last two own huge archives, the others a few messages each.
        for (i, owner) in users.iter().enumerate() {
            let n = if i >= SMALL_USERS { BIG_ARCHIVE } else { 5 };
            let peer = &users[(i + 1) % users.len()];
            let msgs: Vec<ArchivedMessage> = (0..n)
                .map(|k| ArchivedMessage {
                    id: format!("{i}-{k}"),
                    owner: owner.clone(),
                    with: peer.clone(),
                    ts_micros: 1_700_000_000_000_000 + k as i64,
                    outgoing: k % 2 == 0,
                    stanza: format!(
                        "<message xmlns='jabber:client' from='{owner}/r' to='{peer}' type='chat'><body>{k} {body}</body></message>"
                    ),
                })
                .collect();
            for page in msgs.chunks(500) {
                store.archive_import(page).await.unwrap();
            }
        }
        store.close().await;
    }

    let keep = tempfile::tempdir().unwrap();
    let file = keep.path().join("large.xml");
    let (out, backup_heap) = natter_cli_peak_heap(&src_cfg, &["backup", file.to_str().unwrap()]);
    let total = SMALL_USERS * 5 + 2 * BIG_ARCHIVE;
    assert!(
        out.contains(&format!("{} accounts", SMALL_USERS + 2)),
        "{out}"
    );
    assert!(out.contains(&format!("{total} archived messages")), "{out}");
    let size = std::fs::metadata(&file).unwrap().len();
    assert!(size > 25 << 20, "backup is only {size} bytes");

    let fresh = tempfile::tempdir().unwrap();
    let mut fresh_cfg = test_config(fresh.path());
    let _fresh_db = fresh_store(&mut fresh_cfg).await;
    let (out, restore_heap) =
        natter_cli_peak_heap(&fresh_cfg, &["restore", file.to_str().unwrap()]);
    assert!(out.contains(&format!("{total} archived messages")), "{out}");
    eprintln!(
        "backup of {} MB: peak heap {} MB (backup), {} MB (restore)",
        size >> 20,
        backup_heap >> 20,
        restore_heap >> 20
    );
    // The old restore held the file and its tree (129 MB of heap for this
    // 29 MB file), the old backup one account's whole archive as a tree and
    // a string (49 MB); streaming, they took 12 MB and 5 MB.
    assert!(
        restore_heap < size * 3 / 4,
        "restore of a {size}-byte backup peaked at {restore_heap} bytes of heap"
    );
    assert!(
        backup_heap < size * 3 / 4,
        "backup to a {size}-byte file peaked at {backup_heap} bytes of heap"
    );

    // Everything arrived: accounts, and the huge archives complete and in order.
    let store = natter::open_store(&fresh_cfg).await.unwrap();
    assert_eq!(
        store.list_accounts(None).await.unwrap().len(),
        SMALL_USERS + 2
    );
    let big = format!("u{SMALL_USERS:03}@{DOMAIN}");
    let mut after = None;
    let mut seen = 0;
    loop {
        let q = ArchiveQuery {
            after_id: after.clone(),
            max: 1000,
            ..Default::default()
        };
        let page = store.archive_query(&big, &q).await.unwrap();
        for m in &page.items {
            assert_eq!(m.id, format!("{SMALL_USERS}-{seen}"));
            assert!(
                m.stanza.contains(&format!("<body>{seen} x")),
                "{}",
                m.stanza
            );
            seen += 1;
        }
        match page.items.last() {
            Some(l) if !page.complete => after = Some(l.id.clone()),
            _ => break,
        }
    }
    assert_eq!(seen, BIG_ARCHIVE);
    store.close().await;
}

/// A XEP-0227 file as another exporter may write it: the older draft
/// namespace, and the credentials after the messages. Restore streams it
/// all the same (the messages wait for the account to exist).
#[tokio::test]
async fn restore_streams_files_with_messages_before_credentials_and_the_old_namespace() {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("other-server.xml");
    let old_ns = "http://www.xmpp.org/extensions/xep-0227.html#ns";
    let mut doc =
        format!("<?xml version='1.0'?><server-data xmlns='{old_ns}'><host jid='{DOMAIN}'>");
    doc += "<user name='zoe'>\
        <offline-messages><message xmlns='jabber:client' from='amy@localhost/x' to='zoe@localhost' type='chat'><body>queued</body></message></offline-messages>\
        <archive xmlns='urn:xmpp:pie:0#mam'>";
    for k in 0..1200 {
        doc += &format!(
            "<result xmlns='urn:xmpp:mam:2' id='z{k:04}'><forwarded xmlns='urn:xmpp:forward:0'>\
             <delay xmlns='urn:xmpp:delay' stamp='2024-01-02T03:04:05Z'/>\
             <message xmlns='jabber:client' from='zoe@localhost/x' to='amy@localhost' type='chat'><body>{k}</body></message>\
             </forwarded></result>"
        );
    }
    doc += "</archive><query xmlns='jabber:iq:roster'><item jid='amy@localhost' subscription='both'/></query>";
    let creds = natter::accounts::derive("zoe-password", 0).unwrap();
    for (mech, c) in [
        ("SCRAM-SHA-1", &creds.sha1),
        ("SCRAM-SHA-256", &creds.sha256),
    ] {
        doc += &format!(
            "<scram-credentials xmlns='urn:xmpp:pie:0#scram' mechanism='{mech}'>\
             <iter-count>{}</iter-count><salt>{}</salt><server-key>{}</server-key><stored-key>{}</stored-key>\
             </scram-credentials>",
            c.iterations,
            b64(&c.salt),
            b64(&c.server_key),
            b64(&c.stored_key)
        );
    }
    doc += "</user></host></server-data>";
    std::fs::write(&file, doc).unwrap();

    let fresh = tempfile::tempdir().unwrap();
    let mut fresh_cfg = test_config(fresh.path());
    let _fresh_db = fresh_store(&mut fresh_cfg).await;
    let out = natter_cli(&fresh_cfg, &["restore", file.to_str().unwrap()]);
    assert!(out.contains("1 accounts"), "{out}");
    assert!(out.contains("1200 archived messages"), "{out}");
    assert!(out.contains("1 offline messages"), "{out}");

    let server = start_server(|c| c.clone_from(&fresh_cfg)).await;
    let store = server.state().store.clone();
    let zoe = format!("zoe@{DOMAIN}");
    let q = ArchiveQuery {
        max: 2000,
        ..Default::default()
    };
    let page = store.archive_query(&zoe, &q).await.unwrap();
    assert_eq!(page.items.len(), 1200);
    assert!(page
        .items
        .iter()
        .all(|m| m.outgoing && m.with == "amy@localhost"));
    assert_eq!(page.items[1199].id, "z1199");
    let (_, roster) = store.roster(&zoe).await.unwrap();
    assert_eq!(roster.len(), 1);
    let mut c = server.login(&zoe, "zoe-password", "r").await;
    c.close().await;
    server.stop().await;
}

/// Restore checks the whole file before writing: a backup cut short (a
/// disk that filled while it was copied) leaves the store untouched.
#[tokio::test]
async fn a_truncated_backup_restores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cut.xml");
    let mut doc =
        format!("<?xml version='1.0'?><server-data xmlns='urn:xmpp:pie:0'><host jid='{DOMAIN}'>");
    for i in 0..3 {
        doc += &format!("<user name='u{i}' password='pw-{i}-long-enough'><query xmlns='jabber:iq:roster'/></user>");
    }
    doc += "</host></server-data>";
    std::fs::write(&file, &doc[..doc.len() - 20]).unwrap();
    let fresh = tempfile::tempdir().unwrap();
    let mut fresh_cfg = test_config(fresh.path());
    let _fresh_db = fresh_store(&mut fresh_cfg).await;
    let out = natter_command(&fresh_cfg, &["restore", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a well-formed XML document"), "{err}");
    let listed = natter_cli(&fresh_cfg, &["user", "list"]);
    assert_eq!(
        listed.trim(),
        "",
        "accounts were written from a truncated backup"
    );
}

/// Uploads are backed up by slot and hash; `--blobs DIR` copies their bytes
/// (each blob once), and `restore --blobs DIR` puts them back: the same
/// URLs serve the same bytes on the restored server.
#[tokio::test]
async fn uploads_and_their_bytes_survive_backup_and_restore() {
    let server = start_server(sqlite_only).await;
    let (mut a, mut b) = server.logged_in_pair().await;
    let mut paths = Vec::new();
    for (who, body) in [(0, b"photo".as_slice()), (1, b"photo"), (0, b"voice note")] {
        let c = if who == 0 { &mut a } else { &mut b };
        let res = c
            .iq(xml(&format!(
                "<iq type='get' to='upload.localhost'><request xmlns='urn:xmpp:http:upload:0' \
                 filename='f.bin' size='{}' content-type='application/octet-stream'/></iq>",
                body.len()
            )))
            .await;
        let slot = res.get_child("slot", "urn:xmpp:http:upload:0").unwrap();
        let put = slot.get_child("put", "urn:xmpp:http:upload:0").unwrap();
        let url = put.attr("url").unwrap();
        let path = format!("/{}", url.splitn(4, '/').nth(3).unwrap());
        let auth = put.children().next().unwrap().text();
        let headers =
            format!("Authorization: {auth}\r\nContent-Type: application/octet-stream\r\n");
        let (status, _, _) = http_bytes(server.http, "PUT", &path, &headers, body).await;
        assert_eq!(status, 201);
        paths.push((path, body.to_vec()));
    }
    let keep = tempfile::tempdir().unwrap();
    let file = keep.path().join("backup.xml");
    let blobs = keep.path().join("blobs");
    let cfg = server.state().config.clone();
    let args = [
        "backup",
        file.to_str().unwrap(),
        "--blobs",
        blobs.to_str().unwrap(),
    ];
    let out = natter_cli(&cfg, &args);
    assert!(out.contains("3 uploads"), "{out}");
    assert!(out.contains("copied 2 new blobs"), "stored once: {out}");
    // A second backup into the same DIR adds nothing.
    let out = natter_cli(&cfg, &args);
    assert!(out.contains("copied 0 new blobs"), "{out}");
    a.close().await;
    b.close().await;
    server.stop().await;

    let fresh = tempfile::tempdir().unwrap();
    let mut fresh_cfg = test_config(fresh.path());
    sqlite_only(&mut fresh_cfg);
    let out = natter_cli(
        &fresh_cfg,
        &[
            "restore",
            file.to_str().unwrap(),
            "--blobs",
            blobs.to_str().unwrap(),
        ],
    );
    assert!(
        out.contains("3 uploads") && out.contains("restored 2 blobs"),
        "{out}"
    );
    let restored = start_server(|c| c.clone_from(&fresh_cfg)).await;
    for (path, body) in &paths {
        let (status, _, got) = http_bytes(restored.http, "GET", path, "", b"").await;
        assert_eq!((status, &got), (200, body));
    }
    restored.stop().await;
}
