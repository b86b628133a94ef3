//! XEP-0157: configured contact addresses appear as a serverinfo form in
//! the server's disco#info, counted in its XEP-0115 verification string;
//! with none configured there is no form.

mod common;

use common::*;
use natter::modules::disco::{caps_verification_string, CAPS_NODE};

const NS_DATA: &str = "jabber:x:data";
const NS_CAPS: &str = "http://jabber.org/protocol/caps";

fn server_info() -> Element {
    xml(&format!(
        "<iq type='get' to='{DOMAIN}'><query xmlns='{NS_DISCO_INFO}'/></iq>"
    ))
}

/// field var → values of the serverinfo form, if there is one.
fn serverinfo(query: &Element) -> Option<Vec<(String, Vec<String>)>> {
    let x = query.children().find(|x| {
        x.is("x", NS_DATA)
            && x.children().any(|f| {
                f.attr("var") == Some("FORM_TYPE")
                    && f.child_text("value", NS_DATA).as_deref()
                        == Some("http://jabber.org/network/serverinfo")
            })
    })?;
    Some(
        x.children()
            .filter(|f| f.attr("var") != Some("FORM_TYPE"))
            .map(|f| {
                let values = f.children().map(Element::text).collect();
                (f.attr("var").unwrap().to_string(), values)
            })
            .collect(),
    )
}

#[tokio::test]
async fn contact_addresses_in_server_disco() {
    let srv = start_server(|c| {
        c.contact.abuse = vec![
            "mailto:abuse@example.org".into(),
            "xmpp:abuse@example.org".into(),
        ];
        c.contact.security = vec!["https://example.org/security".into()];
    })
    .await;
    let (mut a, _b) = srv.logged_in_pair().await;
    let r = a.iq(server_info()).await;
    let q = r
        .get_child("query", NS_DISCO_INFO)
        .unwrap_or_else(|| panic!("{r}"));
    assert_eq!(
        serverinfo(q).unwrap_or_else(|| panic!("no serverinfo form: {r}")),
        vec![
            (
                "abuse-addresses".to_string(),
                vec![
                    "mailto:abuse@example.org".to_string(),
                    "xmpp:abuse@example.org".to_string()
                ]
            ),
            (
                "security-addresses".to_string(),
                vec!["https://example.org/security".to_string()]
            ),
        ]
    );

    // The caps hash in stream features covers the form (XEP-0115 §5.4).
    let features = a.features.clone().expect("stream features");
    let c = features.get_child("c", NS_CAPS).expect("caps in features");
    let ver = caps_verification_string(q).expect("well-formed disco#info");
    assert_eq!(c.attr("ver"), Some(ver.as_str()), "{features}");
    // … and the caps node answers with the same form.
    let r = a
        .iq(xml(&format!(
            "<iq type='get' to='{DOMAIN}'><query xmlns='{NS_DISCO_INFO}' node='{CAPS_NODE}#{ver}'/></iq>"
        )))
        .await;
    let q = r
        .get_child("query", NS_DISCO_INFO)
        .unwrap_or_else(|| panic!("{r}"));
    assert!(serverinfo(q).is_some(), "{r}");
    srv.stop().await;
}

#[tokio::test]
async fn no_addresses_no_form() {
    let srv = start_server(|_| {}).await;
    let (mut a, _b) = srv.logged_in_pair().await;
    let r = a.iq(server_info()).await;
    let q = r
        .get_child("query", NS_DISCO_INFO)
        .unwrap_or_else(|| panic!("{r}"));
    assert!(q.get_child("feature", NS_DISCO_INFO).is_some(), "{r}");
    assert!(serverinfo(q).is_none(), "{r}");
    srv.stop().await;

    let bad = natter::config::Config::from_parts("[contact]\nabuse = [\"nobody\"]\n", &[]);
    let e = bad.expect_err("an address that is no URI is refused");
    assert!(e.to_string().contains("contact.abuse"), "{e}");
}
