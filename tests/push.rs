//! XEP-0357 push notifications, with a raw XEP-0114 component playing the
//! app server: a device that is offline, parked (XEP-0198) or not
//! acknowledging gets one coalesced push with the count and no body; an
//! active device gets none; a group message for an absent member pushes;
//! disable stops them; an app server's error removes the registration;
//! registrations survive a restart.

mod common;

use common::*;
use natter::config::Config;
use natter_xml::NS_CLIENT;
use std::time::Duration;

const APP: &str = "push.localhost";
const SECRET: &str = "app-server-secret";
const NS_PUSH: &str = "urn:xmpp:push:0";
const NS_PUBSUB: &str = "http://jabber.org/protocol/pubsub";
const NS_SM: &str = "urn:xmpp:sm:3";

fn with_app_server(c: &mut Config) {
    c.listen.component = "127.0.0.1:0".into();
    c.components.insert(
        APP.into(),
        natter::config::ComponentConfig {
            secret: SECRET.into(),
        },
    );
    c.push.coalesce_ms = 300;
}

fn enable(node: &str) -> Element {
    xml(&format!(
        "<iq type='set'><enable xmlns='{NS_PUSH}' jid='{APP}' node='{node}'>\
         <x xmlns='jabber:x:data' type='submit'>\
         <field var='FORM_TYPE'><value>http://jabber.org/protocol/pubsub#publish-options</value></field>\
         <field var='secret'><value>device-secret-{node}</value></field></x></enable></iq>"
    ))
}

/// The next push the app server gets: (node, form fields, whole iq).
async fn next_push(app: &mut Client) -> (String, Vec<(String, String)>, Element) {
    let iq = app.recv_until(|e| e.name == "iq").await;
    assert_eq!(iq.attr("type"), Some("set"), "{iq}");
    let pubsub = iq.get_child("pubsub", NS_PUBSUB).expect("pubsub");
    let publish = pubsub.get_child("publish", NS_PUBSUB).expect("publish");
    let form = publish
        .get_child("item", NS_PUBSUB)
        .and_then(|i| i.get_child("notification", NS_PUSH))
        .and_then(|n| n.get_child("x", "jabber:x:data"))
        .expect("summary form");
    let fields = form
        .children()
        .map(|f| {
            (
                f.attr("var").unwrap_or_default().to_string(),
                f.child_text("value", "jabber:x:data").unwrap_or_default(),
            )
        })
        .collect();
    (
        publish.attr("node").unwrap_or_default().to_string(),
        fields,
        iq,
    )
}

fn field<'a>(fields: &'a [(String, String)], var: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == var)
        .map(|(_, v)| v.as_str())
}

/// Answer a push as the app server.
async fn answer(app: &mut Client, iq: &Element, error: Option<&str>) {
    let (id, from, to) = (
        iq.attr("id").unwrap(),
        iq.attr("from").unwrap(),
        iq.attr("to").unwrap(),
    );
    let reply = match error {
        None => format!("<iq xmlns='jabber:component:accept' type='result' id='{id}' from='{to}' to='{from}'/>"),
        Some(cond) => format!(
            "<iq xmlns='jabber:component:accept' type='error' id='{id}' from='{to}' to='{from}'>\
             <error type='cancel'><{cond} xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>"
        ),
    };
    app.send_raw(reply.as_bytes()).await;
}

/// Nothing reaches the app server for a while.
async fn no_push(app: &mut Client, wait: Duration) {
    if let Ok(e) = tokio::time::timeout(wait, app.recv_until(|e| e.name == "iq")).await {
        panic!("unexpected push: {e}");
    }
}

#[tokio::test]
async fn an_offline_device_gets_one_push_per_burst_without_the_body() {
    let srv = start_server(with_app_server).await;
    let mut app = component_connect(component_addr(&srv), APP, SECRET).await;
    let (mut a, mut b) = srv.logged_in_pair().await;
    let alice = a.bare_jid().to_string();
    let res = a.iq(enable("phone-1")).await;
    assert_eq!(res.attr("type"), Some("result"), "{res}");
    a.close().await;
    for i in 0..20 {
        b.send(&message(&alice, &format!("secret text {i}"))).await;
    }
    let (node, fields, iq) = next_push(&mut app).await;
    assert_eq!(node, "phone-1");
    assert_eq!(iq.attr("from"), Some(alice.as_str()));
    assert_eq!(field(&fields, "FORM_TYPE"), Some("urn:xmpp:push:summary"));
    assert_eq!(field(&fields, "message-count"), Some("20"), "{iq}");
    assert_eq!(field(&fields, "last-message-sender"), Some(b.jid()));
    // Important, but the text stays private.
    assert_eq!(field(&fields, "last-message-body"), Some("New message"));
    assert!(!iq.to_string().contains("secret text"), "{iq}");
    // The app server's secret rides along as publish-options.
    assert!(iq.to_string().contains("device-secret-phone-1"), "{iq}");
    answer(&mut app, &iq, None).await;
    no_push(&mut app, Duration::from_millis(800)).await;
    // The next message, a while later: the count goes on.
    b.send(&message(&alice, "one more")).await;
    let (_, fields, iq) = next_push(&mut app).await;
    assert_eq!(field(&fields, "message-count"), Some("21"), "{iq}");
    answer(&mut app, &iq, None).await;
    // Receipts alone wake nobody.
    b.send(&xml(&format!(
        "<message to='{alice}'><received xmlns='urn:xmpp:receipts' id='x'/></message>"
    )))
    .await;
    no_push(&mut app, Duration::from_millis(800)).await;
    srv.assert_healthy().await;
}

#[tokio::test]
async fn an_active_device_gets_none_a_parked_or_silent_one_does() {
    let srv = start_server(|c| {
        with_app_server(c);
        c.c2s.ping_timeout_secs = 1;
    })
    .await;
    let mut app = component_connect(component_addr(&srv), APP, SECRET).await;
    let (mut a, mut b) = srv.logged_in_pair().await;
    let alice_full = a.jid().to_string();
    assert_eq!(a.iq(enable("n")).await.attr("type"), Some("result"));
    a.send(&xml(&format!("<enable xmlns='{NS_SM}' resume='true'/>")))
        .await;
    let enabled = a.recv_matching(|e| e.ns == NS_SM).await;
    assert!(enabled.is("enabled", NS_SM), "{enabled}");
    // Active and acknowledging: no push.
    b.send(&message(&alice_full, "hello")).await;
    a.recv_until(|e| e.name == "message").await;
    let r = a.recv_matching(|e| e.is("r", NS_SM)).await;
    assert!(r.is("r", NS_SM));
    a.send(&xml(&format!("<a xmlns='{NS_SM}' h='1'/>"))).await;
    no_push(&mut app, Duration::from_millis(1500)).await;
    // Silent (an app frozen with its socket open): the ack request goes
    // unanswered, the session parks, and the device gets a push.
    b.send(&message(&alice_full, "are you there")).await;
    a.recv_until(|e| e.name == "message").await;
    let (_, fields, iq) = next_push(&mut app).await;
    assert_eq!(field(&fields, "message-count"), Some("1"), "{iq}");
    answer(&mut app, &iq, None).await;
    // Parked: further messages push too (coalesced).
    drop(a);
    b.send(&message(&alice_full, "still there?")).await;
    let (_, fields, iq) = next_push(&mut app).await;
    assert_eq!(field(&fields, "message-count"), Some("2"), "{iq}");
    answer(&mut app, &iq, None).await;
    srv.assert_healthy().await;
}

#[tokio::test]
async fn disable_app_server_errors_and_restarts() {
    let srv = start_server(|c| {
        sqlite_only(c);
        with_app_server(c);
    })
    .await;
    let mut app = component_connect(component_addr(&srv), APP, SECRET).await;
    let (mut a, mut b) = srv.logged_in_pair().await;
    let alice = a.bare_jid().to_string();
    for node in ["one", "two"] {
        assert_eq!(a.iq(enable(node)).await.attr("type"), Some("result"));
    }
    // Bad requests are refused with a reason.
    let bad = a
        .iq(xml(&format!(
            "<iq type='set'><enable xmlns='{NS_PUSH}'/></iq>"
        )))
        .await;
    assert_eq!(stanza_error(&bad).as_deref(), Some("bad-request"), "{bad}");
    // Disabled from another session: "two" stops at once.
    let mut other = srv.login(&alice, "password", "desktop").await;
    let res = other
        .iq(xml(&format!(
            "<iq type='set'><disable xmlns='{NS_PUSH}' jid='{APP}' node='two'/></iq>"
        )))
        .await;
    assert_eq!(res.attr("type"), Some("result"), "{res}");
    other.close().await;
    a.close().await;
    b.send(&message(&alice, "m1")).await;
    let (node, _, iq) = next_push(&mut app).await;
    assert_eq!(node, "one");
    // The app server says "one" is gone: removed.
    answer(&mut app, &iq, Some("item-not-found")).await;
    no_push(&mut app, Duration::from_millis(800)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.send(&message(&alice, "m2")).await;
    no_push(&mut app, Duration::from_millis(1200)).await;

    // Registrations survive a restart.
    let mut a = srv.login(&alice, "password", "phone").await;
    assert_eq!(a.iq(enable("three")).await.attr("type"), Some("result"));
    a.close().await;
    let cfg = srv.state().config.as_ref().clone();
    let kept = srv.stop_keeping_store().await;
    let srv = start_server(|c| c.clone_from(&cfg)).await;
    let mut app = component_connect(component_addr(&srv), APP, SECRET).await;
    let mut b = srv.login(b.bare_jid(), "password", "again").await;
    b.send(&message(&alice, "after the restart")).await;
    let (node, _, _) = next_push(&mut app).await;
    assert_eq!(node, "three");
    b.close().await;
    srv.stop().await;
    drop(kept);
}

#[tokio::test]
async fn a_group_message_for_an_absent_member_pushes() {
    let srv = start_server(with_app_server).await;
    let mut app = component_connect(component_addr(&srv), APP, SECRET).await;
    let (mut a, mut b) = srv.logged_in_pair().await;
    let bob = b.bare_jid().to_string();
    assert_eq!(
        b.iq(enable("bobs-phone")).await.attr("type"),
        Some("result")
    );
    let room = "family@conference.localhost";
    a.send(&xml(&format!(
        "<presence to='{room}/alice'><x xmlns='http://jabber.org/protocol/muc'/></presence>"
    )))
    .await;
    a.recv_until(|e| e.name == "message" && e.get_child("subject", NS_CLIENT).is_some())
        .await;
    let res = a
        .iq(xml(&format!(
            "<iq type='set' to='{room}'><query xmlns='http://jabber.org/protocol/muc#admin'>\
             <item affiliation='member' jid='{bob}'/></query></iq>"
        )))
        .await;
    assert_eq!(res.attr("type"), Some("result"), "{res}");
    b.close().await;
    a.send(&xml(&format!(
        "<message to='{room}' type='groupchat'><body>dinner at 8</body></message>"
    )))
    .await;
    let (node, fields, iq) = next_push(&mut app).await;
    assert_eq!(node, "bobs-phone");
    assert_eq!(iq.attr("from"), Some(bob.as_str()));
    assert_eq!(field(&fields, "message-count"), Some("1"));
    srv.assert_healthy().await;
}
