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
