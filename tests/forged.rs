//! Server-only wrappers and stamps forged by one user for another
//! (issue 9 item 7): what the recipient actually receives.
//!
//! A carbon or an archive result around a message "from" a third user
//! is refused with `not-acceptable`; stanza-ids, delays and `ofrom`
//! addresses naming a local JID are stripped, the JID compared after
//! normalization (case, trailing dot of the domain).

mod common;

use common::*;
use natter_xml::{Element, NS_CLIENT};

/// A chat message from `to`'s point of view "from alice", forwarded.
fn forwarded_from(third: &str, to: &str) -> String {
    format!(
        "<forwarded xmlns='urn:xmpp:forward:0'>\
         <delay xmlns='urn:xmpp:delay' stamp='2024-01-01T00:00:00Z'/>\
         <message xmlns='jabber:client' from='{third}/phone' to='{to}' type='chat'>\
         <body>wire the money</body></message></forwarded>"
    )
}

/// `a` sends `b` a message carrying `payload`, once alone and once in the
/// same read as an honest message (the batched path). Each time `a` gets
/// `not-acceptable` naming `ns`, and `b` gets only the honest message.
async fn assert_refused(srv: &TestServer, payload: &str, ns: &str) {
    let (mut a, mut b) = srv.logged_in_pair().await;
    let to = b.jid().to_string();
    let forged = |id: &str| {
        xml(&format!(
            "<message to='{to}' type='chat' id='{id}'><body>see below</body>{payload}</message>"
        ))
    };
    let honest = |body: &str| message(&to, body);

    a.send(&forged("alone")).await;
    a.send(&honest("after alone")).await;
    let batch = a.serialize(&forged("batched")) + &a.serialize(&honest("after batched"));
    a.send_raw(batch.as_bytes()).await;

    for id in ["alone", "batched"] {
        let err = a.recv_until(|e| e.attr("id") == Some(id)).await;
        assert_eq!(err.attr("type"), Some("error"), "{err}");
        assert_eq!(
            stanza_error(&err).as_deref(),
            Some("not-acceptable"),
            "{err}"
        );
        let text = err
            .get_child("error", NS_CLIENT)
            .and_then(|e| e.children().find(|c| c.name == "text"))
            .map(Element::text)
            .unwrap_or_default();
        assert!(text.contains(ns), "error names the element: {err}");
        // The error does not carry the forgery back either.
        assert!(err.children().all(|c| c.ns != ns), "{err}");
    }
    for body in ["after alone", "after batched"] {
        let got = b.recv_until(|e| e.name == "message").await;
        assert_eq!(
            got.child_text("body", NS_CLIENT).as_deref(),
            Some(body),
            "the forged message reached the recipient: {got}"
        );
    }
    let rest = b.sync().await;
    assert!(rest.iter().all(|e| e.name != "message"), "{rest:?}");
    // Nothing of it was archived for the recipient either.
    let page = b
        .iq(xml(
            "<iq type='set'><query xmlns='urn:xmpp:mam:2' queryid='q'/></iq>",
        ))
        .await;
    assert_eq!(page.attr("type"), Some("result"), "{page}");
    let archived: Vec<_> = b.take_buffered();
    assert!(
        archived
            .iter()
            .all(|m| !m.to_string().contains("wire the money")),
        "{archived:?}"
    );
    a.close().await;
    b.close().await;
}

#[tokio::test]
async fn forged_sent_carbon_from_another_user_is_refused() {
    let srv = start_server(|_| {}).await;
    let fwd = forwarded_from("victim@localhost", "someone@localhost");
    let payload = format!("<sent xmlns='urn:xmpp:carbons:2'>{fwd}</sent>");
    assert_refused(&srv, &payload, "urn:xmpp:carbons:2").await;
    srv.assert_healthy().await;
    srv.stop().await;
}

#[tokio::test]
async fn forged_received_carbon_from_another_user_is_refused() {
    let srv = start_server(|_| {}).await;
    for ns in ["urn:xmpp:carbons:2", "urn:xmpp:carbons:1"] {
        let fwd = forwarded_from("third@localhost", "victim@localhost");
        let payload = format!("<received xmlns='{ns}'>{fwd}</received>");
        assert_refused(&srv, &payload, ns).await;
    }
    srv.stop().await;
}

#[tokio::test]
async fn forged_mam_result_from_another_user_is_refused() {
    let srv = start_server(|_| {}).await;
    for ns in [
        "urn:xmpp:mam:2",
        "urn:xmpp:mam:1",
        "urn:xmpp:mam:0",
        "urn:xmpp:mam:tmp",
    ] {
        let fwd = forwarded_from("third@localhost", "victim@localhost");
        let payload = format!("<result xmlns='{ns}' queryid='q' id='forged'>{fwd}</result>");
        assert_refused(&srv, &payload, ns).await;
    }
    srv.stop().await;
}

/// The recipient's view of one message `a` sent it with `extra` children
/// (given the recipient's bare JID).
async fn delivered_with(srv: &TestServer, extra: impl Fn(&str) -> String) -> Element {
    let (mut a, mut b) = srv.logged_in_pair().await;
    let to = b.jid().to_string();
    let m = xml(&format!(
        "<message to='{to}' type='chat' id='m1'><body>hi</body>{}</message>",
        extra(b.bare_jid())
    ));
    a.send(&m).await;
    let got = b.recv_until(|e| e.name == "message").await;
    assert_eq!(got.child_text("body", NS_CLIENT).as_deref(), Some("hi"));
    a.close().await;
    b.close().await;
    got
}

#[tokio::test]
async fn stanza_id_by_recipient_with_trailing_dot_or_other_case_is_stripped() {
    let srv = start_server(|_| {}).await;
    let got = delivered_with(&srv, |to| {
        let (node, domain) = to.split_once('@').unwrap();
        format!(
            "<stanza-id xmlns='urn:xmpp:sid:0' by='{to}.' id='forged-dot'/>\
             <stanza-id xmlns='urn:xmpp:sid:0' by='{}@{}.' id='forged-case'/>\
             <stanza-id xmlns='urn:xmpp:sid:0' by='{to}./res' id='forged-full'/>\
             <stanza-id xmlns='urn:xmpp:sid:0' by='localhost.' id='forged-domain'/>\
             <stanza-id xmlns='urn:xmpp:sid:0' id='forged-no-by'/>",
            node.to_uppercase(),
            domain.to_uppercase()
        )
    })
    .await;
    let ids: Vec<_> = got
        .children()
        .filter(|c| c.is("stanza-id", "urn:xmpp:sid:0"))
        .map(|c| (c.attr("by").unwrap_or(""), c.attr("id").unwrap_or("")))
        .collect();
    assert!(
        ids.iter().all(|(_, id)| !id.starts_with("forged")),
        "forged stanza-id delivered: {got}"
    );
    // The archive's own id is still there, exactly once.
    assert_eq!(ids.len(), 1, "{got}");
    srv.stop().await;
}

#[tokio::test]
async fn legacy_delay_from_the_server_is_stripped() {
    let srv = start_server(|_| {}).await;
    let got = delivered_with(&srv, |to| {
        format!(
            "<x xmlns='jabber:x:delay' from='localhost' stamp='20020910T23:08:25'/>\
             <x xmlns='jabber:x:delay' from='LOCALHOST.' stamp='20020910T23:08:25'/>\
             <x xmlns='jabber:x:delay' from='{to}' stamp='20020910T23:08:25'/>\
             <delay xmlns='urn:xmpp:delay' from='localhost.' stamp='2002-09-10T23:08:25Z'/>"
        )
    })
    .await;
    assert!(got.get_child("x", "jabber:x:delay").is_none(), "{got}");
    assert!(got.get_child("delay", "urn:xmpp:delay").is_none(), "{got}");
    srv.stop().await;
}

#[tokio::test]
async fn forged_ofrom_address_is_stripped() {
    let srv = start_server(|_| {}).await;
    let got = delivered_with(&srv, |_| {
        "<addresses xmlns='http://jabber.org/protocol/address'>\
         <address type='ofrom' jid='victim@localhost'/>\
         <address type='replyto' jid='somewhere@localhost'/></addresses>"
            .to_string()
    })
    .await;
    let addrs = got
        .get_child("addresses", "http://jabber.org/protocol/address")
        .expect("the honest address stays");
    let types: Vec<_> = addrs.children().filter_map(|c| c.attr("type")).collect();
    assert_eq!(types, vec!["replyto"], "{got}");
    srv.stop().await;
}
