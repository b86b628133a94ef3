//! RFC 6121 against the real in-process server: roster management with
//! XEP-0237 versioning (§2), presence subscriptions (§3, Appendix A) and
//! presence broadcast (§4), seen by raw clients.

mod common;

use common::*;
use natter_xml::NS_CLIENT;

const NS_ROSTER: &str = "jabber:iq:roster";
const PASSWORD: &str = "password";

// ---------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------

async fn user(srv: &TestServer, local: &str) -> String {
    srv.add_user(local, PASSWORD).await
}

/// Logged in and interested (requested the roster), not yet available.
async fn interested(srv: &TestServer, bare: &str, res: &str) -> Client {
    let mut c = srv.login(bare, PASSWORD, res).await;
    let r = c.iq(roster_get(None)).await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    c
}

/// Logged in, interested and available: the echo of its own initial
/// presence has been received (§4.2.2); probe answers stay buffered.
async fn online(srv: &TestServer, bare: &str, res: &str) -> Client {
    let mut c = interested(srv, bare, res).await;
    send_presence(&mut c).await;
    c
}

/// Send initial presence and wait for its echo.
async fn send_presence(c: &mut Client) {
    c.send(&xml("<presence/>")).await;
    let me = c.jid().to_string();
    c.recv_matching(|e| is_presence(e, &me, None)).await;
}

fn roster_get(ver: Option<&str>) -> Element {
    let mut q = Element::new("query", NS_ROSTER);
    if let Some(v) = ver {
        q.set_attr("ver", v);
    }
    Element::new("iq", NS_CLIENT)
        .with_attr("type", "get")
        .with_child(q)
}

fn roster_set(item: Element) -> Element {
    Element::new("iq", NS_CLIENT)
        .with_attr("type", "set")
        .with_child(Element::new("query", NS_ROSTER).with_child(item))
}

fn item(jid: &str, name: Option<&str>, groups: &[&str]) -> Element {
    let mut it = Element::new("item", NS_ROSTER).with_attr("jid", jid);
    if let Some(n) = name {
        it.set_attr("name", n);
    }
    for g in groups {
        it.append_child(Element::new("group", NS_ROSTER).with_text(*g));
    }
    it
}

fn presence(to: &str, kind: &str) -> Element {
    Element::new("presence", NS_CLIENT)
        .with_attr("to", to)
        .with_attr("type", kind)
}

/// A presence from `from` (exact) of type `kind` (None = available).
fn is_presence(e: &Element, from: &str, kind: Option<&str>) -> bool {
    e.name == "presence" && e.attr("from") == Some(from) && e.attr("type") == kind
}

/// The item of a roster push for `jid`, if `e` is one.
fn push_item<'a>(e: &'a Element, jid: &str) -> Option<&'a Element> {
    if e.name != "iq" || e.attr("type") != Some("set") {
        return None;
    }
    e.get_child("query", NS_ROSTER)?
        .children()
        .find(|i| i.is("item", NS_ROSTER) && i.attr("jid") == Some(jid))
}

/// Wait for a roster push about `jid`; returns (item, ver).
async fn expect_push(c: &mut Client, jid: &str) -> (Element, String) {
    let iq = c.recv_matching(|e| push_item(e, jid).is_some()).await;
    // RFC 6121 §2.1.6: from the account itself (or no from).
    let bare = c.bare_jid().to_string();
    assert!(
        iq.attr("from").is_none_or(|f| f == bare),
        "push not from the account: {iq}"
    );
    let ver = iq
        .get_child("query", NS_ROSTER)
        .and_then(|q| q.attr("ver"))
        .unwrap_or_else(|| panic!("push without ver: {iq}"))
        .to_string();
    // Acknowledge it like a client does.
    let ack = Element::new("iq", NS_CLIENT)
        .with_attr("type", "result")
        .with_attr("id", iq.attr("id").unwrap_or_default());
    c.send(&ack).await;
    (push_item(&iq, jid).unwrap().clone(), ver)
}

async fn expect_presence(c: &mut Client, from: &str, kind: Option<&str>) -> Element {
    c.recv_matching(|e| is_presence(e, from, kind)).await
}

/// Full roster: (ver, items).
async fn fetch_roster(c: &mut Client) -> (String, Vec<Element>) {
    let r = c.iq(roster_get(None)).await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    let q = r
        .get_child("query", NS_ROSTER)
        .unwrap_or_else(|| panic!("no query: {r}"));
    let ver = q.attr("ver").expect("ver").to_string();
    (ver, q.children().cloned().collect())
}

async fn roster_item(c: &mut Client, jid: &str) -> Option<Element> {
    fetch_roster(c)
        .await
        .1
        .into_iter()
        .find(|i| i.attr("jid") == Some(jid))
}

fn sub_of(item: &Element) -> (&str, Option<&str>) {
    (item.attr("subscription").unwrap(), item.attr("ask"))
}

/// Everything `c` received so far, presence and pushes included.
async fn drain(c: &mut Client) -> Vec<Element> {
    c.sync().await
}

/// Presence stanzas received so far from anyone but `c` itself.
async fn foreign_presences(c: &mut Client) -> Vec<Element> {
    let me = c.jid().to_string();
    drain(c)
        .await
        .into_iter()
        .filter(|e| e.name == "presence" && e.attr("from") != Some(me.as_str()))
        .collect()
}

/// Make `a` and `b` (both online) subscribed to each other; drains both.
async fn befriend(a: &mut Client, b: &mut Client) {
    let (ab, bb) = (a.bare_jid().to_string(), b.bare_jid().to_string());
    a.send(&presence(&bb, "subscribe")).await;
    b.recv_matching(|e| is_presence(e, &ab, Some("subscribe")))
        .await;
    b.send(&presence(&ab, "subscribed")).await;
    b.send(&presence(&ab, "subscribe")).await;
    a.recv_matching(|e| is_presence(e, &bb, Some("subscribe")))
        .await;
    a.send(&presence(&bb, "subscribed")).await;
    drain(a).await;
    drain(b).await;
    assert_eq!(sub_of(&roster_item(a, &bb).await.unwrap()), ("both", None));
    assert_eq!(sub_of(&roster_item(b, &ab).await.unwrap()), ("both", None));
}

// ---------------------------------------------------------------------------
// roster (RFC 6121 §2, XEP-0237)
// ---------------------------------------------------------------------------

#[tokio::test]
async fn stream_features_advertise_versioning_and_preapproval() {
    let srv = start_server(|_| {}).await;
    let alice = user(&srv, "alice").await;
    let c = srv.login(&alice, PASSWORD, "phone").await;
    let f = c.features.clone().unwrap();
    assert!(
        f.get_child("ver", "urn:xmpp:features:rosterver").is_some(),
        "{f}"
    );
    assert!(
        f.get_child("sub", "urn:xmpp:features:pre-approval")
            .is_some(),
        "{f}"
    );
    srv.stop().await;
}

#[tokio::test]
async fn roster_set_get_remove_pushes_to_interested_resources() {
    let srv = start_server(|_| {}).await;
    let alice = user(&srv, "alice").await;
    let bob = user(&srv, "bob").await;
    let mut phone = interested(&srv, &alice, "phone").await;
    let mut laptop = interested(&srv, &alice, "laptop").await;
    // Never asked for the roster: gets no pushes (§2.1.6).
    let mut tv = srv.login(&alice, PASSWORD, "tv").await;

    let (_, items) = fetch_roster(&mut phone).await;
    assert!(items.is_empty(), "{items:?}");

    // Add: both interested resources get the push, then the result.
    let r = phone
        .iq(roster_set(item(&bob, Some("Bob"), &["Friends", "Work"])))
        .await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    for c in [&mut phone, &mut laptop] {
        let (it, _) = expect_push(c, &bob).await;
        assert_eq!(it.attr("name"), Some("Bob"));
        assert_eq!(it.attr("subscription"), Some("none"));
        assert!(it.attr("ask").is_none());
        let groups: Vec<String> = it.children().map(|g| g.text()).collect();
        assert_eq!(groups, ["Friends", "Work"]);
    }
    let got = roster_item(&mut laptop, &bob).await.expect("bob in roster");
    assert_eq!(got.attr("name"), Some("Bob"));
    assert_eq!(got.children().count(), 2);

    // Update: name and groups replaced, subscription untouched.
    let r = laptop.iq(roster_set(item(&bob, Some("Robert"), &[]))).await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    for c in [&mut phone, &mut laptop] {
        let (it, _) = expect_push(c, &bob).await;
        assert_eq!(it.attr("name"), Some("Robert"));
        assert_eq!(it.children().count(), 0);
    }

    // Remove.
    let r = phone
        .iq(roster_set(
            item(&bob, None, &[]).with_attr("subscription", "remove"),
        ))
        .await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    for c in [&mut phone, &mut laptop] {
        let (it, _) = expect_push(c, &bob).await;
        assert_eq!(it.attr("subscription"), Some("remove"));
    }
    assert!(fetch_roster(&mut phone).await.1.is_empty());
    let seen = drain(&mut tv).await;
    assert!(seen.is_empty(), "not interested, yet got {seen:?}");

    // Error cases (§2.3.3, §2.5.3).
    let cases = [
        (
            roster_set(item(&bob, None, &[]).with_attr("subscription", "remove")),
            "item-not-found",
        ),
        (
            Element::new("iq", NS_CLIENT)
                .with_attr("type", "set")
                .with_child(
                    Element::new("query", NS_ROSTER)
                        .with_child(item(&bob, None, &[]))
                        .with_child(item("carol@localhost", None, &[])),
                ),
            "bad-request",
        ),
        (roster_set(item(&alice, None, &[])), "not-allowed"),
        (roster_set(item(&bob, None, &["A", "A"])), "bad-request"),
        (roster_set(item(&bob, None, &[""])), "not-acceptable"),
        (
            roster_set(item("bob@localhost/res", None, &[])),
            "jid-malformed",
        ),
        (roster_get(None).with_attr("to", bob.as_str()), "forbidden"),
        (
            roster_set(item("carol@localhost", None, &[])).with_attr("to", bob.as_str()),
            "forbidden",
        ),
    ];
    for (iq, want) in cases {
        let r = phone.iq(iq.clone()).await;
        assert_eq!(r.attr("type"), Some("error"), "{iq} → {r}");
        assert_eq!(stanza_error(&r).as_deref(), Some(want), "{iq} → {r}");
    }
    assert!(fetch_roster(&mut phone).await.1.is_empty());
    // Addressed to one's own bare JID is the same as no 'to'.
    let r = phone
        .iq(roster_get(None).with_attr("to", alice.as_str()))
        .await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    srv.stop().await;
}

#[tokio::test]
async fn roster_versioning() {
    let srv = start_server(|_| {}).await;
    let alice = user(&srv, "alice").await;
    let mut a = interested(&srv, &alice, "phone").await;
    let (v1, _) = fetch_roster(&mut a).await;

    // Unchanged: an empty result, no items (XEP-0237 §4 / RFC 6121 §2.6.3).
    let r = a.iq(roster_get(Some(&v1))).await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    assert!(r.get_child("query", NS_ROSTER).is_none(), "{r}");

    // A change: the push carries the new version.
    a.iq(roster_set(item("bob@localhost", Some("Bob"), &[])))
        .await;
    let (_, v2) = expect_push(&mut a, "bob@localhost").await;
    assert_ne!(v1, v2);
    let r = a.iq(roster_get(Some(&v2))).await;
    assert!(r.get_child("query", NS_ROSTER).is_none(), "{r}");

    // A stale or empty version gets the whole roster with the current one.
    for stale in [v1.as_str(), ""] {
        let r = a.iq(roster_get(Some(stale))).await;
        let q = r.get_child("query", NS_ROSTER).expect("full roster");
        assert_eq!(q.attr("ver"), Some(v2.as_str()));
        assert_eq!(q.children().count(), 1);
    }

    // The version survives a reconnect.
    a.close().await;
    let mut a = srv.login(&alice, PASSWORD, "laptop").await;
    let r = a.iq(roster_get(Some(&v2))).await;
    assert!(r.get_child("query", NS_ROSTER).is_none(), "{r}");
    srv.stop().await;
}

// ---------------------------------------------------------------------------
// subscriptions (RFC 6121 §3)
// ---------------------------------------------------------------------------

#[tokio::test]
async fn subscribe_approve_both_ways_ends_in_both_with_presence() {
    let srv = start_server(|_| {}).await;
    let alice = user(&srv, "alice").await;
    let bob = user(&srv, "bob").await;
    let mut a = online(&srv, &alice, "phone").await;
    let mut b = online(&srv, &bob, "pc").await;
    let (aj, bj) = (a.jid().to_string(), b.jid().to_string());

    // alice → bob: subscribe. Stamped with alice's bare JID.
    a.send(
        &presence(&bob, "subscribe")
            .with_child(Element::new("status", NS_CLIENT).with_text("it's alice")),
    )
    .await;
    let (it, _) = expect_push(&mut a, &bob).await;
    assert_eq!(sub_of(&it), ("none", Some("subscribe")));
    let req = expect_presence(&mut b, &alice, Some("subscribe")).await;
    assert_eq!(req.attr("to"), Some(bob.as_str()));
    assert_eq!(
        req.child_text("status", NS_CLIENT).as_deref(),
        Some("it's alice")
    );
    // A request does not put alice in bob's roster (§3.1.3).
    assert!(roster_item(&mut b, &alice).await.is_none());
    assert!(foreign_presences(&mut b).await.is_empty());

    // bob approves.
    b.send(&presence(&alice, "subscribed")).await;
    let (it, _) = expect_push(&mut b, &alice).await;
    assert_eq!(sub_of(&it), ("from", None));
    let (it, _) = expect_push(&mut a, &bob).await;
    assert_eq!(sub_of(&it), ("to", None));
    expect_presence(&mut a, &bob, Some("subscribed")).await;
    // ... and alice now sees bob's presence, bob not yet alice's.
    let p = expect_presence(&mut a, &bj, None).await;
    assert_eq!(p.attr("to"), Some(aj.as_str()));
    assert!(foreign_presences(&mut b).await.is_empty());

    // bob → alice: subscribe, alice approves.
    b.send(&presence(&alice, "subscribe")).await;
    let (it, _) = expect_push(&mut b, &alice).await;
    assert_eq!(sub_of(&it), ("from", Some("subscribe")));
    expect_presence(&mut a, &bob, Some("subscribe")).await;
    a.send(&presence(&bob, "subscribed")).await;
    let (it, _) = expect_push(&mut a, &bob).await;
    assert_eq!(sub_of(&it), ("both", None));
    let (it, _) = expect_push(&mut b, &alice).await;
    assert_eq!(sub_of(&it), ("both", None));
    expect_presence(&mut b, &alice, Some("subscribed")).await;
    expect_presence(&mut b, &aj, None).await;

    assert_eq!(
        sub_of(&roster_item(&mut a, &bob).await.unwrap()),
        ("both", None)
    );
    assert_eq!(
        sub_of(&roster_item(&mut b, &alice).await.unwrap()),
        ("both", None)
    );

    // Both now see each other's updates.
    a.send(&xml("<presence><show>away</show></presence>")).await;
    let p = expect_presence(&mut b, &aj, None).await;
    assert_eq!(p.child_text("show", NS_CLIENT).as_deref(), Some("away"));
    b.send(&xml("<presence><show>dnd</show></presence>")).await;
    let p = expect_presence(&mut a, &bj, None).await;
    assert_eq!(p.child_text("show", NS_CLIENT).as_deref(), Some("dnd"));
    srv.stop().await;
}

#[tokio::test]
async fn subscription_request_to_offline_user_is_delivered_at_next_login() {
    let srv = start_server(|_| {}).await;
    let alice = user(&srv, "alice").await;
    let bob = user(&srv, "bob").await;
    let mut a = online(&srv, &alice, "phone").await;
    a.send(&presence(&bob, "subscribe")).await;
    expect_push(&mut a, &bob).await;

    // bob connects: no request before his initial presence, and alice is
    // not in his roster.
    let mut b = interested(&srv, &bob, "pc").await;
    assert!(foreign_presences(&mut b).await.is_empty());
    assert!(fetch_roster(&mut b).await.1.is_empty());
    b.send(&xml("<presence/>")).await;
    expect_presence(&mut b, &alice, Some("subscribe")).await;

    // A second resource gets it at its own initial presence too.
    let mut b2 = online(&srv, &bob, "tablet").await;
    expect_presence(&mut b2, &alice, Some("subscribe")).await;

    b.send(&presence(&alice, "subscribed")).await;
    let (it, _) = expect_push(&mut a, &bob).await;
    assert_eq!(sub_of(&it), ("to", None));
    expect_presence(&mut a, &bob, Some("subscribed")).await;
    // Both of bob's resources are online: alice gets both presences.
    expect_presence(&mut a, b.jid(), None).await;
    expect_presence(&mut a, b2.jid(), None).await;

    // Approved: not delivered again.
    let mut b3 = online(&srv, &bob, "watch").await;
    let seen = drain(&mut b3).await;
    assert!(
        !seen
            .iter()
            .any(|e| is_presence(e, &alice, Some("subscribe"))),
        "{seen:?}"
    );
    srv.stop().await;
}

#[tokio::test]
async fn pre_approval() {
    let srv = start_server(|_| {}).await;
    let alice = user(&srv, "alice").await;
    let bob = user(&srv, "bob").await;
    let mut a = online(&srv, &alice, "phone").await;
    let mut b = online(&srv, &bob, "pc").await;

    // bob pre-approves alice (§3.4): an item with approved='true', nothing
    // sent to alice.
    b.send(&presence(&alice, "subscribed")).await;
    let (it, _) = expect_push(&mut b, &alice).await;
    assert_eq!(sub_of(&it), ("none", None));
    assert_eq!(it.attr("approved"), Some("true"));
    let seen = foreign_presences(&mut a).await;
    assert!(seen.is_empty(), "{seen:?}");

    // alice's request is approved by the server at once.
    a.send(&presence(&bob, "subscribe")).await;
    let (it, _) = expect_push(&mut a, &bob).await;
    assert_eq!(sub_of(&it), ("none", Some("subscribe")));
    let (it, _) = expect_push(&mut a, &bob).await;
    assert_eq!(sub_of(&it), ("to", None));
    expect_presence(&mut a, &bob, Some("subscribed")).await;
    expect_presence(&mut a, b.jid(), None).await;
    let (it, _) = expect_push(&mut b, &alice).await;
    assert_eq!(sub_of(&it), ("from", None));
    assert!(it.attr("approved").is_none());
    let seen = drain(&mut b).await;
    assert!(
        !seen
            .iter()
            .any(|e| is_presence(e, &alice, Some("subscribe"))),
        "a pre-approved request is not delivered: {seen:?}"
    );

    // A pre-approval can be withdrawn with unsubscribed (§3.2.2 case 2).
    let carol = user(&srv, "carol").await;
    let mut c = online(&srv, &carol, "x").await;
    b.send(&presence(&carol, "subscribed")).await;
    let (it, _) = expect_push(&mut b, &carol).await;
    assert_eq!(it.attr("approved"), Some("true"));
    b.send(&presence(&carol, "unsubscribed")).await;
    let (it, _) = expect_push(&mut b, &carol).await;
    assert!(it.attr("approved").is_none());
    assert!(foreign_presences(&mut c).await.is_empty());
    c.send(&presence(&bob, "subscribe")).await;
    expect_presence(&mut b, &carol, Some("subscribe")).await;
    srv.stop().await;
}

#[tokio::test]
async fn unsubscribe_and_unsubscribed() {
    let srv = start_server(|_| {}).await;
    let alice = user(&srv, "alice").await;
    let bob = user(&srv, "bob").await;
    let mut a = online(&srv, &alice, "phone").await;
    let mut b = online(&srv, &bob, "pc").await;
    befriend(&mut a, &mut b).await;
    let (aj, bj) = (a.jid().to_string(), b.jid().to_string());

    // alice stops following bob (§3.3): both → from / both → to, and bob
    // goes offline for alice.
    a.send(&presence(&bob, "unsubscribe")).await;
    let (it, _) = expect_push(&mut a, &bob).await;
    assert_eq!(sub_of(&it), ("from", None));
    let (it, _) = expect_push(&mut b, &alice).await;
    assert_eq!(sub_of(&it), ("to", None));
    expect_presence(&mut b, &alice, Some("unsubscribe")).await;
    expect_presence(&mut a, &bj, Some("unavailable")).await;
    // bob still gets alice's presence, alice no longer bob's.
    b.send(&xml("<presence><show>xa</show></presence>")).await;
    assert!(foreign_presences(&mut a).await.is_empty());
    a.send(&xml("<presence><show>chat</show></presence>")).await;
    expect_presence(&mut b, &aj, None).await;

    // alice cancels bob's subscription (§3.2): unavailable first, then
    // unsubscribed; both end at none.
    a.send(&presence(&bob, "unsubscribed")).await;
    let (it, _) = expect_push(&mut a, &bob).await;
    assert_eq!(sub_of(&it), ("none", None));
    expect_presence(&mut b, &aj, Some("unavailable")).await;
    expect_presence(&mut b, &alice, Some("unsubscribed")).await;
    let (it, _) = expect_push(&mut b, &alice).await;
    assert_eq!(sub_of(&it), ("none", None));
    a.send(&xml("<presence><show>away</show></presence>")).await;
    assert!(foreign_presences(&mut b).await.is_empty());

    // Denying a request (§3.2 "deny"): the requester's ask is cleared.
    b.send(&presence(&alice, "subscribe")).await;
    expect_presence(&mut a, &bob, Some("subscribe")).await;
    a.send(&presence(&bob, "unsubscribed")).await;
    expect_presence(&mut b, &alice, Some("unsubscribed")).await;
    let it = roster_item(&mut b, &alice).await.unwrap();
    assert_eq!(sub_of(&it), ("none", None));
    // Items stay in both rosters (they were there before).
    assert!(roster_item(&mut a, &bob).await.is_some());
    srv.stop().await;
}

#[tokio::test]
async fn roster_remove_cancels_both_directions() {
    let srv = start_server(|_| {}).await;
    let alice = user(&srv, "alice").await;
    let bob = user(&srv, "bob").await;
    let mut a = online(&srv, &alice, "phone").await;
    let mut b = online(&srv, &bob, "pc").await;
    befriend(&mut a, &mut b).await;
    let aj = a.jid().to_string();

    let r = a
        .iq(roster_set(
            item(&bob, None, &[]).with_attr("subscription", "remove"),
        ))
        .await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    let (it, _) = expect_push(&mut a, &bob).await;
    assert_eq!(it.attr("subscription"), Some("remove"));
    expect_presence(&mut b, &alice, Some("unsubscribe")).await;
    expect_presence(&mut b, &aj, Some("unavailable")).await;
    expect_presence(&mut b, &alice, Some("unsubscribed")).await;
    let it = roster_item(&mut b, &alice).await.unwrap();
    assert_eq!(sub_of(&it), ("none", None));
    assert!(roster_item(&mut a, &bob).await.is_none());

    // Removing a request-only contact declines the request.
    let carol = user(&srv, "carol").await;
    let mut c = online(&srv, &carol, "x").await;
    c.send(&presence(&alice, "subscribe")).await;
    expect_presence(&mut a, &carol, Some("subscribe")).await;
    let r = a
        .iq(roster_set(
            item(&carol, None, &[]).with_attr("subscription", "remove"),
        ))
        .await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    expect_presence(&mut c, &alice, Some("unsubscribed")).await;
    assert_eq!(
        sub_of(&roster_item(&mut c, &alice).await.unwrap()),
        ("none", None)
    );
    srv.stop().await;
}

#[tokio::test]
async fn subscriptions_to_unknown_and_remote_contacts() {
    let srv = start_server(|_| {}).await;
    let alice = user(&srv, "alice").await;
    let mut a = online(&srv, &alice, "phone").await;

    // No such account here: the request is refused with unsubscribed.
    let ghost = "ghost@localhost";
    a.send(&presence(ghost, "subscribe")).await;
    let (it, _) = expect_push(&mut a, ghost).await;
    assert_eq!(sub_of(&it), ("none", Some("subscribe")));
    expect_presence(&mut a, ghost, Some("unsubscribed")).await;
    let (it, _) = expect_push(&mut a, ghost).await;
    assert_eq!(sub_of(&it), ("none", None));

    // Another domain (no server-to-server yet): an error, but the contact
    // can still be kept in the roster.
    let remote = "romeo@montague.example";
    a.send(&presence(remote, "subscribe").with_attr("id", "s1"))
        .await;
    let err = a
        .recv_matching(|e| e.name == "presence" && e.attr("id") == Some("s1"))
        .await;
    assert_eq!(err.attr("type"), Some("error"), "{err}");
    assert_eq!(
        stanza_error(&err).as_deref(),
        Some("remote-server-not-found")
    );
    let r = a.iq(roster_set(item(remote, Some("Romeo"), &[]))).await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    let it = roster_item(&mut a, remote).await.unwrap();
    assert_eq!(sub_of(&it), ("none", None));
    srv.stop().await;
}

// ---------------------------------------------------------------------------
// presence (RFC 6121 §4)
// ---------------------------------------------------------------------------

#[tokio::test]
async fn presence_broadcast_on_login_and_logout() {
    let srv = start_server(|_| {}).await;
    let alice = user(&srv, "alice").await;
    let bob = user(&srv, "bob").await;
    let carol = user(&srv, "carol").await;
    let mut a = online(&srv, &alice, "phone").await;
    let mut b = online(&srv, &bob, "pc").await;
    let mut c = online(&srv, &carol, "x").await;
    befriend(&mut a, &mut b).await;
    b.close().await;
    expect_presence(&mut a, &format!("{bob}/pc"), Some("unavailable")).await;

    // A second resource of alice comes online: the first one sees it, and
    // it gets the first one's presence and its own (§4.2.2).
    let mut a2 = interested(&srv, &alice, "laptop").await;
    let a2j = a2.jid().to_string();
    a2.send(&xml(
        "<presence><show>away</show>\
         <c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='https://example.org' ver='QgayPKawpkPSDYmwT/WM94uAlu0='/>\
         <x xmlns='vcard-temp:x:update'><photo>01b87fcd030b72895ff8e88db57ec525450f000d</photo></x>\
         </presence>",
    ))
    .await;
    let p = expect_presence(&mut a2, &a2j, None).await;
    assert_eq!(p.child_text("show", NS_CLIENT).as_deref(), Some("away"));
    expect_presence(&mut a2, a.jid(), None).await;
    let p = expect_presence(&mut a, &a2j, None).await;
    assert_eq!(p.attr("to"), Some(a.jid()));

    // bob logs in: both of alice's resources see him, he sees both of
    // them with their payloads untouched (XEP-0115, XEP-0153).
    let mut b = interested(&srv, &bob, "pc").await;
    let bj = b.jid().to_string();
    b.send(&xml(
        "<presence><status>back</status><priority>3</priority></presence>",
    ))
    .await;
    for x in [&mut a, &mut a2] {
        let p = expect_presence(x, &bj, None).await;
        assert_eq!(p.child_text("status", NS_CLIENT).as_deref(), Some("back"));
    }
    expect_presence(&mut b, a.jid(), None).await;
    let p = expect_presence(&mut b, &a2j, None).await;
    let caps = p
        .get_child("c", "http://jabber.org/protocol/caps")
        .expect("caps passed through");
    assert_eq!(caps.attr("ver"), Some("QgayPKawpkPSDYmwT/WM94uAlu0="));
    let photo = p
        .get_child("x", "vcard-temp:x:update")
        .and_then(|x| x.child_text("photo", "vcard-temp:x:update"));
    assert_eq!(
        photo.as_deref(),
        Some("01b87fcd030b72895ff8e88db57ec525450f000d")
    );

    // Logout by unavailable presence, then by closing the stream.
    a2.send(&xml(
        "<presence type='unavailable'><status>gone</status></presence>",
    ))
    .await;
    let p = expect_presence(&mut b, &a2j, Some("unavailable")).await;
    assert_eq!(p.child_text("status", NS_CLIENT).as_deref(), Some("gone"));
    expect_presence(&mut a, &a2j, Some("unavailable")).await;
    b.close().await;
    expect_presence(&mut a, &bj, Some("unavailable")).await;

    // carol, no contact of anyone, saw none of it.
    let leaked = foreign_presences(&mut c).await;
    assert!(
        leaked.is_empty(),
        "presence leaked to a non-contact: {leaked:?}"
    );
    srv.stop().await;
}

#[tokio::test]
async fn priority_routing_and_clamping() {
    let srv = start_server(|_| {}).await;
    let alice = user(&srv, "alice").await;
    let bob = user(&srv, "bob").await;
    let mut phone = interested(&srv, &alice, "phone").await;
    let mut laptop = interested(&srv, &alice, "laptop").await;
    let mut b = online(&srv, &bob, "pc").await;
    phone
        .send(&xml("<presence><priority>-1</priority></presence>"))
        .await;
    laptop
        .send(&xml("<presence><priority>300</priority></presence>"))
        .await;
    drain(&mut phone).await;
    drain(&mut laptop).await;
    let prio = |res: &str| {
        let j = jid::FullJid::new(&format!("{alice}/{res}")).unwrap();
        srv.state().router.session(&j).unwrap().priority()
    };
    assert_eq!(prio("phone"), -1);
    assert_eq!(prio("laptop"), 127);

    // A chat to the bare JID skips the negative-priority resource.
    b.send(&message(&alice, "hi")).await;
    laptop.recv_until(|e| e.name == "message").await;
    let seen = drain(&mut phone).await;
    assert!(
        !seen.iter().any(|e| e.name == "message"),
        "negative priority got a bare-JID message: {seen:?}"
    );

    // Garbage is priority 0.
    phone
        .send(&xml("<presence><priority>high</priority></presence>"))
        .await;
    drain(&mut phone).await;
    assert_eq!(prio("phone"), 0);
    srv.stop().await;
}

#[tokio::test]
async fn directed_presence_gets_unavailable_at_logout() {
    let srv = start_server(|_| {}).await;
    let alice = user(&srv, "alice").await;
    let carol = user(&srv, "carol").await;
    let dave = user(&srv, "dave").await;
    let mut a = online(&srv, &alice, "phone").await;
    let mut c = online(&srv, &carol, "x").await;
    let mut d = online(&srv, &dave, "y").await;
    let aj = a.jid().to_string();

    // Directed presence to two non-contacts (bare and full JID).
    a.send(&xml(&format!(
        "<presence to='{carol}'><status>for carol</status></presence>"
    )))
    .await;
    let p = expect_presence(&mut c, &aj, None).await;
    assert_eq!(
        p.child_text("status", NS_CLIENT).as_deref(),
        Some("for carol")
    );
    a.send(&xml(&format!("<presence to='{}'/>", d.jid()))).await;
    expect_presence(&mut d, &aj, None).await;

    // A broadcast update is not sent to them (§4.6).
    a.send(&xml("<presence><show>away</show></presence>")).await;
    drain(&mut a).await;
    assert!(foreign_presences(&mut c).await.is_empty());

    // dave is told unavailable directly: no second one at logout.
    a.send(&xml(&format!(
        "<presence type='unavailable' to='{}'/>",
        d.jid()
    )))
    .await;
    expect_presence(&mut d, &aj, Some("unavailable")).await;

    a.close().await;
    expect_presence(&mut c, &aj, Some("unavailable")).await;
    let seen = foreign_presences(&mut d).await;
    assert!(seen.is_empty(), "{seen:?}");
    srv.stop().await;
}

#[tokio::test]
async fn no_presence_leak_to_non_contacts() {
    let srv = start_server(|_| {}).await;
    let alice = user(&srv, "alice").await;
    let mallory = user(&srv, "mallory").await;
    let mut a = online(&srv, &alice, "phone").await;
    let mut m = online(&srv, &mallory, "m").await;

    // mallory asks; alice ignores the request.
    m.send(&presence(&alice, "subscribe")).await;
    expect_presence(&mut a, &mallory, Some("subscribe")).await;
    a.send(&xml("<presence><show>dnd</show></presence>")).await;
    // Probes from a non-subscriber are not answered (§4.3.2).
    m.send(&presence(&alice, "probe")).await;
    m.send(&presence(a.jid(), "probe")).await;
    let leaked = foreign_presences(&mut m).await;
    assert!(leaked.is_empty(), "{leaked:?}");

    // Still pending: redelivered at alice's next login, not in her roster.
    a.close().await;
    let mut a = online(&srv, &alice, "laptop").await;
    expect_presence(&mut a, &mallory, Some("subscribe")).await;
    assert!(roster_item(&mut a, &mallory).await.is_none());
    a.send(&xml("<presence type='unavailable'/>")).await;
    a.close().await;
    let leaked = foreign_presences(&mut m).await;
    assert!(leaked.is_empty(), "{leaked:?}");

    // A subscriber's probe is answered.
    let bob = user(&srv, "bob").await;
    let mut a = online(&srv, &alice, "phone").await;
    let mut b = online(&srv, &bob, "pc").await;
    befriend(&mut a, &mut b).await;
    b.send(&presence(&alice, "probe")).await;
    expect_presence(&mut b, a.jid(), None).await;
    srv.stop().await;
}
