//! XEP-0198 Stream Management: acks, resumption after a dropped connection,
//! and the delivery promise (an unacknowledged stanza is resent on
//! resumption or handed to offline requeueing, never dropped).

mod common;

use base64::Engine;
use common::*;
use natter_sasl::Mechanism;
use natter_xml::NS_CLIENT;
use std::time::Duration;

const NS_SM: &str = "urn:xmpp:sm:3";

fn sm(name: &str) -> Element {
    Element::new(name, NS_SM)
}

fn ack(h: u32) -> Element {
    sm("a").with_attr("h", h.to_string())
}

fn resume_el(previd: &str, h: u32) -> Element {
    sm("resume")
        .with_attr("previd", previd)
        .with_attr("h", h.to_string())
}

/// `<enable resume='true'/>`; returns the SM-ID.
async fn enable_resume(c: &mut Client) -> String {
    c.send(&sm("enable").with_attr("resume", "true")).await;
    let e = c.recv_matching(|e| e.ns == NS_SM).await;
    assert!(e.is("enabled", NS_SM), "expected <enabled/>, got {e}");
    assert_eq!(e.attr("resume"), Some("true"), "{e}");
    e.attr("id").expect("SM-ID").to_string()
}

/// The next message, skipping the server's ack requests.
async fn recv_msg(c: &mut Client) -> Element {
    c.recv_until(|e| e.name == "message").await
}

/// The next stanza, counted in `h` as a client does (nonzas are not).
async fn recv_counted(c: &mut Client, h: &mut u32) -> Element {
    loop {
        let e = c.recv().await;
        if e.ns == NS_CLIENT {
            *h += 1;
            return e;
        }
    }
}

fn body(m: &Element) -> String {
    m.child_text("body", NS_CLIENT).unwrap_or_default()
}

/// A new connection that authenticates as `user` and sends `<resume/>`;
/// returns it and the server's answer (`<resumed/>` or `<failed/>`).
async fn resume(srv: &TestServer, user: &str, previd: &str, h: u32) -> (Client, Element) {
    let mut c = Client::connect_tls(srv.c2s_tls).await;
    c.authenticate(Mechanism::ScramSha256, user, "password", None)
        .await
        .expect("login");
    let f = c.features.clone().unwrap();
    assert!(f.get_child("sm", NS_SM).is_some(), "no <sm/> feature: {f}");
    c.send(&resume_el(previd, h)).await;
    let r = c.recv_matching(|e| e.ns == NS_SM && e.name != "r").await;
    (c, r)
}

async fn resumed(srv: &TestServer, user: &str, jid: &str, previd: &str, h: u32) -> Client {
    let (mut c, r) = resume(srv, user, previd, h).await;
    assert!(r.is("resumed", NS_SM), "expected <resumed/>, got {r}");
    assert_eq!(r.attr("previd"), Some(previd));
    c.full_jid = Some(jid.to_string());
    c
}

fn failed_condition(r: &Element) -> String {
    assert!(r.is("failed", NS_SM), "expected <failed/>, got {r}");
    r.children()
        .find(|c| c.ns == NS_STANZAS)
        .map(|c| c.name.clone())
        .unwrap_or_default()
}

fn bare(c: &Client) -> jid::BareJid {
    jid::BareJid::new(c.bare_jid()).unwrap()
}

/// The next top-level element, which must be a stream error; returned whole.
async fn stream_error_element(c: &mut Client) -> Element {
    loop {
        match c.next_event().await {
            Event::Stanza(el) if el.is("error", natter_xml::NS_STREAM) => return el,
            Event::Stanza(_) | Event::Open(_) => continue,
            ev => panic!("expected a stream error, got {ev:?}"),
        }
    }
}

#[tokio::test]
async fn sm_and_csi_are_offered_after_authentication_only() {
    let srv = start_server(|_| {}).await;
    let user = srv.add_user("feat", "password").await;
    let mut c = Client::connect_tls(srv.c2s_tls).await;
    let pre = c.features.clone().unwrap();
    assert!(pre.get_child("sm", NS_SM).is_none(), "{pre}");
    c.authenticate(Mechanism::ScramSha256, &user, "password", None)
        .await
        .unwrap();
    let f = c.features.clone().unwrap();
    assert!(f.get_child("sm", NS_SM).is_some(), "{f}");
    assert!(f.get_child("csi", "urn:xmpp:csi:0").is_some(), "{f}");
    // XEP-0198 §3: enabling needs a bound resource.
    c.send(&sm("enable")).await;
    let r = c.recv().await;
    assert_eq!(failed_condition(&r), "unexpected-request");
    c.bind("x").await;
    c.close().await;
    srv.stop().await;
}

#[tokio::test]
async fn acks_count_handled_stanzas() {
    let srv = start_server(|_| {}).await;
    let (mut a, _b) = srv.logged_in_pair().await;
    let id = enable_resume(&mut a).await;
    assert_eq!(id.len(), 32, "128-bit SM-ID: {id}");
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
    a.send(&sm("enable")).await;
    let r = a.recv_matching(|e| e.ns == NS_SM).await;
    assert_eq!(failed_condition(&r), "unexpected-request");
    for _ in 0..3 {
        a.send(&ping_iq(None).with_attr("id", next_id())).await;
    }
    a.send(&sm("r")).await;
    let r = a.recv_matching(|e| e.is("a", NS_SM)).await;
    assert_eq!(r.attr("h"), Some("3"), "{r}");
    // The three pongs were counted as sent: acking them is fine …
    for _ in 0..3 {
        a.recv_until(|e| e.name == "iq").await;
    }
    a.send(&ack(3)).await;
    // … and the session goes on.
    a.sync().await;
    a.send(&sm("r")).await;
    let r = a.recv_matching(|e| e.is("a", NS_SM)).await;
    assert_eq!(r.attr("h"), Some("4"), "{r}");
    a.close().await;
    srv.stop().await;
}

#[tokio::test]
async fn server_requests_acks_every_few_stanzas() {
    let srv = start_server(|_| {}).await;
    let (mut a, mut b) = srv.logged_in_pair().await;
    enable_resume(&mut b).await;
    for i in 0..5 {
        a.send(&message(b.jid(), &format!("m{i}"))).await;
    }
    let mut got = 0;
    loop {
        let e = b.recv().await;
        if e.is("r", NS_SM) {
            break;
        }
        assert_eq!(e.name, "message");
        got += 1;
    }
    assert_eq!(got, 5);
    b.send(&ack(5)).await;
    b.sync().await;
    srv.stop().await;
}

#[tokio::test]
async fn unacked_stanzas_are_resent_on_resumption() {
    let srv = start_server(|_| {}).await;
    let (mut a, mut b) = srv.logged_in_pair().await;
    let (bob, bob_jid) = (b.bare_jid().to_string(), b.jid().to_string());
    let id = enable_resume(&mut b).await;
    for i in 1..=3 {
        a.send(&message(&bob_jid, &format!("m{i}"))).await;
    }
    for i in 1..=3 {
        assert_eq!(body(&recv_msg(&mut b).await), format!("m{i}"));
    }
    b.send(&ack(1)).await;
    b.sync().await;
    drop(b);
    // Routed to the detached session meanwhile.
    a.send(&message(&bob_jid, "m4")).await;
    a.sync().await;
    let mut b2 = resumed(&srv, &bob, &bob_jid, &id, 1).await;
    for i in 2..=4 {
        assert_eq!(body(&recv_msg(&mut b2).await), format!("m{i}"));
    }
    let extra: Vec<_> = b2
        .sync()
        .await
        .into_iter()
        .filter(|e| e.name == "message")
        .collect();
    assert!(extra.is_empty(), "resent twice: {extra:?}");
    // Same full JID, same session.
    a.send(&message(&bob_jid, "m5")).await;
    assert_eq!(body(&recv_msg(&mut b2).await), "m5");
    assert_eq!(srv.state().router.requeued(), 0);
    b2.close().await;
    srv.stop().await;
}

#[tokio::test]
async fn resumed_reports_handled_count() {
    let srv = start_server(|_| {}).await;
    let (_a, mut b) = srv.logged_in_pair().await;
    let (bob, bob_jid) = (b.bare_jid().to_string(), b.jid().to_string());
    let id = enable_resume(&mut b).await;
    b.sync().await;
    b.sync().await;
    drop(b);
    let (_b2, r) = resume(&srv, &bob, &id, 2).await;
    assert!(r.is("resumed", NS_SM), "{r}");
    assert_eq!(r.attr("h"), Some("2"), "two pings handled: {r}");
    let _ = bob_jid;
    srv.stop().await;
}

#[tokio::test]
async fn dropped_tcp_resumes_with_every_message_exactly_once() {
    let srv = start_server(|_| {}).await;
    let (mut a, mut b) = srv.logged_in_pair().await;
    let (bob, bob_jid) = (b.bare_jid().to_string(), b.jid().to_string());
    let id = enable_resume(&mut b).await;
    let mut seen = Vec::new();
    for i in 0..10 {
        a.send(&message(&bob_jid, &format!("m{i}"))).await;
    }
    for _ in 0..4 {
        seen.push(body(&recv_msg(&mut b).await));
    }
    // Bob read 4 (maybe more sit unread in his socket) and vanishes
    // without </stream>.
    drop(b);
    for i in 10..20 {
        a.send(&message(&bob_jid, &format!("m{i}"))).await;
    }
    a.sync().await;
    let mut b2 = resumed(&srv, &bob, &bob_jid, &id, 4).await;
    while seen.len() < 20 {
        seen.push(body(&recv_msg(&mut b2).await));
    }
    let expected: Vec<_> = (0..20).map(|i| format!("m{i}")).collect();
    assert_eq!(seen, expected);
    let extra: Vec<_> = b2
        .sync()
        .await
        .into_iter()
        .filter(|e| e.name == "message")
        .collect();
    assert!(extra.is_empty(), "delivered twice: {extra:?}");
    srv.stop().await;
}

#[tokio::test]
async fn order_is_kept_across_repeated_resumptions() {
    let srv = start_server(|_| {}).await;
    let (mut a, mut b) = srv.logged_in_pair().await;
    let (bob, bob_jid) = (b.bare_jid().to_string(), b.jid().to_string());
    let id = enable_resume(&mut b).await;
    let mut seen: Vec<String> = Vec::new();
    // Stanzas bob handled, as his client counts them.
    let mut h = 0;
    let mut n = 0;
    for _round in 0..3 {
        for _ in 0..8 {
            a.send(&message(&bob_jid, &format!("m{n}"))).await;
            n += 1;
        }
        // All routed to bob before he reads.
        a.sync().await;
        // Read three messages (and whatever comes between them) …
        let mut got = 0;
        while got < 3 {
            let e = recv_counted(&mut b, &mut h).await;
            if e.name == "message" {
                seen.push(body(&e));
                got += 1;
            }
        }
        // … but lose the last one before handling it.
        seen.pop();
        h -= 1;
        b.send(&ack(h - 1)).await;
        drop(b);
        b = resumed(&srv, &bob, &bob_jid, &id, h).await;
    }
    while seen.len() < n {
        let e = recv_counted(&mut b, &mut h).await;
        if e.name == "message" {
            seen.push(body(&e));
        }
    }
    let expected: Vec<_> = (0..n).map(|i| format!("m{i}")).collect();
    assert_eq!(seen, expected);
    srv.stop().await;
}

#[tokio::test]
async fn resuming_while_the_old_connection_is_open_moves_the_session() {
    let srv = start_server(|_| {}).await;
    let (mut a, mut b) = srv.logged_in_pair().await;
    let (bob, bob_jid) = (b.bare_jid().to_string(), b.jid().to_string());
    let id = enable_resume(&mut b).await;
    a.send(&message(&bob_jid, "m1")).await;
    assert_eq!(body(&recv_msg(&mut b).await), "m1");
    // The client thinks the old connection is dead; the server does not.
    let mut b2 = resumed(&srv, &bob, &bob_jid, &id, 0).await;
    assert_eq!(body(&recv_msg(&mut b2).await), "m1");
    assert_eq!(b.expect_stream_error().await, "conflict");
    a.send(&message(&bob_jid, "m2")).await;
    assert_eq!(body(&recv_msg(&mut b2).await), "m2");
    let extra: Vec<_> = b2
        .sync()
        .await
        .into_iter()
        .filter(|e| e.name == "message")
        .collect();
    assert!(extra.is_empty(), "delivered twice: {extra:?}");
    assert_eq!(srv.state().router.resources(&bare(&b2)).len(), 1);
    srv.stop().await;
}

#[tokio::test]
async fn pipelined_auth_resume_and_ack_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let srv = start_server(|_| {}).await;
    let (mut a, mut b) = srv.logged_in_pair().await;
    let (bob, bob_jid) = (b.bare_jid().to_string(), b.jid().to_string());
    let id = enable_resume(&mut b).await;
    a.send(&message(&bob_jid, "m1")).await;
    a.send(&message(&bob_jid, "m2")).await;
    recv_msg(&mut b).await;
    recv_msg(&mut b).await;
    drop(b);

    // A raw TLS socket: the answer to the pipelined bytes restarts the
    // stream in the middle of one read, which the test client's parser
    // does not expect.
    let tcp = tokio::net::TcpStream::connect(srv.c2s_tls).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(DOMAIN).unwrap();
    let mut tls = tls_connector().connect(name, tcp).await.unwrap();
    let header = format!(
        "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
         xmlns:stream='http://etherx.jabber.org/streams' to='{DOMAIN}' version='1.0'>"
    );
    tls.write_all(header.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    async fn read_until<S: tokio::io::AsyncRead + Unpin>(
        s: &mut S,
        got: &mut Vec<u8>,
        buf: &mut [u8],
        needle: &str,
    ) {
        let deadline = tokio::time::Instant::now() + RECV_TIMEOUT;
        while !String::from_utf8_lossy(got).contains(needle) {
            let n = tokio::time::timeout_at(deadline, s.read(buf))
                .await
                .unwrap_or_else(|_| {
                    panic!("waiting for {needle}, got {}", String::from_utf8_lossy(got))
                })
                .unwrap();
            assert!(n > 0, "EOF; got {}", String::from_utf8_lossy(got));
            got.extend_from_slice(&buf[..n]);
        }
    }
    read_until(&mut tls, &mut got, &mut buf, "</stream:features>").await;
    got.clear();
    let local = bob.split('@').next().unwrap();
    let plain = base64::engine::general_purpose::STANDARD.encode(format!("\0{local}\0password"));
    let pipelined = format!(
        "<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{plain}</auth>{header}\
         <resume xmlns='{NS_SM}' previd='{id}' h='0'/><r xmlns='{NS_SM}'/>"
    );
    tls.write_all(pipelined.as_bytes()).await.unwrap();
    read_until(
        &mut tls,
        &mut got,
        &mut buf,
        "<a xmlns='urn:xmpp:sm:3' h='0'/>",
    )
    .await;
    let text = String::from_utf8(got).unwrap();
    // success, then the new stream: parse it as its own stream.
    let (before, after) = text.split_at(text.find("<?xml").expect("new stream header"));
    assert!(before.contains("<success"), "{text}");
    let mut parser = natter_xml::StreamParser::new(natter_xml::Limits {
        max_stanza_bytes: 1 << 20,
        max_depth: 100,
        max_attrs: 100,
        max_elements: usize::MAX,
    });
    let events = parser.feed(after.as_bytes()).unwrap();
    let els: Vec<Element> = events
        .into_iter()
        .filter_map(|e| match e {
            natter_xml::StreamEvent::Stanza(el) => Some(el),
            _ => None,
        })
        .collect();
    let names: Vec<String> = els.iter().map(|e| e.name.clone()).collect();
    assert_eq!(
        names,
        ["features", "resumed", "message", "message", "r", "a"],
        "{text}"
    );
    assert_eq!(body(&els[2]), "m1");
    assert_eq!(body(&els[3]), "m2");
    srv.stop().await;
}

#[tokio::test]
async fn resume_with_h_higher_than_sent_ends_the_session_without_leaks() {
    let srv = start_server(|_| {}).await;
    let (mut a, mut b) = srv.logged_in_pair().await;
    let (bob, bob_jid) = (b.bare_jid().to_string(), b.jid().to_string());
    let bob_bare = bare(&b);
    let id = enable_resume(&mut b).await;
    a.send(&message(&bob_jid, "m1")).await;
    a.send(&message(&bob_jid, "m2")).await;
    recv_msg(&mut b).await;
    recv_msg(&mut b).await;
    drop(b);
    let mut c = Client::connect_tls(srv.c2s_tls).await;
    c.authenticate(Mechanism::ScramSha256, &bob, "password", None)
        .await
        .unwrap();
    c.send(&resume_el(&id, 7)).await;
    let e = stream_error_element(&mut c).await;
    assert!(
        e.get_child("undefined-condition", NS_STREAMS).is_some(),
        "{e}"
    );
    let too_high = e
        .get_child("handled-count-too-high", NS_SM)
        .unwrap_or_else(|| panic!("{e}"));
    assert_eq!(too_high.attr("h"), Some("7"));
    assert_eq!(too_high.attr("send-count"), Some("2"));
    // No session left behind; the two unacknowledged messages went to
    // offline requeueing.
    wait_for("the session to end", || {
        srv.state().router.count() == 1 && srv.state().router.requeued() == 2
    })
    .await;
    assert!(srv.state().router.resources(&bob_bare).is_empty());
    assert!(srv.state().router.resumable.is_empty());
    let (_c, r) = resume(&srv, &bob, &id, 2).await;
    assert_eq!(failed_condition(&r), "item-not-found");
    srv.stop().await;
}

#[tokio::test]
async fn client_acking_more_than_was_sent_is_a_stream_error() {
    let srv = start_server(|_| {}).await;
    let (mut a, mut b) = srv.logged_in_pair().await;
    let bob_jid = b.jid().to_string();
    enable_resume(&mut b).await;
    a.send(&message(&bob_jid, "m1")).await;
    recv_msg(&mut b).await;
    b.send(&ack(5)).await;
    let e = stream_error_element(&mut b).await;
    assert!(
        e.get_child("undefined-condition", NS_STREAMS).is_some(),
        "{e}"
    );
    assert!(e.get_child("text", NS_STREAMS).is_some(), "{e}");
    let too_high = e
        .get_child("handled-count-too-high", NS_SM)
        .unwrap_or_else(|| panic!("{e}"));
    assert_eq!(too_high.attr("h"), Some("5"));
    assert_eq!(too_high.attr("send-count"), Some("1"));
    b.expect_closed().await;
    // The session ended (it does not wait for resumption), and the
    // unacknowledged message was requeued.
    wait_for("requeue", || srv.state().router.requeued() == 1).await;
    srv.stop().await;
}

#[tokio::test]
async fn resuming_an_unknown_session_fails_and_binding_still_works() {
    let srv = start_server(|_| {}).await;
    let user = srv.add_user("nobody", "password").await;
    let (mut c, r) = resume(&srv, &user, "00112233445566778899aabbccddeeff", 0).await;
    assert_eq!(failed_condition(&r), "item-not-found");
    assert!(r.attr("h").is_none(), "{r}");
    c.bind("after-failed").await;
    c.sync().await;
    c.close().await;
    srv.stop().await;
}

#[tokio::test]
async fn resuming_an_expired_session_fails_with_its_last_h() {
    let srv = start_server(|c| c.c2s.resume_timeout_secs = 1).await;
    let (_a, mut b) = srv.logged_in_pair().await;
    let bob = b.bare_jid().to_string();
    let bob_bare = bare(&b);
    let id = enable_resume(&mut b).await;
    b.sync().await;
    b.sync().await;
    b.sync().await;
    drop(b);
    wait_for("the session to expire", || {
        srv.state().router.resources(&bob_bare).is_empty()
    })
    .await;
    let (_c, r) = resume(&srv, &bob, &id, 0).await;
    assert_eq!(failed_condition(&r), "item-not-found");
    assert_eq!(r.attr("h"), Some("3"), "three pings handled: {r}");
    srv.stop().await;
}

#[tokio::test]
async fn another_users_session_cannot_be_resumed() {
    let srv = start_server(|_| {}).await;
    let (mut a, mut b) = srv.logged_in_pair().await;
    let (alice, bob, bob_jid) = (
        a.bare_jid().to_string(),
        b.bare_jid().to_string(),
        b.jid().to_string(),
    );
    let id = enable_resume(&mut b).await;
    a.send(&message(&bob_jid, "m1")).await;
    recv_msg(&mut b).await;
    drop(b);
    let (_c, r) = resume(&srv, &alice, &id, 0).await;
    assert_eq!(failed_condition(&r), "item-not-found");
    assert!(r.attr("h").is_none(), "{r}");
    // Bob's session is untouched.
    let mut b2 = resumed(&srv, &bob, &bob_jid, &id, 0).await;
    assert_eq!(body(&recv_msg(&mut b2).await), "m1");
    srv.stop().await;
}

#[tokio::test]
async fn resume_timeout_requeues_then_the_session_goes_offline() {
    let srv = start_server(|c| c.c2s.resume_timeout_secs = 1).await;
    let (mut a, _) = srv.logged_in_pair().await;
    let bob = srv.add_user("bobmulti", "password").await;
    let mut phone = srv.login(&bob, "password", "phone").await;
    let mut desk = srv.login(&bob, "password", "desk").await;
    let phone_jid = phone.jid().to_string();
    phone.send(&xml("<presence/>")).await;
    desk.send(&xml("<presence/>")).await;
    desk.recv_until(|e| e.name == "presence" && e.attr("from") == Some(phone_jid.as_str()))
        .await;
    let id = enable_resume(&mut phone).await;
    a.send(&message(&phone_jid, "m1")).await;
    recv_msg(&mut phone).await;
    drop(phone);
    // Detached, not gone: the contact sees no unavailable presence yet, and
    // the phone is still routable.
    a.send(&message(&phone_jid, "m2")).await;
    a.sync().await;
    let early = desk.sync().await;
    assert!(
        early.iter().all(|e| e.attr("type") != Some("unavailable")),
        "went offline before the resumption timeout: {early:?}"
    );
    assert_eq!(srv.state().router.requeued(), 0);
    let gone = desk
        .recv_matching(|e| e.name == "presence" && e.attr("from") == Some(phone_jid.as_str()))
        .await;
    assert_eq!(gone.attr("type"), Some("unavailable"), "{gone}");
    // Requeued before the unavailable presence went out …
    assert_eq!(srv.state().router.requeued(), 2);
    // … and so delivered to the device that is still online.
    assert_eq!(body(&recv_msg(&mut desk).await), "m1");
    assert_eq!(body(&recv_msg(&mut desk).await), "m2");
    let (_c, r) = resume(&srv, &bob, &id, 1).await;
    assert_eq!(failed_condition(&r), "item-not-found");
    srv.stop().await;
}

/// A stream-managed client that stops acknowledging gets back-pressure
/// (nothing more is written past `c2s.max_unacked`), then its queue
/// overflows: without resumption the session ends with policy-violation
/// and everything is requeued, in order.
#[tokio::test]
async fn too_many_unacked_stanzas_close_the_session_and_requeue_them() {
    let srv = start_server(|c| {
        c.c2s.max_unacked = 5;
        c.c2s.max_queue = 3;
    })
    .await;
    let (mut a, mut b) = srv.logged_in_pair().await;
    let bob_jid = b.jid().to_string();
    let bob_bare = bare(&b);
    b.send(&sm("enable")).await;
    let e = b.recv_matching(|e| e.ns == NS_SM).await;
    assert!(e.is("enabled", NS_SM) && e.attr("id").is_none(), "{e}");
    for i in 0..12 {
        a.send(&message(&bob_jid, &format!("m{i}"))).await;
    }
    assert_eq!(b.expect_stream_error().await, "policy-violation");
    // What its queue held is requeued; what it refused went offline.
    wait_for("the session to end", || {
        srv.state().router.requeued() > 0 && srv.state().router.count() == 1
    })
    .await;
    assert!(srv.state().router.resources(&bob_bare).is_empty());
    // Nothing lost: the next login gets all of them from offline storage, in order.
    let mut b2 = srv.login(b.bare_jid(), "password", "again").await;
    b2.send(&xml("<presence/>")).await;
    for i in 0..12 {
        assert_eq!(body(&recv_msg(&mut b2).await), format!("m{i}"));
    }
    srv.stop().await;
}

/// Issue 9: a resumable session whose client stops acknowledging is a
/// half-dead connection: it parks, and `<resume/>` with the client's real
/// `h` gets exactly what it has not handled — not a failed resumption and
/// an offline copy of what it had read.
#[tokio::test]
async fn stuck_resumable_session_past_its_unacked_limit_parks_and_resumes() {
    let srv = start_server(|c| {
        c.c2s.max_unacked = 5;
        c.c2s.max_queue = 2;
    })
    .await;
    let (mut a, mut b) = srv.logged_in_pair().await;
    let (bob, bob_jid) = (b.bare_jid().to_string(), b.jid().to_string());
    let id = enable_resume(&mut b).await;
    b.send(&xml("<presence/>")).await;
    // What bob handled so far: his presence, and the ping result.
    let mut h = b.sync().await.iter().filter(|e| e.ns == NS_CLIENT).count() as u32 + 1;
    for i in 0..8 {
        a.send(&message(&bob_jid, &format!("m{i}"))).await;
    }
    // Bob reads (without acknowledging) until the server gives up on him.
    let mut got = Vec::new();
    let err = loop {
        match b.next_event().await {
            Event::Stanza(el) if el.is("error", natter_xml::NS_STREAM) => {
                break stream_error_condition(&el);
            }
            Event::Stanza(el) if el.ns == NS_CLIENT => {
                h += 1;
                if el.name == "message" {
                    got.push(body(&el));
                }
            }
            Event::Stanza(_) => {}
            other => panic!("expected stanzas then a stream error, got {other:?}"),
        }
    };
    assert_eq!(err, "policy-violation");
    assert!(got.len() <= 5, "more than max_unacked written: {got:?}");
    // Still routable while parked.
    a.send(&message(&bob_jid, "m8")).await;
    let mut b2 = resumed(&srv, &bob, &bob_jid, &id, h).await;
    while got.len() < 9 {
        got.push(body(&recv_counted(&mut b2, &mut h).await));
        // Acknowledge as we go, as a client does.
        b2.send(&ack(h)).await;
    }
    let want: Vec<_> = (0..9).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want);
    assert_eq!(srv.state().router.requeued(), 0);
    queue_emptied(&srv, &bob).await;
    srv.stop().await;
}

/// Issue 9: a parked session holds a bounded amount; past it its queue
/// refuses, messages go to offline storage, and a resumption gets them
/// all, in order, once: what the session held, then the offline queue.
#[tokio::test]
async fn detached_session_past_its_limit_resumes_with_everything_in_order() {
    let srv = start_server(|c| {
        c.c2s.max_unacked = 5;
        c.c2s.max_queue = 3;
    })
    .await;
    let (mut a, mut b) = srv.logged_in_pair().await;
    let (bob, bob_jid) = (b.bare_jid().to_string(), b.jid().to_string());
    let bob_bare = bare(&b);
    let id = enable_resume(&mut b).await;
    b.send(&xml("<presence/>")).await;
    // What bob handled so far: his presence, and the ping result.
    let mut h = b.sync().await.iter().filter(|e| e.ns == NS_CLIENT).count() as u32 + 1;
    drop(b);
    wait_for("the session to park", || {
        srv.state()
            .router
            .resources(&bob_bare)
            .first()
            .is_some_and(|s| s.is_available())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..20 {
        a.send(&message(&bob, &format!("m{i}"))).await;
    }
    a.sync().await;
    // Some are held by the parked session, the rest are in offline storage.
    let queued = srv.state().store.offline_count(&bob).await.unwrap();
    assert!(queued > 0, "nothing went to offline storage");
    assert!(srv.state().router.resources(&bob_bare).len() == 1);
    let (mut b2, r) = resume(&srv, &bob, &id, h).await;
    assert!(r.is("resumed", NS_SM), "expected <resumed/>, got {r}");
    b2.full_jid = Some(bob_jid);
    let mut got = Vec::new();
    while got.len() < 20 {
        got.push(body(&recv_counted(&mut b2, &mut h).await));
        b2.send(&ack(h)).await;
    }
    let want: Vec<_> = (0..20).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want);
    // And they left the offline queue.
    queue_emptied(&srv, &bob).await;
    // Later messages come live, after those.
    a.send(&message(&bob, "live")).await;
    assert_eq!(body(&recv_msg(&mut b2).await), "live");
    srv.stop().await;
}

#[tokio::test]
async fn unanswered_ack_request_detaches_a_half_dead_connection() {
    let srv = start_server(|c| c.c2s.ping_timeout_secs = 1).await;
    let (mut a, mut b) = srv.logged_in_pair().await;
    let (bob, bob_jid) = (b.bare_jid().to_string(), b.jid().to_string());
    let id = enable_resume(&mut b).await;
    for i in 0..5 {
        a.send(&message(&bob_jid, &format!("m{i}"))).await;
    }
    // Bob reads but never answers the server's <r/>.
    b.recv_until(|e| e.is("r", NS_SM)).await;
    assert_eq!(b.expect_stream_error().await, "connection-timeout");
    let mut b2 = resumed(&srv, &bob, &bob_jid, &id, 5).await;
    a.send(&message(&bob_jid, "m5")).await;
    assert_eq!(body(&recv_msg(&mut b2).await), "m5");
    assert_eq!(srv.state().router.requeued(), 0);
    srv.stop().await;
}

#[tokio::test]
async fn clean_close_requeues_what_was_not_acknowledged() {
    let srv = start_server(|_| {}).await;
    let (mut a, mut b) = srv.logged_in_pair().await;
    let bob_jid = b.jid().to_string();
    b.send(&sm("enable")).await;
    let e = b.recv_matching(|e| e.ns == NS_SM).await;
    assert!(e.is("enabled", NS_SM) && e.attr("id").is_none(), "{e}");
    a.send(&message(&bob_jid, "m1")).await;
    a.send(&message(&bob_jid, "m2")).await;
    recv_msg(&mut b).await;
    recv_msg(&mut b).await;
    b.send(&ack(1)).await;
    b.close().await;
    wait_for("requeue", || srv.state().router.requeued() == 1).await;
    srv.stop().await;
}

#[tokio::test]
async fn a_fresh_bind_replaces_a_detached_session_and_requeues_its_stanzas() {
    let srv = start_server(|_| {}).await;
    let (mut a, mut b) = srv.logged_in_pair().await;
    let (bob, bob_jid) = (b.bare_jid().to_string(), b.jid().to_string());
    let id = enable_resume(&mut b).await;
    a.send(&message(&bob_jid, "m1")).await;
    recv_msg(&mut b).await;
    drop(b);
    // Same resource, bound anew instead of resumed.
    let mut b2 = srv.login(&bob, "password", "res").await;
    assert_eq!(b2.jid(), bob_jid);
    wait_for("requeue", || srv.state().router.requeued() == 1).await;
    let (_c, r) = resume(&srv, &bob, &id, 0).await;
    assert_eq!(failed_condition(&r), "item-not-found");
    a.send(&message(&bob_jid, "m2")).await;
    assert_eq!(body(&recv_msg(&mut b2).await), "m2");
    let extra: Vec<_> = b2
        .sync()
        .await
        .into_iter()
        .filter(|e| e.name == "message")
        .collect();
    assert!(extra.is_empty(), "{extra:?}");
    srv.stop().await;
}

#[tokio::test]
async fn a_websocket_session_resumes_over_tls() {
    let srv = start_server(|_| {}).await;
    let (mut a, _) = srv.logged_in_pair().await;
    let bob = srv.add_user("wsbob", "password").await;
    let mut b = Client::connect_ws(srv.http).await;
    let bob_jid = b.login(&bob, "password", "web").await;
    let id = enable_resume(&mut b).await;
    a.send(&message(&bob_jid, "m1")).await;
    assert_eq!(body(&recv_msg(&mut b).await), "m1");
    drop(b);
    a.send(&message(&bob_jid, "m2")).await;
    a.sync().await;
    let mut b2 = resumed(&srv, &bob, &bob_jid, &id, 1).await;
    assert_eq!(body(&recv_msg(&mut b2).await), "m2");
    b2.close().await;
    srv.stop().await;
}
