//! `natter backup` taken from a running server restores into a fresh data
//! directory with accounts (SCRAM keys), rosters, vCards and archives intact
//! (issue 5). The CLI runs as its own process against the live SQLite file.

mod common;

use common::*;
use natter_store::{ArchiveQuery, NewArchiveEntry, RosterItem, Store, Subscription};
use std::path::Path;
use std::process::Command;

fn natter_cli(data_dir: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_natter"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("NATTER_DATA_DIR", data_dir)
        .env("NATTER_DOMAINS", DOMAIN)
        .env("NATTER_LOG_LEVEL", "warn")
        .output()
        .expect("run natter");
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
    let out = natter_cli(server.dir.path(), &["backup", file.to_str().unwrap()]);
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
    let out = natter_cli(fresh.path(), &["restore", file.to_str().unwrap()]);
    assert!(out.contains("3 accounts"), "{out}");
    // Restoring twice is refused: accounts exist now.
    let again = Command::new(env!("CARGO_BIN_EXE_natter"))
        .args(["restore", file.to_str().unwrap()])
        .env("NATTER_DATA_DIR", fresh.path())
        .env("NATTER_DOMAINS", DOMAIN)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    let restored = start_server(|c| c.data_dir = fresh.path().to_path_buf()).await;
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
