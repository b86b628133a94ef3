//! Cluster membership (issue 14, first step) on a real NATS server with
//! JetStream (NATTER_TEST_NATS_URL, default nats://127.0.0.1:4222) and
//! PostgreSQL: nodes join and list each other with their session counts,
//! a clean stop removes a node at once, `kill -9` removes it when its lease
//! runs out, a live node's name is refused, an unreachable NATS fails the
//! start naming it, and `/ready` reports NATS.

mod common;

use common::*;
use natter::config::Config;
use std::time::Duration;

fn nats_url() -> String {
    std::env::var("NATTER_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A cluster of its own per test (they share the NATS server).
fn cluster_name() -> String {
    format!("t{:012x}", rand::random::<u64>() >> 16)
}

/// Cluster settings for node `node` of cluster `name` on the database at
/// `db_url`.
fn clustered(c: &mut Config, name: &str, node: &str, db_url: &str) {
    c.store.backend = "postgres".into();
    c.store.url = db_url.into();
    c.cluster.enabled = true;
    c.cluster.nats_url = nats_url();
    c.cluster.name = name.into();
    c.cluster.node_name = node.into();
    c.cluster.lease_secs = 3;
}

async fn node(name: &str, node: &str, db: &TestDb) -> TestServer {
    let (name, node, url) = (name.to_string(), node.to_string(), db.url.clone());
    start_server(move |c| clustered(c, &name, &node, &url)).await
}

/// The live nodes of cluster `name`, as `natter admin cluster` reads them.
async fn live(name: &str, db: &TestDb) -> Vec<natter::cluster::NodeInfo> {
    let mut c = Config::default();
    clustered(&mut c, name, "reader", &db.url);
    natter::cluster::live_nodes(&c).await.unwrap_or_else(|e| {
        panic!(
            "the cluster tests need NATS with JetStream at {}: {e:#}",
            nats_url()
        )
    })
}

async fn names(name: &str, db: &TestDb) -> Vec<String> {
    live(name, db).await.into_iter().map(|n| n.name).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_list_each_other_and_leave_at_once() {
    let db = TestDb::create().await;
    let name = cluster_name();
    let n1 = node(&name, "n1", &db).await;
    let n2 = node(&name, "n2", &db).await;
    assert_eq!(names(&name, &db).await, ["n1", "n2"]);

    // Both nodes share the store: an account made through one logs in on
    // the other, and n2's heartbeat reports the session.
    let alice = n1.add_user("alice", "password").await;
    let _c = n2.login(&alice, "password", "phone").await;
    let mut sessions = 0;
    for _ in 0..40 {
        sessions = live(&name, &db)
            .await
            .into_iter()
            .find(|n| n.name == "n2")
            .map_or(0, |n| n.sessions);
        if sessions == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(sessions, 1, "n2's heartbeat should report its session");
    let n2_info = live(&name, &db).await.remove(1);
    assert!(n2_info.listeners.contains("c2s"), "{n2_info:?}");

    // What `natter admin cluster` prints.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_natter"))
        .args(["admin", "cluster"])
        .env_remove("NATTER_CONFIG")
        .env("NATTER_STORE_BACKEND", "postgres")
        .env("NATTER_STORE_URL", &db.url)
        .env("NATTER_CLUSTER_ENABLED", "true")
        .env("NATTER_CLUSTER_NATS_URL", nats_url())
        .env("NATTER_CLUSTER_NAME", &name)
        .output()
        .expect("natter admin cluster");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("n1") && text.contains("n2"), "{text}");
    assert!(text.contains("2 live node(s)"), "{text}");

    // /ready includes NATS.
    let (status, _, body) = http_request(n1.http, "GET", "/ready", "").await;
    assert_eq!(status, 200, "{body}");

    // A clean stop leaves at once, not a lease later.
    n2.stop().await;
    assert_eq!(names(&name, &db).await, ["n1"]);
    n1.stop().await;
    assert!(names(&name, &db).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_node_name_is_refused() {
    let db = TestDb::create().await;
    let name = cluster_name();
    let n1 = node(&name, "same", &db).await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = test_config(dir.path());
    clustered(&mut c, &name, "same", &db.url);
    let err = match natter::start(c).await {
        Ok(_) => panic!("a second node named \"same\" started"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("\"same\" is already live"), "{err}");
    n1.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_nats_fails_the_start_naming_it() {
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = test_config(dir.path());
    clustered(&mut c, &cluster_name(), "n1", &db.url);
    c.cluster.nats_url = format!("nats://127.0.0.1:{}", free_port());
    let err = match natter::start(c).await {
        Ok(_) => panic!("started without NATS"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("cannot reach NATS at cluster.nats_url"),
        "{err}"
    );
}

/// A child process that a failing test does not leave running (it would
/// hold the test's output pipe open).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_disappears_when_its_lease_ends() {
    let db = TestDb::create().await;
    let name = cluster_name();
    let dir = tempfile::tempdir().unwrap();
    let mut child = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_natter"))
            .arg("serve")
            .env_remove("NATTER_CONFIG")
            .env("NATTER_DATA_DIR", dir.path())
            .env("NATTER_LISTEN_C2S", "127.0.0.1:0")
            .env("NATTER_LISTEN_C2S_TLS", "")
            .env("NATTER_LISTEN_HTTP", "")
            .env("NATTER_LOG_LEVEL", "warn")
            .env("NATTER_STORE_BACKEND", "postgres")
            .env("NATTER_STORE_URL", &db.url)
            .env("NATTER_CLUSTER_ENABLED", "true")
            .env("NATTER_CLUSTER_NATS_URL", nats_url())
            .env("NATTER_CLUSTER_NAME", &name)
            .env("NATTER_CLUSTER_NODE_NAME", "doomed")
            .env("NATTER_CLUSTER_LEASE_SECS", "3")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start natter"),
    );
    // Up once it has joined (its listeners are bound just before).
    let mut joined = false;
    for _ in 0..300 {
        if names(&name, &db).await == ["doomed"] {
            joined = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(joined, "the node did not join");
    // SIGKILL: no leaving. The entry stays until the lease (3 s) ends.
    child.0.kill().unwrap();
    let _ = child.0.wait();
    let killed = std::time::Instant::now();
    assert_eq!(names(&name, &db).await, ["doomed"]);
    while !names(&name, &db).await.is_empty() {
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "a dead node's entry outlived its lease"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Its name is free again.
    let n = node(&name, "doomed", &db).await;
    assert_eq!(names(&name, &db).await, ["doomed"]);
    n.stop().await;
}

/// Mutual presence subscription, straight in the shared store.
async fn friends(srv: &TestServer, a: &str, b: &str) {
    use natter_store::{RosterItem, Subscription};
    for (owner, contact) in [(a, b), (b, a)] {
        let mut it = RosterItem::new(contact);
        it.subscription = Subscription::Both;
        srv.state().store.put_roster_item(owner, &it).await.unwrap();
    }
}

/// Wait until `srv` sees `full` bound somewhere in the cluster (the
/// registry reached its mirror), available or not as asked.
async fn routable(srv: &TestServer, full: &str, available: bool) {
    let jid = jid::FullJid::new(full).unwrap();
    for _ in 0..200 {
        if srv
            .state()
            .routing
            .session(&jid)
            .is_some_and(|h| h.is_available() == available)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{full} never became routable (available: {available})");
}

/// Wait until `srv` no longer routes to `full`.
async fn unroutable(srv: &TestServer, full: &str) {
    let jid = jid::FullJid::new(full).unwrap();
    for _ in 0..200 {
        if srv.state().routing.session(&jid).is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{full} is still routable");
}

fn body_of(el: &natter_xml::Element) -> Option<String> {
    el.get_child("body", "jabber:client").map(|b| b.text())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_on_different_nodes_chat_with_presence_carbons_and_iqs() {
    let db = TestDb::create().await;
    let name = cluster_name();
    let n1 = node(&name, "n1", &db).await;
    let n2 = node(&name, "n2", &db).await;
    let alice = n1.add_user("alice", "password").await;
    let bob = n1.add_user("bob", "password").await;
    friends(&n1, &alice, &bob).await;

    let mut a1 = n1.login(&alice, "password", "phone").await;
    let mut a2 = n2.login(&alice, "password", "laptop").await;
    let mut b = n2.login(&bob, "password", "phone").await;
    for c in [&mut a1, &mut a2] {
        let r = c
            .iq(xml(
                "<iq type='set'><enable xmlns='urn:xmpp:carbons:2'/></iq>",
            ))
            .await;
        assert_eq!(r.attr("type"), Some("result"), "{r}");
    }
    a1.send(&xml("<presence/>")).await;
    routable(&n2, &format!("{alice}/phone"), true).await;
    a2.send(&xml("<presence/>")).await;
    routable(&n1, &format!("{alice}/laptop"), true).await;

    // Bob comes online on n2: alice's phone on n1 gets his presence, and
    // bob gets both of alice's (the phone's through the registry's copy).
    b.send(&xml("<presence><status>here</status></presence>"))
        .await;
    let p = a1
        .recv_until(|e| e.name == "presence" && e.attr("from") == Some(&format!("{bob}/phone")))
        .await;
    assert_eq!(p.attr("type"), None, "{p}");
    let mut seen = std::collections::HashSet::new();
    while seen.len() < 2 {
        let p = b.recv_until(|e| e.name == "presence").await;
        let from = p.attr("from").unwrap_or_default();
        if from.starts_with(&format!("{alice}/")) {
            seen.insert(from.to_string());
        }
    }
    routable(&n1, &format!("{bob}/phone"), true).await;

    // Alice's phone (n1) to bob (n2); her laptop (n2) gets the sent carbon.
    a1.send(&message(&bob, "hello from n1")).await;
    let m = b.recv_until(|e| e.name == "message").await;
    assert_eq!(body_of(&m).as_deref(), Some("hello from n1"), "{m}");
    assert_eq!(m.attr("from"), Some(format!("{alice}/phone").as_str()));
    let carbon = a2
        .recv_until(|e| e.name == "message" && e.get_child("sent", "urn:xmpp:carbons:2").is_some())
        .await;
    assert!(carbon.to_string().contains("hello from n1"), "{carbon}");

    // Bob's reply to alice's bare JID reaches both of her devices.
    b.send(&message(&alice, "hi both")).await;
    for c in [&mut a1, &mut a2] {
        let m = c
            .recv_until(|e| e.name == "message" && body_of(e).is_some())
            .await;
        assert_eq!(body_of(&m).as_deref(), Some("hi both"), "{m}");
    }

    // An IQ to a full JID on the other node, and its answer back.
    let id = next_id();
    a1.send(&xml(&format!(
        "<iq type='get' id='{id}' to='{bob}/phone'><query xmlns='jabber:iq:version'/></iq>"
    )))
    .await;
    let q = b.recv_until(|e| e.name == "iq").await;
    assert_eq!(q.attr("from"), Some(format!("{alice}/phone").as_str()));
    b.send(&xml(&format!(
        "<iq type='result' id='{id}' to='{alice}/phone'><query xmlns='jabber:iq:version'><name>t</name></query></iq>"
    )))
    .await;
    let r = a1.recv_until(|e| e.name == "iq").await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    assert_eq!(r.attr("from"), Some(format!("{bob}/phone").as_str()));

    // Bob goes offline: n1 sees him leave, and what alice sends him from
    // n1 waits in the shared offline queue until he is back (on n1).
    b.close().await;
    drop(b);
    unroutable(&n1, &format!("{bob}/phone")).await;
    a1.send(&message(&bob, "while you were away")).await;
    a1.sync().await;
    let mut b = n1.login(&bob, "password", "tablet").await;
    b.send(&xml("<presence/>")).await;
    let m = b
        .recv_until(|e| e.name == "message" && body_of(e).is_some())
        .await;
    assert_eq!(body_of(&m).as_deref(), Some("while you were away"), "{m}");

    // A node that stops takes its sessions out of the others' routing.
    drop((a2, b));
    n2.stop().await;
    unroutable(&n1, &format!("{alice}/laptop")).await;
    n1.stop().await;
}

/// A NATS server of the test's own (JetStream on, state in `dir`), so the
/// test can kill and restart it.
fn own_nats(port: u16, dir: &std::path::Path) -> KillOnDrop {
    let child = KillOnDrop(
        std::process::Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server (Debian package nats-server) on PATH"),
    );
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return child;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("nats-server did not listen on {port}");
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..400 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting until {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_refused_with_wait_while_nats_is_down_and_flow_after() {
    let db = TestDb::create().await;
    let name = cluster_name();
    let port = free_port();
    let nats_dir = tempfile::tempdir().unwrap();
    let mut nats = own_nats(port, nats_dir.path());
    let url = format!("nats://127.0.0.1:{port}");
    let start = |node: &'static str| {
        let (name, url, db_url) = (name.clone(), url.clone(), db.url.clone());
        start_server(move |c| {
            clustered(c, &name, node, &db_url);
            c.cluster.nats_url = url;
        })
    };
    let n1 = start("n1").await;
    let n2 = start("n2").await;
    let alice = n1.add_user("alice", "password").await;
    let bob = n1.add_user("bob", "password").await;
    let mut a = n1.login(&alice, "password", "phone").await;
    let mut b = n2.login(&bob, "password", "phone").await;
    a.send(&xml("<presence/>")).await;
    b.send(&xml("<presence/>")).await;
    routable(&n1, &format!("{bob}/phone"), true).await;
    a.send(&message(&bob, "before")).await;
    let m = b.recv_until(|e| e.name == "message").await;
    assert_eq!(body_of(&m).as_deref(), Some("before"));

    // NATS goes away: n1 refuses messages (type wait), even to a user on
    // n1 itself, rather than accept what it may not deliver.
    drop(nats);
    let c1 = n1.state().cluster.clone().unwrap();
    until("n1 notices NATS is gone", || !c1.connected()).await;
    let (status, _, body) = http_request(n1.http, "GET", "/ready", "").await;
    assert_eq!(status, 503, "{body}");
    let id = next_id();
    let mut msg = message(&bob, "during");
    msg.set_attr("id", &id);
    a.send(&msg).await;
    let err = a
        .recv_until(|e| e.name == "message" && e.attr("id") == Some(&id))
        .await;
    assert_eq!(err.attr("type"), Some("error"), "{err}");
    let e = err.get_child("error", "jabber:client").unwrap();
    assert_eq!(e.attr("type"), Some("wait"), "{err}");

    // NATS is back (same state directory): the nodes reconnect, bob is
    // routable again, and messages flow.
    nats = own_nats(port, nats_dir.path());
    until("n1 reconnects", || c1.connected()).await;
    routable(&n1, &format!("{bob}/phone"), true).await;
    a.send(&message(&bob, "after")).await;
    let m = b
        .recv_until(|e| e.name == "message" && body_of(e).is_some())
        .await;
    assert_eq!(body_of(&m).as_deref(), Some("after"), "{m}");
    drop((a, b));
    n2.stop().await;
    n1.stop().await;
    drop(nats);
}
