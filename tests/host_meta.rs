//! XEP-0156: /.well-known/host-meta (XRD) and host-meta.json point to the
//! WebSocket endpoint, readable cross-origin; the address follows the Host
//! header (ws://, wss:// behind a TLS proxy) or `http.public_url`.

mod common;

use common::*;

const REL: &str = "urn:xmpp:alt-connections:websocket";

/// The `href` of the WebSocket link in an XRD document.
fn xrd_href(body: &str) -> String {
    let doc = body
        .split_once("?>")
        .map_or(body, |(_, rest)| rest)
        .trim()
        .to_string();
    let xrd = xml(&doc);
    assert!(
        xrd.is("XRD", "http://docs.oasis-open.org/ns/xri/xrd-1.0"),
        "{body}"
    );
    let link = xrd
        .children()
        .find(|l| l.attr("rel") == Some(REL))
        .unwrap_or_else(|| panic!("no websocket link in {body}"));
    link.attr("href").unwrap().to_string()
}

fn jrd_href(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).expect("JSON");
    let links = v["links"].as_array().expect("links");
    let link = links
        .iter()
        .find(|l| l["rel"] == REL)
        .unwrap_or_else(|| panic!("no websocket link in {body}"));
    link["href"].as_str().unwrap().to_string()
}

fn assert_cors(head: &str) {
    assert!(
        head.lines()
            .any(|l| l.eq_ignore_ascii_case("access-control-allow-origin: *")),
        "{head}"
    );
}

#[tokio::test]
async fn host_meta_points_to_the_websocket() {
    let srv = start_server(|_| {}).await;
    let addr = srv.http;

    let (st, head, body) = http_request(addr, "GET", "/.well-known/host-meta", "").await;
    assert_eq!(st, 200, "{head}");
    assert_cors(&head);
    assert!(head.contains("application/xrd+xml"), "{head}");
    assert_eq!(xrd_href(&body), format!("ws://{addr}/xmpp-websocket"));

    let (st, head, body) = http_request(addr, "GET", "/.well-known/host-meta.json", "").await;
    assert_eq!(st, 200, "{head}");
    assert_cors(&head);
    assert!(head.contains("application/json"), "{head}");
    assert_eq!(jrd_href(&body), format!("ws://{addr}/xmpp-websocket"));

    // Behind a TLS proxy.
    let proxied = "X-Forwarded-Proto: https\r\n";
    let (_, _, body) = http_request(addr, "GET", "/.well-known/host-meta.json", proxied).await;
    assert_eq!(jrd_href(&body), format!("wss://{addr}/xmpp-websocket"));

    // The advertised endpoint is the real one: a client logs in over it.
    let mut c = Client::connect_ws(addr).await;
    let alice = srv.add_user("alice", "password").await;
    c.login(&alice, "password", "web").await;
    c.close().await;
    srv.stop().await;
}

#[tokio::test]
async fn public_url_wins() {
    let srv = start_server(|c| c.http.public_url = "https://chat.example.org/".into()).await;
    let (_, _, body) = http_request(srv.http, "GET", "/.well-known/host-meta", "").await;
    assert_eq!(xrd_href(&body), "wss://chat.example.org/xmpp-websocket");
    let (_, _, body) = http_request(srv.http, "GET", "/.well-known/host-meta.json", "").await;
    assert_eq!(jrd_href(&body), "wss://chat.example.org/xmpp-websocket");
    srv.stop().await;
}
