//! XEP-0191 Blocking Command against the real in-process server: the list,
//! pushes to interested resources, and enforcement on messages, presence
//! and IQs in both directions.

mod common;

use common::*;
use natter_store::{RosterItem, Subscription};
use natter_xml::NS_CLIENT;

const NS: &str = "urn:xmpp:blocking";
const NS_ERRORS: &str = "urn:xmpp:blocking:errors";
const PASSWORD: &str = "password";

fn blocklist_get() -> Element {
    xml(&format!("<iq type='get'><blocklist xmlns='{NS}'/></iq>"))
}

fn cmd(name: &str, jids: &[&str]) -> Element {
    let mut el = Element::new(name, NS);
    for j in jids {
        el.append_child(Element::new("item", NS).with_attr("jid", *j));
    }
    Element::new("iq", NS_CLIENT)
        .with_attr("type", "set")
        .with_child(el)
}

async fn list(c: &mut Client) -> Vec<String> {
    let r = c.iq(blocklist_get()).await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    r.get_child("blocklist", NS)
        .unwrap_or_else(|| panic!("no blocklist: {r}"))
        .children()
        .map(|i| i.attr("jid").unwrap().to_string())
        .collect()
}

async fn ok(c: &mut Client, iq: Element) {
    let r = c.iq(iq).await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
}

/// Both subscribed to each other, straight in the store.
async fn friends(srv: &TestServer, a: &str, b: &str) {
    for (owner, contact) in [(a, b), (b, a)] {
        let mut it = RosterItem::new(contact);
        it.name = Some(String::new());
        it.subscription = Subscription::Both;
        srv.state().store.put_roster_item(owner, &it).await.unwrap();
    }
}

/// Logged in, roster fetched, available; own presence echo consumed.
async fn online(srv: &TestServer, bare: &str, res: &str) -> Client {
    let mut c = srv.login(bare, PASSWORD, res).await;
    c.iq(xml("<iq type='get'><query xmlns='jabber:iq:roster'/></iq>"))
        .await;
    c.send(&xml("<presence/>")).await;
    let me = c.jid().to_string();
    c.recv_matching(|e| e.name == "presence" && e.attr("from") == Some(me.as_str()))
        .await;
    c
}

fn presences_from<'a>(els: &'a [Element], bare: &str) -> Vec<&'a Element> {
    els.iter()
        .filter(|e| {
            e.name == "presence"
                && e.attr("from")
                    .is_some_and(|f| f.split('/').next() == Some(bare))
        })
        .collect()
}

fn error_has_blocked(e: &Element) -> bool {
    e.get_child("error", NS_CLIENT)
        .is_some_and(|err| err.get_child("blocked", NS_ERRORS).is_some())
}

#[tokio::test]
async fn block_list_get_set_and_pushes_to_interested_resources() {
    let srv = start_server(|_| {}).await;
    let alice = srv.add_user("alice", PASSWORD).await;
    let bob = srv.add_user("bob", PASSWORD).await;
    let mut a1 = srv.login(&alice, PASSWORD, "one").await;
    let mut a2 = srv.login(&alice, PASSWORD, "two").await;
    let mut a3 = srv.login(&alice, PASSWORD, "three").await;
    assert!(list(&mut a1).await.is_empty());
    assert!(list(&mut a2).await.is_empty());

    ok(&mut a1, cmd("block", &[&bob, "spam.example"])).await;
    for c in [&mut a1, &mut a2] {
        let push = c
            .recv_matching(|e| e.name == "iq" && e.get_child("block", NS).is_some())
            .await;
        assert_eq!(push.attr("type"), Some("set"));
        let jids: Vec<_> = push
            .get_child("block", NS)
            .unwrap()
            .children()
            .map(|i| i.attr("jid").unwrap().to_string())
            .collect();
        assert_eq!(jids, vec![bob.clone(), "spam.example".to_string()]);
    }
    // a3 never asked for the list: no push.
    assert!(a3
        .sync()
        .await
        .iter()
        .all(|e| e.get_child("block", NS).is_none()));
    let mut l = list(&mut a3).await;
    l.sort();
    assert_eq!(l, vec![bob.clone(), "spam.example".to_string()]);

    // Errors.
    let r = a1.iq(cmd("block", &[])).await;
    assert_eq!(stanza_error(&r).as_deref(), Some("bad-request"), "{r}");
    let r = a1.iq(cmd("block", &["@@bad"])).await;
    assert_eq!(stanza_error(&r).as_deref(), Some("jid-malformed"), "{r}");

    // Unblock one, then all.
    ok(&mut a1, cmd("unblock", &["spam.example"])).await;
    let push = a2
        .recv_matching(|e| e.name == "iq" && e.get_child("unblock", NS).is_some())
        .await;
    assert_eq!(push.get_child("unblock", NS).unwrap().children().count(), 1);
    assert_eq!(list(&mut a1).await, vec![bob.clone()]);
    ok(&mut a1, cmd("unblock", &[])).await;
    let push = a2
        .recv_matching(|e| {
            e.name == "iq"
                && e.get_child("unblock", NS)
                    .is_some_and(|u| u.children().count() == 0)
        })
        .await;
    assert_eq!(push.attr("type"), Some("set"));
    assert!(list(&mut a3).await.is_empty());
    srv.stop().await;
}

#[tokio::test]
async fn blocked_contact_cannot_reach_blocker_and_blocker_cannot_reach_them() {
    let srv = start_server(|_| {}).await;
    let alice = srv.add_user("alice", PASSWORD).await;
    let bob = srv.add_user("bob", PASSWORD).await;
    friends(&srv, &alice, &bob).await;
    let mut a = online(&srv, &alice, "phone").await;
    let mut b = online(&srv, &bob, "laptop").await;
    a.sync().await;
    b.sync().await;

    ok(&mut a, cmd("block", &[&bob])).await;
    // §3.3: bob sees alice go offline, alice sees bob go offline.
    let p = b
        .recv_matching(|e| e.name == "presence" && e.attr("from") == Some(a.jid()))
        .await;
    assert_eq!(p.attr("type"), Some("unavailable"), "{p}");
    let p = a
        .recv_matching(|e| e.name == "presence" && e.attr("from") == Some(b.jid()))
        .await;
    assert_eq!(p.attr("type"), Some("unavailable"), "{p}");

    // Inbound message: service-unavailable to bob, nothing for alice.
    b.send(&message(&alice, "hello?")).await;
    let err = b
        .recv_matching(|e| e.name == "message" && e.attr("type") == Some("error"))
        .await;
    assert_eq!(
        stanza_error(&err).as_deref(),
        Some("service-unavailable"),
        "{err}"
    );
    // Inbound IQs, to the full JID and to the account.
    let r = b.iq(ping_iq(Some(a.jid()))).await;
    assert_eq!(stanza_error(&r).as_deref(), Some("service-unavailable"));
    let r = b
        .iq(xml(&format!(
            "<iq type='get' to='{alice}'><vCard xmlns='vcard-temp'/></iq>"
        )))
        .await;
    assert_eq!(stanza_error(&r).as_deref(), Some("service-unavailable"));
    // Inbound presence: dropped silently, no error back.
    b.send(&xml(&format!("<presence to='{alice}'/>"))).await;
    b.send(&xml("<presence><show>away</show></presence>")).await;
    let got = b.sync().await;
    assert!(
        got.iter().all(|e| e.attr("type") != Some("error")),
        "{got:?}"
    );
    let got = a.sync().await;
    assert!(
        got.iter()
            .all(|e| e.attr("from").is_none_or(|f| !f.starts_with(&bob))),
        "alice got something from bob: {got:?}"
    );

    // Outbound: not-acceptable + <blocked/>; alice's presence doesn't leak.
    a.send(&message(&bob, "hi")).await;
    let err = a
        .recv_matching(|e| e.name == "message" && e.attr("type") == Some("error"))
        .await;
    assert_eq!(stanza_error(&err).as_deref(), Some("not-acceptable"));
    assert!(error_has_blocked(&err), "{err}");
    let r = a.iq(ping_iq(Some(b.jid()))).await;
    assert_eq!(stanza_error(&r).as_deref(), Some("not-acceptable"));
    assert!(error_has_blocked(&r), "{r}");
    a.send(&xml("<presence><show>dnd</show></presence>")).await;
    a.sync().await;
    let got = b.sync().await;
    assert!(presences_from(&got, &alice).is_empty(), "{got:?}");
    assert!(got.iter().all(|e| e.name != "message"), "{got:?}");

    // Unblock: presence again both ways, messages flow.
    ok(&mut a, cmd("unblock", &[&bob])).await;
    let p = b
        .recv_matching(|e| e.name == "presence" && e.attr("from") == Some(a.jid()))
        .await;
    assert_eq!(p.attr("type"), None, "{p}");
    let p = a
        .recv_matching(|e| e.name == "presence" && e.attr("from") == Some(b.jid()))
        .await;
    assert_eq!(p.attr("type"), None, "{p}");
    b.send(&message(&alice, "friends again")).await;
    let m = a
        .recv_matching(|e| e.name == "message" && e.attr("type") == Some("chat"))
        .await;
    assert_eq!(
        m.child_text("body", NS_CLIENT).as_deref(),
        Some("friends again")
    );
    srv.stop().await;
}

#[tokio::test]
async fn full_jid_and_domain_items_match_like_xep0016() {
    let srv = start_server(|_| {}).await;
    let alice = srv.add_user("alice", PASSWORD).await;
    let bob = srv.add_user("bob", PASSWORD).await;
    let carol = srv.add_user("carol", PASSWORD).await;
    let mut a = srv.login(&alice, PASSWORD, "phone").await;
    a.send(&xml("<presence/>")).await;
    let mut b1 = srv.login(&bob, PASSWORD, "one").await;
    let mut b2 = srv.login(&bob, PASSWORD, "two").await;
    let mut c = srv.login(&carol, PASSWORD, "x").await;
    a.sync().await;

    // Only bob's resource "one".
    ok(&mut a, cmd("block", &[&format!("{bob}/one")])).await;
    b1.send(&message(&alice, "from one")).await;
    let err = b1.recv_until(|e| e.name == "message").await;
    assert_eq!(stanza_error(&err).as_deref(), Some("service-unavailable"));
    b2.send(&message(&alice, "from two")).await;
    let m = a.recv_until(|e| e.name == "message").await;
    assert_eq!(m.child_text("body", NS_CLIENT).as_deref(), Some("from two"));

    // The whole domain: everyone there but alice herself.
    ok(&mut a, cmd("block", &[DOMAIN])).await;
    c.send(&message(&alice, "carol here")).await;
    let err = c.recv_until(|e| e.name == "message").await;
    assert_eq!(stanza_error(&err).as_deref(), Some("service-unavailable"));
    // Her own resources and the server still reach her.
    let mut a2 = srv.login(&alice, PASSWORD, "tablet").await;
    a2.send(&message(a.jid(), "note to self")).await;
    let m = a.recv_until(|e| e.name == "message").await;
    assert_eq!(
        m.child_text("body", NS_CLIENT).as_deref(),
        Some("note to self")
    );
    let pong = a.iq(ping_iq(Some(DOMAIN))).await;
    assert_eq!(pong.attr("type"), Some("result"), "{pong}");
    srv.stop().await;
}

#[tokio::test]
async fn block_list_survives_reconnect_and_is_enforced_for_offline_blocker() {
    let srv = start_server(|_| {}).await;
    let alice = srv.add_user("alice", PASSWORD).await;
    let bob = srv.add_user("bob", PASSWORD).await;
    let mut a = srv.login(&alice, PASSWORD, "phone").await;
    ok(&mut a, cmd("block", &[&bob])).await;
    a.close().await;
    // Alice is offline: a message from bob still gets the blocked answer,
    // not queued for her.
    let mut b = srv.login(&bob, PASSWORD, "x").await;
    b.send(&message(&alice, "while you were out")).await;
    let err = b.recv_until(|e| e.name == "message").await;
    assert_eq!(stanza_error(&err).as_deref(), Some("service-unavailable"));
    let mut a = srv.login(&alice, PASSWORD, "phone").await;
    assert_eq!(list(&mut a).await, vec![bob.clone()]);
    a.send(&xml("<presence/>")).await;
    let got = a.sync().await;
    assert!(got.iter().all(|e| e.name != "message"), "{got:?}");
    srv.stop().await;
}
