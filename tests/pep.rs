//! XEP-0163 PEP (with the XEP-0060 subset and XEP-0223 publish-options)
//! against the real in-process server: access models, OMEMO/avatar/
//! bookmark defaults, preconditions, configuration, and notifications
//! filtered by entity capabilities (XEP-0115) that the server asks for.

mod common;

use common::*;
use natter_store::{RosterItem, Subscription};
use natter_xml::NS_CLIENT;

const NS: &str = "http://jabber.org/protocol/pubsub";
const NS_OWNER: &str = "http://jabber.org/protocol/pubsub#owner";
const NS_EVENT: &str = "http://jabber.org/protocol/pubsub#event";
const NS_ERRORS: &str = "http://jabber.org/protocol/pubsub#errors";
const NS_CAPS: &str = "http://jabber.org/protocol/caps";
const NS_ITEMS: &str = "http://jabber.org/protocol/disco#items";
const PASSWORD: &str = "password";
const AVATAR: &str = "urn:xmpp:avatar:metadata";
const DEVICES: &str = "eu.siacs.conversations.axolotl.devicelist";
const BOOKMARKS: &str = "urn:xmpp:bookmarks:1";

fn form(form_type: &str, fields: &[(&str, &str)]) -> String {
    let mut s = format!(
        "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'><value>{form_type}</value></field>"
    );
    for (k, v) in fields {
        s.push_str(&format!("<field var='{k}'><value>{v}</value></field>"));
    }
    s.push_str("</x>");
    s
}

fn publish(node: &str, id: &str, payload: &str, options: &[(&str, &str)]) -> Element {
    let opts = if options.is_empty() {
        String::new()
    } else {
        format!(
            "<publish-options>{}</publish-options>",
            form("http://jabber.org/protocol/pubsub#publish-options", options)
        )
    };
    xml(&format!(
        "<iq type='set'><pubsub xmlns='{NS}'><publish node='{node}'><item id='{id}'>{payload}</item></publish>{opts}</pubsub></iq>"
    ))
}

fn items_get(to: &str, node: &str, max: Option<u32>) -> Element {
    let max = max.map(|m| format!(" max_items='{m}'")).unwrap_or_default();
    xml(&format!(
        "<iq type='get' to='{to}'><pubsub xmlns='{NS}'><items node='{node}'{max}/></pubsub></iq>"
    ))
}

fn owner_iq(kind: &str, inner: &str) -> Element {
    xml(&format!(
        "<iq type='{kind}'><pubsub xmlns='{NS_OWNER}'>{inner}</pubsub></iq>"
    ))
}

/// Item ids of an items result, in order.
fn item_ids(r: &Element) -> Vec<String> {
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    r.get_child("pubsub", NS)
        .and_then(|p| p.get_child("items", NS))
        .unwrap_or_else(|| panic!("no items: {r}"))
        .children()
        .map(|i| i.attr("id").unwrap().to_string())
        .collect()
}

fn pubsub_app_error(r: &Element) -> Option<String> {
    r.get_child("error", NS_CLIENT)?
        .children()
        .find(|c| c.ns == NS_ERRORS)
        .map(|c| c.name.clone())
}

async fn ok(c: &mut Client, iq: Element) -> Element {
    let r = c.iq(iq).await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    r
}

async fn subscribe(srv: &TestServer, owner: &str, contact: &str, sub: Subscription) {
    let mut it = RosterItem::new(contact);
    it.name = Some(String::new());
    it.subscription = sub;
    srv.state().store.put_roster_item(owner, &it).await.unwrap();
}

/// Mutual subscription, straight in the store.
async fn friends(srv: &TestServer, a: &str, b: &str) {
    subscribe(srv, a, b, Subscription::Both).await;
    subscribe(srv, b, a, Subscription::Both).await;
}

/// A client's disco#info for capabilities with `+notify` for `notify`.
fn caps_query(notify: &[&str]) -> Element {
    let mut s = format!(
        "<query xmlns='{NS_DISCO_INFO}'><identity category='client' type='pc' name='natter-test'/>\
         <feature var='{NS_DISCO_INFO}'/><feature var='{NS_CAPS}'/>"
    );
    for n in notify {
        s.push_str(&format!("<feature var='{n}+notify'/>"));
    }
    s.push_str("</query>");
    xml(&s)
}

/// Send available presence with caps for `notify`; answer the server's
/// disco#info query when `expect_query` (the ver is new to the server).
async fn caps_online(c: &mut Client, notify: &[&str], expect_query: bool) {
    let query = caps_query(notify);
    let ver = natter::modules::pep::caps_verification_string(&query).unwrap();
    c.send(&xml(&format!(
        "<presence><c xmlns='{NS_CAPS}' hash='sha-1' node='https://natter.test' ver='{ver}'/></presence>"
    )))
    .await;
    if expect_query {
        let q = c
            .recv_matching(|e| {
                e.name == "iq"
                    && e.attr("type") == Some("get")
                    && e.get_child("query", NS_DISCO_INFO).is_some()
            })
            .await;
        let node = q
            .get_child("query", NS_DISCO_INFO)
            .unwrap()
            .attr("node")
            .unwrap()
            .to_string();
        assert_eq!(node, format!("https://natter.test#{ver}"));
        assert_eq!(q.attr("from"), Some(DOMAIN));
        let mut answer = query.clone();
        answer.set_attr("node", node);
        c.send(
            &Element::new("iq", NS_CLIENT)
                .with_attr("type", "result")
                .with_attr("id", q.attr("id").unwrap())
                .with_attr("to", DOMAIN)
                .with_child(answer),
        )
        .await;
    }
    let me = c.jid().to_string();
    c.recv_matching(|e| e.name == "presence" && e.attr("from") == Some(me.as_str()))
        .await;
}

fn is_event(e: &Element, from: &str, node: &str) -> bool {
    e.name == "message"
        && e.attr("from") == Some(from)
        && e.get_child("event", NS_EVENT)
            .and_then(|ev| ev.children().next())
            .is_some_and(|x| x.attr("node") == Some(node))
}

fn events(got: &[Element], from: &str, node: &str) -> usize {
    got.iter().filter(|e| is_event(e, from, node)).count()
}

#[tokio::test]
async fn disco_announces_pep_on_account_and_server() {
    let srv = start_server(|_| {}).await;
    let alice = srv.add_user("alice", PASSWORD).await;
    let mut a = srv.login(&alice, PASSWORD, "x").await;
    for to in [alice.as_str(), DOMAIN] {
        let r = ok(
            &mut a,
            xml(&format!(
                "<iq type='get' to='{to}'><query xmlns='{NS_DISCO_INFO}'/></iq>"
            )),
        )
        .await;
        let q = r.get_child("query", NS_DISCO_INFO).unwrap();
        assert!(
            q.children().any(|i| i.name == "identity"
                && i.attr("category") == Some("pubsub")
                && i.attr("type") == Some("pep")),
            "{r}"
        );
        for f in [
            NS,
            "http://jabber.org/protocol/pubsub#publish-options",
            "http://jabber.org/protocol/pubsub#access-open",
            "http://jabber.org/protocol/pubsub#last-published",
        ] {
            assert!(
                q.children().any(|x| x.attr("var") == Some(f)),
                "{f} missing: {r}"
            );
        }
    }
    srv.stop().await;
}

#[tokio::test]
async fn access_models_and_defaults_for_omemo_avatars_and_bookmarks() {
    let srv = start_server(|_| {}).await;
    let alice = srv.add_user("alice", PASSWORD).await;
    let bob = srv.add_user("bob", PASSWORD).await;
    let carol = srv.add_user("carol", PASSWORD).await;
    subscribe(&srv, &alice, &bob, Subscription::From).await;
    let mut a = srv.login(&alice, PASSWORD, "x").await;
    let mut b = srv.login(&bob, PASSWORD, "x").await;
    let mut c = srv.login(&carol, PASSWORD, "x").await;

    let r = ok(
        &mut a,
        publish(
            AVATAR,
            "abc",
            "<metadata xmlns='urn:xmpp:avatar:metadata'/>",
            &[],
        ),
    )
    .await;
    let published = r
        .get_child("pubsub", NS)
        .and_then(|p| p.get_child("publish", NS))
        .and_then(|p| p.get_child("item", NS))
        .and_then(|i| i.attr("id"));
    assert_eq!(published, Some("abc"), "{r}");
    ok(
        &mut a,
        publish(
            DEVICES,
            "current",
            "<list xmlns='eu.siacs.conversations.axolotl'><device id='1'/></list>",
            &[],
        ),
    )
    .await;
    ok(
        &mut a,
        publish(
            BOOKMARKS,
            "room@muc.example",
            "<conference xmlns='urn:xmpp:bookmarks:1' autojoin='true'/>",
            &[],
        ),
    )
    .await;

    // Presence access (default): the owner and subscribers only.
    assert_eq!(
        item_ids(&a.iq(items_get(&alice, AVATAR, None)).await),
        ["abc"]
    );
    let r = b.iq(items_get(&alice, AVATAR, None)).await;
    assert_eq!(item_ids(&r), ["abc"]);
    let payload = r
        .get_child("pubsub", NS)
        .unwrap()
        .get_child("items", NS)
        .unwrap()
        .children()
        .next()
        .unwrap()
        .clone();
    assert!(payload.get_child("metadata", AVATAR).is_some(), "{r}");
    let r = c.iq(items_get(&alice, AVATAR, None)).await;
    assert_eq!(stanza_error(&r).as_deref(), Some("not-authorized"), "{r}");
    assert_eq!(
        pubsub_app_error(&r).as_deref(),
        Some("presence-subscription-required")
    );

    // OMEMO device list: open by default, even for a stranger.
    assert_eq!(
        item_ids(&c.iq(items_get(&alice, DEVICES, None)).await),
        ["current"]
    );

    // Bookmarks: the owner only.
    let r = b.iq(items_get(&alice, BOOKMARKS, None)).await;
    assert_eq!(stanza_error(&r).as_deref(), Some("not-allowed"), "{r}");
    assert_eq!(pubsub_app_error(&r).as_deref(), Some("closed-node"));
    assert_eq!(
        item_ids(&a.iq(items_get(&alice, BOOKMARKS, None)).await),
        ["room@muc.example"]
    );

    // Writes are the owner's; unknown nodes are item-not-found.
    let mut p = publish(
        AVATAR,
        "x",
        "<metadata xmlns='urn:xmpp:avatar:metadata'/>",
        &[],
    );
    p.set_attr("to", alice.as_str());
    let r = b.iq(p).await;
    assert_eq!(stanza_error(&r).as_deref(), Some("forbidden"), "{r}");
    let r = b.iq(items_get(&alice, "nope", None)).await;
    assert_eq!(stanza_error(&r).as_deref(), Some("item-not-found"), "{r}");
    // XEP-0086: profanity's OMEMO reads a missing device list off code 404.
    let err = r.get_child("error", NS_CLIENT).expect("error element");
    assert_eq!(err.attr("code"), Some("404"), "{r}");

    // disco#items lists what the asker may read.
    let nodes = |r: &Element| -> Vec<String> {
        let mut v: Vec<String> = r
            .get_child("query", NS_ITEMS)
            .unwrap()
            .children()
            .map(|i| i.attr("node").unwrap().to_string())
            .collect();
        v.sort();
        v
    };
    let disco = xml(&format!(
        "<iq type='get' to='{alice}'><query xmlns='{NS_ITEMS}'/></iq>"
    ));
    assert_eq!(nodes(&ok(&mut c, disco.clone()).await), [DEVICES]);
    assert_eq!(nodes(&ok(&mut b, disco.clone()).await), [DEVICES, AVATAR]);
    assert_eq!(
        nodes(&ok(&mut a, disco).await),
        [DEVICES, AVATAR, BOOKMARKS]
    );
    srv.stop().await;
}

#[tokio::test]
async fn publish_options_max_items_configure_retract_delete() {
    let srv = start_server(|_| {}).await;
    let alice = srv.add_user("alice", PASSWORD).await;
    let mut a = srv.login(&alice, PASSWORD, "x").await;
    let node = "urn:example:notes";
    let opts = [
        ("pubsub#access_model", "open"),
        ("pubsub#max_items", "2"),
        ("pubsub#persist_items", "true"),
    ];
    for id in ["1", "2", "3"] {
        ok(
            &mut a,
            publish(node, id, "<note xmlns='urn:example'/>", &opts),
        )
        .await;
    }
    assert_eq!(
        item_ids(&a.iq(items_get(&alice, node, None)).await),
        ["2", "3"]
    );
    assert_eq!(
        item_ids(&a.iq(items_get(&alice, node, Some(1))).await),
        ["3"]
    );

    // A precondition the node doesn't meet.
    let r = a
        .iq(publish(
            node,
            "4",
            "<note xmlns='urn:example'/>",
            &[("pubsub#access_model", "presence")],
        ))
        .await;
    assert_eq!(stanza_error(&r).as_deref(), Some("conflict"), "{r}");
    assert_eq!(
        pubsub_app_error(&r).as_deref(),
        Some("precondition-not-met")
    );
    let r = a
        .iq(publish(
            node,
            "4",
            "<note xmlns='urn:example'/>",
            &[("pubsub#title", "x")],
        ))
        .await;
    assert_eq!(
        pubsub_app_error(&r).as_deref(),
        Some("precondition-not-met")
    );

    // The configuration form, then reconfigure like clients do after
    // precondition-not-met.
    let r = ok(
        &mut a,
        owner_iq("get", &format!("<configure node='{node}'/>")),
    )
    .await;
    let x = r
        .get_child("pubsub", NS_OWNER)
        .and_then(|p| p.get_child("configure", NS_OWNER))
        .and_then(|c| c.get_child("x", "jabber:x:data"))
        .unwrap_or_else(|| panic!("no form: {r}"));
    let value = |var: &str| {
        x.children()
            .find(|f| f.attr("var") == Some(var))
            .and_then(|f| f.child_text("value", "jabber:x:data"))
    };
    assert_eq!(value("pubsub#access_model").as_deref(), Some("open"));
    assert_eq!(value("pubsub#max_items").as_deref(), Some("2"));
    let conf = |fields: &[(&str, &str)]| {
        owner_iq(
            "set",
            &format!(
                "<configure node='{node}'>{}</configure>",
                form("http://jabber.org/protocol/pubsub#node_config", fields)
            ),
        )
    };
    ok(
        &mut a,
        conf(&[
            ("pubsub#access_model", "presence"),
            ("pubsub#max_items", "max"),
        ]),
    )
    .await;
    ok(
        &mut a,
        publish(
            node,
            "4",
            "<note xmlns='urn:example'/>",
            &[
                ("pubsub#access_model", "presence"),
                ("pubsub#max_items", "max"),
            ],
        ),
    )
    .await;
    assert_eq!(
        item_ids(&a.iq(items_get(&alice, node, None)).await),
        ["2", "3", "4"]
    );
    let r = a.iq(conf(&[("pubsub#access_model", "roster")])).await;
    assert_eq!(stanza_error(&r).as_deref(), Some("not-acceptable"), "{r}");
    let r = a.iq(conf(&[("pubsub#max_items", "0")])).await;
    assert_eq!(stanza_error(&r).as_deref(), Some("not-acceptable"), "{r}");

    // Re-publishing an id replaces it and makes it the newest.
    ok(
        &mut a,
        publish(node, "2", "<note xmlns='urn:example' v='2'/>", &[]),
    )
    .await;
    assert_eq!(
        item_ids(&a.iq(items_get(&alice, node, None)).await),
        ["3", "4", "2"]
    );

    // Retract, create (conflict), delete.
    ok(
        &mut a,
        xml(&format!(
            "<iq type='set'><pubsub xmlns='{NS}'><retract node='{node}'><item id='3'/></retract></pubsub></iq>"
        )),
    )
    .await;
    assert_eq!(
        item_ids(&a.iq(items_get(&alice, node, None)).await),
        ["4", "2"]
    );
    let r = a
        .iq(xml(&format!(
            "<iq type='set'><pubsub xmlns='{NS}'><create node='{node}'/></pubsub></iq>"
        )))
        .await;
    assert_eq!(stanza_error(&r).as_deref(), Some("conflict"), "{r}");
    ok(&mut a, owner_iq("set", &format!("<delete node='{node}'/>"))).await;
    let r = a.iq(items_get(&alice, node, None)).await;
    assert_eq!(stanza_error(&r).as_deref(), Some("item-not-found"), "{r}");

    // Explicit create with configuration.
    ok(
        &mut a,
        xml(&format!(
            "<iq type='set'><pubsub xmlns='{NS}'><create node='n2'/><configure>{}</configure></pubsub></iq>",
            form(
                "http://jabber.org/protocol/pubsub#node_config",
                &[("pubsub#access_model", "whitelist")]
            )
        )),
    )
    .await;
    let r = a
        .iq(publish(
            "n2",
            "1",
            "<x xmlns='urn:example'/>",
            &[("pubsub#access_model", "whitelist")],
        ))
        .await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    srv.stop().await;
}

#[tokio::test]
async fn notifications_go_to_subscribers_with_notify_caps() {
    let srv = start_server(|_| {}).await;
    let alice = srv.add_user("alice", PASSWORD).await;
    let bob = srv.add_user("bob", PASSWORD).await;
    let carol = srv.add_user("carol", PASSWORD).await;
    friends(&srv, &alice, &bob).await;
    let mut a1 = srv.login(&alice, PASSWORD, "notify").await;
    caps_online(&mut a1, &[AVATAR], true).await;
    let mut a2 = srv.login(&alice, PASSWORD, "plain").await;
    caps_online(&mut a2, &[], true).await;
    let mut b = srv.login(&bob, PASSWORD, "x").await;
    // Same capabilities as a1: known by now, not asked again.
    caps_online(&mut b, &[AVATAR], false).await;
    let mut c = srv.login(&carol, PASSWORD, "x").await;
    caps_online(&mut c, &[AVATAR], false).await;
    for cl in [&mut a1, &mut a2, &mut b, &mut c] {
        cl.sync().await;
    }

    ok(
        &mut a2,
        publish(
            AVATAR,
            "v1",
            "<metadata xmlns='urn:xmpp:avatar:metadata'/>",
            &[],
        ),
    )
    .await;
    let ev = b.recv_matching(|e| is_event(e, &alice, AVATAR)).await;
    assert_eq!(ev.attr("type"), Some("headline"));
    let item = ev
        .get_child("event", NS_EVENT)
        .and_then(|e| e.get_child("items", NS_EVENT))
        .and_then(|i| i.get_child("item", NS_EVENT))
        .unwrap_or_else(|| panic!("no item: {ev}"));
    assert_eq!(item.attr("id"), Some("v1"));
    assert!(item.get_child("metadata", AVATAR).is_some(), "{ev}");
    a1.recv_matching(|e| is_event(e, &alice, AVATAR)).await;
    assert_eq!(events(&a2.sync().await, &alice, AVATAR), 0);
    assert_eq!(events(&c.sync().await, &alice, AVATAR), 0);

    // Retract with notify.
    ok(
        &mut a1,
        xml(&format!(
            "<iq type='set'><pubsub xmlns='{NS}'><retract node='{AVATAR}' notify='true'><item id='v1'/></retract></pubsub></iq>"
        )),
    )
    .await;
    let ev = b.recv_matching(|e| is_event(e, &alice, AVATAR)).await;
    let retract = ev
        .get_child("event", NS_EVENT)
        .and_then(|e| e.get_child("items", NS_EVENT))
        .and_then(|i| i.get_child("retract", NS_EVENT));
    assert_eq!(retract.and_then(|r| r.attr("id")), Some("v1"), "{ev}");

    // Whitelist nodes notify the owner's resources only.
    ok(
        &mut a1,
        publish(
            AVATAR,
            "v2",
            "<metadata xmlns='urn:xmpp:avatar:metadata'/>",
            &[],
        ),
    )
    .await;
    b.recv_matching(|e| is_event(e, &alice, AVATAR)).await;
    ok(
        &mut a1,
        owner_iq(
            "set",
            &format!(
                "<configure node='{AVATAR}'>{}</configure>",
                form(
                    "http://jabber.org/protocol/pubsub#node_config",
                    &[("pubsub#access_model", "whitelist")]
                )
            ),
        ),
    )
    .await;
    ok(
        &mut a1,
        publish(
            AVATAR,
            "v3",
            "<metadata xmlns='urn:xmpp:avatar:metadata'/>",
            &[],
        ),
    )
    .await;
    a1.recv_matching(|e| is_event(e, &alice, AVATAR)).await;
    assert_eq!(events(&b.sync().await, &alice, AVATAR), 0);

    // A contact alice blocked gets nothing either.
    ok(
        &mut a1,
        owner_iq(
            "set",
            &format!(
                "<configure node='{AVATAR}'>{}</configure>",
                form(
                    "http://jabber.org/protocol/pubsub#node_config",
                    &[("pubsub#access_model", "presence")]
                )
            ),
        ),
    )
    .await;
    ok(
        &mut a1,
        xml(&format!(
            "<iq type='set'><block xmlns='urn:xmpp:blocking'><item jid='{bob}'/></block></iq>"
        )),
    )
    .await;
    ok(
        &mut a1,
        publish(
            AVATAR,
            "v4",
            "<metadata xmlns='urn:xmpp:avatar:metadata'/>",
            &[],
        ),
    )
    .await;
    a1.recv_matching(|e| is_event(e, &alice, AVATAR)).await;
    assert_eq!(events(&b.sync().await, &alice, AVATAR), 0);
    srv.stop().await;
}

#[tokio::test]
async fn last_published_item_on_coming_online() {
    let srv = start_server(|_| {}).await;
    let alice = srv.add_user("alice", PASSWORD).await;
    let bob = srv.add_user("bob", PASSWORD).await;
    friends(&srv, &alice, &bob).await;
    let mut a = srv.login(&alice, PASSWORD, "x").await;
    for id in ["old", "new"] {
        ok(
            &mut a,
            publish(
                AVATAR,
                id,
                "<metadata xmlns='urn:xmpp:avatar:metadata'/>",
                &[],
            ),
        )
        .await;
    }
    ok(
        &mut a,
        publish(
            BOOKMARKS,
            "room@muc.example",
            "<conference xmlns='urn:xmpp:bookmarks:1'/>",
            &[],
        ),
    )
    .await;

    // Bob's capabilities are new to the server: it asks, then sends the
    // last item of each node bob wants and may read.
    let mut b = srv.login(&bob, PASSWORD, "one").await;
    caps_online(&mut b, &[AVATAR, BOOKMARKS], true).await;
    let ev = b.recv_matching(|e| is_event(e, &alice, AVATAR)).await;
    let item = ev
        .get_child("event", NS_EVENT)
        .and_then(|e| e.get_child("items", NS_EVENT))
        .and_then(|i| i.get_child("item", NS_EVENT))
        .unwrap();
    assert_eq!(item.attr("id"), Some("new"));
    assert!(ev.get_child("delay", "urn:xmpp:delay").is_some(), "{ev}");
    // Known capabilities: straight away, no query.
    let mut b2 = srv.login(&bob, PASSWORD, "two").await;
    caps_online(&mut b2, &[AVATAR, BOOKMARKS], false).await;
    b2.recv_matching(|e| is_event(e, &alice, AVATAR)).await;
    // A presence update with the same caps doesn't resend it.
    b2.send(&xml(&format!(
        "<presence><show>away</show><c xmlns='{NS_CAPS}' hash='sha-1' node='https://natter.test' ver='{}'/></presence>",
        natter::modules::pep::caps_verification_string(&caps_query(&[AVATAR, BOOKMARKS])).unwrap()
    )))
    .await;
    let got = b2.sync().await;
    assert_eq!(events(&got, &alice, AVATAR), 0, "{got:?}");
    // Never bookmarks (whitelist, send_last never).
    assert_eq!(events(&got, &alice, BOOKMARKS), 0);
    assert_eq!(events(&b.sync().await, &alice, BOOKMARKS), 0);

    // The owner's own new resource gets its own last items (not bookmarks,
    // whose default is never).
    let mut a2 = srv.login(&alice, PASSWORD, "two").await;
    caps_online(&mut a2, &[AVATAR, BOOKMARKS], false).await;
    a2.recv_matching(|e| is_event(e, &alice, AVATAR)).await;
    assert_eq!(events(&a2.sync().await, &alice, BOOKMARKS), 0);
    srv.stop().await;
}

#[tokio::test]
async fn caps_answer_that_does_not_verify_is_not_cached() {
    let srv = start_server(|_| {}).await;
    let alice = srv.add_user("alice", PASSWORD).await;
    let mut a = srv.login(&alice, PASSWORD, "x").await;
    ok(
        &mut a,
        publish(
            AVATAR,
            "v",
            "<metadata xmlns='urn:xmpp:avatar:metadata'/>",
            &[],
        ),
    )
    .await;
    // Claim a ver that doesn't hash to the answer.
    let mut b = srv.login(&alice, PASSWORD, "liar").await;
    b.send(&xml(&format!(
        "<presence><c xmlns='{NS_CAPS}' hash='sha-1' node='n' ver='bogus='/></presence>"
    )))
    .await;
    let q = b
        .recv_matching(|e| e.name == "iq" && e.get_child("query", NS_DISCO_INFO).is_some())
        .await;
    let mut answer = caps_query(&[AVATAR]);
    answer.set_attr("node", "n#bogus=");
    b.send(
        &Element::new("iq", NS_CLIENT)
            .with_attr("type", "result")
            .with_attr("id", q.attr("id").unwrap())
            .with_attr("to", DOMAIN)
            .with_child(answer),
    )
    .await;
    // Used for that session...
    b.recv_matching(|e| is_event(e, &alice, AVATAR)).await;
    // ...but the next session with that ver is asked again.
    let mut c = srv.login(&alice, PASSWORD, "other").await;
    c.send(&xml(&format!(
        "<presence><c xmlns='{NS_CAPS}' hash='sha-1' node='n' ver='bogus='/></presence>"
    )))
    .await;
    c.recv_matching(|e| e.name == "iq" && e.get_child("query", NS_DISCO_INFO).is_some())
        .await;
    srv.stop().await;
}
