//! A panic in a stanza handler (issue 10): the session it happened in ends
//! and leaves routing, everything it held reaches the user's other devices
//! or offline storage, in order, and every other session carries on.
//! `handle_iq` of a test module panics on purpose: caught at the wake-up
//! boundary (the session ends with `internal-server-error`), or — with a
//! payload that panics again when dropped — escaping every catch, when the
//! session's drop guard has to do the same work.

mod common;

use common::*;
use natter::modules::{Cx, Iq, IqResult, Module};
use natter_xml::NS_CLIENT;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const NS_SM: &str = "urn:xmpp:sm:3";
const NS_TEST: &str = "urn:natter:test:panic";

/// Panics in `handle_iq`: `<panic/>` plainly, `<bomb/>` with a payload whose
/// drop panics too, so the panic escapes the session's catch.
struct Panics;

struct Bomb;

impl Drop for Bomb {
    fn drop(&mut self) {
        panic!("the panic payload panics when dropped");
    }
}

#[async_trait::async_trait]
impl Module for Panics {
    fn name(&self) -> &'static str {
        "test-panics"
    }
    fn iq_payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[(NS_TEST, "panic"), (NS_TEST, "bomb")]
    }

    async fn handle_iq(&self, _cx: &Cx<'_>, iq: &Iq) -> IqResult {
        if iq.payload().name == "bomb" {
            std::panic::panic_any(Bomb);
        }
        panic!("a stanza handler panics on purpose");
    }
}

async fn server() -> TestServer {
    start_server_with(
        // The phone never acks: its ack requests must not time out first.
        |c| c.c2s.ping_timeout_secs = 120,
        vec![Arc::new(Panics) as Arc<dyn Module>],
    )
    .await
}

fn body(m: &Element) -> String {
    m.child_text("body", NS_CLIENT).unwrap_or_default()
}

fn bodies(msgs: &[Element]) -> Vec<String> {
    msgs.iter().map(body).collect()
}

fn expected(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("m{i}")).collect()
}

/// Alice's phone with stream management (no resumption) that reads but
/// never acks, holding `N` messages from bob: the first five written and
/// unacknowledged, the rest queued or unacknowledged, whichever the
/// server got to.
const N: usize = 8;

async fn phone_holding_messages(srv: &TestServer, alice: &str, bob: &mut Client) -> Client {
    let mut phone = srv.login(alice, "password", "phone").await;
    phone
        .send(&Element::new("enable", NS_SM).with_attr("resume", "false"))
        .await;
    let enabled = phone.recv().await;
    assert!(
        enabled.is("enabled", NS_SM),
        "expected <enabled/>, got {enabled}"
    );
    let to = phone.jid().to_string();
    for i in 0..5 {
        bob.send(&message(&to, &format!("m{i}"))).await;
    }
    for i in 0..5 {
        let m = phone.recv_until(|e| e.name == "message").await;
        assert_eq!(body(&m), format!("m{i}"));
    }
    for i in 5..N {
        bob.send(&message(&to, &format!("m{i}"))).await;
    }
    // Bob's stanzas are dispatched in order: after his ping, all N are the
    // phone's.
    bob.sync().await;
    phone
}

/// Accounts alice and bob; bob logged in, alice only on her phone, which
/// holds `N` messages from bob.
async fn alice_phone_and_bob(srv: &TestServer) -> (String, Client, Client) {
    let alice = srv.add_user("alice", "password").await;
    let bob = srv.add_user("bob", "password").await;
    let mut b = srv.login(&bob, "password", "desk").await;
    let phone = phone_holding_messages(srv, &alice, &mut b).await;
    (alice, b, phone)
}

fn panic_iq(kind: &str) -> Element {
    xml(&format!(
        "<iq type='get' id='{}'><{kind} xmlns='{NS_TEST}'/></iq>",
        next_id()
    ))
}

/// Wait (bounded) until `full` is no longer bound anywhere in the router.
async fn wait_unbound(srv: &TestServer, full: &str) {
    let full: jid::FullJid = full.parse().expect("full JID");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while srv.state().router.session(&full).is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{full} is still bound after its handler panicked"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Log `user` in again with initial presence; the messages that arrive
/// before a ping round trip (the offline queue).
async fn offline_messages(srv: &TestServer, user: &str, expect: usize) -> Vec<Element> {
    let mut c = srv.login(user, "password", "again").await;
    c.send(&xml("<presence/>")).await;
    let mut got = Vec::new();
    while got.len() < expect {
        got.push(c.recv_until(|e| e.name == "message").await);
    }
    got.extend(c.sync().await.into_iter().filter(|e| e.name == "message"));
    c.close().await;
    got
}

#[tokio::test]
async fn panic_with_another_device_online_moves_everything_to_it() {
    let srv = server().await;
    let alice = srv.add_user("alice", "password").await;
    let bob = srv.add_user("bob", "password").await;
    let mut laptop = srv.login(&alice, "password", "laptop").await;
    laptop.send(&xml("<presence/>")).await;
    laptop.sync().await;
    let mut b = srv.login(&bob, "password", "desk").await;
    let mut phone = phone_holding_messages(&srv, &alice, &mut b).await;
    let phone_jid = phone.jid().to_string();

    phone.send(&panic_iq("panic")).await;
    assert_eq!(phone.expect_stream_error().await, "internal-server-error");
    wait_unbound(&srv, &phone_jid).await;

    // What the phone held went to the laptop, in order.
    let mut got = Vec::new();
    while got.len() < N {
        got.push(laptop.recv_until(|e| e.name == "message").await);
    }
    assert_eq!(bodies(&got), expected(N));
    // A chat message to the gone phone now reaches the laptop.
    b.send(&message(&phone_jid, "after")).await;
    let m = laptop.recv_until(|e| e.name == "message").await;
    assert_eq!(body(&m), "after");
    // Nothing was left for offline storage as well.
    assert!(offline_messages(&srv, &alice, 0).await.is_empty());
    assert_eq!(srv.state().store.offline_count(&alice).await.unwrap(), 0);

    // The laptop, bob, and everyone else carry on.
    laptop.sync().await;
    b.sync().await;
    b.send(&message(laptop.jid(), "hello laptop")).await;
    let m = laptop.recv_until(|e| e.name == "message").await;
    assert_eq!(body(&m), "hello laptop");
    srv.assert_healthy().await;
    srv.stop().await;
}

/// Alice's only session panics on `<kind/>`: it leaves routing, and
/// everything it held is in offline storage, in order; bob never notices.
async fn only_session_panics(kind: &str) {
    let srv = server().await;
    let (alice, mut b, mut phone) = alice_phone_and_bob(&srv).await;
    let phone_jid = phone.jid().to_string();

    phone.send(&panic_iq(kind)).await;
    if kind == "bomb" {
        // The task died: no stream error, the connection just ends.
        phone.expect_closed().await;
    } else {
        assert_eq!(phone.expect_stream_error().await, "internal-server-error");
    }
    wait_unbound(&srv, &phone_jid).await;
    assert!(srv.state().router.resources(&phone_bare(&alice)).is_empty());

    assert_eq!(
        bodies(&offline_messages(&srv, &alice, N).await),
        expected(N)
    );
    b.sync().await;
    srv.assert_healthy().await;
    srv.stop().await;
}

#[tokio::test]
async fn panic_of_the_only_session_puts_everything_in_offline_storage() {
    only_session_panics("panic").await;
}

#[tokio::test]
async fn a_panic_escaping_the_catch_is_handled_by_the_drop_guard() {
    only_session_panics("bomb").await;
}

#[tokio::test]
async fn shutdown_keeps_the_requeue_of_a_session_that_panicked() {
    let srv = server().await;
    let (alice, _bob, mut phone) = alice_phone_and_bob(&srv).await;
    phone.send(&panic_iq("bomb")).await;
    // The drop guard ran (the connection ended); its requeue task may still
    // be running: shutdown waits for it before closing the store.
    phone.expect_closed().await;
    let config = (*srv.state().config).clone();
    let TestServer { running, dir, .. } = srv;
    running.shutdown().await;
    let store = natter::open_store(&config).await.expect("store reopens");
    assert_eq!(store.offline_count(&alice).await.unwrap(), N as u64);
    store.close().await;
    drop(dir);
}

#[tokio::test]
async fn shutdown_waits_for_tracked_tasks() {
    let srv = server().await;
    let alice = srv.add_user("alice", "password").await;
    let done = Arc::new(AtomicBool::new(false));
    let state = srv.state().clone();
    let flag = done.clone();
    srv.state().tasks.spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The store is still open while tracked tasks run.
        state.store.offline_count(&alice).await.expect("store open");
        flag.store(true, Ordering::SeqCst);
    });
    srv.stop().await;
    assert!(done.load(Ordering::SeqCst), "shutdown returned first");
}

fn phone_bare(alice: &str) -> jid::BareJid {
    alice.parse().expect("bare JID")
}
