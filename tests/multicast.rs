//! XEP-0033 multicast through the server: a message to the domain with
//! `to`/`cc`/`bcc` addresses becomes one 1:1 message per distinct
//! recipient — archived for both parties, delivered live or queued
//! offline, bcc hidden, blocking and unknown accounts answered per
//! recipient, duplicates sent once, a recipient limit.

mod common;

use common::*;
use natter_store::ArchiveQuery;
use natter_xml::NS_CLIENT;
use std::collections::BTreeSet;

const NS_ADDRESS: &str = "http://jabber.org/protocol/address";
const NS_SID: &str = "urn:xmpp:sid:0";
const PASSWORD: &str = "password";

/// A chat message to the server's domain with these (type, jid) addresses.
fn multicast(body: &str, addresses: &[(&str, &str)]) -> Element {
    let mut a = Element::new("addresses", NS_ADDRESS);
    for (kind, jid) in addresses {
        a.append_child(
            Element::new("address", NS_ADDRESS)
                .with_attr("type", *kind)
                .with_attr("jid", *jid),
        );
    }
    message(DOMAIN, body).with_child(a)
}

/// The (type, jid, delivered) of each address a received copy shows.
fn shown(m: &Element) -> Vec<(String, String, bool)> {
    m.get_child("addresses", NS_ADDRESS)
        .map(|a| {
            a.children()
                .map(|c| {
                    (
                        c.attr("type").unwrap_or_default().to_string(),
                        c.attr("jid").unwrap_or_default().to_string(),
                        c.attr("delivered") == Some("true"),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Every archived message of `owner`, oldest first.
async fn archive(srv: &TestServer, owner: &str) -> Vec<natter_store::ArchivedMessage> {
    let q = ArchiveQuery {
        max: 1000,
        ..Default::default()
    };
    let page = srv.state().store.archive_query(owner, &q).await.unwrap();
    page.items
}

async fn online(srv: &TestServer, user: &str) -> Client {
    let mut c = srv.login(user, PASSWORD, "res").await;
    c.send(&xml("<presence/>")).await;
    c.sync().await;
    c
}

/// alice, bob and carol, online.
async fn trio(srv: &TestServer) -> ([String; 3], [Client; 3]) {
    let mut names = Vec::new();
    let mut clients = Vec::new();
    for n in ["alice", "bob", "carol"] {
        let jid = srv.add_user(n, PASSWORD).await;
        clients.push(online(srv, &jid).await);
        names.push(jid);
    }
    let Ok(names) = names.try_into() else {
        unreachable!("three names")
    };
    let Ok(clients) = clients.try_into() else {
        unreachable!("three clients")
    };
    (names, clients)
}

/// The messages `c` got, after a round trip that follows them.
async fn messages(c: &mut Client) -> Vec<Element> {
    c.sync()
        .await
        .into_iter()
        .filter(|s| s.name == "message")
        .collect()
}

#[tokio::test]
async fn fifty_recipients_get_fifty_archived_one_to_one_messages() {
    let srv = start_server(|_| {}).await;
    let alice = srv.add_user("alice", PASSWORD).await;
    let mut users = Vec::new();
    for i in 0..50 {
        users.push(srv.add_user(&format!("r{i}"), PASSWORD).await);
    }
    // 0..25 in `to`, 25..40 in `cc`, 40..50 in `bcc`; some of each online.
    let kind = |i: usize| match i {
        0..=24 => "to",
        25..=39 => "cc",
        _ => "bcc",
    };
    let live = [0, 1, 2, 25, 26, 40, 41];
    let mut clients = Vec::new();
    for i in live {
        clients.push((i, online(&srv, &users[i]).await));
    }
    let mut a = online(&srv, &alice).await;
    let addrs: Vec<(&str, &str)> = (0..50).map(|i| (kind(i), users[i].as_str())).collect();
    let sent = multicast("to everyone", &addrs);
    a.send(&sent).await;
    let back = a.sync().await;
    assert!(back.is_empty(), "the sender got {back:?}");

    // What every recipient sees: all to/cc addresses, delivered; no bcc.
    let visible: Vec<(String, String, bool)> = (0..40)
        .map(|i| (kind(i).to_string(), users[i].clone(), true))
        .collect();
    for (i, c) in &mut clients {
        let got = messages(c).await;
        assert_eq!(got.len(), 1, "r{i} got {got:?}");
        let m = &got[0];
        assert_eq!(m.attr("from"), Some(a.jid()), "{m}");
        assert_eq!(m.attr("to"), Some(users[*i].as_str()), "{m}");
        assert_eq!(m.attr("id"), sent.attr("id"));
        assert_eq!(
            m.child_text("body", NS_CLIENT).as_deref(),
            Some("to everyone")
        );
        assert_eq!(shown(m), visible, "r{i}");
        let sid = m
            .get_child("stanza-id", NS_SID)
            .expect("recipient's stanza-id");
        assert_eq!(sid.attr("by"), Some(users[*i].as_str()));
    }
    for (i, u) in users.iter().enumerate() {
        let queued = srv.state().store.offline_count(u).await.unwrap();
        assert_eq!(
            queued,
            u64::from(!live.contains(&i)),
            "r{i}'s offline queue"
        );
        let theirs = archive(&srv, u).await;
        assert_eq!(theirs.len(), 1, "r{i}'s archive");
        assert_eq!(theirs[0].with, alice);
        assert!(!theirs[0].outgoing);
    }
    // The sender's archive: one outgoing message per recipient.
    let mine = archive(&srv, &alice).await;
    assert_eq!(mine.len(), 50);
    assert!(mine.iter().all(|m| m.outgoing));
    let with: BTreeSet<&str> = mine.iter().map(|m| m.with.as_str()).collect();
    assert_eq!(with, users.iter().map(String::as_str).collect());

    // Offline recipients get theirs at login, a bcc one as well (still
    // without any bcc address, its own included).
    for i in [10, 30, 45] {
        let mut c = srv.login(&users[i], PASSWORD, "res").await;
        c.send(&xml("<presence/>")).await;
        let m = c.recv_until(|e| e.name == "message").await;
        assert_eq!(m.attr("from"), Some(a.jid()));
        assert_eq!(shown(&m), visible, "r{i}");
        assert!(messages(&mut c).await.is_empty());
        queue_emptied(&srv, &users[i]).await;
    }
    srv.stop().await;
}

#[tokio::test]
async fn duplicates_go_once_and_too_many_recipients_are_refused() {
    let srv = start_server(|c| c.limits.max_multicast_recipients = 3).await;
    let ([alice, bob, carol], [mut a, mut b, mut c]) = trio(&srv).await;
    let dave = srv.add_user("dave", PASSWORD).await;

    // bob three times (once in another case), carol in to and bcc.
    let shouty = format!("BOB@{}", DOMAIN.to_uppercase());
    let m = multicast(
        "once",
        &[
            ("to", &bob),
            ("cc", &bob),
            ("to", &shouty),
            ("to", &carol),
            ("bcc", &carol),
        ],
    );
    a.send(&m).await;
    assert!(a.sync().await.is_empty());
    for x in [&mut b, &mut c] {
        let got = messages(x).await;
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(
            got[0].child_text("body", NS_CLIENT).as_deref(),
            Some("once")
        );
    }
    assert_eq!(archive(&srv, &alice).await.len(), 2);

    // Four distinct recipients with a limit of three: nobody gets it.
    let m = multicast(
        "too many",
        &[("to", &bob), ("to", &carol), ("cc", &dave), ("bcc", &alice)],
    );
    a.send(&m).await;
    let e = a.recv_until(|e| e.name == "message").await;
    assert_eq!(e.attr("type"), Some("error"), "{e}");
    assert_eq!(e.attr("from"), Some(DOMAIN));
    assert_eq!(stanza_error(&e).as_deref(), Some("policy-violation"), "{e}");
    assert!(e.to_string().contains("at most 3 recipients"), "{e}");
    assert!(messages(&mut b).await.is_empty());
    assert!(messages(&mut c).await.is_empty());
    assert_eq!(srv.state().store.offline_count(&dave).await.unwrap(), 0);
    assert_eq!(archive(&srv, &alice).await.len(), 2);

    // A uri address is not supported: the whole message is refused.
    let mut m = multicast("uri", &[("to", &bob)]);
    m.get_child_mut("addresses", NS_ADDRESS)
        .unwrap()
        .append_child(
            Element::new("address", NS_ADDRESS)
                .with_attr("type", "cc")
                .with_attr("uri", "mailto:bob@example.org"),
        );
    a.send(&m).await;
    let e = a.recv_until(|e| e.name == "message").await;
    assert_eq!(stanza_error(&e).as_deref(), Some("bad-request"), "{e}");
    assert!(messages(&mut b).await.is_empty());
    srv.stop().await;
}

#[tokio::test]
async fn blocked_unknown_and_remote_recipients_get_errors_the_others_the_message() {
    let srv = start_server(|_| {}).await;
    let ([alice, bob, carol], [mut a, mut b, mut c]) = trio(&srv).await;

    // The feature is on the server's disco#info.
    let info = a
        .iq(xml(&format!(
            "<iq type='get' to='{DOMAIN}'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>"
        )))
        .await;
    let advertised = info
        .get_child("query", "http://jabber.org/protocol/disco#info")
        .is_some_and(|q| q.children().any(|f| f.attr("var") == Some(NS_ADDRESS)));
    assert!(advertised, "{info}");

    let r = b
        .iq(xml(&format!(
            "<iq type='set'><block xmlns='urn:xmpp:blocking'><item jid='{alice}'/></block></iq>"
        )))
        .await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    let nobody = format!("nobody@{DOMAIN}");
    let m = multicast(
        "hello",
        &[
            ("to", &bob),
            ("to", &nobody),
            ("cc", "someone@elsewhere.example"),
            ("to", &carol),
        ],
    );
    a.send(&m).await;
    let mut errors: Vec<(String, String)> = a
        .sync()
        .await
        .iter()
        .filter(|e| e.name == "message")
        .map(|e| {
            assert_eq!(e.attr("type"), Some("error"), "{e}");
            assert_eq!(e.attr("id"), m.attr("id"));
            (
                e.attr("from").unwrap_or_default().to_string(),
                stanza_error(e).unwrap_or_default(),
            )
        })
        .collect();
    // Alice's session is done with it once her round trip is: now look.
    let got = messages(&mut c).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].attr("from"), Some(a.jid()));
    assert!(messages(&mut b).await.is_empty());
    errors.sort();
    assert_eq!(
        errors,
        vec![
            (bob.clone(), "service-unavailable".to_string()),
            (nobody, "service-unavailable".to_string()),
            (
                "someone@elsewhere.example".to_string(),
                "remote-server-not-found".to_string()
            ),
        ]
    );
    // Only carol's copy was accepted, so only it is archived.
    let mine = archive(&srv, &alice).await;
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0].with, carol);
    assert!(archive(&srv, &bob).await.is_empty());
    srv.stop().await;
}
