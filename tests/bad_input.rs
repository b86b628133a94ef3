//! Hostile and broken input. Each test is a regression test for a class of
//! bug real XMPP servers shipped; each asserts the exact stream or stanza
//! error, and that the server still serves everyone else afterwards
//! (`assert_healthy`: two fresh accounts log in and exchange a message).

mod common;

use common::*;
use natter_sasl::Mechanism;
use natter_xml::{NS_CLIENT, NS_FRAMING, NS_STREAM};
use std::net::IpAddr;
use std::time::Duration;

const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
     xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>";

/// A logged-in client over direct TLS for a fresh account.
async fn logged_in(srv: &TestServer, local: &str) -> Client {
    let jid = srv.add_user(local, "password").await;
    srv.login(&jid, "password", "res").await
}

/// Send `bytes` on a fresh pre-auth TCP stream (after the header) and
/// return the stream error condition.
async fn preauth_error(srv: &TestServer, bytes: &[u8]) -> String {
    let mut c = Client::connect_tls(srv.c2s_tls).await;
    c.send_raw(bytes).await;
    c.expect_stream_error().await
}

/// Send `bytes` on a bound session and return the stream error condition.
async fn bound_error(srv: &TestServer, local: &str, bytes: &[u8]) -> String {
    let mut c = logged_in(srv, local).await;
    c.send_raw(bytes).await;
    c.expect_stream_error().await
}

// ---------------------------------------------------------------------------
// Malformed XML
// ---------------------------------------------------------------------------

#[tokio::test]
async fn malformed_xml_is_not_well_formed() {
    let srv = start_server(|_| {}).await;
    let cases: &[&[u8]] = &[
        b"<message><body>x</message>",
        b"<message to='a@localhost' to='b@localhost'/>",
        b"<message to=unquoted/>",
        b"<a:message xmlns='jabber:client'/>",
        b"<message><body>x</body></message></stream:wrong>",
    ];
    for (i, bytes) in cases.iter().enumerate() {
        assert_eq!(
            bound_error(&srv, &format!("m{i}"), bytes).await,
            "not-well-formed",
            "{}",
            String::from_utf8_lossy(bytes)
        );
    }
    assert_eq!(
        preauth_error(&srv, b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl'></x>").await,
        "not-well-formed"
    );
    srv.assert_healthy().await;
    srv.stop().await;
}

#[tokio::test]
async fn invalid_utf8_is_not_well_formed() {
    let srv = start_server(|_| {}).await;
    let (mut a, mut b) = srv.logged_in_pair().await;
    // Zoom (CVE-2022-25235 class): a lead byte swallowing the next '<' must
    // not make the server and the recipient disagree about where markup is.
    // Overlong '<' (C0 BC), lone continuation byte, truncated sequence.
    for bad in [&b"\xEB<"[..], b"\xC0\xBC", b"\x80", b"\xE2\x82", b"\xFF"] {
        let mut raw = format!("<message to='{}' type='chat' id='u'><body>x", b.jid()).into_bytes();
        raw.extend_from_slice(bad);
        raw.extend_from_slice(b"</body></message>");
        let mut c = logged_in(&srv, &format!("u{}", bad[0])).await;
        c.send_raw(&raw).await;
        assert_eq!(c.expect_stream_error().await, "not-well-formed", "{bad:?}");
    }
    // Nothing reached bob.
    let got = b.sync().await;
    assert!(got.is_empty(), "{got:?}");
    // Invalid UTF-8 in the stream header.
    let mut c = Client::tcp_raw(srv.c2s).await;
    c.send_raw(
        b"<?xml version='1.0'?><stream:stream xmlns:stream='http://etherx.jabber.org/streams' \
          to='local\xFFhost'>",
    )
    .await;
    assert_eq!(c.expect_stream_error().await, "not-well-formed");
    a.close().await;
    srv.assert_healthy().await;
    srv.stop().await;
}

#[tokio::test]
async fn illegal_xml_characters_are_not_well_formed() {
    let srv = start_server(|_| {}).await;
    for (i, ch) in ["\u{0}", "\u{c}", "\u{1b}", "&#0;", "&#12;", "&#xFFFE;"]
        .iter()
        .enumerate()
    {
        let raw = format!("<message to='x@localhost'><body>a{ch}b</body></message>");
        assert_eq!(
            bound_error(&srv, &format!("c{i}"), raw.as_bytes()).await,
            "not-well-formed",
            "{ch:?}"
        );
        let raw = format!("<iq type='get' id='a{ch}'/>");
        assert_eq!(
            preauth_error(&srv, raw.as_bytes()).await,
            "not-well-formed",
            "{ch:?} in an attribute"
        );
    }
    srv.assert_healthy().await;
    srv.stop().await;
}

/// Billion laughs, before the stream header (TCP) and as the WebSocket
/// `<open/>` frame (Prosody CVE-2022-0217), and entity references inside
/// a stream.
#[tokio::test]
async fn doctype_and_entity_bombs_are_restricted_xml() {
    let srv = start_server(|_| {}).await;
    let dtd = "<!DOCTYPE lolz [<!ENTITY lol 'lol'>\
               <!ENTITY lol2 '&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;'>\
               <!ENTITY lol3 '&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;'>]>";
    // TCP: DTD before <stream:stream>.
    let mut c = Client::tcp_raw(srv.c2s).await;
    c.send_raw(
        format!(
            "<?xml version='1.0'?>{dtd}<stream:stream xmlns='jabber:client' \
             xmlns:stream='{NS_STREAM}' to='localhost' version='1.0'>"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(c.expect_stream_error().await, "restricted-xml");
    // Direct TLS, same.
    let mut c = Client::tls_raw(srv.c2s_tls).await;
    c.send_raw(format!("{dtd}{HEADER}").as_bytes()).await;
    assert_eq!(c.expect_stream_error().await, "restricted-xml");
    // WebSocket: the DTD in the <open/> frame.
    let mut w = Client::ws_raw(srv.http).await;
    w.send_raw(
        format!("{dtd}<open xmlns='{NS_FRAMING}' to='localhost' version='1.0'>&lol3;</open>")
            .as_bytes(),
    )
    .await;
    assert_eq!(w.expect_stream_error().await, "restricted-xml");
    // WebSocket: after a good <open/>, a DTD in a stanza frame.
    let mut w = Client::connect_ws(srv.http).await;
    w.send_raw(format!("{dtd}<message xmlns='jabber:client'>&lol3;</message>").as_bytes())
        .await;
    assert_eq!(w.expect_stream_error().await, "restricted-xml");
    // Inside an open stream: undeclared entities, a DTD, a PI, a comment.
    assert_eq!(
        bound_error(&srv, "e1", b"<message><body>&lol3;</body></message>").await,
        "restricted-xml"
    );
    for (i, bytes) in [
        dtd.as_bytes(),
        b"<?php evil() ?>",
        b"<message><!-- hidden --></message>",
    ]
    .iter()
    .enumerate()
    {
        assert_eq!(
            bound_error(&srv, &format!("e{}", i + 2), bytes).await,
            "restricted-xml",
            "{}",
            String::from_utf8_lossy(bytes)
        );
    }
    srv.assert_healthy().await;
    srv.stop().await;
}

// ---------------------------------------------------------------------------
// Stanza smuggling
// ---------------------------------------------------------------------------

/// Zoom 2022 (CVE-2022-25235 class): escaped markup in a body must reach
/// the recipient as text, re-escaped, never as a second stanza — over TCP
/// and over WebSocket (each transport has its own serializer call).
#[tokio::test]
async fn escaped_markup_is_delivered_as_text_not_as_a_stanza() {
    let srv = start_server(|_| {}).await;
    let alice = srv.add_user("alice", "password").await;
    let bob = srv.add_user("bob", "password").await;
    let mut a = srv.login(&alice, "password", "a").await;
    let mut b_tls = srv.login(&bob, "password", "tls").await;
    let mut b_ws = Client::connect_ws(srv.http).await;
    b_ws.login(&bob, "password", "ws").await;
    let payload = "</body></message><message from='admin@localhost' to='bob@localhost/tls' \
                   type='chat'><body>smuggled</body></message><message><body>]]>&amp;'\"";
    for b in [&mut b_tls, &mut b_ws] {
        let to = b.jid().to_string();
        // Escaped on the wire, as a client library would write it.
        let mut raw = String::new();
        natter_xml::escape_text(payload, &mut raw);
        let id_payload = "x' from='admin@localhost";
        let mut id = String::new();
        natter_xml::escape_attr(id_payload, &mut id);
        a.send_raw(
            format!("<message to='{to}' type='chat' id='{id}'><body>{raw}</body></message>")
                .as_bytes(),
        )
        .await;
        let m = b.recv().await;
        assert_eq!(m.name, "message", "{m}");
        assert_eq!(m.attr("from"), Some(a.jid()));
        assert_eq!(m.attr("id"), Some(id_payload));
        assert_eq!(m.child_text("body", NS_CLIENT).as_deref(), Some(payload));
        // The body, and the server's own XEP-0359 stanza-id (the archive's).
        let ours = |c: &Element| c.is("stanza-id", "urn:xmpp:sid:0") && c.attr("by") == Some(&bob);
        assert_eq!(m.children().filter(|c| !ours(c)).count(), 1, "{m}");
        // And nothing else arrived.
        let more = b.sync().await;
        assert!(more.is_empty(), "[{}] smuggled stanza: {more:?}", b.kind);
    }
    srv.stop().await;
}

// ---------------------------------------------------------------------------
// Resource limits
// ---------------------------------------------------------------------------

#[tokio::test]
async fn oversized_stanzas_are_policy_violations_with_a_smaller_preauth_limit() {
    let srv = start_server(|c| {
        c.limits.max_stanza_bytes_preauth = 2048;
        c.limits.max_stanza_bytes = 16 * 1024;
    })
    .await;
    let big = |n: usize| {
        format!(
            "<message to='x@localhost'><body>{}</body></message>",
            "a".repeat(n)
        )
    };
    // Pre-auth: 4 KiB is too much on every transport.
    assert_eq!(
        preauth_error(&srv, big(4096).as_bytes()).await,
        "policy-violation"
    );
    let mut c = Client::connect_starttls(srv.c2s).await;
    c.send_raw(big(4096).as_bytes()).await;
    assert_eq!(c.expect_stream_error().await, "policy-violation");
    let mut w = Client::connect_ws(srv.http).await;
    w.send_raw(
        big(4096)
            .replace("<message", "<message xmlns='jabber:client'")
            .as_bytes(),
    )
    .await;
    assert_eq!(w.expect_stream_error().await, "policy-violation");
    // A huge attribute value pre-auth.
    let attr = format!("<iq type='get' id='{}'/>", "i".repeat(10_000));
    assert_eq!(
        preauth_error(&srv, attr.as_bytes()).await,
        "policy-violation"
    );
    // A stream header that never ends.
    let mut c = Client::tcp_raw(srv.c2s).await;
    c.send_raw(
        format!(
            "<stream:stream xmlns:stream='{NS_STREAM}' to='localhost' x='{}",
            "y".repeat(8192)
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(c.expect_stream_error().await, "policy-violation");

    // After auth, 4 KiB is fine ...
    let (mut a, mut b) = srv.logged_in_pair().await;
    let body = "b".repeat(4096);
    a.send(&message(b.jid(), &body)).await;
    let m = b.recv().await;
    assert_eq!(
        m.child_text("body", NS_CLIENT).as_deref(),
        Some(body.as_str())
    );
    // ... over WebSocket too ...
    let wj = srv.add_user("wsuser", "password").await;
    let mut w = Client::connect_ws(srv.http).await;
    w.login(&wj, "password", "w").await;
    w.send(&message(b.jid(), &body)).await;
    let m = b.recv().await;
    assert_eq!(
        m.child_text("body", NS_CLIENT).as_deref(),
        Some(body.as_str())
    );
    // ... and 20 KiB is not; b got nothing of it.
    a.send(&message(b.jid(), &"c".repeat(20 * 1024))).await;
    assert_eq!(a.expect_stream_error().await, "policy-violation");
    w.send(&message(b.jid(), &"c".repeat(20 * 1024))).await;
    assert_eq!(w.expect_stream_error().await, "policy-violation");
    // A WebSocket frame far over the limit is cut off by the WebSocket layer.
    let mut w = Client::connect_ws(srv.http).await;
    w.login(&wj, "password", "w2").await;
    w.send(&message(b.jid(), &"c".repeat(64 * 1024))).await;
    w.expect_closed().await;
    let got = b.sync().await;
    assert!(got.is_empty(), "{got:?}");
    srv.assert_healthy().await;
    srv.stop().await;
}

/// Issue 9 (memory amplification): a 240 KB stanza of 60,000 empty
/// elements fits the byte limit but would cost ~18 MB parsed. It is
/// refused while it is parsed (at `limits.max_elements`), over TCP and
/// WebSocket, and reaches nobody; a stanza at the limit still goes through.
/// (Server memory under this attack is measured by bench/hostile-memory.)
#[tokio::test]
async fn element_heavy_stanza_is_refused_while_parsed() {
    let srv = start_server(|_| {}).await;
    let (mut a, mut b) = srv.logged_in_pair().await;
    let heavy = format!(
        "<message to='{}' type='chat'>{}</message>",
        b.jid(),
        "<a/>".repeat(60_000)
    );
    assert!(heavy.len() < srv.state().config.limits.max_stanza_bytes);
    a.send_raw(heavy.as_bytes()).await;
    assert_eq!(a.expect_stream_error().await, "policy-violation");
    let wj = srv.add_user("heavy-ws", "password").await;
    let mut w = Client::connect_ws(srv.http).await;
    w.login(&wj, "password", "w").await;
    w.send_raw(heavy.as_bytes()).await;
    assert_eq!(w.expect_stream_error().await, "policy-violation");
    assert!(b.sync().await.is_empty());
    // At the limit (the stanza and its children) it is delivered.
    let max = srv.state().config.limits.max_elements;
    let mut c = logged_in(&srv, "heavy-ok").await;
    c.send_raw(
        format!(
            "<message to='{}' type='chat'>{}</message>",
            b.jid(),
            "<a/>".repeat(max - 1)
        )
        .as_bytes(),
    )
    .await;
    let m = b.recv_until(|e| e.name == "message").await;
    assert_eq!(m.children().filter(|c| c.name == "a").count(), max - 1);
    srv.assert_healthy().await;
    srv.stop().await;
}

#[tokio::test]
async fn too_many_attributes_and_too_deep_nesting_are_policy_violations() {
    let srv = start_server(|c| {
        c.limits.max_attrs = 10;
        c.limits.max_depth = 8;
    })
    .await;
    let attrs: String = (0..20).map(|i| format!(" a{i}='v'")).collect();
    let many = format!("<message to='x@localhost'><x xmlns='urn:x'{attrs}/></message>");
    assert_eq!(
        bound_error(&srv, "a1", many.as_bytes()).await,
        "policy-violation"
    );
    assert_eq!(
        preauth_error(&srv, format!("<iq{attrs}/>").as_bytes()).await,
        "policy-violation"
    );
    // Ten attributes are still fine.
    let (mut a, mut b) = srv.logged_in_pair().await;
    let ok_attrs: String = (0..10).map(|i| format!(" a{i}='v'")).collect();
    a.send_raw(
        format!(
            "<message to='{}' type='chat'><x xmlns='urn:x'{ok_attrs}/></message>",
            b.jid()
        )
        .as_bytes(),
    )
    .await;
    let m = b.recv().await;
    assert_eq!(m.get_child("x", "urn:x").unwrap().attrs.len(), 10);
    // Depth: the stanza is level 1; 8 levels pass, 9 do not.
    let bj = b.jid().to_string();
    let nest = |n: usize| {
        let mut s = format!("<message to='{bj}' type='chat'>");
        for _ in 1..n {
            s.push_str("<x xmlns='urn:x'>");
        }
        for _ in 1..n {
            s.push_str("</x>");
        }
        s.push_str("</message>");
        s
    };
    a.send_raw(nest(8).as_bytes()).await;
    let m = b.recv().await;
    assert!(m.get_child("x", "urn:x").is_some(), "{m}");
    a.send_raw(nest(9).as_bytes()).await;
    assert_eq!(a.expect_stream_error().await, "policy-violation");
    // Deep nesting before authentication, and in a WebSocket frame.
    assert_eq!(
        preauth_error(&srv, "<x>".repeat(1000).as_bytes()).await,
        "policy-violation"
    );
    let mut w = Client::connect_ws(srv.http).await;
    w.send_raw(format!("<x xmlns='urn:x'>{}", "<x>".repeat(100)).as_bytes())
        .await;
    assert_eq!(w.expect_stream_error().await, "policy-violation");
    let got = b.sync().await;
    assert!(got.is_empty(), "{got:?}");
    srv.assert_healthy().await;
    srv.stop().await;
}

// ---------------------------------------------------------------------------
// STARTTLS
// ---------------------------------------------------------------------------

/// CVE-2011-1431 class (Postfix, many XMPP servers): bytes pipelined after
/// `<starttls/>` in the same TCP write were processed as if they had come
/// over TLS. Here they would register an account "pwned" (registration
/// is only allowed over TLS).
#[tokio::test]
async fn bytes_pipelined_after_starttls_are_discarded() {
    let srv = start_server(|_| {}).await;
    let mut c = Client::tcp_raw(srv.c2s).await;
    c.open().await;
    let register = format!(
        "<iq type='set' id='evil'><query xmlns='{NS_REGISTER}'>\
         <username>pwned</username><password>pwned-password</password></query></iq>"
    );
    c.send_raw(format!("<starttls xmlns='{NS_TLS}'/>{register}").as_bytes())
        .await;
    let p = c.recv().await;
    assert!(p.is("proceed", NS_TLS), "{p}");
    // The handshake may fail (the server read the junk) or succeed
    // without it; either way the iq must never be processed.
    if c.upgrade_tls().await.is_ok() {
        let f = c.open().await;
        assert!(f.get_child("mechanisms", NS_SASL).is_some(), "{f}");
        // A registration form request round-trips: nothing came before it.
        let r = c
            .iq(xml(&format!(
                "<iq type='get'><query xmlns='{NS_REGISTER}'/></iq>"
            )))
            .await;
        assert_eq!(r.attr("type"), Some("result"), "{r}");
        let stray = c.take_buffered();
        assert!(stray.is_empty(), "{stray:?}");
    }
    assert!(srv
        .state()
        .store
        .credentials("pwned@localhost")
        .await
        .unwrap()
        .is_none());
    // The same junk sent over TLS later is processed (the test is not vacuous).
    let mut c = Client::connect_starttls(srv.c2s).await;
    c.send_raw(register.as_bytes()).await;
    let r = c.recv().await;
    assert_eq!(r.attr("id"), Some("evil"));
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    srv.assert_healthy().await;
    srv.stop().await;
}

#[tokio::test]
async fn starttls_twice_or_on_direct_tls_is_refused() {
    let srv = start_server(|_| {}).await;
    let mut c = Client::connect_starttls(srv.c2s).await;
    c.send_raw(format!("<starttls xmlns='{NS_TLS}'/>").as_bytes())
        .await;
    assert_eq!(c.expect_stream_error().await, "not-authorized");
    let mut c = Client::connect_tls(srv.c2s_tls).await;
    c.send_raw(format!("<starttls xmlns='{NS_TLS}'/>").as_bytes())
        .await;
    assert_eq!(c.expect_stream_error().await, "not-authorized");
    srv.assert_healthy().await;
    srv.stop().await;
}

// ---------------------------------------------------------------------------
// Forged addresses and server-stamped elements
// ---------------------------------------------------------------------------

#[tokio::test]
async fn forged_from_is_overwritten_on_every_stanza_kind() {
    let srv = start_server(|_| {}).await;
    let (mut a, mut b) = srv.logged_in_pair().await;
    let to = b.jid().to_string();
    for forged in [
        "admin@localhost",
        "localhost",
        &to,
        "x@evil.example/r",
        "not a jid@@",
    ] {
        let mut m = message(&to, "hi");
        m.set_attr("from", forged);
        a.send(&m).await;
        let got = b.recv().await;
        assert_eq!(got.attr("from"), Some(a.jid()), "forged {forged:?}");
    }
    // IQs relayed between resources too.
    let iq = xml(&format!(
        "<iq type='get' id='q1' to='{to}' from='admin@localhost'>\
         <query xmlns='jabber:iq:version'/></iq>"
    ));
    a.send(&iq).await;
    let got = b.recv().await;
    assert_eq!(got.name, "iq");
    assert_eq!(got.attr("from"), Some(a.jid()));
    srv.stop().await;
}

/// XEP-0359 §5 / XEP-0203: a client must not be able to forge the ids and
/// delays its contacts trust because the server stamps them (Conversations
/// uses stanza-id by=own-account for MAM deduplication).
#[tokio::test]
async fn forged_stanza_id_and_delay_are_stripped() {
    let srv = start_server(|_| {}).await;
    let (mut a, mut b) = srv.logged_in_pair().await;
    let to = b.jid().to_string();
    let bob_bare = b.bare_jid().to_string();
    let bob_upper = bob_bare.to_uppercase();
    let m = xml(&format!(
        "<message to='{to}' type='chat' id='s1'><body>hi</body>\
         <stanza-id xmlns='urn:xmpp:sid:0' by='{bob_bare}' id='forged-1'/>\
         <stanza-id xmlns='urn:xmpp:sid:0' by='{bob_upper}' id='forged-2'/>\
         <stanza-id xmlns='urn:xmpp:sid:0' by='localhost' id='forged-3'/>\
         <stanza-id xmlns='urn:xmpp:sid:0' by='room@localhost/nick' id='forged-4'/>\
         <stanza-id xmlns='urn:xmpp:sid:0' by='other.example' id='kept-1'/>\
         <delay xmlns='urn:xmpp:delay' from='localhost' stamp='2002-09-10T23:08:25Z'/>\
         <delay xmlns='urn:xmpp:delay' from='{bob_bare}' stamp='2002-09-10T23:08:25Z'/>\
         <delay xmlns='urn:xmpp:delay' from='other.example' stamp='2002-09-10T23:08:25Z'/>\
         <origin-id xmlns='urn:xmpp:sid:0' id='o1'/></message>"
    ));
    a.send(&m).await;
    let got = b.recv().await;
    let ids: Vec<_> = got
        .children()
        .filter(|c| c.is("stanza-id", "urn:xmpp:sid:0"))
        .map(|c| c.attr("id").unwrap().to_string())
        .collect();
    assert!(
        ids.iter().all(|i| !i.starts_with("forged")),
        "forged stanza-id delivered: {got}"
    );
    assert!(ids.contains(&"kept-1".to_string()), "{got}");
    let delays: Vec<_> = got
        .children()
        .filter(|c| c.is("delay", "urn:xmpp:delay"))
        .map(|c| c.attr("from").unwrap().to_string())
        .collect();
    assert_eq!(delays, vec!["other.example"], "{got}");
    assert!(
        got.get_child("origin-id", "urn:xmpp:sid:0").is_some(),
        "{got}"
    );
    assert_eq!(got.child_text("body", NS_CLIENT).as_deref(), Some("hi"));
    srv.stop().await;
}

// ---------------------------------------------------------------------------
// Authentication abuse
// ---------------------------------------------------------------------------

/// ejabberd #4601: an authzid naming another user must not log in as them.
#[tokio::test]
async fn sasl_authzid_for_another_user_is_invalid_authzid() {
    let srv = start_server(|_| {}).await;
    let alice = srv.add_user("alice", "password").await;
    let bob = srv.add_user("bob", "password").await;
    for mech in [
        Mechanism::Plain,
        Mechanism::ScramSha256,
        Mechanism::ScramSha1,
    ] {
        let mut c = Client::connect_tls(srv.c2s_tls).await;
        assert_eq!(
            c.authenticate(mech, &alice, "password", Some(&bob)).await,
            Err("invalid-authzid".to_string()),
            "{}",
            mech.name()
        );
    }
    // The own JID as authzid is fine.
    let mut c = Client::connect_tls(srv.c2s_tls).await;
    c.authenticate(Mechanism::Plain, &alice, "password", Some(&alice))
        .await
        .unwrap();
    assert_eq!(c.bind("r").await, "alice@localhost/r");
    srv.stop().await;
}

/// One failed login from `ip` on a fresh connection (a wrong password for
/// `user`); returns the condition and how long the reply took.
async fn wrong_password_from(
    srv: &TestServer,
    ip: IpAddr,
    mech: Mechanism,
    user: &str,
) -> (String, Duration) {
    let mut c = Client::connect_tls_from(srv.c2s_tls, ip).await;
    let started = tokio::time::Instant::now();
    let r = c.authenticate(mech, user, "wrong-guess", None).await;
    (r.expect_err("a wrong password fails"), started.elapsed())
}

/// Issue 9 item 5: five wrong passwords from anywhere used to lock the
/// account, so the owner's right password failed with
/// temporary-auth-failure.
#[tokio::test]
async fn correct_password_is_not_locked_out_by_guessers() {
    let srv = start_server(|c| {
        c.limits.auth_failures_per_account = 3;
        c.limits.auth_failures_per_ip = 6;
        c.limits.auth_max_delay_ms = 200;
    })
    .await;
    let victim = srv.add_user("victim", "right-password").await;
    // Twenty guesses on the account from four addresses of another range.
    for i in 0..20u8 {
        let ip = IpAddr::from([127, 0, 2, 1 + i % 4]);
        let mech = [Mechanism::Plain, Mechanism::ScramSha256][usize::from(i % 2)];
        let (cond, _) = wrong_password_from(&srv, ip, mech, &victim).await;
        assert_eq!(cond, "not-authorized", "guess {i}");
    }
    // The owner, from an address that did not guess, gets in at once.
    for (ip, mech) in [
        ([127, 0, 0, 5], Mechanism::Plain),
        ([127, 0, 0, 6], Mechanism::ScramSha256),
    ] {
        let mut c = Client::connect_tls_from(srv.c2s_tls, IpAddr::from(ip)).await;
        let started = tokio::time::Instant::now();
        c.authenticate(mech, &victim, "right-password", None)
            .await
            .unwrap_or_else(|e| panic!("{} from {ip:?}: {e}", mech.name()));
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    srv.assert_healthy().await;
    srv.stop().await;
}

/// The guessing address is slowed down, then refused (even a right
/// password, until the window ends), as is its range once enough of it
/// guessed; other ranges are unaffected.
#[tokio::test]
async fn guessing_address_is_slowed_then_refused() {
    let srv = start_server(|c| {
        c.limits.auth_failures_per_ip = 6;
        c.limits.auth_failures_per_range = 8;
        c.limits.auth_max_delay_ms = 1000;
    })
    .await;
    let other = srv.add_user("other", "other-password").await;
    let guesser: IpAddr = "127.0.3.2".parse().unwrap();
    // Three guesses on one connection: answered at once, then the
    // connection is closed.
    let mut c = Client::connect_tls_from(srv.c2s_tls, guesser).await;
    for i in 0..3 {
        let started = tokio::time::Instant::now();
        assert_eq!(
            c.authenticate(Mechanism::Plain, &format!("user{i}"), "guess", None)
                .await,
            Err("not-authorized".into())
        );
        assert!(started.elapsed() < Duration::from_millis(250), "typo {i}");
    }
    assert_eq!(c.expect_stream_error().await, "policy-violation");
    // The 4th and 5th failures wait 250 ms and 500 ms, the 6th the 1 s cap
    // (different names: it is the address that is slowed).
    let mut waited = Vec::new();
    for i in 3..6 {
        let name = format!("user{i}");
        let (cond, took) = wrong_password_from(&srv, guesser, Mechanism::ScramSha256, &name).await;
        assert_eq!(cond, "not-authorized");
        waited.push(took);
    }
    assert!(waited[0] >= Duration::from_millis(240), "{waited:?}");
    assert!(waited[1] >= Duration::from_millis(490), "{waited:?}");
    assert!(waited[2] >= Duration::from_millis(990), "{waited:?}");
    // Six failures: the address is refused, whatever it tries.
    let mut c = Client::connect_tls_from(srv.c2s_tls, guesser).await;
    assert_eq!(
        c.authenticate(Mechanism::ScramSha256, &other, "other-password", None)
            .await,
        Err("temporary-auth-failure".into())
    );
    // A neighbour is not, until the /24 has eight failures ...
    let neighbour: IpAddr = "127.0.3.3".parse().unwrap();
    for _ in 0..2 {
        let (cond, _) = wrong_password_from(&srv, neighbour, Mechanism::Plain, "x").await;
        assert_eq!(cond, "not-authorized");
    }
    let mut c = Client::connect_tls_from(srv.c2s_tls, "127.0.3.4".parse().unwrap()).await;
    assert_eq!(
        c.authenticate(Mechanism::Plain, &other, "other-password", None)
            .await,
        Err("temporary-auth-failure".into())
    );
    // ... while another range logs in at once.
    let mut c = Client::connect_tls_from(srv.c2s_tls, "127.0.4.4".parse().unwrap()).await;
    c.authenticate(Mechanism::Plain, &other, "other-password", None)
        .await
        .unwrap();
    srv.assert_healthy().await;
    srv.stop().await;
}

/// Issue 9 item 6: an existing account switched to temporary-auth-failure
/// after five failures while an unknown name kept getting not-authorized,
/// telling which names are accounts. Now both get the same condition and
/// the same growing delay.
#[tokio::test]
async fn unknown_and_existing_names_fail_alike_through_the_throttle() {
    let srv = start_server(|c| {
        c.limits.auth_failures_per_account = 2;
        c.limits.auth_max_delay_ms = 800;
    })
    .await;
    for (m, mech) in [Mechanism::Plain, Mechanism::ScramSha256]
        .into_iter()
        .enumerate()
    {
        let real = srv.add_user(&format!("real{m}"), "password").await;
        let ghost = format!("ghost{m}@{}", srv.domain);
        for (n, name) in [&real, &ghost].into_iter().enumerate() {
            // One failure per address, each from a different range: only
            // the name's own counter can slow these down.
            let mut outcomes = Vec::new();
            for i in 0..6u8 {
                let ip = IpAddr::from([127, 1 + 2 * m as u8 + n as u8, 10 + i, 1]);
                outcomes.push(wrong_password_from(&srv, ip, mech, name).await);
            }
            let conds: Vec<_> = outcomes.iter().map(|(c, _)| c.as_str()).collect();
            assert_eq!(conds, ["not-authorized"; 6], "{name} {}", mech.name());
            let took: Vec<_> = outcomes.iter().map(|(_, t)| *t).collect();
            // Failures 3, 4, 5, 6 wait 250, 500, then the 800 ms cap.
            assert!(took[1] < Duration::from_millis(240), "{name}: {took:?}");
            assert!(took[2] >= Duration::from_millis(240), "{name}: {took:?}");
            assert!(took[3] >= Duration::from_millis(490), "{name}: {took:?}");
            assert!(took[5] >= Duration::from_millis(790), "{name}: {took:?}");
            assert!(took[5] < Duration::from_millis(2000), "{name}: {took:?}");
        }
    }
    srv.stop().await;
}

/// The salt SCRAM-SHA-256 offers `user` (the server-first-message's `s=`).
async fn scram_salt(addr: std::net::SocketAddr, user: &str) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut c = Client::connect_tls(addr).await;
    let first = format!("n,,n={user},r=abcdefghijklmnop");
    c.send(
        &Element::new("auth", NS_SASL)
            .with_attr("mechanism", "SCRAM-SHA-256")
            .with_text(b64.encode(first)),
    )
    .await;
    let r = c.recv().await;
    assert!(r.is("challenge", NS_SASL), "{r}");
    let sf = String::from_utf8(b64.decode(r.text().trim()).unwrap()).unwrap();
    sf.split(',')
        .find_map(|a| a.strip_prefix("s="))
        .expect("salt")
        .to_string()
}

/// Issue 9 item 6: the secret unknown names' salts derive from was made
/// anew by every process, so a name whose salt changed across a restart was
/// not an account. It is kept in the data directory (0600). Two runs of the
/// real binary (a fresh process each) on one data directory.
#[tokio::test]
async fn unknown_name_salt_is_stable_across_a_restart() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let port = || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut salts = Vec::new();
    for _ in 0..2 {
        let tls: std::net::SocketAddr = format!("127.0.0.1:{}", port()).parse().unwrap();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_natter"))
            .arg("serve")
            .env_remove("NATTER_CONFIG")
            .env("NATTER_DATA_DIR", dir.path())
            .env("NATTER_LISTEN_C2S", "")
            .env("NATTER_LISTEN_C2S_TLS", tls.to_string())
            .env("NATTER_LISTEN_HTTP", "")
            .env("NATTER_LOG_LEVEL", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start natter");
        let mut up = false;
        for _ in 0..300 {
            if tokio::net::TcpStream::connect(tls).await.is_ok() {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if up {
            salts.push(scram_salt(tls, "ghost").await);
            assert_eq!(scram_salt(tls, "ghost").await, salts[salts.len() - 1]);
            assert_ne!(scram_salt(tls, "phantom").await, salts[salts.len() - 1]);
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(up, "natter did not start listening on {tls}");
    }
    assert_eq!(
        salts[0], salts[1],
        "salt of an unknown name changed across a restart"
    );
    let mode = std::fs::metadata(dir.path().join("fake-salt.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test]
async fn unauthenticated_connection_flood_is_capped_and_timed_out() {
    let srv = start_server(|c| {
        // Half the budget in use counts as pressure: the per-address share
        // applies from the 4th connection.
        c.c2s.max_preauth_total = 6;
        c.c2s.max_preauth_per_ip = 3;
        c.c2s.preauth_timeout_secs = 1;
    })
    .await;
    let flooder: IpAddr = "127.0.0.2".parse().unwrap();
    let mut idle = Vec::new();
    for _ in 0..3 {
        let mut c = Client::tcp_raw_from(srv.c2s, flooder).await;
        c.open().await;
        idle.push(c);
    }
    // Over the cap: closed at once without a word, on both TCP ports.
    for port in [srv.c2s, srv.c2s_tls] {
        let mut c = Client::tcp_raw_from(port, flooder).await;
        c.send_header("localhost").await;
        c.expect_eof().await;
    }
    // A normal user from another address logs in meanwhile.
    let user = srv.add_user("normal", "password").await;
    let mut n = Client::connect_tls_from(srv.c2s_tls, "127.0.0.3".parse().unwrap()).await;
    n.login(&user, "password", "r").await;
    // The idle ones are dropped at preauth_timeout_secs.
    let started = tokio::time::Instant::now();
    for c in &mut idle {
        assert_eq!(c.expect_stream_error().await, "connection-timeout");
    }
    assert!(started.elapsed() < Duration::from_secs(3));
    // Slots are free again: the flooder's address can log in normally.
    let mut c = Client::tcp_raw_from(srv.c2s, flooder).await;
    c.open().await;
    c.starttls().await;
    c.open().await;
    c.login(&user, "password", "again").await;
    // A silent TCP connection to the direct-TLS port (no handshake) is
    // dropped at the same deadline.
    let mut s = Client::tcp_raw_from(srv.c2s_tls, flooder).await;
    s.expect_eof().await;
    srv.assert_healthy().await;
    srv.stop().await;
}

#[tokio::test]
async fn websocket_upgrades_count_against_the_preauth_cap() {
    let srv = start_server(|c| {
        c.c2s.max_preauth_total = 4;
        c.c2s.max_preauth_per_ip = 2;
    })
    .await;
    // All clients here come from 127.0.0.1 (the WebSocket client cannot bind).
    let mut a = Client::connect_ws(srv.http).await;
    let _b = Client::connect_ws(srv.http).await;
    match Client::try_ws_raw(srv.http).await {
        Err(status) => assert_eq!(status, "429"),
        Ok(_) => panic!("third unauthenticated WebSocket accepted"),
    }
    // Binding releases the slot.
    let user = srv.add_user("w", "password").await;
    a.login(&user, "password", "r").await;
    let mut c = Client::connect_ws(srv.http).await;
    c.login(&user, "password", "r2").await;
    srv.stop().await;
}

/// Issue 9 item 8: the unauthenticated-connection limit was counted per
/// transport. One budget covers TCP, direct TLS and WebSocket: under
/// pressure an address's share counts all three, and the connection past
/// the budget is refused on every transport.
#[tokio::test]
async fn preauth_cap_counts_tcp_and_websocket_together() {
    let srv = start_server(|c| {
        c.c2s.max_preauth_total = 8;
        c.c2s.max_preauth_per_ip = 2;
    })
    .await;
    let mut held = Vec::new();
    // Half the budget from one address: no pressure yet, all accepted.
    for _ in 0..4 {
        let mut c = Client::tcp_raw_from(srv.c2s, "127.0.0.2".parse().unwrap()).await;
        c.open().await;
        held.push(c);
    }
    // Under pressure: 127.0.0.1 gets its share of two, over TCP and
    // WebSocket together (the WebSocket client connects from 127.0.0.1).
    held.push(Client::connect_tls_from(srv.c2s_tls, "127.0.0.1".parse().unwrap()).await);
    held.push(Client::connect_ws(srv.http).await);
    match Client::try_ws_raw(srv.http).await {
        Err(status) => assert_eq!(status, "429"),
        Ok(_) => panic!("a third unauthenticated connection from 127.0.0.1 accepted"),
    }
    let mut c = Client::tcp_raw_from(srv.c2s, "127.0.0.1".parse().unwrap()).await;
    c.send_header("localhost").await;
    c.expect_eof().await;
    // Two more from elsewhere spend the budget; the next is refused on
    // either transport, whoever asks.
    for _ in 0..2 {
        let mut c = Client::tcp_raw_from(srv.c2s, "127.0.0.3".parse().unwrap()).await;
        c.open().await;
        held.push(c);
    }
    let mut c = Client::tcp_raw_from(srv.c2s, "127.0.0.4".parse().unwrap()).await;
    c.send_header("localhost").await;
    c.expect_eof().await;
    match Client::try_ws_raw(srv.http).await {
        Err(status) => assert_eq!(status, "429"),
        Ok(_) => panic!("an unauthenticated WebSocket past the budget accepted"),
    }
    // Closing them gives the budget back.
    held.clear();
    let user = srv.add_user("after", "password").await;
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match Client::try_ws_raw(srv.http).await {
                Ok(mut c) => {
                    c.open().await;
                    c.login(&user, "password", "r").await;
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await
    .expect("the budget is released when connections close");
    srv.stop().await;
}

/// Issue 9 item 8: a fixed cap of 20 per address locked out users behind a
/// carrier-grade NAT. While the budget is not under pressure, one address
/// may open as many unauthenticated connections as it likes.
#[tokio::test]
async fn login_storm_from_one_address_is_accepted_while_the_server_is_idle() {
    let srv = start_server(|c| {
        c.c2s.max_preauth_total = 200;
        c.c2s.max_preauth_per_ip = 3;
    })
    .await;
    let user = srv.add_user("phone", "password").await;
    let nat: IpAddr = "127.0.0.2".parse().unwrap();
    let mut phones = Vec::new();
    for i in 0..60 {
        let mut c = Client::tcp_raw_from(srv.c2s, nat).await;
        let f = c.open().await;
        assert!(f.get_child("starttls", NS_TLS).is_some(), "phone {i}: {f}");
        phones.push(c);
    }
    // And they log in.
    for (i, c) in phones.iter_mut().enumerate().take(10) {
        c.starttls().await;
        c.open().await;
        c.login(&user, "password", &format!("p{i}")).await;
    }
    srv.stop().await;
}

/// A session that stops reading must not make the server buffer without
/// bound: its queue is capped, it is closed with policy-violation, and the
/// sender does not notice.
#[tokio::test]
async fn slow_reader_is_closed_and_memory_stays_bounded() {
    const MSG: usize = 32 * 1024;
    const COUNT: usize = 2000; // 64 MiB in total
    let srv = start_server(|c| {
        c.c2s.max_queue = 16;
        // Bob's blocked write of the stream error must outlast the flood,
        // whose 128 MB of archive take longer on PostgreSQL than on SQLite.
        c.c2s.write_timeout_secs = 120;
        c.limits.rate_bytes_per_sec = 1 << 30;
        c.limits.rate_burst_bytes = 1 << 30;
    })
    .await;
    let alice = srv.add_user("alice", "password").await;
    let bob = srv.add_user("bob", "password").await;
    let carol = srv.add_user("carol", "password").await;
    let mut a = srv.login(&alice, "password", "a").await;
    // Bob's socket has a small receive buffer, and bob never reads.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let tcp = sock.connect(srv.c2s_tls).await.unwrap();
    let mut b = Client::tls_over(tcp).await;
    b.open().await;
    let bob_jid = b.login(&bob, "password", "slow").await;

    let before = rss_bytes();
    let body = "z".repeat(MSG);
    let mut batch = String::new();
    // Once bob's session is closed, the rest bounce (RFC 6121 §8.5.3.2.1);
    // alice reads those as she goes, as a real client would.
    let check_bounces = |els: Vec<Element>| {
        for e in els {
            assert_eq!(
                stanza_error(&e).as_deref(),
                Some("service-unavailable"),
                "{e}"
            );
        }
    };
    for i in 0..COUNT {
        let m = message(&bob_jid, &body).with_attr("id", format!("f{i}"));
        batch.push_str(&a.serialize(&m));
        if batch.len() > 1 << 20 || i == COUNT - 1 {
            a.send_raw_reading(batch.as_bytes()).await;
            batch.clear();
            check_bounces(a.drain_received());
        }
    }
    // All of alice's messages have been routed once her ping is answered.
    a.timeout = Duration::from_secs(30);
    check_bounces(a.sync().await);
    let grown = rss_bytes().saturating_sub(before);
    eprintln!("RSS growth during the flood: {} KiB", grown >> 10);
    assert!(
        grown < 32 << 20,
        "RSS grew by {} MiB while {} MiB were sent to a stuck reader",
        grown >> 20,
        (MSG * COUNT) >> 20
    );

    // Bob reads at last: what was queued, then the stream error.
    let mut got = 0;
    b.timeout = Duration::from_secs(10);
    let cond = loop {
        match b.next_event().await {
            Event::Stanza(el) if el.is("error", NS_STREAM) => {
                break stream_error_condition(&el);
            }
            Event::Stanza(el) => {
                assert_eq!(el.name, "message");
                got += 1;
            }
            other => panic!("expected messages then a stream error, got {other:?}"),
        }
    };
    assert_eq!(cond, "policy-violation");
    b.expect_closed().await;
    assert!(got < COUNT, "all {got} messages were buffered");

    // The flooder is fine.
    let mut c = srv.login(&carol, "password", "c").await;
    a.send(&message(c.jid(), "after the flood")).await;
    let m = c.recv().await;
    assert_eq!(
        m.child_text("body", NS_CLIENT).as_deref(),
        Some("after the flood")
    );
    for e in a.sync().await {
        assert_eq!(
            stanza_error(&e).as_deref(),
            Some("service-unavailable"),
            "{e}"
        );
    }
    srv.stop().await;
}

// ---------------------------------------------------------------------------
// Accounts
// ---------------------------------------------------------------------------

/// A deleted username stays reserved, so nobody can register it at once
/// and receive what was meant for its former owner.
#[tokio::test]
async fn deleted_username_cannot_be_registered_again_at_once() {
    let srv = start_server(|c| c.registration.reserve_deleted_secs = 3600).await;
    let reg = || {
        xml(&format!(
            "<iq type='set'><query xmlns='{NS_REGISTER}'><username>dan</username>\
             <password>password</password></query></iq>"
        ))
    };
    let mut c = Client::connect_tls(srv.c2s_tls).await;
    let r = c.iq(reg()).await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    c.login("dan", "password", "r").await;
    let r = c
        .iq(xml(&format!(
            "<iq type='set'><query xmlns='{NS_REGISTER}'><remove/></query></iq>"
        )))
        .await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    assert_eq!(c.expect_stream_error().await, "not-authorized");
    let mut c = Client::connect_tls(srv.c2s_tls).await;
    let r = c.iq(reg()).await;
    assert_eq!(stanza_error(&r).as_deref(), Some("conflict"), "{r}");
    // Case variants are the same username.
    let r = c
        .iq(xml(&format!(
            "<iq type='set'><query xmlns='{NS_REGISTER}'><username>DAN</username>\
             <password>password</password></query></iq>"
        )))
        .await;
    assert_eq!(stanza_error(&r).as_deref(), Some("conflict"), "{r}");
    assert_eq!(
        c.authenticate(Mechanism::ScramSha256, "dan", "password", None)
            .await,
        Err("not-authorized".into())
    );
    srv.stop().await;
}

// ---------------------------------------------------------------------------
// Stream framing
// ---------------------------------------------------------------------------

#[tokio::test]
async fn stream_header_errors() {
    let srv = start_server(|_| {}).await;
    // A stanza before the stream header.
    let mut c = Client::tcp_raw(srv.c2s).await;
    c.send_raw(b"<message to='a@localhost'><body>x</body></message>")
        .await;
    assert_eq!(c.expect_stream_error().await, "invalid-namespace");
    let mut w = Client::ws_raw(srv.http).await;
    w.send_raw(b"<message xmlns='jabber:client' to='a@localhost'/>")
        .await;
    assert_eq!(w.expect_stream_error().await, "not-authorized");
    // Wrong stream namespace.
    let mut c = Client::tcp_raw(srv.c2s).await;
    c.send_raw(
        b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streamz' \
          to='localhost' version='1.0'>",
    )
    .await;
    assert_eq!(c.expect_stream_error().await, "invalid-namespace");
    // Wrong, missing `to` domain (TCP, TLS and WebSocket).
    for to in ["example.org", ""] {
        let header = format!(
            "<stream:stream xmlns='jabber:client' xmlns:stream='{NS_STREAM}' \
             to='{to}' version='1.0'>"
        );
        let mut c = Client::tcp_raw(srv.c2s).await;
        c.send_raw(header.as_bytes()).await;
        assert_eq!(c.expect_stream_error().await, "host-unknown", "to={to:?}");
        let mut c = Client::tls_raw(srv.c2s_tls).await;
        c.send_raw(header.as_bytes()).await;
        assert_eq!(c.expect_stream_error().await, "host-unknown", "to={to:?}");
        let mut w = Client::ws_raw(srv.http).await;
        w.send_header(to).await;
        assert_eq!(w.expect_stream_error().await, "host-unknown", "to={to:?}");
    }
    // Unsupported or missing version.
    for v in ["version='0.9'", "version='2.0'", ""] {
        let mut c = Client::tcp_raw(srv.c2s).await;
        c.send_raw(
            format!(
                "<stream:stream xmlns='jabber:client' xmlns:stream='{NS_STREAM}' \
                 to='localhost' {v}>"
            )
            .as_bytes(),
        )
        .await;
        assert_eq!(c.expect_stream_error().await, "unsupported-version", "{v}");
    }
    // A second stream header (with its XML declaration) inside the stream.
    let mut c = Client::connect_tls(srv.c2s_tls).await;
    c.send_raw(HEADER.as_bytes()).await;
    assert_eq!(c.expect_stream_error().await, "restricted-xml");
    // A WebSocket binary frame.
    let mut w = Client::connect_ws(srv.http).await;
    w.send_raw(b"\xFF\x00binary").await;
    assert_eq!(w.expect_stream_error().await, "bad-format");
    // An unknown top-level element after binding.
    let mut c = logged_in(&srv, "u1").await;
    c.send_raw(b"<foo xmlns='urn:x'/>").await;
    assert_eq!(c.expect_stream_error().await, "unsupported-stanza-type");
    // Stanzas in the wrong namespace after binding.
    let mut c = logged_in(&srv, "u2").await;
    c.send_raw(b"<message xmlns='jabber:server' to='a@localhost'/>")
        .await;
    assert_eq!(c.expect_stream_error().await, "unsupported-stanza-type");
    // An unauthenticated client sending stanzas.
    let mut c = Client::connect_tls(srv.c2s_tls).await;
    c.send_raw(b"<message to='u1@localhost'><body>spam</body></message>")
        .await;
    assert_eq!(c.expect_stream_error().await, "not-authorized");
    // Text directly inside the stream.
    let mut c = Client::connect_tls(srv.c2s_tls).await;
    c.send_raw(b"hello").await;
    assert_eq!(c.expect_stream_error().await, "bad-format");
    srv.assert_healthy().await;
    srv.stop().await;
}

// ---------------------------------------------------------------------------
// Found by fuzzing (fuzz/, bench/fuzz)
// ---------------------------------------------------------------------------

/// A child element in the reserved XML namespace (`<xml:x/>`) was written to
/// the recipient as `<x xmlns='http://www.w3.org/XML/1998/namespace'/>`,
/// which is not well-formed: any user could end any other user's stream
/// with one message (found by the ws_frame fuzz target).
#[tokio::test]
async fn element_in_the_xml_namespace_does_not_break_the_recipients_stream() {
    let srv = start_server(|_| {}).await;
    let (mut a, mut b) = srv.logged_in_pair().await;
    let to = b.jid().to_string();
    a.send_raw(
        format!(
            "<message to='{to}' type='chat' id='x1'><body>one</body>\
             <xml:x xml:lang='en'><y/></xml:x></message>"
        )
        .as_bytes(),
    )
    .await;
    a.send(&message(&to, "two")).await;
    let m = b.recv_until(|e| e.name == "message").await;
    assert_eq!(m.child_text("body", NS_CLIENT).as_deref(), Some("one"));
    let x = m
        .get_child("x", natter_xml::NS_XML)
        .expect("the xml:x child arrives intact");
    assert_eq!(x.attr("xml:lang"), Some("en"));
    assert!(x.get_child("y", NS_CLIENT).is_some());
    // The recipient's stream still parses: the next message arrives too.
    let m = b.recv_until(|e| e.name == "message").await;
    assert_eq!(m.child_text("body", NS_CLIENT).as_deref(), Some("two"));
    srv.assert_healthy().await;
}
