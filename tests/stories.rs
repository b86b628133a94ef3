//! 24-hour statuses (stories) against the real in-process server: who may
//! read them (presence and whitelist access models), the limits, expiry
//! after a short TTL taking the uploaded image with it, and seen receipts
//! that reach the author only.

mod common;

use common::*;
use natter_store::{RosterItem, Subscription};
use natter_xml::NS_CLIENT;
use std::time::Duration;

const NS: &str = "http://jabber.org/protocol/pubsub";
const NS_OWNER: &str = "http://jabber.org/protocol/pubsub#owner";
const NODE: &str = "urn:xmpp:pubsub-stories:0";
const NS_STORIES: &str = "urn:natter:stories:0";
const ATOM: &str = "http://www.w3.org/2005/Atom";
const NS_UPLOAD: &str = "urn:xmpp:http:upload:0";

fn entry(title: &str, image: Option<&str>) -> String {
    let link = image
        .map(|u| format!("<link rel='enclosure' type='image/png' href='{u}'/>"))
        .unwrap_or_default();
    format!("<entry xmlns='{ATOM}'><title>{title}</title>{link}</entry>")
}

/// A story publish, with publish-options fields when given.
fn post(id: &str, payload: &str, options: &[(&str, &str)]) -> Element {
    let mut opts = String::new();
    if !options.is_empty() {
        opts.push_str(
            "<publish-options><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' \
             type='hidden'><value>http://jabber.org/protocol/pubsub#publish-options</value></field>",
        );
        for (k, v) in options {
            opts.push_str(&format!("<field var='{k}'><value>{v}</value></field>"));
        }
        opts.push_str("</x></publish-options>");
    }
    xml(&format!(
        "<iq type='set'><pubsub xmlns='{NS}'><publish node='{NODE}'><item id='{id}'>{payload}</item></publish>{opts}</pubsub></iq>"
    ))
}

/// The story ids `c` can read of `author`, or the error condition.
async fn stories_of(c: &mut Client, author: &str) -> Result<Vec<String>, String> {
    let r = c
        .iq(xml(&format!(
            "<iq type='get' to='{author}'><pubsub xmlns='{NS}'><items node='{NODE}'/></pubsub></iq>"
        )))
        .await;
    if let Some(e) = stanza_error(&r) {
        return Err(e);
    }
    Ok(r.get_child("pubsub", NS)
        .and_then(|p| p.get_child("items", NS))
        .map(|items| {
            items
                .children()
                .filter_map(|i| i.attr("id").map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

async fn contacts(srv: &TestServer, a: &str, b: &str) {
    for (owner, other) in [(a, b), (b, a)] {
        let mut it = RosterItem::new(other);
        it.subscription = Subscription::Both;
        srv.state().store.put_roster_item(owner, &it).await.unwrap();
    }
}

/// The owner sets `jid`'s affiliation to the stories node.
async fn affiliate(owner: &mut Client, jid: &str, affiliation: &str) {
    result(
        owner,
        xml(&format!(
            "<iq type='set'><pubsub xmlns='{NS_OWNER}'><affiliations node='{NODE}'>\
             <affiliation jid='{jid}' affiliation='{affiliation}'/></affiliations></pubsub></iq>"
        )),
    )
    .await;
}

async fn result(c: &mut Client, iq: Element) -> Element {
    let r = c.iq(iq).await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    r
}

fn error_text(r: &Element) -> String {
    r.get_child("error", NS_CLIENT)
        .and_then(|e| e.child_text("text", "urn:ietf:params:xml:ns:xmpp-stanzas"))
        .unwrap_or_default()
}

async fn three_users(srv: &TestServer) -> [(String, Client); 3] {
    let mut out = Vec::new();
    for name in ["author", "friend", "stranger"] {
        let jid = srv.add_user(name, "password").await;
        let c = srv.login(&jid, "password", "phone").await;
        out.push((jid, c));
    }
    out.try_into().ok().unwrap()
}

#[tokio::test]
async fn contacts_see_stories_and_strangers_do_not() {
    let srv = start_server(|_| {}).await;
    let [(author, mut a), (friend, mut f), (stranger, mut s)] = three_users(&srv).await;
    contacts(&srv, &author, &friend).await;

    // Advertised on the server and on accounts.
    let info = result(
        &mut a,
        xml(&format!(
            "<iq type='get'><query xmlns='{NS_DISCO_INFO}'/></iq>"
        )),
    )
    .await;
    assert!(info.to_string().contains(NS_STORIES), "{info}");

    result(&mut a, post("s1", &entry("hello", None), &[])).await;
    // The node got the stories defaults: contacts, 24 h.
    let cfg = result(
        &mut a,
        xml(&format!(
            "<iq type='get'><pubsub xmlns='{NS_OWNER}'><configure node='{NODE}'/></pubsub></iq>"
        )),
    )
    .await
    .to_string();
    assert!(cfg.contains("pubsub#item_expire"), "{cfg}");
    assert!(cfg.contains("<value>86400</value>"), "{cfg}");
    assert!(cfg.contains("<value>presence</value>"), "{cfg}");

    assert_eq!(stories_of(&mut f, &author).await, Ok(vec!["s1".into()]));
    assert_eq!(
        stories_of(&mut s, &author).await,
        Err("not-authorized".into())
    );
    // Nor can a stranger post on someone's behalf.
    let r = s
        .iq(post("x", &entry("spoof", None), &[]).with_attr("to", author.clone()))
        .await;
    assert_eq!(stanza_error(&r).as_deref(), Some("forbidden"), "{r}");

    // Whitelist: only the chosen list (here: the stranger, not the contact).
    let r = result(
        &mut a,
        xml(&format!(
            "<iq type='set'><pubsub xmlns='{NS_OWNER}'><configure node='{NODE}'><x xmlns='jabber:x:data' type='submit'>\
             <field var='FORM_TYPE' type='hidden'><value>http://jabber.org/protocol/pubsub#node_config</value></field>\
             <field var='pubsub#access_model'><value>whitelist</value></field></x></configure></pubsub></iq>"
        )),
    )
    .await;
    drop(r);
    assert_eq!(stories_of(&mut f, &author).await, Err("not-allowed".into()));
    assert_eq!(stories_of(&mut s, &author).await, Err("not-allowed".into()));
    affiliate(&mut a, &stranger, "member").await;
    assert_eq!(stories_of(&mut s, &author).await, Ok(vec!["s1".into()]));
    assert_eq!(stories_of(&mut f, &author).await, Err("not-allowed".into()));
    let list = result(
        &mut a,
        xml(&format!(
            "<iq type='get'><pubsub xmlns='{NS_OWNER}'><affiliations node='{NODE}'/></pubsub></iq>"
        )),
    )
    .await
    .to_string();
    assert!(
        list.contains(&stranger) && list.contains("member"),
        "{list}"
    );
    // Only the owner manages the list.
    let r = s
        .iq(xml(&format!(
            "<iq type='get' to='{author}'><pubsub xmlns='{NS_OWNER}'><affiliations node='{NODE}'/></pubsub></iq>"
        )))
        .await;
    assert_eq!(stanza_error(&r).as_deref(), Some("forbidden"), "{r}");
    // Removing the member closes it again.
    affiliate(&mut a, &stranger, "none").await;
    assert_eq!(stories_of(&mut s, &author).await, Err("not-allowed".into()));
    srv.assert_healthy().await;
}

#[tokio::test]
async fn bad_stories_and_limits_get_clear_errors() {
    let srv = start_server(|c| {
        c.stories.max_live = 2;
        c.stories.max_item_bytes = 300;
        c.stories.item_expire_secs = 3600;
    })
    .await;
    let [(_, mut a), _, _] = three_users(&srv).await;
    let r = a.iq(post("x", "<body xmlns='urn:x'/>", &[])).await;
    assert_eq!(stanza_error(&r).as_deref(), Some("bad-request"), "{r}");
    assert!(error_text(&r).contains("Atom"), "{r}");
    let r = a.iq(post("x", &entry(&"x".repeat(400), None), &[])).await;
    assert_eq!(stanza_error(&r).as_deref(), Some("not-acceptable"), "{r}");
    assert!(error_text(&r).contains("300 bytes"), "{r}");
    for (k, v) in [
        ("pubsub#item_expire", "0"),
        ("pubsub#item_expire", "3601"),
        ("pubsub#access_model", "open"),
    ] {
        let r = a.iq(post("x", &entry("t", None), &[(k, v)])).await;
        assert_eq!(
            stanza_error(&r).as_deref(),
            Some("not-acceptable"),
            "{k}={v}: {r}"
        );
    }
    result(&mut a, post("1", &entry("one", None), &[])).await;
    result(&mut a, post("2", &entry("two", None), &[])).await;
    let r = a.iq(post("3", &entry("three", None), &[])).await;
    assert_eq!(
        stanza_error(&r).as_deref(),
        Some("resource-constraint"),
        "{r}"
    );
    assert!(error_text(&r).contains("at most 2 live stories"), "{r}");
    // Editing a live story is not one more.
    result(&mut a, post("2", &entry("two, edited", None), &[])).await;
    // A seen receipt names an item, and goes to someone else.
    let me = a.bare_jid().to_string();
    for (to, seen) in [
        ("friend@localhost", "<seen xmlns='urn:natter:stories:0'/>"),
        (me.as_str(), "<seen xmlns='urn:natter:stories:0' item='1'/>"),
    ] {
        a.send(&xml(&format!("<message to='{to}'>{seen}</message>")))
            .await;
        let e = a
            .recv_until(|e| e.name == "message" && e.attr("type") == Some("error"))
            .await;
        assert_eq!(stanza_error(&e).as_deref(), Some("bad-request"), "{e}");
    }
    srv.assert_healthy().await;
}

/// Upload `body` as a PNG through XEP-0363; the file's GET URL and path.
async fn upload_png(srv: &TestServer, c: &mut Client, body: &[u8]) -> (String, String) {
    let r = result(
        c,
        xml(&format!(
            "<iq type='get' to='upload.{}'><request xmlns='{NS_UPLOAD}' filename='story.png' size='{}' content-type='image/png'/></iq>",
            srv.domain,
            body.len()
        )),
    )
    .await;
    let slot = r.get_child("slot", NS_UPLOAD).unwrap();
    let url = slot
        .get_child("get", NS_UPLOAD)
        .unwrap()
        .attr("url")
        .unwrap()
        .to_string();
    let put = slot.get_child("put", NS_UPLOAD).unwrap();
    let auth = put.get_child("header", NS_UPLOAD).unwrap().text();
    let path = url.splitn(4, '/').nth(3).map(|p| format!("/{p}")).unwrap();
    let headers = format!("Authorization: {auth}\r\nContent-Type: image/png\r\n");
    let (status, _, _) = http_bytes(srv.http, "PUT", &path, &headers, body).await;
    assert_eq!(status, 201);
    (url, path)
}

#[tokio::test]
async fn a_story_expires_with_its_image_and_seen_receipts_reach_the_author_only() {
    let srv = start_server(|_| {}).await;
    let [(author, mut a), (friend, mut f), (stranger, mut s)] = three_users(&srv).await;
    contacts(&srv, &author, &friend).await;
    contacts(&srv, &friend, &stranger).await;
    // Everyone available, so a leak to anyone would show.
    for c in [&mut a, &mut f, &mut s] {
        c.send(&xml("<presence/>")).await;
    }
    // A second device of the author hears receipts too.
    let mut a2 = srv.login(&author, "password", "laptop").await;
    a2.send(&xml("<presence/>")).await;

    let png: Vec<u8> = (0..5000u32).map(|i| (i % 253) as u8).collect();
    let (url, path) = upload_png(&srv, &mut a, &png).await;
    assert_eq!(http_bytes(srv.http, "GET", &path, "", b"").await.0, 200);
    // A 2-second story (the test's short TTL, as publish-options).
    result(
        &mut a,
        post(
            "pic",
            &entry("beach", Some(&url)),
            &[("pubsub#item_expire", "2")],
        ),
    )
    .await;
    let published = std::time::Instant::now();
    let got = result(
        &mut f,
        xml(&format!(
            "<iq type='get' to='{author}'><pubsub xmlns='{NS}'><items node='{NODE}'/></pubsub></iq>"
        )),
    )
    .await;
    assert!(got.to_string().contains(&url), "{got}");

    // Seen: the friend's receipt reaches the author's devices, no one else.
    f.send(&xml(&format!(
        "<message to='{author}' id='seen1'><seen xmlns='{NS_STORIES}' node='{NODE}' item='pic'/></message>"
    )))
    .await;
    for c in [&mut a, &mut a2] {
        let m = c
            .recv_until(|e| e.name == "message" && e.get_child("seen", NS_STORIES).is_some())
            .await;
        assert_eq!(m.attr("from"), Some(friend.as_str()), "{m}");
        let seen = m.get_child("seen", NS_STORIES).unwrap();
        assert_eq!(seen.attr("item"), Some("pic"));
        assert_eq!(seen.attr("jid"), Some(friend.as_str()));
    }
    // Not to the viewer's own session (no carbons), nor to the stranger.
    for c in [&mut f, &mut s] {
        let leaked: Vec<Element> = c
            .sync()
            .await
            .into_iter()
            .filter(|e| e.to_string().contains(NS_STORIES))
            .collect();
        assert!(leaked.is_empty(), "{leaked:?}");
    }
    // A stranger (not a contact) may not send one.
    s.send(&xml(&format!(
        "<message to='{author}' id='seen2'><seen xmlns='{NS_STORIES}' item='pic'/></message>"
    )))
    .await;
    let e = s
        .recv_until(|e| e.name == "message" && e.attr("type") == Some("error"))
        .await;
    assert_eq!(stanza_error(&e).as_deref(), Some("not-authorized"), "{e}");
    // The author (only) reads who saw it.
    let q = result(
        &mut a,
        xml(&format!(
            "<iq type='get'><query xmlns='{NS_STORIES}' item='pic'/></iq>"
        )),
    )
    .await;
    let viewers: Vec<&str> = q
        .get_child("query", NS_STORIES)
        .unwrap()
        .children()
        .filter_map(|c| c.attr("jid"))
        .collect();
    assert_eq!(viewers, [friend.as_str()], "{q}");
    let r = f
        .iq(xml(&format!(
            "<iq type='get' to='{author}'><query xmlns='{NS_STORIES}' item='pic'/></iq>"
        )))
        .await;
    assert_eq!(stanza_error(&r).as_deref(), Some("forbidden"), "{r}");
    // No archive copy of the receipt either.
    let archived = srv
        .state()
        .store
        .archive_query(&author, &Default::default())
        .await
        .unwrap()
        .items
        .len();
    assert_eq!(archived, 0);

    // Expiry: gone for readers, then swept with its blob and seen list.
    let deadline = published + Duration::from_secs(10);
    loop {
        let gone = stories_of(&mut f, &author).await == Ok(vec![]);
        let blob = http_bytes(srv.http, "GET", &path, "", b"").await.0;
        if gone && blob == 404 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not expired: {gone} {blob}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(published.elapsed() >= Duration::from_secs(2));
    assert!(srv
        .state()
        .store
        .pep_items(&author, NODE, None, None)
        .await
        .unwrap()
        .is_empty());
    let q = result(
        &mut a,
        xml(&format!(
            "<iq type='get'><query xmlns='{NS_STORIES}' item='pic'/></iq>"
        )),
    )
    .await;
    assert_eq!(
        q.get_child("query", NS_STORIES).unwrap().children().count(),
        0,
        "{q}"
    );
    // A receipt for the expired story is refused.
    f.send(&xml(&format!(
        "<message to='{author}' id='seen3'><seen xmlns='{NS_STORIES}' item='pic'/></message>"
    )))
    .await;
    let e = f
        .recv_until(|e| e.name == "message" && e.attr("type") == Some("error"))
        .await;
    assert_eq!(stanza_error(&e).as_deref(), Some("item-not-found"), "{e}");
    srv.assert_healthy().await;
}

#[tokio::test]
async fn expiry_survives_a_restart() {
    let srv = start_server(|_| {}).await;
    let author = srv.add_user("author", "password").await;
    let mut a = srv.login(&author, "password", "phone").await;
    result(
        &mut a,
        post(
            "old",
            &entry("before the restart", None),
            &[("pubsub#item_expire", "2")],
        ),
    )
    .await;
    a.close().await;
    let config = srv.state().config.as_ref().clone();
    let _kept = srv.stop_keeping_store().await;
    // The story's time runs out while the server is down.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let running = natter::start(config).await.expect("restart");
    let store = running.state.store.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !store.pep_expired(i64::MAX, 10).await.unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "not swept after the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut c = Client::connect_tls(running.bound.c2s_tls.unwrap()).await;
    c.login(&author, "password", "phone").await;
    assert_eq!(stories_of(&mut c, &author).await, Ok(vec![]));
    c.close().await;
    running.shutdown().await;
}
