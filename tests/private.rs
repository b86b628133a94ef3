//! XEP-0049 private XML storage: the owner stores and reads one element per
//! (namespace, name), nobody else may, reserved namespaces and oversized
//! elements are refused, and the data survives a restart (it lives in the
//! owner's whitelist PEP nodes).

mod common;

use common::*;
use natter_xml::NS_CLIENT;

const NS: &str = "jabber:iq:private";

fn private(kind: &str, inner: &str) -> Element {
    xml(&format!(
        "<iq type='{kind}'><query xmlns='{NS}'>{inner}</query></iq>"
    ))
}

/// The stored element of a get result.
fn stored(r: &Element) -> Element {
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    r.get_child("query", NS)
        .and_then(|q| q.children().next())
        .unwrap_or_else(|| panic!("no element in {r}"))
        .clone()
}

/// The stored `exodus:prefs` nickname.
async fn nick(c: &mut Client) -> Option<String> {
    let r = c.iq(private("get", "<prefs xmlns='exodus:prefs'/>")).await;
    stored(&r).child_text("defaultnick", "exodus:prefs")
}

#[tokio::test]
async fn owner_stores_and_reads_private_xml_across_restart() {
    let data = tempfile::tempdir().unwrap();
    let srv = start_server(|c| c.data_dir = data.path().to_path_buf()).await;
    let (mut a, mut b) = srv.logged_in_pair().await;
    let alice = a.bare_jid().to_string();

    // Nothing stored: the empty element comes back.
    let r = a.iq(private("get", "<prefs xmlns='exodus:prefs'/>")).await;
    let e = stored(&r);
    assert!(
        e.is("prefs", "exodus:prefs") && e.children().next().is_none(),
        "{r}"
    );

    let r = a
        .iq(private(
            "set",
            "<prefs xmlns='exodus:prefs'><defaultnick>Hamlet</defaultnick></prefs>",
        ))
        .await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    // Another name in the same namespace is a separate element.
    let r = a
        .iq(private("set", "<other xmlns='exodus:prefs' v='2'/>"))
        .await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    assert_eq!(nick(&mut a).await.as_deref(), Some("Hamlet"));

    // Only the owner: another account is forbidden, reading or writing.
    let mut get = private("get", "<prefs xmlns='exodus:prefs'/>");
    get.set_attr("to", alice.as_str());
    let r = b.iq(get).await;
    assert_eq!(stanza_error(&r).as_deref(), Some("forbidden"), "{r}");
    let mut set = private("set", "<prefs xmlns='exodus:prefs'>evil</prefs>");
    set.set_attr("to", alice.as_str());
    let r = b.iq(set).await;
    assert_eq!(stanza_error(&r).as_deref(), Some("forbidden"), "{r}");
    // … and b's own storage is its own.
    let r = b.iq(private("get", "<prefs xmlns='exodus:prefs'/>")).await;
    assert!(stored(&r).children().next().is_none(), "{r}");

    // Reserved namespaces (XEP-0049 §3) and oversized elements.
    for reserved in [
        "<query xmlns='jabber:iq:roster'/>",
        "<x xmlns='http://jabber.org/protocol/muc'/>",
    ] {
        let r = a.iq(private("set", reserved)).await;
        assert_eq!(stanza_error(&r).as_deref(), Some("not-acceptable"), "{r}");
        let r = a.iq(private("get", reserved)).await;
        assert_eq!(stanza_error(&r).as_deref(), Some("not-acceptable"), "{r}");
    }
    let big = "x".repeat(70 * 1024);
    let r = a
        .iq(private("set", &format!("<big xmlns='my:ns'>{big}</big>")))
        .await;
    assert_eq!(stanza_error(&r).as_deref(), Some("not-acceptable"), "{r}");

    // The owner sees it through PEP too, whitelist (owner-only).
    let r = b
        .iq(xml(&format!(
            "<iq type='get' to='{alice}'><pubsub xmlns='http://jabber.org/protocol/pubsub'>\
             <items node='exodus:prefs'/></pubsub></iq>"
        )))
        .await;
    assert_eq!(r.attr("type"), Some("error"), "others may not read it: {r}");

    a.close().await;
    b.close().await;
    let config = srv.state().config.as_ref().clone();
    let _kept = srv.stop_keeping_store().await;

    // Survives a restart; an empty element deletes.
    let running = natter::start(config).await.expect("restart");
    let port = running.bound.c2s_tls.unwrap();
    let mut a = Client::connect_tls(port).await;
    a.login(&alice, "password", "again").await;
    assert_eq!(nick(&mut a).await.as_deref(), Some("Hamlet"));
    let r = a.iq(private("get", "<other xmlns='exodus:prefs'/>")).await;
    assert_eq!(stored(&r).attr("v"), Some("2"), "{r}");
    let r = a.iq(private("set", "<prefs xmlns='exodus:prefs'/>")).await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    let r = a.iq(private("get", "<prefs xmlns='exodus:prefs'/>")).await;
    assert!(stored(&r).children().next().is_none(), "deleted: {r}");
    assert!(r.get_child("error", NS_CLIENT).is_none());
    a.close().await;
    running.shutdown().await;
}

#[tokio::test]
async fn per_account_total_is_bounded() {
    let srv = start_server(|_| {}).await;
    let (mut a, _b) = srv.logged_in_pair().await;
    let chunk = "y".repeat(60 * 1024);
    let mut refused = None;
    for i in 0..20 {
        let r = a
            .iq(private(
                "set",
                &format!("<e{i} xmlns='quota:test'>{chunk}</e{i}>"),
            ))
            .await;
        if r.attr("type") == Some("error") {
            refused = Some((i, r));
            break;
        }
    }
    let (i, r) = refused.expect("1 MiB per account is enforced");
    assert_eq!(
        i, 17,
        "17 elements of 60 KiB fit in 1 MiB, the 18th does not"
    );
    assert_eq!(
        stanza_error(&r).as_deref(),
        Some("resource-constraint"),
        "{r}"
    );
    // Replacing an element within the total still works.
    let r = a
        .iq(private(
            "set",
            &format!("<e0 xmlns='quota:test'>{chunk}</e0>"),
        ))
        .await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    srv.stop().await;
}
