//! XEP-0352 Client State Indication: while a client is inactive, presence
//! updates (latest per sender) and standalone chat states wait; messages
//! with a body, IQs and everything else go out at once, after what is held
//! from the same sender.

mod common;

use common::*;
use natter_xml::NS_CLIENT;

const NS_CSI: &str = "urn:xmpp:csi:0";
const NS_CHATSTATES: &str = "http://jabber.org/protocol/chatstates";

fn presence_show(show: &str) -> Element {
    Element::new("presence", NS_CLIENT).with_child(Element::new("show", NS_CLIENT).with_text(show))
}

fn chat_state(to: &str, state: &str) -> Element {
    Element::new("message", NS_CLIENT)
        .with_attr("to", to)
        .with_attr("type", "chat")
        .with_child(Element::new(state, NS_CHATSTATES))
}

fn from_is(e: &Element, jid: &str) -> bool {
    e.attr("from") == Some(jid)
}

#[tokio::test]
async fn inactive_client_gets_latest_presence_on_active_and_bodies_at_once() {
    let srv = start_server(|_| {}).await;
    let (mut alice, _) = srv.logged_in_pair().await;
    let bob = srv.add_user("csibob", "password").await;
    let mut phone = srv.login(&bob, "password", "phone").await;
    let mut desk = srv.login(&bob, "password", "desk").await;
    let (phone_jid, desk_jid, alice_jid) = (
        phone.jid().to_string(),
        desk.jid().to_string(),
        alice.jid().to_string(),
    );
    let f = phone.features.clone().unwrap();
    assert!(f.get_child("csi", NS_CSI).is_some(), "{f}");
    phone.send(&xml("<presence/>")).await;
    desk.send(&xml("<presence/>")).await;
    phone
        .recv_until(|e| e.name == "presence" && from_is(e, &desk_jid))
        .await;
    // Both went online at once, so the phone may get the desk's initial
    // presence twice (its broadcast, and the answer to the phone's own
    // probe): let both land before the client goes inactive.
    desk.sync().await;
    phone.sync().await;

    phone.send(&Element::new("inactive", NS_CSI)).await;
    for show in ["away", "dnd", "xa"] {
        desk.send(&presence_show(show)).await;
    }
    alice.send(&chat_state(&phone_jid, "composing")).await;
    desk.sync().await;
    alice.sync().await;
    // IQs are answered at once; the presence updates and the chat state wait.
    let early = phone.sync().await;
    assert!(early.is_empty(), "held stanzas were sent: {early:?}");

    // A message with a body goes out at once, after the chat state held
    // from its sender; the presence from the other sender still waits.
    alice.send(&message(&phone_jid, "hello")).await;
    alice.sync().await;
    let got = phone.sync().await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(
        got[0].get_child("composing", NS_CHATSTATES).is_some(),
        "{got:?}"
    );
    assert!(from_is(&got[0], &alice_jid));
    assert_eq!(
        got[1].child_text("body", NS_CLIENT).as_deref(),
        Some("hello")
    );

    // Active again: only the latest presence of the desk.
    phone.send(&Element::new("active", NS_CSI)).await;
    let got = phone.sync().await;
    let presences: Vec<_> = got.iter().filter(|e| e.name == "presence").collect();
    assert_eq!(presences.len(), 1, "{got:?}");
    assert!(from_is(presences[0], &desk_jid));
    assert_eq!(
        presences[0].child_text("show", NS_CLIENT).as_deref(),
        Some("xa")
    );

    // And nothing is held while active.
    desk.send(&presence_show("chat")).await;
    desk.sync().await;
    let p = phone
        .recv_until(|e| e.name == "presence" && from_is(e, &desk_jid))
        .await;
    assert_eq!(p.child_text("show", NS_CLIENT).as_deref(), Some("chat"));
    srv.stop().await;
}

#[tokio::test]
async fn held_stanzas_are_not_lost_when_the_stream_closes() {
    let srv = start_server(|_| {}).await;
    let bob = srv.add_user("csiclose", "password").await;
    let mut phone = srv.login(&bob, "password", "phone").await;
    let mut desk = srv.login(&bob, "password", "desk").await;
    let desk_jid = desk.jid().to_string();
    phone.send(&xml("<presence/>")).await;
    desk.send(&xml("<presence/>")).await;
    phone
        .recv_until(|e| e.name == "presence" && from_is(e, &desk_jid))
        .await;
    // A possible second copy of the desk's initial presence (see above).
    desk.sync().await;
    phone.sync().await;
    phone.send(&Element::new("inactive", NS_CSI)).await;
    desk.send(&presence_show("away")).await;
    desk.sync().await;
    assert!(phone.sync().await.is_empty());
    // Without stream management the client gets what is held before the
    // stream closes.
    phone.send_raw(b"</stream:stream>").await;
    let mut got_presence = false;
    loop {
        match phone.next_event().await {
            Event::Stanza(e) if e.name == "presence" && from_is(&e, &desk_jid) => {
                got_presence = true;
            }
            Event::Close | Event::Eof => break,
            _ => {}
        }
    }
    assert!(got_presence, "held presence dropped at close");
    srv.stop().await;
}
