//! Happy paths of client-to-server sessions against the real in-process
//! server: every transport, every SASL mechanism, resource binding, disco,
//! pings both ways, 1:1 messages, shutdown and in-band registration.

mod common;

use common::*;
use natter_sasl::Mechanism;
use natter_xml::{NS_CLIENT, NS_FRAMING};
use std::time::Duration;

/// alice and bob swap one message each way (addressed to full JIDs).
async fn exchange(a: &mut Client, b: &mut Client) {
    let (ja, jb) = (a.jid().to_string(), b.jid().to_string());
    a.send(&message(&jb, "hello bob")).await;
    let m = b.recv_until(|e| e.name == "message").await;
    assert_eq!(m.attr("from"), Some(ja.as_str()));
    assert_eq!(m.attr("to"), Some(jb.as_str()));
    assert_eq!(
        m.child_text("body", NS_CLIENT).as_deref(),
        Some("hello bob")
    );
    b.send(&message(&ja, "hi alice")).await;
    let m = a.recv_until(|e| e.name == "message").await;
    assert_eq!(m.attr("from"), Some(jb.as_str()));
    assert_eq!(m.child_text("body", NS_CLIENT).as_deref(), Some("hi alice"));
}

#[tokio::test]
async fn starttls_login() {
    let srv = start_server(|_| {}).await;
    let alice = srv.add_user("alice", "secret1").await;
    let mut c = Client::tcp_raw(srv.c2s).await;
    let f = c.open().await;
    // Before TLS: STARTTLS is required and no mechanism is offered.
    let st = f.get_child("starttls", NS_TLS).expect("starttls offered");
    assert!(st.get_child("required", NS_TLS).is_some(), "{f}");
    assert!(f.get_child("mechanisms", NS_SASL).is_none(), "{f}");
    c.starttls().await;
    let f = c.open().await;
    assert!(f.get_child("starttls", NS_TLS).is_none(), "{f}");
    assert!(c.mechanisms().contains(&"PLAIN".to_string()), "{f}");
    let jid = c.login(&alice, "secret1", "laptop").await;
    assert_eq!(jid, "alice@localhost/laptop");
    let bob = srv.add_user("bob", "secret2").await;
    let mut b = srv.login(&bob, "secret2", "phone").await;
    exchange(&mut c, &mut b).await;
    c.close().await;
    b.close().await;
    srv.stop().await;
}

#[tokio::test]
async fn direct_tls_login() {
    let srv = start_server(|_| {}).await;
    let alice = srv.add_user("alice", "secret1").await;
    let mut c = Client::connect_tls(srv.c2s_tls).await;
    let f = c.features.clone().unwrap();
    assert!(f.get_child("starttls", NS_TLS).is_none(), "{f}");
    let jid = c.login(&alice, "secret1", "phone").await;
    assert_eq!(jid, "alice@localhost/phone");
    let r = c.iq(ping_iq(None)).await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    c.close().await;
    srv.stop().await;
}

#[tokio::test]
async fn websocket_login() {
    let srv = start_server(|_| {}).await;
    let alice = srv.add_user("alice", "secret1").await;
    let bob = srv.add_user("bob", "secret2").await;
    let mut w = Client::ws_raw(srv.http).await;
    w.send_header("localhost").await;
    let attrs = w.expect_header().await;
    // RFC 7395 §3.3.2: the server's <open/> carries from, id and version.
    let get = |k: &str| attrs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(get("from").as_deref(), Some("localhost"));
    assert_eq!(get("version").as_deref(), Some("1.0"));
    assert!(get("id").is_some_and(|i| !i.is_empty()));
    let f = w.recv().await;
    assert!(f.is("features", natter_xml::NS_STREAM), "{f}");
    w.features = Some(f);
    assert!(w.mechanisms().contains(&"SCRAM-SHA-256".to_string()));
    let jid = w.login(&alice, "secret1", "browser").await;
    assert_eq!(jid, "alice@localhost/browser");
    let mut b = srv.login(&bob, "secret2", "phone").await;
    exchange(&mut w, &mut b).await;
    // <close/> is answered with <close/> (RFC 7395 §3.6).
    w.send_raw(format!("<close xmlns='{NS_FRAMING}'/>").as_bytes())
        .await;
    match w.next_event().await {
        Event::Close => {}
        other => panic!("expected <close/>, got {other:?}"),
    }
    b.close().await;
    srv.stop().await;
}

async fn login_with_mechanism(mech: Mechanism) {
    let srv = start_server(|_| {}).await;
    let alice = srv.add_user("alice", "secret1").await;
    let mut c = Client::connect_tls(srv.c2s_tls).await;
    assert!(
        c.mechanisms().contains(&mech.name().to_string()),
        "{} not offered: {:?}",
        mech.name(),
        c.mechanisms()
    );
    let jid = c.login_with(mech, &alice, "secret1", "r").await;
    assert_eq!(jid, "alice@localhost/r");
    // A wrong password fails with not-authorized on the same mechanism.
    let mut bad = Client::connect_tls(srv.c2s_tls).await;
    assert_eq!(
        bad.authenticate(mech, &alice, "wrong-password", None).await,
        Err("not-authorized".to_string())
    );
    c.close().await;
    srv.stop().await;
}

#[tokio::test]
async fn scram_sha256_login() {
    login_with_mechanism(Mechanism::ScramSha256).await;
}

#[tokio::test]
async fn scram_sha1_login() {
    login_with_mechanism(Mechanism::ScramSha1).await;
}

#[tokio::test]
async fn scram_sha256_plus_login_with_tls_exporter() {
    login_with_mechanism(Mechanism::ScramSha256Plus).await;
}

#[tokio::test]
async fn plain_login() {
    login_with_mechanism(Mechanism::Plain).await;
}

#[tokio::test]
async fn scram_plus_with_wrong_binding_data_is_refused() {
    // Channel binding must actually bind: data from another TLS connection fails.
    let srv = start_server(|_| {}).await;
    let alice = srv.add_user("alice", "secret1").await;
    let other = Client::connect_tls(srv.c2s_tls).await;
    let mut c = Client::connect_tls(srv.c2s_tls).await;
    let foreign = other.tls_exporter().unwrap();
    assert_ne!(foreign.data, c.tls_exporter().unwrap().data);
    let mut scram = natter_sasl::client::ScramClient::new(
        natter_sasl::Hash::Sha256,
        "alice",
        "secret1",
        None,
        natter_sasl::client::ClientBinding::Use(foreign),
    );
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    c.send(
        &Element::new("auth", NS_SASL)
            .with_attr("mechanism", "SCRAM-SHA-256-PLUS")
            .with_text(b64.encode(scram.client_first())),
    )
    .await;
    let ch = c.recv().await;
    assert!(ch.is("challenge", NS_SASL), "{ch}");
    let fin = scram.client_final(&b64.decode(ch.text()).unwrap()).unwrap();
    c.send(&Element::new("response", NS_SASL).with_text(b64.encode(fin)))
        .await;
    let r = c.recv().await;
    assert!(r.is("failure", NS_SASL), "{r}");
    assert!(r.get_child("not-authorized", NS_SASL).is_some(), "{r}");
    // The right binding on the same account works.
    let mut ok = Client::connect_tls(srv.c2s_tls).await;
    ok.login_with(Mechanism::ScramSha256Plus, &alice, "secret1", "r")
        .await;
    srv.stop().await;
}

#[tokio::test]
async fn server_generates_resource_when_none_requested() {
    let srv = start_server(|_| {}).await;
    let alice = srv.add_user("alice", "secret1").await;
    let mut c1 = srv.login(&alice, "secret1", "").await;
    let mut c2 = srv.login(&alice, "secret1", "").await;
    let (j1, j2) = (c1.jid().to_string(), c2.jid().to_string());
    for j in [&j1, &j2] {
        let res = j
            .strip_prefix("alice@localhost/")
            .expect("full JID of alice");
        assert!(!res.is_empty(), "{j}");
    }
    assert_ne!(j1, j2, "generated resources must differ");
    // Both sessions are live and addressable.
    exchange(&mut c1, &mut c2).await;
    srv.stop().await;
}

#[tokio::test]
async fn two_resources_of_one_account_at_once() {
    let srv = start_server(|_| {}).await;
    let alice = srv.add_user("alice", "secret1").await;
    let bob = srv.add_user("bob", "secret2").await;
    let mut phone = srv.login(&alice, "secret1", "phone").await;
    let mut laptop = srv.login(&alice, "secret1", "laptop").await;
    let mut b = srv.login(&bob, "secret2", "x").await;
    // Each resource is reachable on its own full JID.
    exchange(&mut phone, &mut b).await;
    exchange(&mut laptop, &mut b).await;
    exchange(&mut phone, &mut laptop).await;
    let bare: jid::BareJid = alice.parse().unwrap();
    assert_eq!(srv.state().router.resources(&bare).len(), 2);
    phone.close().await;
    laptop.close().await;
    b.close().await;
    srv.stop().await;
}

#[tokio::test]
async fn rebinding_a_resource_replaces_the_old_session() {
    let srv = start_server(|_| {}).await;
    let alice = srv.add_user("alice", "secret1").await;
    let bob = srv.add_user("bob", "secret2").await;
    let mut old = srv.login(&alice, "secret1", "phone").await;
    let mut new = srv.login(&alice, "secret1", "phone").await;
    assert_eq!(new.jid(), "alice@localhost/phone");
    assert_eq!(old.expect_stream_error().await, "conflict");
    // The new session owns the JID now.
    let mut b = srv.login(&bob, "secret2", "x").await;
    exchange(&mut new, &mut b).await;
    let bare: jid::BareJid = alice.parse().unwrap();
    assert_eq!(srv.state().router.resources(&bare).len(), 1);
    srv.stop().await;
}

#[tokio::test]
async fn disco_info_lists_exactly_the_modules_features() {
    let srv = start_server(|_| {}).await;
    let alice = srv.add_user("alice", "secret1").await;
    let mut c = srv.login(&alice, "secret1", "r").await;
    let r = c
        .iq(xml(&format!(
            "<iq type='get' to='localhost'><query xmlns='{NS_DISCO_INFO}'/></iq>"
        )))
        .await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    assert_eq!(r.attr("from"), Some("localhost"));
    let q = r.get_child("query", NS_DISCO_INFO).expect("query");
    // Identities are sorted: PEP's pubsub/pep comes before server/im.
    let id = q
        .children()
        .find(|e| e.is("identity", NS_DISCO_INFO) && e.attr("category") == Some("server"))
        .unwrap_or_else(|| panic!("no server identity: {q}"));
    assert_eq!(id.attr("type"), Some("im"));
    let mut listed: Vec<String> = q
        .children()
        .filter(|e| e.name == "feature")
        .map(|e| e.attr("var").unwrap().to_string())
        .collect();
    let n = listed.len();
    listed.sort();
    listed.dedup();
    assert_eq!(listed.len(), n, "duplicate features: {q}");
    let mut declared: Vec<String> = srv
        .state()
        .modules
        .features()
        .iter()
        .map(|s| s.to_string())
        .collect();
    declared.sort();
    assert_eq!(listed, declared);
    for must in [
        NS_DISCO_INFO,
        NS_PING,
        NS_REGISTER,
        "urn:xmpp:carbons:2",
        "jabber:iq:version",
    ] {
        assert!(listed.iter().any(|f| f == must), "{must} missing: {q}");
    }
    // No `to`: RFC 6120 §10.3.3, the account answers.
    let r = c
        .iq(xml(&format!(
            "<iq type='get'><query xmlns='{NS_DISCO_INFO}'/></iq>"
        )))
        .await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    srv.stop().await;
}

#[tokio::test]
async fn client_pings_server() {
    let srv = start_server(|_| {}).await;
    let alice = srv.add_user("alice", "secret1").await;
    let mut c = srv.login(&alice, "secret1", "r").await;
    for to in [None, Some("localhost")] {
        let r = c.iq(ping_iq(to)).await;
        assert_eq!(r.attr("type"), Some("result"), "{r}");
        assert_eq!(r.attr("to"), Some(c.jid()));
        assert_eq!(r.children().count(), 0, "{r}");
    }
    srv.stop().await;
}

#[tokio::test]
async fn server_pings_idle_client_and_drops_it_when_unanswered() {
    let srv = start_server(|c| {
        c.c2s.ping_interval_secs = 1;
        c.c2s.ping_timeout_secs = 1;
    })
    .await;
    let alice = srv.add_user("alice", "secret1").await;
    let mut c = srv.login(&alice, "secret1", "r").await;
    // First ping: answer it.
    let p = c.recv().await;
    assert_eq!(p.name, "iq");
    assert_eq!(p.attr("type"), Some("get"));
    assert_eq!(p.attr("from"), Some("localhost"));
    assert_eq!(p.attr("to"), Some(c.jid()));
    assert!(p.get_child("ping", NS_PING).is_some(), "{p}");
    let pong = Element::new("iq", NS_CLIENT)
        .with_attr("type", "result")
        .with_attr("id", p.attr("id").unwrap())
        .with_attr("to", "localhost");
    c.send(&pong).await;
    // Answered: the session lives on and is pinged again later.
    let p2 = c.recv().await;
    assert!(p2.get_child("ping", NS_PING).is_some(), "{p2}");
    assert_ne!(p2.attr("id"), p.attr("id"));
    // Not answered: dropped with connection-timeout.
    assert_eq!(c.expect_stream_error().await, "connection-timeout");
    let bare: jid::BareJid = alice.parse().unwrap();
    // The session leaves the router once its task has finished.
    for _ in 0..100 {
        if srv.state().router.resources(&bare).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(srv.state().router.resources(&bare).is_empty());
    srv.stop().await;
}

#[tokio::test]
async fn message_from_is_stamped_by_the_server() {
    let srv = start_server(|_| {}).await;
    let (mut a, mut b) = srv.logged_in_pair().await;
    let to = b.jid().to_string();
    let mut m = message(&to, "who am I?");
    m.set_attr("from", "mallory@localhost/forged");
    a.send(&m).await;
    let got = b.recv_until(|e| e.name == "message").await;
    assert_eq!(got.attr("from"), Some(a.jid()));
    assert_eq!(got.attr("id"), m.attr("id"));
    assert_eq!(
        got.child_text("body", NS_CLIENT).as_deref(),
        Some("who am I?")
    );
    srv.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_closes_every_stream_with_system_shutdown() {
    let srv = start_server(|_| {}).await;
    let alice = srv.add_user("alice", "secret1").await;
    let mut tls = srv.login(&alice, "secret1", "tls").await;
    let mut st = Client::connect_starttls(srv.c2s).await;
    st.login(&alice, "secret1", "starttls").await;
    let mut ws = Client::connect_ws(srv.http).await;
    ws.login(&alice, "secret1", "ws").await;
    // And one that has not authenticated yet.
    let mut pre = Client::connect_tls(srv.c2s_tls).await;
    let stop = tokio::spawn(srv.stop());
    for c in [&mut tls, &mut st, &mut ws, &mut pre] {
        // <stream:error><system-shutdown/></stream:error> then a clean
        // </stream:stream> (WebSocket: <close/>), not just a dropped socket.
        let err = loop {
            match c.next_event().await {
                Event::Stanza(e) if e.is("error", natter_xml::NS_STREAM) => break e,
                Event::Stanza(_) => continue,
                other => panic!("[{}] expected a stream error, got {other:?}", c.kind),
            }
        };
        assert_eq!(
            stream_error_condition(&err),
            "system-shutdown",
            "{}",
            c.kind
        );
        match c.next_event().await {
            Event::Close => {}
            other => panic!("[{}] expected </stream:stream>, got {other:?}", c.kind),
        }
    }
    tokio::time::timeout(Duration::from_secs(10), stop)
        .await
        .expect("shutdown finishes")
        .unwrap();
}

#[tokio::test]
async fn in_band_registration_password_change_and_removal() {
    let srv = start_server(|_| {}).await;
    // XEP-0077 before authentication.
    let mut c = Client::connect_tls(srv.c2s_tls).await;
    let f = c.features.clone().unwrap();
    assert!(
        f.get_child("register", "http://jabber.org/features/iq-register")
            .is_some(),
        "{f}"
    );
    let form = c
        .iq(xml(&format!(
            "<iq type='get'><query xmlns='{NS_REGISTER}'/></iq>"
        )))
        .await;
    assert_eq!(form.attr("type"), Some("result"), "{form}");
    let q = form.get_child("query", NS_REGISTER).unwrap();
    assert!(q.get_child("username", NS_REGISTER).is_some(), "{q}");
    assert!(q.get_child("password", NS_REGISTER).is_some(), "{q}");
    let reg = |user: &str, pw: &str| {
        xml(&format!(
            "<iq type='set'><query xmlns='{NS_REGISTER}'><username>{user}</username>\
             <password>{pw}</password></query></iq>"
        ))
    };
    let r = c.iq(reg("carol", "first-pass")).await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    // Taken names and short passwords are refused.
    let r = c.iq(reg("carol", "another-pass")).await;
    assert_eq!(stanza_error(&r).as_deref(), Some("conflict"), "{r}");
    let r = c.iq(reg("dave", "x")).await;
    assert_eq!(stanza_error(&r).as_deref(), Some("not-acceptable"), "{r}");
    // The same connection logs in with the new account.
    assert_eq!(
        c.login("carol@localhost", "first-pass", "r").await,
        "carol@localhost/r"
    );

    // Password change.
    let r = c
        .iq(xml(&format!(
            "<iq type='set'><query xmlns='{NS_REGISTER}'><username>carol</username>\
             <password>second-pass</password></query></iq>"
        )))
        .await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    let mut old = Client::connect_tls(srv.c2s_tls).await;
    assert_eq!(
        old.authenticate(Mechanism::ScramSha256, "carol", "first-pass", None)
            .await,
        Err("not-authorized".into())
    );
    let mut other = srv.login("carol", "second-pass", "other").await;

    // Removal: result first, then every session of the account ends.
    let r = c
        .iq(xml(&format!(
            "<iq type='set'><query xmlns='{NS_REGISTER}'><remove/></query></iq>"
        )))
        .await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    assert_eq!(c.expect_stream_error().await, "not-authorized");
    assert_eq!(other.expect_stream_error().await, "not-authorized");
    let mut gone = Client::connect_tls(srv.c2s_tls).await;
    assert_eq!(
        gone.authenticate(Mechanism::ScramSha256, "carol", "second-pass", None)
            .await,
        Err("not-authorized".into())
    );
    srv.stop().await;
}
