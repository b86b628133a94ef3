//! XEP-0114 external components: the handshake (right and wrong secret,
//! unknown domain), messages both ways between a user and a component,
//! `from` checked, a message to an offline user queued, the component's
//! domain in disco#items, and service-unavailable while it is away.

mod common;

use common::*;
use natter_xml::NS_CLIENT;
use std::net::SocketAddr;

const BOT: &str = "bot.localhost";
const SECRET: &str = "s3cret-for-the-bot";

async fn server() -> TestServer {
    start_server(|c| {
        c.listen.component = "127.0.0.1:0".into();
        c.components.insert(
            BOT.into(),
            natter::config::ComponentConfig {
                secret: SECRET.into(),
            },
        );
    })
    .await
}

/// A component logged in to BOT.
async fn connect(addr: SocketAddr) -> Client {
    component_connect(addr, BOT, SECRET).await
}

#[tokio::test]
async fn component_and_user_exchange_messages() {
    let srv = server().await;
    let addr = component_addr(&srv);
    let (mut a, _b) = srv.logged_in_pair().await;
    let user = a.jid().to_string();

    // Away: the user is told.
    let r = {
        a.send(&message(&format!("echo@{BOT}"), "anyone?")).await;
        a.recv_until(|e| e.name == "message").await
    };
    assert_eq!(
        stanza_error(&r).as_deref(),
        Some("service-unavailable"),
        "{r}"
    );

    let mut bot = connect(addr).await;
    a.send(&message(&format!("echo@{BOT}"), "ping")).await;
    let m = bot.recv().await;
    assert!(m.is("message", NS_ACCEPT), "{m}");
    assert_eq!(m.attr("from"), Some(user.as_str()));
    assert_eq!(m.attr("to"), Some(format!("echo@{BOT}").as_str()));
    assert_eq!(m.child_text("body", NS_ACCEPT).as_deref(), Some("ping"));

    bot.send_raw(
        format!("<message from='echo@{BOT}/x' to='{user}' type='chat'><body>pong</body></message>")
            .as_bytes(),
    )
    .await;
    let m = a.recv_until(|e| e.name == "message").await;
    assert_eq!(m.attr("from"), Some(format!("echo@{BOT}/x").as_str()));
    assert_eq!(m.child_text("body", NS_CLIENT).as_deref(), Some("pong"));

    // To an offline user: queued, delivered when they come online.
    let carol = srv.add_user("carol", "password").await;
    bot.send_raw(
        format!("<message from='{BOT}' to='{carol}' type='chat'><body>later</body></message>")
            .as_bytes(),
    )
    .await;
    // An IQ to a resource that isn't there is answered with an error.
    bot.send_raw(
        format!("<iq type='get' id='q1' from='{BOT}' to='{carol}/gone'><ping xmlns='urn:xmpp:ping'/></iq>")
            .as_bytes(),
    )
    .await;
    let e = bot.recv().await;
    assert_eq!(e.attr("type"), Some("error"), "{e}");
    assert_eq!(e.attr("id"), Some("q1"));
    let mut c = srv.login(&carol, "password", "phone").await;
    c.send(&xml("<presence/>")).await;
    let m = c.recv_until(|e| e.name == "message").await;
    assert_eq!(m.attr("from"), Some(BOT));
    assert_eq!(m.child_text("body", NS_CLIENT).as_deref(), Some("later"));

    // The server lists the component.
    let items = a
        .iq(xml(&format!(
            "<iq type='get' to='{DOMAIN}'><query xmlns='http://jabber.org/protocol/disco#items'/></iq>"
        )))
        .await;
    let jids: Vec<&str> = items
        .get_child("query", "http://jabber.org/protocol/disco#items")
        .unwrap_or_else(|| panic!("{items}"))
        .children()
        .filter_map(|i| i.attr("jid"))
        .collect();
    assert_eq!(
        jids,
        [BOT, "conference.localhost", "upload.localhost"],
        "{items}"
    );

    // A second connection for the same domain is refused.
    let (mut again, id) = component_open(addr, BOT).await;
    again
        .send_raw(component_handshake(&id, SECRET).as_bytes())
        .await;
    assert_eq!(again.expect_stream_error().await, "conflict");

    // Speaking for another domain ends the stream.
    bot.send_raw(
        format!("<message from='evil@{DOMAIN}' to='{user}'><body>hi</body></message>").as_bytes(),
    )
    .await;
    assert_eq!(bot.expect_stream_error().await, "invalid-from");
    srv.stop().await;
}

#[tokio::test]
async fn wrong_secret_and_unknown_domain_are_refused() {
    let srv = server().await;
    let addr = component_addr(&srv);

    let (mut c, id) = component_open(addr, BOT).await;
    c.send_raw(component_handshake(&id, "not-the-secret").as_bytes())
        .await;
    assert_eq!(c.expect_stream_error().await, "not-authorized");

    let (mut c, _) = component_open(addr, "other.localhost").await;
    assert_eq!(c.expect_stream_error().await, "host-unknown");

    // The right secret still works afterwards.
    let mut bot = connect(addr).await;
    bot.close().await;
    srv.stop().await;
}

#[tokio::test]
async fn no_component_no_listener() {
    let srv = start_server(|_| {}).await;
    assert!(srv.running.bound.modules.is_empty());
    srv.stop().await;
}
