//! XEP-0012 Last Activity against the real in-process server: uptime,
//! "last seen" for contacts only, updated at logout.

mod common;

use common::*;
use natter_store::{RosterItem, Subscription};

const NS: &str = "jabber:iq:last";
const PASSWORD: &str = "password";

fn last_iq(to: &str) -> Element {
    xml(&format!(
        "<iq type='get' to='{to}'><query xmlns='{NS}'/></iq>"
    ))
}

fn seconds(r: &Element) -> u64 {
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    r.get_child("query", NS)
        .and_then(|q| q.attr("seconds"))
        .unwrap_or_else(|| panic!("no seconds: {r}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn server_uptime() {
    let srv = start_server(|_| {}).await;
    let (mut a, _b) = srv.logged_in_pair().await;
    let r = a.iq(last_iq(DOMAIN)).await;
    assert!(seconds(&r) < 60, "{r}");
    srv.stop().await;
}

#[tokio::test]
async fn last_seen_for_subscribers_only() {
    let srv = start_server(|_| {}).await;
    let alice = srv.add_user("alice", PASSWORD).await;
    let bob = srv.add_user("bob", PASSWORD).await;
    let carol = srv.add_user("carol", PASSWORD).await;
    // Bob may see alice's presence (alice's item: from); carol may not.
    let mut it = RosterItem::new(bob.as_str());
    it.name = Some(String::new());
    it.subscription = Subscription::From;
    srv.state()
        .store
        .put_roster_item(&alice, &it)
        .await
        .unwrap();
    let mut b = srv.login(&bob, PASSWORD, "x").await;
    let mut c = srv.login(&carol, PASSWORD, "x").await;

    // Never logged in yet.
    let r = b.iq(last_iq(&alice)).await;
    assert_eq!(stanza_error(&r).as_deref(), Some("item-not-found"), "{r}");
    // Not allowed.
    let r = c.iq(last_iq(&alice)).await;
    assert_eq!(stanza_error(&r).as_deref(), Some("forbidden"), "{r}");

    // Online: 0.
    let mut a = srv.login(&alice, PASSWORD, "phone").await;
    a.send(&xml("<presence/>")).await;
    a.sync().await;
    assert_eq!(seconds(&b.iq(last_iq(&alice)).await), 0);
    let r = c.iq(last_iq(&alice)).await;
    assert_eq!(stanza_error(&r).as_deref(), Some("forbidden"), "{r}");

    // Logged out with a status: seconds since then and the status.
    a.send(&xml(
        "<presence type='unavailable'><status>Heading home</status></presence>",
    ))
    .await;
    a.close().await;
    let r = b.iq(last_iq(&alice)).await;
    assert!(seconds(&r) < 5, "{r}");
    assert_eq!(r.get_child("query", NS).unwrap().text(), "Heading home");

    // The account owner may ask too; a session that just drops also counts.
    let mut a = srv.login(&alice, PASSWORD, "phone").await;
    a.send(&xml("<presence/>")).await;
    a.sync().await;
    drop(a);
    let mut a = srv.login(&alice, PASSWORD, "other").await;
    let r = a
        .iq(xml(&format!("<iq type='get'><query xmlns='{NS}'/></iq>")))
        .await;
    // (0 while the dropped session is still closing, else a few seconds.)
    assert!(seconds(&r) < 5, "{r}");
    // The dropped session's logout lands in the store (the server sees the
    // EOF on its own time).
    let mut recorded = None;
    for _ in 0..100 {
        recorded = srv.state().store.last_activity(&alice).await.unwrap();
        if recorded.as_ref().is_some_and(|(_, s)| s.is_empty()) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (at, status) = recorded.unwrap();
    assert!(at > 0);
    assert_eq!(status, "");
    srv.stop().await;
}

#[tokio::test]
async fn ping_heartbeat_records_activity_of_online_users() {
    let srv = start_server(|c| c.c2s.ping_interval_secs = 1).await;
    let alice = srv.add_user("alice", PASSWORD).await;
    let mut a = srv.login(&alice, PASSWORD, "phone").await;
    a.send(&xml("<presence/>")).await;
    a.sync().await;
    assert!(srv
        .state()
        .store
        .last_activity(&alice)
        .await
        .unwrap()
        .is_none());
    // Idle for a ping interval: the server pings, and notes she was there
    // (so a crash loses at most HEARTBEAT_WRITE_SECS of "last seen").
    let ping = a
        .recv_until(|e| e.name == "iq" && e.get_child("ping", NS_PING).is_some())
        .await;
    assert_eq!(ping.attr("type"), Some("get"));
    let (at, status) = srv
        .state()
        .store
        .last_activity(&alice)
        .await
        .unwrap()
        .expect("heartbeat recorded");
    assert!(at > 0);
    assert_eq!(status, "");
    srv.stop().await;
}
