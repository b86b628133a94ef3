//! Issue 9, items 1 and 2: a receiver that stops reading loses nothing,
//! and what its session gave back comes back in acceptance order. Each
//! test floods a stuck reader with 3,000 messages of ~4 KB (12 MB: more
//! than the kernel's socket buffers, which grow to 4 MiB) and checks
//! that every one arrives exactly once and in order across what the stuck
//! connection got, what a resumption (or the offline queue) delivers
//! next.

mod common;

use common::*;
use natter_xml::{Element, NS_CLIENT};
use std::time::Duration;

const N: usize = 3000;
const NS_SM: &str = "urn:xmpp:sm:3";

fn body(m: &Element) -> Option<usize> {
    m.child_text("body", NS_CLIENT)?
        .split_once(' ')?
        .0
        .parse()
        .ok()
}

/// A socket to the direct-TLS port with a 4 KiB receive buffer.
async fn small_buffer_client(srv: &TestServer) -> Client {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let tcp = sock.connect(srv.c2s_tls).await.unwrap();
    let mut c = Client::tls_over(tcp).await;
    c.open().await;
    c
}

/// Alice sends `N` messages of ~4 KB to `to`, pipelined, and checks that
/// each was accepted (no error came back).
async fn flood(a: &mut Client, to: &str) {
    let pad = "x".repeat(4000);
    let mut batch = String::new();
    for i in 0..N {
        let m = message(to, &format!("{i} {pad}")).with_attr("id", format!("f{i}"));
        batch.push_str(&a.serialize(&m));
        if batch.len() > 64 * 1024 || i == N - 1 {
            a.send_raw_reading(batch.as_bytes()).await;
            batch.clear();
            let refused = a.drain_received();
            assert!(refused.is_empty(), "messages were refused: {refused:?}");
        }
    }
    a.timeout = Duration::from_secs(60);
    let refused = a.sync().await;
    assert!(refused.is_empty(), "messages were refused: {refused:?}");
}

fn config(c: &mut natter::config::Config) {
    c.c2s.write_timeout_secs = 2;
    c.c2s.ping_timeout_secs = 2;
    c.limits.rate_bytes_per_sec = 1 << 30;
    c.limits.rate_burst_bytes = 1 << 30;
}

/// Every message exactly once and in order.
fn assert_all_once_in_order(got: &[usize]) {
    let firsts: Vec<_> = got.iter().take(20).collect();
    for (i, n) in got.iter().enumerate() {
        assert_eq!(
            *n,
            i,
            "message {i} is {n} (got {} in all; first ones: {firsts:?})",
            got.len()
        );
    }
    assert_eq!(got.len(), N, "messages lost");
}

/// No duplicate comes after all of them, and nothing is left offline.
async fn assert_nothing_more(srv: &TestServer, c: &mut Client, bob: &str) {
    c.timeout = Duration::from_secs(2);
    let rest: Vec<_> = c
        .sync()
        .await
        .into_iter()
        .filter(|e| e.is("message", NS_CLIENT))
        .collect();
    assert!(rest.is_empty(), "{} duplicates", rest.len());
    queue_emptied(srv, bob).await;
}

/// Without stream management: what a session was handed and did not wholly
/// write to its socket goes back to offline storage, before everything
/// accepted after it; a stanza cut mid-write counts as not delivered.
#[tokio::test]
async fn stuck_reader_without_sm_loses_nothing_and_keeps_order() {
    let srv = start_server(config).await;
    let alice = srv.add_user("alice", "password").await;
    let bob = srv.add_user("bob", "password").await;
    let mut a = srv.login(&alice, "password", "a").await;
    let mut b = small_buffer_client(&srv).await;
    b.login(&bob, "password", "stuck").await;
    b.send(&xml("<presence/>")).await;
    b.sync().await;
    b.drain_received();

    flood(&mut a, &bob).await;

    // Bob reads at last: whatever reached his socket, then the end.
    let first: Vec<_> = b
        .read_to_end(Duration::from_secs(10))
        .await
        .iter()
        .filter(|e| e.is("message", NS_CLIENT))
        .filter_map(body)
        .collect();
    assert!(first.len() < N, "the reader was never stuck");
    // Everything else waits offline, in order.
    let mut b2 = srv.login(&bob, "password", "again").await;
    b2.timeout = Duration::from_secs(30);
    b2.send(&xml("<presence/>")).await;
    let mut got = first.clone();
    while got.len() < N {
        let m = b2.recv_until(|e| e.name == "message").await;
        got.extend(body(&m));
    }
    assert_all_once_in_order(&got);
    assert_nothing_more(&srv, &mut b2, &bob).await;
    srv.stop().await;
}

/// With stream management: a session that stopped reading parks like a
/// broken connection; `<resume/>` with the client's real `h` gets exactly
/// what it has not handled — the unacknowledged stanzas, then what was
/// queued offline while it was parked, in order.
#[tokio::test]
async fn stuck_reader_with_sm_resumes_exactly_what_it_missed() {
    let srv = start_server(config).await;
    let alice = srv.add_user("alice", "password").await;
    let bob = srv.add_user("bob", "password").await;
    let mut a = srv.login(&alice, "password", "a").await;
    let mut b = small_buffer_client(&srv).await;
    let bob_jid = b.login(&bob, "password", "stuck").await;
    b.send(&Element::new("enable", NS_SM).with_attr("resume", "true"))
        .await;
    let enabled = b.recv_matching(|e| e.ns == NS_SM).await;
    let previd = enabled.attr("id").expect("SM-ID").to_string();
    b.send(&xml("<presence/>")).await;
    // h counts every stanza handled, as a client does: so far his
    // presence and the ping result.
    let mut h = b.sync().await.iter().filter(|e| e.ns == NS_CLIENT).count() as u32 + 1;

    flood(&mut a, &bob).await;

    // Bob reads what reached him.
    let mut got = Vec::new();
    for el in b.read_to_end(Duration::from_secs(10)).await {
        if el.ns == NS_CLIENT {
            h += 1;
            if el.is("message", NS_CLIENT) {
                got.extend(body(&el));
            }
        }
    }
    assert!(got.len() < N, "the reader was never stuck");

    let mut c = Client::connect_tls(srv.c2s_tls).await;
    c.authenticate(natter_sasl::Mechanism::ScramSha256, &bob, "password", None)
        .await
        .expect("login");
    c.send(
        &Element::new("resume", NS_SM)
            .with_attr("previd", previd)
            .with_attr("h", h.to_string()),
    )
    .await;
    let r = c.recv_matching(|e| e.ns == NS_SM && e.name != "r").await;
    assert!(r.is("resumed", NS_SM), "expected <resumed/>, got {r}");
    c.full_jid = Some(bob_jid);
    c.timeout = Duration::from_secs(30);
    let mut handled = h;
    while got.len() < N {
        let el = c.recv().await;
        if el.ns != NS_CLIENT {
            continue;
        }
        handled += 1;
        if el.is("message", NS_CLIENT) {
            got.extend(body(&el));
            if got.len() % 100 == 0 {
                c.send(&Element::new("a", NS_SM).with_attr("h", handled.to_string()))
                    .await;
            }
        }
    }
    c.send(&Element::new("a", NS_SM).with_attr("h", handled.to_string()))
        .await;
    assert_all_once_in_order(&got);
    assert_nothing_more(&srv, &mut c, &bob).await;
    assert_eq!(srv.state().router.requeued(), 0);
    srv.stop().await;
}
