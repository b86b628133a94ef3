//! XEP-0215: configured STUN/TURN services for logged-in users, the type
//! filter, and credentials of a restricted service only on request.

mod common;

use common::*;
use natter::config::ExternalService;

const NS: &str = "urn:xmpp:extdisco:2";

fn services(kind: Option<&str>) -> Element {
    let filter = kind.map_or(String::new(), |k| format!(" type='{k}'"));
    xml(&format!(
        "<iq type='get' to='{DOMAIN}'><services xmlns='{NS}'{filter}/></iq>"
    ))
}

/// The `<service/>` elements of a `<services/>` or `<credentials/>` result.
fn listed(r: &Element, top: &str) -> Vec<Element> {
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    r.get_child(top, NS)
        .unwrap_or_else(|| panic!("no <{top}/> in {r}"))
        .children()
        .cloned()
        .collect()
}

#[tokio::test]
async fn services_and_credentials() {
    let srv = start_server(|c| {
        c.external_services = vec![
            ExternalService {
                kind: "stun".into(),
                host: "stun.example.org".into(),
                port: Some(3478),
                transport: Some("udp".into()),
                ..Default::default()
            },
            ExternalService {
                kind: "turn".into(),
                host: "turn.example.org".into(),
                port: Some(3478),
                transport: Some("udp".into()),
                username: Some("natter".into()),
                password: Some("s3cret".into()),
                restricted: true,
                ..Default::default()
            },
        ];
    })
    .await;
    let (mut a, _b) = srv.logged_in_pair().await;

    let all = listed(&a.iq(services(None)).await, "services");
    let summary: Vec<(Option<&str>, Option<&str>, Option<&str>)> = all
        .iter()
        .map(|s| (s.attr("type"), s.attr("host"), s.attr("port")))
        .collect();
    assert_eq!(
        summary,
        vec![
            (Some("stun"), Some("stun.example.org"), Some("3478")),
            (Some("turn"), Some("turn.example.org"), Some("3478")),
        ]
    );
    // A restricted service's credentials are not in the list.
    assert_eq!(all[1].attr("restricted"), Some("true"));
    assert_eq!(all[1].attr("password"), None, "{}", all[1]);

    let turn = listed(&a.iq(services(Some("turn"))).await, "services");
    assert_eq!(turn.len(), 1);
    assert_eq!(turn[0].attr("host"), Some("turn.example.org"));
    assert!(listed(&a.iq(services(Some("ftp"))).await, "services").is_empty());

    let creds = xml(&format!(
        "<iq type='get' to='{DOMAIN}'><credentials xmlns='{NS}'>\
         <service type='turn' host='turn.example.org'/></credentials></iq>"
    ));
    let got = listed(&a.iq(creds).await, "credentials");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].attr("username"), Some("natter"));
    assert_eq!(got[0].attr("password"), Some("s3cret"));

    let unknown = xml(&format!(
        "<iq type='get'><credentials xmlns='{NS}'>\
         <service type='turn' host='elsewhere.example'/></credentials></iq>"
    ));
    let r = a.iq(unknown).await;
    assert_eq!(stanza_error(&r).as_deref(), Some("item-not-found"), "{r}");

    // Not an account's service.
    let mut to_account = services(None);
    to_account.set_attr("to", a.bare_jid());
    let r = a.iq(to_account).await;
    assert_eq!(
        stanza_error(&r).as_deref(),
        Some("service-unavailable"),
        "{r}"
    );
    srv.stop().await;
}

#[tokio::test]
async fn nothing_configured_lists_nothing() {
    let srv = start_server(|_| {}).await;
    let (mut a, _b) = srv.logged_in_pair().await;
    assert!(listed(&a.iq(services(None)).await, "services").is_empty());
    srv.stop().await;
}
