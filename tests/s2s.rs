//! RFC 6120 federation between two in-process servers on loopback
//! (`a.test` and `b.test`, found through `s2s.hosts`): STARTTLS, XEP-0220
//! dialback, chat both ways with receipts and archiving, IQs answered
//! across, presence subscriptions and broadcast (RFC 6121) both ways, the
//! sender's archive copy and carbons of messages to remote users, bounces
//! for unreachable domains, and a peer forging another domain's `from`
//! refused with `invalid-from`; and natter with Debian's Prosody.

mod common;

use common::*;
use natter_xml::{Element, NS_CLIENT};
use std::net::SocketAddr;

const NS_RECEIPTS: &str = "urn:xmpp:receipts";

async fn federated(domain: &str, port: u16, peers: &[(&str, String)]) -> TestServer {
    federated_with(domain, port, peers, |_| {}).await
}

/// a.test and b.test, each finding the other and its group service.
async fn pair() -> (TestServer, TestServer) {
    let (pa, pb) = (free_port(), free_port());
    let (to_a, to_b) = (format!("127.0.0.1:{pa}"), format!("127.0.0.1:{pb}"));
    let a = federated(
        "a.test",
        pa,
        &[("b.test", to_b.clone()), ("conference.b.test", to_b)],
    )
    .await;
    let b = federated(
        "b.test",
        pb,
        &[("a.test", to_a.clone()), ("conference.a.test", to_a)],
    )
    .await;
    (a, b)
}

fn body(el: &Element) -> Option<String> {
    el.child_text("body", NS_CLIENT)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_on_two_servers_chat_both_ways_with_receipts() {
    let (a, b) = pair().await;
    let alice = a.add_user("alice", "password").await;
    let bob = b.add_user("bob", "password").await;
    let mut ca = a.login(&alice, "password", "phone").await;
    let mut cb = b.login(&bob, "password", "laptop").await;
    ca.send(&xml("<presence/>")).await;
    cb.send(&xml("<presence/>")).await;

    let mut m = message(&bob, "hello from a");
    m.append_child(Element::new("request", NS_RECEIPTS));
    let id = m.attr("id").unwrap().to_string();
    ca.send(&m).await;
    let got = cb.recv_until(|e| e.name == "message").await;
    assert_eq!(body(&got).as_deref(), Some("hello from a"));
    assert_eq!(got.attr("from"), Some(ca.jid()));
    // The receiving server archived it for bob (XEP-0359 stanza-id by bob).
    let sid = got
        .get_child("stanza-id", "urn:xmpp:sid:0")
        .expect("stanza-id");
    assert_eq!(sid.attr("by"), Some(bob.as_str()));

    // Bob's receipt and reply travel back over b → a.
    let receipt = Element::new("message", NS_CLIENT)
        .with_attr("to", ca.jid())
        .with_child(Element::new("received", NS_RECEIPTS).with_attr("id", id.as_str()));
    cb.send(&receipt).await;
    let r = ca.recv_until(|e| e.name == "message").await;
    assert_eq!(
        r.get_child("received", NS_RECEIPTS)
            .and_then(|x| x.attr("id")),
        Some(id.as_str())
    );
    assert_eq!(r.attr("from"), Some(cb.jid()));
    cb.send(&message(&alice, "hi back from b")).await;
    let back = ca
        .recv_until(|e| e.name == "message" && body(e).is_some())
        .await;
    assert_eq!(body(&back).as_deref(), Some("hi back from b"));
    // A burst crosses in runs (one archive write per run on the receiving
    // side): complete and in order.
    for i in 0..300 {
        cb.send(&message(&alice, &format!("burst {i}"))).await;
    }
    for i in 0..300 {
        let got = ca
            .recv_until(|e| e.name == "message" && body(e).is_some())
            .await;
        assert_eq!(body(&got), Some(format!("burst {i}")));
        assert!(got.get_child("stanza-id", "urn:xmpp:sid:0").is_some());
    }

    // An IQ to a remote full JID is relayed, and its result comes back.
    let mut ping = ping_iq(Some(cb.jid()));
    ping.set_attr("id", "p1");
    ca.send(&ping).await;
    let got = cb.recv_until(|e| e.name == "iq").await;
    assert_eq!(got.attr("from"), Some(ca.jid()));
    let pong = Element::new("iq", NS_CLIENT)
        .with_attr("type", "result")
        .with_attr("id", "p1")
        .with_attr("to", ca.jid());
    cb.send(&pong).await;
    let r = ca.recv_until(|e| e.name == "iq").await;
    assert_eq!(
        (r.attr("type"), r.attr("from")),
        (Some("result"), Some(cb.jid()))
    );

    // Alice's received message is in bob's archive on b (MAM).
    let q = xml("<iq type='set' id='q1'><query xmlns='urn:xmpp:mam:2'/></iq>");
    cb.send(&q).await;
    let hit = cb
        .recv_until(|e| e.name == "message" && e.get_child("result", "urn:xmpp:mam:2").is_some())
        .await;
    assert!(hit.to_string().contains("hello from a"), "{hit}");

    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_domain_bounces_remote_server_not_found() {
    let closed = free_port();
    let a = federated(
        "a.test",
        free_port(),
        &[("nowhere.test", format!("127.0.0.1:{closed}"))],
    )
    .await;
    let alice = a.add_user("alice", "password").await;
    let mut ca = a.login(&alice, "password", "r").await;
    let _ = alice;
    ca.send(&message("someone@nowhere.test", "anyone there?"))
        .await;
    let e = ca.recv_until(|e| e.name == "message").await;
    assert_eq!(e.attr("type"), Some("error"));
    assert_eq!(stanza_error(&e).as_deref(), Some("remote-server-not-found"));
    assert_eq!(e.attr("from"), Some("someone@nowhere.test"));
    // Accepted before the bounce: the sender's archive keeps it.
    assert_eq!(archived_bodies(&mut ca).await, ["anyone there?"]);
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_domain_bounces_remote_server_timeout() {
    // Accepts TCP and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = silent.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let port = free_port();
    let a = start_server(move |c| {
        c.domains = vec!["a.test".into()];
        c.listen.s2s = format!("127.0.0.1:{port}");
        c.s2s.connect_timeout_secs = 1;
        c.s2s.hosts = [("silent.test".to_string(), addr.to_string())]
            .into_iter()
            .collect();
    })
    .await;
    let alice = a.add_user("alice", "password").await;
    let mut ca = a.login(&alice, "password", "r").await;
    ca.send(&message("x@silent.test", "hello?")).await;
    let e = ca.recv_until(|e| e.name == "message").await;
    assert_eq!(stanza_error(&e).as_deref(), Some("remote-server-timeout"));
    hold.abort();
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_domains_are_refused_at_once() {
    let a = start_server(|c| {
        c.domains = vec!["a.test".into()];
        c.listen.s2s = "127.0.0.1:0".into();
        c.s2s.deny = vec!["evil.test".into()];
    })
    .await;
    let alice = a.add_user("alice", "password").await;
    let mut ca = a.login(&alice, "password", "r").await;
    ca.send(&message("x@evil.test", "hi")).await;
    let e = ca.recv_until(|e| e.name == "message").await;
    assert_eq!(stanza_error(&e).as_deref(), Some("remote-server-not-found"));
    a.stop().await;
}

/// A federated server whose peers are reached as `peers` says, with
/// `tweak` applied last.
async fn federated_with(
    domain: &str,
    port: u16,
    peers: &[(&str, String)],
    tweak: impl FnOnce(&mut natter::config::Config) + Send + 'static,
) -> TestServer {
    let peers: Vec<(String, String)> = peers
        .iter()
        .map(|(d, a)| (d.to_string(), a.clone()))
        .collect();
    let domain = domain.to_string();
    start_server(move |c| {
        c.domains = vec![domain];
        c.listen.s2s = format!("127.0.0.1:{port}");
        c.s2s.connect_timeout_secs = 5;
        c.s2s.hosts = peers.into_iter().collect();
        tweak(c);
    })
    .await
}

/// One message from alice@`a` to bob@`b` arrives, from alice.
async fn one_message_arrives(a: &TestServer, b: &TestServer, text: &str) {
    let alice = a.add_user("alice", "password").await;
    let bob = b.add_user("bob", "password").await;
    let mut ca = a.login(&alice, "password", "phone").await;
    let mut cb = b.login(&bob, "password", "laptop").await;
    cb.send(&xml("<presence/>")).await;
    ca.send(&message(&bob, text)).await;
    let got = cb.recv_until(|e| e.name == "message").await;
    assert_eq!(body(&got).as_deref(), Some(text), "{got}");
    assert_eq!(got.attr("from"), Some(ca.jid()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_streams_carry_federation() {
    // XEP-0368: a.test reaches b.test's direct TLS listener (no STARTTLS
    // on the wire); b.test answers dialback over its own connection.
    let (pa, pb, pb_tls) = (free_port(), free_port(), free_port());
    let a = federated(
        "a.test",
        pa,
        &[("b.test", format!("tls://127.0.0.1:{pb_tls}"))],
    )
    .await;
    let b = federated_with(
        "b.test",
        pb,
        &[("a.test", format!("127.0.0.1:{pa}"))],
        move |c| {
            c.listen.s2s_tls = format!("127.0.0.1:{pb_tls}");
        },
    )
    .await;
    one_message_arrives(&a, &b, "over direct TLS").await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_notifications_reach_an_app_server_on_another_server() {
    // XEP-0357 with the app server on another domain, as Conversations'
    // is: here a client session on b.test plays it.
    let (a, b) = pair().await;
    let alice = a.add_user("alice", "password").await;
    let carol = a.add_user("carol", "password").await;
    let app = b.add_user("app", "password").await;
    let mut capp = b.login(&app, "password", "server").await;
    capp.send(&xml("<presence/>")).await;
    let mut ca = a.login(&alice, "password", "phone").await;
    let enable = xml(&format!(
        "<iq type='set'><enable xmlns='urn:xmpp:push:0' jid='{}' node='device-1'/></iq>",
        capp.jid()
    ));
    let res = ca.iq(enable).await;
    assert_eq!(res.attr("type"), Some("result"), "{res}");
    ca.close().await;
    let mut cc = a.login(&carol, "password", "r").await;
    cc.send(&message(&alice, "private words")).await;
    let iq = capp.recv_until(|e| e.name == "iq").await;
    assert_eq!(iq.attr("from"), Some(alice.as_str()), "{iq}");
    let text = iq.to_string();
    assert!(
        text.contains("device-1") && text.contains("urn:xmpp:push:summary"),
        "{iq}"
    );
    assert!(!text.contains("private words"), "{iq}");
    let result = Element::new("iq", NS_CLIENT)
        .with_attr("type", "result")
        .with_attr("id", iq.attr("id").unwrap())
        .with_attr("to", alice.as_str());
    capp.send(&result).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incoming_stream_over_its_rate_is_slowed_and_loses_nothing() {
    let (pa, pb) = (free_port(), free_port());
    let a = federated("a.test", pa, &[("b.test", format!("127.0.0.1:{pb}"))]).await;
    let b = federated_with(
        "b.test",
        pb,
        &[("a.test", format!("127.0.0.1:{pa}"))],
        |c| {
            c.limits.max_stanza_bytes = 16 * 1024;
            c.s2s.max_queue_bytes = 1024 * 1024;
            c.s2s.rate_bytes_per_sec = 16 * 1024;
            c.s2s.rate_burst_bytes = 16 * 1024;
        },
    )
    .await;
    let alice = a.add_user("alice", "password").await;
    let bob = b.add_user("bob", "password").await;
    let mut ca = a.login(&alice, "password", "phone").await;
    let mut cb = b.login(&bob, "password", "laptop").await;
    cb.send(&xml("<presence/>")).await;
    // About 80 KB: five seconds at 16 KB/s once the burst is spent.
    let pad = "x".repeat(800);
    let start = std::time::Instant::now();
    for i in 0..100 {
        ca.send(&message(&bob, &format!("{i} {pad}"))).await;
    }
    for i in 0..100 {
        let got = cb
            .recv_until(|e| e.name == "message" && body(e).is_some())
            .await;
        assert_eq!(body(&got), Some(format!("{i} {pad}")));
    }
    let took = start.elapsed();
    assert!(
        took >= std::time::Duration::from_secs(3),
        "not slowed: {took:?}"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_member_joins_a_group_and_chats_in_it() {
    const NS_MUC: &str = "http://jabber.org/protocol/muc";
    let (a, b, _, bob, mut ca, mut cb) = alice_and_bob().await;
    let room = "family@conference.a.test";
    let join = |nick: &str| {
        Element::new("presence", NS_CLIENT)
            .with_attr("to", format!("{room}/{nick}"))
            .with_child(Element::new("x", NS_MUC))
    };
    let self_presence = |e: &Element| {
        e.name == "presence"
            && e.get_child("x", &format!("{NS_MUC}#user"))
                .is_some_and(|x| {
                    x.children()
                        .any(|c| c.name == "status" && c.attr("code") == Some("110"))
                })
    };
    ca.send(&join("alice")).await;
    ca.recv_until(self_presence).await;
    // New rooms are members-only groups: alice adds bob on b.test.
    let add = xml(&format!(
        "<iq type='set' to='{room}'><query xmlns='{NS_MUC}#admin'>\
         <item jid='{bob}' affiliation='member'/></query></iq>"
    ));
    let r = ca.iq(add).await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    // bob joins across federation and gets his self-presence and the subject.
    cb.send(&join("bob")).await;
    let me = cb
        .recv_until(|e| self_presence(e) || e.attr("type") == Some("error"))
        .await;
    assert_ne!(me.attr("type"), Some("error"), "{me}");
    assert_eq!(me.attr("from"), Some(format!("{room}/bob").as_str()));
    ca.recv_until(|e| e.name == "presence" && e.attr("from") == Some(&format!("{room}/bob")))
        .await;
    let group = |text: &str| {
        Element::new("message", NS_CLIENT)
            .with_attr("to", room)
            .with_attr("type", "groupchat")
            .with_child(Element::new("body", NS_CLIENT).with_text(text))
    };
    ca.send(&group("hello bob")).await;
    let got = cb
        .recv_until(|e| e.name == "message" && body(e).is_some())
        .await;
    assert_eq!(body(&got).as_deref(), Some("hello bob"), "{got}");
    assert_eq!(got.attr("from"), Some(format!("{room}/alice").as_str()));
    cb.send(&group("hi from b")).await;
    let got = ca
        .recv_until(|e| e.name == "message" && body(e).as_deref() == Some("hi from b"))
        .await;
    assert_eq!(got.attr("from"), Some(format!("{room}/bob").as_str()));
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_contact_fetches_omemo_keys_and_is_refused_private_nodes() {
    // End-to-end encryption across servers: bob on b.test starts an OMEMO
    // session with alice by fetching her device list from her PEP.
    const NS_PUBSUB: &str = "http://jabber.org/protocol/pubsub";
    const DEVICES: &str = "eu.siacs.conversations.axolotl.devicelist";
    let (a, b, alice, _, mut ca, mut cb) = alice_and_bob().await;
    let publish = |node: &str, payload: &str| {
        xml(&format!(
            "<iq type='set'><pubsub xmlns='{NS_PUBSUB}'><publish node='{node}'>\
             <item id='current'>{payload}</item></publish></pubsub></iq>"
        ))
    };
    let r = ca
        .iq(publish(
            DEVICES,
            "<list xmlns='eu.siacs.conversations.axolotl'><device id='7'/></list>",
        ))
        .await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    let r = ca
        .iq(publish(
            "urn:xmpp:avatar:metadata",
            "<metadata xmlns='urn:xmpp:avatar:metadata'/>",
        ))
        .await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    let get = |node: &str| {
        xml(&format!(
            "<iq type='get' to='{alice}'><pubsub xmlns='{NS_PUBSUB}'><items node='{node}'/></pubsub></iq>"
        ))
    };
    let r = cb.iq(get(DEVICES)).await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    assert!(
        r.to_string().contains("device id='7'") || r.to_string().contains("device id=\"7\""),
        "{r}"
    );
    // Presence-access nodes stay closed to a non-contact on another server.
    let r = cb.iq(get("urn:xmpp:avatar:metadata")).await;
    assert_eq!(r.attr("type"), Some("error"), "{r}");
    assert_eq!(stanza_error(&r).as_deref(), Some("not-authorized"), "{r}");
    a.stop().await;
    b.stop().await;
}

/// A test CA and, per domain, a certificate it signed (PEM files in `dir`).
fn ca_and_certs(dir: &std::path::Path, domains: &[&str]) -> std::path::PathBuf {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "natter test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    for d in domains {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![d.to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, *d);
        let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
        std::fs::write(dir.join(format!("{d}.crt")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{d}.key")), key.serialize_pem()).unwrap();
    }
    let path = dir.join("ca.crt");
    std::fs::write(&path, ca_cert.pem()).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_external_authenticates_a_peer_with_a_valid_certificate() {
    let certs = tempfile::tempdir().unwrap();
    let ca = ca_and_certs(certs.path(), &["a.test", "b.test"]);
    let with_cert = |d: &'static str| {
        let (dir, ca) = (certs.path().to_path_buf(), ca.clone());
        move |c: &mut natter::config::Config| {
            c.tls.cert = dir.join(format!("{d}.crt")).display().to_string();
            c.tls.key = dir.join(format!("{d}.key")).display().to_string();
            c.s2s.ca_file = ca.display().to_string();
        }
    };
    let (pa, pb) = (free_port(), free_port());
    let a = federated_with(
        "a.test",
        pa,
        &[("b.test", format!("127.0.0.1:{pb}"))],
        with_cert("a.test"),
    )
    .await;
    // b.test cannot reach a.test at all: dialback (which connects back)
    // would fail, so the message arriving proves EXTERNAL.
    let closed = free_port();
    let b = federated_with(
        "b.test",
        pb,
        &[("a.test", format!("127.0.0.1:{closed}"))],
        with_cert("b.test"),
    )
    .await;
    one_message_arrives(&a, &b, "authenticated by certificate").await;

    // A peer with a.test's certificate that claims another domain is not
    // offered EXTERNAL, and an EXTERNAL attempt for it fails.
    use tokio::io::AsyncWriteExt;
    let tls = {
        let id = natter::net::tls::identity(&{
            let mut c = natter::config::Config::default();
            with_cert("a.test")(&mut c);
            c
        })
        .unwrap();
        natter::net::tls::unverified_client_config_with(id).unwrap()
    };
    let s = tokio::net::TcpStream::connect(("127.0.0.1", pb))
        .await
        .unwrap();
    let mut s = s;
    let mut buf = String::new();
    s.write_all(header("c.test", "b.test", "").as_bytes())
        .await
        .unwrap();
    read_until(&mut s, &mut buf, "</stream:features>").await;
    s.write_all(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        .await
        .unwrap();
    read_until(&mut s, &mut buf, "<proceed").await;
    let name = rustls::pki_types::ServerName::try_from("b.test").unwrap();
    let mut t = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(name, s)
        .await
        .unwrap();
    let mut buf = String::new();
    t.write_all(header("c.test", "b.test", "").as_bytes())
        .await
        .unwrap();
    read_until(&mut t, &mut buf, "</stream:features>").await;
    assert!(!buf.contains("EXTERNAL"), "{buf}");
    t.write_all(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>")
        .await
        .unwrap();
    read_until(&mut t, &mut buf, "not-authorized").await;
    a.stop().await;
    b.stop().await;
}

/// Read into `buf` until it holds `needle` (5 s at most).
async fn read_until<S: tokio::io::AsyncRead + Unpin>(s: &mut S, buf: &mut String, needle: &str) {
    use tokio::io::AsyncReadExt;
    let wait = async {
        while !buf.contains(needle) {
            let mut b = [0u8; 4096];
            let n = s.read(&mut b).await.unwrap();
            assert!(n > 0, "connection closed waiting for {needle:?}: {buf}");
            buf.push_str(std::str::from_utf8(&b[..n]).unwrap());
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), wait)
        .await
        .unwrap_or_else(|_| panic!("no {needle:?} in {buf}"));
}

fn header(from: &str, to: &str, id: &str) -> String {
    format!(
        "<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' \
         xmlns:db='jabber:server:dialback' from='{from}' to='{to}' id='{id}' version='1.0'>"
    )
}

/// The server of `evil.test` as dialback sees it: it vouches for any key.
async fn vouching_server(l: tokio::net::TcpListener) {
    use tokio::io::AsyncWriteExt;
    let ck = rcgen::generate_simple_self_signed(vec!["evil.test".into()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(ck.key_pair.serialize_der()).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![ck.cert.der().clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg));
    while let Ok((mut s, _)) = l.accept().await {
        let mut buf = String::new();
        read_until(&mut s, &mut buf, "'>").await;
        let features = "<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/></stream:features>";
        s.write_all((header("evil.test", "b.test", "v1") + features).as_bytes())
            .await
            .unwrap();
        read_until(&mut s, &mut buf, "<starttls").await;
        s.write_all(b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
            .await
            .unwrap();
        let mut t = acceptor.accept(s).await.unwrap();
        let mut buf = String::new();
        read_until(&mut t, &mut buf, "'>").await;
        t.write_all((header("evil.test", "b.test", "v2") + "<stream:features/>").as_bytes())
            .await
            .unwrap();
        read_until(&mut t, &mut buf, "</verify>").await;
        let id = buf
            .rsplit(" id='")
            .next()
            .and_then(|r| r.split('\'').next())
            .unwrap()
            .to_string();
        let ok = format!("<db:verify from='evil.test' to='b.test' id='{id}' type='valid'/>");
        t.write_all(ok.as_bytes()).await.unwrap();
        t.flush().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_forging_another_domains_from_is_refused() {
    use tokio::io::AsyncWriteExt;
    let evil = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let evil_addr = evil.local_addr().unwrap();
    tokio::spawn(vouching_server(evil));
    let pb = free_port();
    let b = federated("b.test", pb, &[("evil.test", evil_addr.to_string())]).await;
    let bob = b.add_user("bob", "password").await;
    let mut cb = b.login(&bob, "password", "r").await;
    cb.send(&xml("<presence/>")).await;

    // evil.test authenticates honestly (its server vouches for its key)...
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", pb))
        .await
        .unwrap();
    let mut buf = String::new();
    s.write_all(header("evil.test", "b.test", "").as_bytes())
        .await
        .unwrap();
    read_until(&mut s, &mut buf, "</stream:features>").await;
    assert!(buf.contains("starttls"), "{buf}");
    s.write_all(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        .await
        .unwrap();
    read_until(&mut s, &mut buf, "<proceed").await;
    let name = rustls::pki_types::ServerName::try_from("b.test").unwrap();
    let mut t = tls_connector().connect(name, s).await.unwrap();
    let mut buf = String::new();
    t.write_all(header("evil.test", "b.test", "").as_bytes())
        .await
        .unwrap();
    read_until(&mut t, &mut buf, "</stream:features>").await;
    let id = buf
        .split(" id='")
        .nth(1)
        .and_then(|r| r.split('\'').next())
        .unwrap()
        .to_string();
    assert!(!id.is_empty());
    t.write_all(b"<db:result from='evil.test' to='b.test'>anykey</db:result>")
        .await
        .unwrap();
    read_until(&mut t, &mut buf, "type='valid'").await;

    // ... then speaks for a.test: the stream ends with invalid-from.
    t.write_all(
        format!(
            "<message from='mallory@a.test' to='{bob}' type='chat'><body>forged</body></message>"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    read_until(&mut t, &mut buf, "invalid-from").await;
    // Nothing reached bob.
    let got = cb.read_to_end(std::time::Duration::from_millis(300)).await;
    assert!(!got.iter().any(|e| e.name == "message"), "{got:?}");
    b.stop().await;
}

const NS_ROSTER: &str = "jabber:iq:roster";

/// a.test and b.test with alice on a and bob on b, both online.
async fn alice_and_bob() -> (TestServer, TestServer, String, String, Client, Client) {
    let (a, b) = pair().await;
    let alice = a.add_user("alice", "password").await;
    let bob = b.add_user("bob", "password").await;
    let ca = online(&a, &alice, "phone").await;
    let cb = online(&b, &bob, "laptop").await;
    (a, b, alice, bob, ca, cb)
}

/// Logged in to `srv`, roster requested, available.
async fn online(srv: &TestServer, bare: &str, res: &str) -> Client {
    available(srv.login(bare, "password", res).await).await
}

/// Requests the roster (so roster pushes come) and sends initial presence.
async fn available(mut c: Client) -> Client {
    let r = c
        .iq(xml(&format!(
            "<iq type='get'><query xmlns='{NS_ROSTER}'/></iq>"
        )))
        .await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    c.send(&xml("<presence/>")).await;
    c
}

fn pres(to: &str, kind: Option<&str>) -> Element {
    let p = Element::new("presence", NS_CLIENT).with_attr("to", to);
    match kind {
        Some(k) => p.with_attr("type", k),
        None => p,
    }
}

fn is_pres(e: &Element, from: &str, kind: Option<&str>) -> bool {
    e.name == "presence" && e.attr("from") == Some(from) && e.attr("type") == kind
}

/// The subscription (and ask) a roster push gives `jid`.
async fn pushed(c: &mut Client, jid: &str) -> (String, Option<String>) {
    let iq = c
        .recv_matching(|e| {
            e.name == "iq"
                && e.get_child("query", NS_ROSTER)
                    .and_then(|q| q.children().next())
                    .is_some_and(|i| i.attr("jid") == Some(jid))
        })
        .await;
    let item = iq
        .get_child("query", NS_ROSTER)
        .unwrap()
        .children()
        .next()
        .unwrap();
    (
        item.attr("subscription").unwrap().to_string(),
        item.attr("ask").map(str::to_string),
    )
}

/// Roster pushes for `jid` until one says `sub`.
async fn until_sub(c: &mut Client, jid: &str, sub: &str) {
    while pushed(c, jid).await.0 != sub {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_subscriptions_and_broadcast_across_servers() {
    let (a, b) = pair().await;
    let alice = a.add_user("alice", "password").await;
    let bob = b.add_user("bob", "password").await;
    let carol = b.add_user("carol", "password").await;
    let mut ca = online(&a, &alice, "phone").await;
    let mut cb = online(&b, &bob, "laptop").await;

    // alice → bob: subscribe; bob's server keeps it pending and shows it.
    ca.send(&pres(&bob, Some("subscribe"))).await;
    assert_eq!(
        pushed(&mut ca, &bob).await,
        ("none".into(), Some("subscribe".into()))
    );
    cb.recv_matching(|e| is_pres(e, &alice, Some("subscribe")))
        .await;
    // bob approves: alice's item becomes `to` and she gets bob's presence.
    cb.send(&pres(&alice, Some("subscribed"))).await;
    assert_eq!(pushed(&mut cb, &alice).await.0, "from");
    assert_eq!(pushed(&mut ca, &bob).await, ("to".into(), None));
    ca.recv_matching(|e| is_pres(e, cb.jid(), None)).await;

    // bob → alice, approved: both.
    cb.send(&pres(&alice, Some("subscribe"))).await;
    ca.recv_matching(|e| is_pres(e, &bob, Some("subscribe")))
        .await;
    ca.send(&pres(&bob, Some("subscribed"))).await;
    until_sub(&mut ca, &bob, "both").await;
    until_sub(&mut cb, &alice, "both").await;
    cb.recv_matching(|e| is_pres(e, ca.jid(), None)).await;

    // A status change reaches the remote subscriber.
    ca.send(&xml("<presence><status>busy</status></presence>"))
        .await;
    let p = cb
        .recv_matching(|e| {
            is_pres(e, ca.jid(), None) && e.child_text("status", NS_CLIENT).is_some()
        })
        .await;
    assert_eq!(p.child_text("status", NS_CLIENT).as_deref(), Some("busy"));

    // A second device of alice logs in: its probe fetches bob's presence
    // from b, and bob sees the new resource.
    let mut ca2 = online(&a, &alice, "tablet").await;
    ca2.recv_matching(|e| is_pres(e, cb.jid(), None)).await;
    cb.recv_matching(|e| is_pres(e, ca2.jid(), None)).await;

    // Directed presence to a stranger on b, then logout: carol gets both
    // the available and the unavailable; bob gets the unavailable.
    let mut cc = online(&b, &carol, "r").await;
    ca2.send(&pres(&carol, None)).await;
    cc.recv_matching(|e| is_pres(e, ca2.jid(), None)).await;
    let gone = ca2.jid().to_string();
    ca2.close().await;
    cb.recv_matching(|e| is_pres(e, &gone, Some("unavailable")))
        .await;
    cc.recv_matching(|e| is_pres(e, &gone, Some("unavailable")))
        .await;

    // bob removes alice: she gets unsubscribe + unsubscribed and her item
    // goes to `none`; bob's other presence stops reaching her.
    let rm = format!(
        "<iq type='set'><query xmlns='{NS_ROSTER}'><item jid='{alice}' subscription='remove'/></query></iq>"
    );
    let r = cb.iq(xml(&rm)).await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    ca.recv_matching(|e| is_pres(e, cb.jid(), Some("unavailable")))
        .await;
    until_sub(&mut ca, &bob, "none").await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_user_cannot_change_a_roster_uninvited() {
    let (a, b) = pair().await;
    let alice = a.add_user("alice", "password").await;
    let mallory = b.add_user("mallory", "password").await;
    let mut ca = online(&a, &alice, "r").await;
    let mut cm = online(&b, &mallory, "r").await;
    // `subscribed` nobody asked for, `unsubscribe` with no subscription:
    // RFC 6121 A.3.3 / A.3.2 say to ignore them.
    cm.send(&pres(&alice, Some("subscribed"))).await;
    cm.send(&pres(&alice, Some("unsubscribe"))).await;
    // A probe from a non-subscriber gets no presence (alice's server says
    // `unsubscribed`, which b drops as mallory never subscribed).
    cm.send(&pres(&alice, Some("probe"))).await;
    let got = cm.read_to_end(std::time::Duration::from_millis(500)).await;
    let from_alice = |e: &Element| e.attr("from").is_some_and(|f| f.starts_with("alice@"));
    assert!(
        !got.iter().any(|e| e.name == "presence" && from_alice(e)),
        "{got:?}"
    );
    let r = ca
        .iq(xml(&format!(
            "<iq type='get'><query xmlns='{NS_ROSTER}'/></iq>"
        )))
        .await;
    let q = r.get_child("query", NS_ROSTER).unwrap();
    assert_eq!(q.children().count(), 0, "{r}");
    let got = ca.read_to_end(std::time::Duration::from_millis(300)).await;
    assert!(
        !got.iter()
            .any(|e| e.name == "presence" && e.attr("from") != Some(ca.jid())),
        "{got:?}"
    );
    a.stop().await;
    b.stop().await;
}

/// The bodies in `c`'s own archive (XEP-0313), oldest first.
async fn archived_bodies(c: &mut Client) -> Vec<String> {
    c.send(&xml(
        "<iq type='set' id='mam'><query xmlns='urn:xmpp:mam:2' queryid='q'/></iq>",
    ))
    .await;
    let mut out = Vec::new();
    loop {
        let e = c
            .recv_until(|e| e.name == "message" || (e.name == "iq" && e.attr("id") == Some("mam")))
            .await;
        if e.name == "iq" {
            return out;
        }
        if let Some(r) = e.get_child("result", "urn:xmpp:mam:2") {
            let fwd = r.get_child("forwarded", "urn:xmpp:forward:0").unwrap();
            let m = fwd.get_child("message", NS_CLIENT).unwrap();
            out.extend(body(m));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_to_remote_users_are_archived_and_carbon_copied() {
    let (a, b) = pair().await;
    let alice = a.add_user("alice", "password").await;
    let bob = b.add_user("bob", "password").await;
    let mut phone = online(&a, &alice, "phone").await;
    let mut laptop = online(&a, &alice, "laptop").await;
    let r = laptop
        .iq(xml(
            "<iq type='set'><enable xmlns='urn:xmpp:carbons:2'/></iq>",
        ))
        .await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    let mut cb = online(&b, &bob, "r").await;

    phone.send(&message(&bob, "to b, with copies")).await;
    let got = cb.recv_until(|e| e.name == "message").await;
    assert_eq!(body(&got).as_deref(), Some("to b, with copies"));
    // Only bob's server's stanza-id reaches bob, not alice's archive id.
    let ids: Vec<_> = got
        .children()
        .filter(|c| c.is("stanza-id", "urn:xmpp:sid:0"))
        .map(|c| c.attr("by").unwrap_or_default().to_string())
        .collect();
    assert_eq!(ids, [bob.as_str()]);

    // XEP-0280: the laptop gets a sent carbon with alice's archive id.
    let carbon = laptop
        .recv_until(|e| e.name == "message" && e.get_child("sent", "urn:xmpp:carbons:2").is_some())
        .await;
    let inner = carbon
        .get_child("sent", "urn:xmpp:carbons:2")
        .and_then(|s| s.get_child("forwarded", "urn:xmpp:forward:0"))
        .and_then(|f| f.get_child("message", NS_CLIENT))
        .unwrap();
    assert_eq!(body(inner).as_deref(), Some("to b, with copies"));
    let sid = inner.get_child("stanza-id", "urn:xmpp:sid:0").unwrap();
    assert_eq!(sid.attr("by"), Some(alice.as_str()));

    // XEP-0313: alice's own archive has it.
    assert_eq!(archived_bodies(&mut phone).await, ["to b, with copies"]);
    a.stop().await;
    b.stop().await;
}

/// Debian's Prosody as a child process: its own config, data and
/// certificate in a temp dir, c2s and s2s on free loopback ports, dialback
/// with `s2s_secure_auth = false` (self-signed certificates both ways).
struct Prosody {
    child: tokio::process::Child,
    c2s: SocketAddr,
    s2s: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prosody {
    async fn start(domain: &str, users: &[&str]) -> Prosody {
        let bin = std::process::Command::new("prosody").arg("-v").output();
        assert!(
            bin.is_ok(),
            "prosody is not installed (apt-get install -y prosody)"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
        let ck = rcgen::generate_simple_self_signed(vec![domain.to_string()]).unwrap();
        std::fs::write(path("p.crt"), ck.cert.pem()).unwrap();
        std::fs::write(path("p.key"), ck.key_pair.serialize_pem()).unwrap();
        std::fs::create_dir(path("data")).unwrap();
        let (c2s, s2s) = (free_port(), free_port());
        let cfg = format!(
            r#"run_as_root = true
pidfile = "{pid}"
data_path = "{data}"
certificates = "{dir}"
interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {c2s} }}
s2s_ports = {{ {s2s} }}
s2s_require_encryption = true
s2s_secure_auth = false
authentication = "internal_plain"
log = {{ debug = "{log}" }}
modules_enabled = {{ "roster", "saslauth", "tls", "dialback", "disco", "ping" }}
ssl = {{ certificate = "{crt}", key = "{key}" }}
VirtualHost "{domain}"
"#,
            pid = path("p.pid"),
            data = path("data"),
            dir = dir.path().display(),
            log = path("prosody.log"),
            crt = path("p.crt"),
            key = path("p.key"),
        );
        let cfg_path = path("prosody.cfg.lua");
        std::fs::write(&cfg_path, cfg).unwrap();
        for u in users {
            let st = std::process::Command::new("prosodyctl")
                .args(["--config", &cfg_path, "register", u, domain, "password"])
                .output()
                .unwrap();
            assert!(st.status.success(), "prosodyctl register: {st:?}");
        }
        let child = tokio::process::Command::new("prosody")
            .args(["-F", "--config", &cfg_path])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let c2s: SocketAddr = format!("127.0.0.1:{c2s}").parse().unwrap();
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(c2s).await.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        Prosody {
            child,
            c2s,
            s2s: format!("127.0.0.1:{s2s}").parse().unwrap(),
            _dir: dir,
        }
    }

    /// A c2s client logged in (PLAIN over STARTTLS), roster requested,
    /// available.
    async fn online(&self, domain: &str, user: &str, res: &str) -> Client {
        let mut c = Client::tcp_raw(self.c2s).await;
        c.domain = domain.to_string();
        c.open().await;
        c.starttls().await;
        c.open().await;
        let jid = format!("{user}@{domain}");
        c.login_with(natter_sasl::Mechanism::Plain, &jid, "password", res)
            .await;
        available(c).await
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prosody.log")).unwrap_or_default()
    }
}

/// natter ↔ Prosody. Prosody finds a server by DNS only (SRV, then A on
/// 5269; no static host map), so natter's domain here is an IP literal
/// (RFC 7622 allows it), which Prosody connects to on port 5269 without
/// DNS: natter listens on 127.0.0.N:5269 with N random, so parallel runs
/// don't collide. natter finds Prosody through `s2s.hosts`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn natter_and_prosody_chat_and_subscribe() {
    let n = 2 + (std::process::id() % 250);
    let natter_domain = format!("127.0.0.{n}");
    let prosody = Prosody::start("prosody.test", &["alice"]).await;
    let nd = natter_domain.clone();
    let ps2s = prosody.s2s.to_string();
    let srv = start_server(move |c| {
        c.domains = vec![nd.clone()];
        c.listen.s2s = format!("{nd}:5269");
        c.s2s.connect_timeout_secs = 10;
        c.s2s.hosts = [
            ("prosody.test".to_string(), ps2s),
            (
                "nowhere.test".to_string(),
                format!("127.0.0.1:{}", free_port()),
            ),
        ]
        .into_iter()
        .collect();
    })
    .await;
    let bob = srv.add_user("bob", "password").await;
    let mut cb = online(&srv, &bob, "laptop").await;
    let mut ca = prosody.online("prosody.test", "alice", "phone").await;
    let alice = "alice@prosody.test";

    // natter → Prosody.
    cb.send(&message(alice, "hello prosody")).await;
    let got = ca
        .recv_until(|e| e.name == "message" && body(e).is_some())
        .await;
    assert_eq!(
        body(&got).as_deref(),
        Some("hello prosody"),
        "{}",
        prosody.log()
    );
    assert_eq!(got.attr("from"), Some(cb.jid()));
    // Prosody → natter.
    ca.send(&message(&bob, "hello natter")).await;
    let got = cb
        .recv_until(|e| e.name == "message" && body(e).is_some())
        .await;
    assert_eq!(body(&got).as_deref(), Some("hello natter"));
    assert_eq!(got.attr("from"), Some(ca.jid()));

    // bob subscribes to alice, she approves: bob's item is `to` and he
    // gets her presence.
    cb.send(&pres(alice, Some("subscribe"))).await;
    ca.recv_matching(|e| is_pres(e, &bob, Some("subscribe")))
        .await;
    ca.send(&pres(&bob, Some("subscribed"))).await;
    until_sub(&mut cb, alice, "to").await;
    cb.recv_matching(|e| is_pres(e, ca.jid(), None)).await;
    // alice subscribes to bob, he approves: both, and she sees him.
    ca.send(&pres(&bob, Some("subscribe"))).await;
    cb.recv_matching(|e| is_pres(e, alice, Some("subscribe")))
        .await;
    cb.send(&pres(alice, Some("subscribed"))).await;
    until_sub(&mut cb, alice, "both").await;
    ca.recv_matching(|e| is_pres(e, cb.jid(), None)).await;
    // Presence changes travel both ways.
    cb.send(&xml("<presence><show>away</show></presence>"))
        .await;
    ca.recv_matching(|e| is_pres(e, cb.jid(), None) && e.child_text("show", NS_CLIENT).is_some())
        .await;
    let gone = ca.jid().to_string();
    ca.close().await;
    cb.recv_matching(|e| is_pres(e, &gone, Some("unavailable")))
        .await;

    // A domain nobody answers for bounces.
    cb.send(&message("x@nowhere.test", "anyone?")).await;
    let e = cb
        .recv_until(|e| e.name == "message" && e.attr("type") == Some("error"))
        .await;
    assert_eq!(stanza_error(&e).as_deref(), Some("remote-server-not-found"));
    srv.stop().await;
    let mut p = prosody;
    let _ = p.child.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pep_notifications_reach_remote_contacts_that_want_them() {
    const NS_PUBSUB: &str = "http://jabber.org/protocol/pubsub";
    const AVATAR: &str = "urn:xmpp:avatar:metadata";
    let (a, b, alice, bob, mut ca, mut cb) = alice_and_bob().await;
    // Mutual presence subscription across the two servers.
    ca.send(&pres(&bob, Some("subscribe"))).await;
    cb.recv_matching(|e| is_pres(e, &alice, Some("subscribe")))
        .await;
    cb.send(&pres(&alice, Some("subscribed"))).await;
    cb.send(&pres(&alice, Some("subscribe"))).await;
    ca.recv_matching(|e| is_pres(e, &bob, Some("subscribe")))
        .await;
    ca.send(&pres(&bob, Some("subscribed"))).await;
    until_sub(&mut ca, &bob, "both").await;
    until_sub(&mut cb, &alice, "both").await;

    let publish = |id: &str| {
        xml(&format!(
            "<iq type='set'><pubsub xmlns='{NS_PUBSUB}'><publish node='{AVATAR}'>\
             <item id='{id}'><metadata xmlns='{AVATAR}'/></item></publish></pubsub></iq>"
        ))
    };
    let r = ca.iq(publish("first")).await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");

    // bob's client announces capabilities; alice's server asks what they
    // mean (disco#info over s2s) and bob's client answers with avatar
    // +notify.
    cb.send(&xml(
        "<presence><c xmlns='http://jabber.org/protocol/caps' hash='sha-1' \
         node='https://client.example' ver='opaque-ver'/></presence>",
    ))
    .await;
    // bob's own server asks too (for its own PEP); both get the answer.
    let mut asked_by_alice = false;
    while !asked_by_alice {
        let q = cb
            .recv_matching(|e| e.name == "iq" && e.attr("type") == Some("get"))
            .await;
        let asker = q.attr("from").unwrap_or_default().to_string();
        assert!(asker == alice || asker == "b.test", "{q}");
        asked_by_alice = asker == alice;
        let answer = xml(&format!(
            "<iq type='result' id='{}' to='{asker}'><query xmlns='http://jabber.org/protocol/disco#info' \
             node='https://client.example#opaque-ver'><identity category='client' type='pc'/>\
             <feature var='http://jabber.org/protocol/disco#info'/>\
             <feature var='{AVATAR}+notify'/></query></iq>",
            q.attr("id").unwrap()
        ));
        cb.send(&answer).await;
    }
    let item_of = |e: &Element| {
        e.get_child("event", "http://jabber.org/protocol/pubsub#event")
            .and_then(|ev| ev.get_child("items", "http://jabber.org/protocol/pubsub#event"))
            .filter(|i| i.attr("node") == Some(AVATAR))
            .and_then(|i| i.children().next())
            .and_then(|i| i.attr("id").map(str::to_string))
    };
    // The last item first (XEP-0163 §4.3.1), then a new one as published.
    let last = cb
        .recv_matching(|e| e.name == "message" && item_of(e).is_some())
        .await;
    assert_eq!(item_of(&last).as_deref(), Some("first"));
    assert_eq!(last.attr("from"), Some(alice.as_str()));
    let r = ca.iq(publish("second")).await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    let live = cb
        .recv_matching(|e| e.name == "message" && item_of(e).is_some())
        .await;
    assert_eq!(item_of(&live).as_deref(), Some("second"));

    // A node bob's client did not ask for is not pushed to it.
    let tune = xml(&format!(
        "<iq type='set'><pubsub xmlns='{NS_PUBSUB}'><publish node='http://jabber.org/protocol/tune'>\
         <item id='t'><tune xmlns='http://jabber.org/protocol/tune'/></item></publish></pubsub></iq>"
    ));
    let r = ca.iq(tune).await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    let got = cb.read_to_end(std::time::Duration::from_millis(500)).await;
    assert!(
        !got.iter().any(|e| e.to_string().contains("protocol/tune")),
        "{got:?}"
    );

    // A stranger's presence with caps is not tracked: no query, nothing
    // remembered (contacts only).
    let carol = b.add_user("carol", "password").await;
    let mut cc = online(&b, &carol, "r").await;
    cc.send(&xml(&format!(
        "<presence to='{alice}'><c xmlns='http://jabber.org/protocol/caps' hash='sha-1' \
         node='https://client.example' ver='other-ver'/></presence>"
    )))
    .await;
    let got = cc.read_to_end(std::time::Duration::from_millis(500)).await;
    assert!(
        !got.iter()
            .any(|e| e.name == "iq" && e.attr("from") == Some(alice.as_str())),
        "{got:?}"
    );
    a.stop().await;
    b.stop().await;
}
