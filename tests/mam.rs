//! XEP-0313 message archive: archiving of both sides, RSM paging both ways,
//! flip-page, filters (with/start/end/before-id/after-id/ids), errors,
//! access control, preferences and metadata — against the in-process server.

mod common;

use common::*;
use natter_xml::NS_CLIENT;

const NS_MAM: &str = "urn:xmpp:mam:2";
const NS_RSM: &str = "http://jabber.org/protocol/rsm";
const NS_DATA: &str = "jabber:x:data";
const NS_FORWARD: &str = "urn:xmpp:forward:0";
const NS_DELAY: &str = "urn:xmpp:delay";
const NS_SID: &str = "urn:xmpp:sid:0";

/// One archived item as a test sees it.
#[derive(Clone, Debug)]
struct Item {
    id: String,
    stamp: String,
    body: String,
    from: String,
}

/// The answer to one query.
struct Answer {
    items: Vec<Item>,
    fin: Element,
}

impl Answer {
    fn bodies(&self) -> Vec<String> {
        self.items.iter().map(|i| i.body.clone()).collect()
    }
    fn complete(&self) -> bool {
        self.fin.attr("complete") == Some("true")
    }
    fn rsm(&self, name: &str) -> Option<String> {
        self.fin
            .get_child("set", NS_RSM)
            .and_then(|s| s.child_text(name, NS_RSM))
    }
    fn first_index(&self) -> Option<String> {
        self.fin
            .get_child("set", NS_RSM)
            .and_then(|s| s.get_child("first", NS_RSM))
            .and_then(|f| f.attr("index"))
            .map(str::to_owned)
    }
}

fn field(var: &str, values: &[&str]) -> Element {
    let mut f = Element::new("field", NS_DATA).with_attr("var", var);
    for v in values {
        f.append_child(Element::new("value", NS_DATA).with_text(*v));
    }
    f
}

/// A MAM query IQ: form fields, RSM children (name, text; "" = empty
/// element), flip-page, addressed to `to` if given.
fn query_iq(
    fields: &[(&str, &[&str])],
    rsm: &[(&str, &str)],
    flip: bool,
    to: Option<&str>,
) -> Element {
    let qid = next_id();
    let mut q = Element::new("query", NS_MAM).with_attr("queryid", qid);
    if !fields.is_empty() {
        let mut x = Element::new("x", NS_DATA)
            .with_attr("type", "submit")
            .with_child(field("FORM_TYPE", &[NS_MAM]).with_attr("type", "hidden"));
        for (var, vals) in fields {
            x.append_child(field(var, vals));
        }
        q.append_child(x);
    }
    if !rsm.is_empty() {
        let mut set = Element::new("set", NS_RSM);
        for (name, text) in rsm {
            let mut e = Element::new(*name, NS_RSM);
            if !text.is_empty() {
                e.append_text(*text);
            }
            set.append_child(e);
        }
        q.append_child(set);
    }
    if flip {
        q.append_child(Element::new("flip-page", NS_MAM));
    }
    let mut iq = Element::new("iq", NS_CLIENT)
        .with_attr("type", "set")
        .with_child(q);
    if let Some(t) = to {
        iq.set_attr("to", t);
    }
    iq
}

/// Run a query; panics unless it succeeds.
async fn query(
    c: &mut Client,
    fields: &[(&str, &[&str])],
    rsm: &[(&str, &str)],
    flip: bool,
) -> Answer {
    let iq = query_iq(fields, rsm, flip, None);
    let qid = iq
        .children()
        .next()
        .unwrap()
        .attr("queryid")
        .unwrap()
        .to_string();
    let r = c.iq(iq).await;
    assert_eq!(r.attr("type"), Some("result"), "MAM query failed: {r}");
    let fin = r
        .get_child("fin", NS_MAM)
        .unwrap_or_else(|| panic!("no <fin/>: {r}"))
        .clone();
    let me = c.jid().to_string();
    let mut items = Vec::new();
    for m in c.take_buffered() {
        let Some(res) = m.get_child("result", NS_MAM) else {
            continue;
        };
        assert_eq!(res.attr("queryid"), Some(qid.as_str()), "{m}");
        assert_eq!(
            m.attr("to"),
            Some(me.as_str()),
            "results go to the querying resource: {m}"
        );
        let fwd = res.get_child("forwarded", NS_FORWARD).expect("forwarded");
        let stamp = fwd
            .get_child("delay", NS_DELAY)
            .and_then(|d| d.attr("stamp"))
            .expect("delay stamp")
            .to_string();
        let orig = fwd
            .get_child("message", NS_CLIENT)
            .expect("original message");
        items.push(Item {
            id: res.attr("id").expect("result id").to_string(),
            stamp,
            body: orig.child_text("body", NS_CLIENT).unwrap_or_default(),
            from: orig.attr("from").unwrap_or_default().to_string(),
        });
    }
    Answer { items, fin }
}

/// The error condition a query gets.
async fn query_error(c: &mut Client, iq: Element) -> String {
    let r = c.iq(iq).await;
    assert_eq!(r.attr("type"), Some("error"), "expected an error: {r}");
    c.take_buffered();
    stanza_error(&r).expect("error condition")
}

/// Send bodies `prefix0..prefixN` from `a` to `to`, then make sure they were
/// all accepted (no error came back).
async fn send_many(a: &mut Client, to: &str, prefix: &str, n: usize) -> Vec<String> {
    let mut bodies = Vec::new();
    for i in 0..n {
        let body = format!("{prefix}{i}");
        a.send(&message(to, &body)).await;
        bodies.push(body);
    }
    let before = a.sync().await;
    for s in before {
        assert_ne!(s.attr("type"), Some("error"), "message refused: {s}");
    }
    bodies
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[tokio::test]
async fn paging_forward_and_backward_with_complete_flag() {
    let srv = start_server(|_| {}).await;
    let (mut a, mut b) = srv.logged_in_pair().await;
    let bob = b.bare_jid().to_string();
    let sent = send_many(&mut a, &bob, "m", 25).await;

    // Forward from the start.
    let p1 = query(&mut a, &[], &[("max", "10")], false).await;
    assert_eq!(p1.bodies(), sent[..10]);
    assert!(!p1.complete());
    assert_eq!(p1.first_index().as_deref(), Some("0"));
    // The count costs a walk over the whole archive: only given for max=0.
    assert_eq!(p1.rsm("count"), None);
    assert_eq!(p1.rsm("first"), Some(p1.items[0].id.clone()));
    assert_eq!(p1.rsm("last"), Some(p1.items[9].id.clone()));
    let last = p1.rsm("last").unwrap();
    let p2 = query(&mut a, &[], &[("max", "10"), ("after", &last)], false).await;
    assert_eq!(p2.bodies(), sent[10..20]);
    assert!(!p2.complete());
    let last = p2.rsm("last").unwrap();
    let p3 = query(&mut a, &[], &[("max", "10"), ("after", &last)], false).await;
    assert_eq!(p3.bodies(), sent[20..]);
    assert!(p3.complete());
    // Past the end: empty and complete.
    let last = p3.rsm("last").unwrap();
    let p4 = query(&mut a, &[], &[("max", "10"), ("after", &last)], false).await;
    assert!(p4.items.is_empty());
    assert!(p4.complete());

    // Backward from the end: <before/> is the last page.
    let b1 = query(&mut a, &[], &[("max", "10"), ("before", "")], false).await;
    assert_eq!(b1.bodies(), sent[15..]);
    assert!(!b1.complete());
    // No index on backward pages (slixmpp's reverse iterator misreads it).
    assert_eq!(b1.first_index(), None);
    let first = b1.rsm("first").unwrap();
    let b2 = query(&mut a, &[], &[("max", "10"), ("before", &first)], false).await;
    assert_eq!(b2.bodies(), sent[5..15]);
    assert!(!b2.complete());
    let first = b2.rsm("first").unwrap();
    let b3 = query(&mut a, &[], &[("max", "10"), ("before", &first)], false).await;
    assert_eq!(b3.bodies(), sent[..5]);
    assert!(b3.complete());

    // The recipient's archive holds the same messages, as incoming.
    let theirs = query(&mut b, &[], &[("max", "100")], false).await;
    assert_eq!(theirs.bodies(), sent);
    assert!(theirs.complete());
    assert!(theirs.items.iter().all(|i| i.from == a.jid()));
    // Ids are per archive: the two copies differ.
    assert_ne!(theirs.items[0].id, p1.items[0].id);

    // max=0: only the count.
    let c = query(&mut a, &[], &[("max", "0")], false).await;
    assert!(c.items.is_empty());
    assert_eq!(c.rsm("count").as_deref(), Some("25"));
    srv.stop().await;
}

#[tokio::test]
async fn flip_page_reverses_order_only() {
    let srv = start_server(|_| {}).await;
    let (mut a, b) = srv.logged_in_pair().await;
    let sent = send_many(&mut a, b.bare_jid(), "f", 7).await;
    let plain = query(&mut a, &[], &[("max", "5"), ("before", "")], false).await;
    let flipped = query(&mut a, &[], &[("max", "5"), ("before", "")], true).await;
    assert_eq!(plain.bodies(), sent[2..]);
    let mut rev = flipped.bodies();
    rev.reverse();
    assert_eq!(rev, sent[2..]);
    // Same page, same cursors and completeness.
    assert_eq!(plain.rsm("first"), flipped.rsm("first"));
    assert_eq!(plain.rsm("last"), flipped.rsm("last"));
    assert_eq!(plain.complete(), flipped.complete());
    srv.stop().await;
}

#[tokio::test]
async fn filters_with_start_end_and_ids() {
    let srv = start_server(|_| {}).await;
    let (mut a, b) = srv.logged_in_pair().await;
    let carol = srv.add_user("carol_filters", "password").await;
    let bob = b.bare_jid().to_string();
    let mut to_bob = Vec::new();
    let mut all = Vec::new();
    for i in 0..6 {
        let to = if i % 2 == 0 { &bob } else { &carol };
        let sent = send_many(&mut a, to, &format!("w{i}-"), 1).await;
        if to == &bob {
            to_bob.extend(sent.clone());
        }
        all.extend(sent);
    }
    let with_bob = query(&mut a, &[("with", &[bob.as_str()])], &[], false).await;
    assert_eq!(with_bob.bodies(), to_bob);
    assert!(with_bob.complete());
    // A full JID matches its bare JID's messages.
    let full = format!("{bob}/whatever");
    let with_full = query(&mut a, &[("with", &[full.as_str()])], &[], false).await;
    assert_eq!(with_full.bodies(), to_bob);

    let everything = query(&mut a, &[], &[], false).await;
    assert_eq!(everything.bodies(), all);
    // start/end are inclusive.
    let s = everything.items[1].stamp.clone();
    let e = everything.items[4].stamp.clone();
    let range = query(
        &mut a,
        &[("start", &[s.as_str()]), ("end", &[e.as_str()])],
        &[],
        false,
    )
    .await;
    assert_eq!(range.bodies(), all[1..=4]);
    let later = query(&mut a, &[("start", &[e.as_str()])], &[], false).await;
    assert_eq!(later.bodies(), all[4..]);

    // ids: exactly those, in archive order.
    let ids = [
        everything.items[3].id.as_str(),
        everything.items[0].id.as_str(),
    ];
    let picked = query(&mut a, &[("ids", &ids)], &[], false).await;
    assert_eq!(picked.bodies(), vec![all[0].clone(), all[3].clone()]);
    // Malformed filters.
    let bad = query_iq(&[("start", &["last tuesday"])], &[], false, None);
    assert_eq!(query_error(&mut a, bad).await, "bad-request");
    let unknown = query_iq(&[("fulltext", &["x"])], &[], false, None);
    assert_eq!(
        query_error(&mut a, unknown).await,
        "feature-not-implemented"
    );
    srv.stop().await;
}

#[tokio::test]
async fn before_id_and_after_id() {
    let srv = start_server(|_| {}).await;
    let (mut a, b) = srv.logged_in_pair().await;
    let sent = send_many(&mut a, b.bare_jid(), "x", 10).await;
    let all = query(&mut a, &[], &[], false).await;
    let id = |i: usize| all.items[i].id.clone();

    let between = query(
        &mut a,
        &[("after-id", &[&id(2)]), ("before-id", &[&id(8)])],
        &[],
        false,
    )
    .await;
    assert_eq!(between.bodies(), sent[3..8]);
    assert!(between.complete());
    // Bounded both sides, paged forward.
    let page = query(
        &mut a,
        &[("after-id", &[&id(2)]), ("before-id", &[&id(8)])],
        &[("max", "2")],
        false,
    )
    .await;
    assert_eq!(page.bodies(), sent[3..5]);
    assert!(!page.complete());
    // ... and backward with RSM <before/>.
    let back = query(
        &mut a,
        &[("after-id", &[&id(2)]), ("before-id", &[&id(8)])],
        &[("max", "2"), ("before", "")],
        false,
    )
    .await;
    assert_eq!(back.bodies(), sent[6..8]);
    assert!(!back.complete());

    let after = query(&mut a, &[("after-id", &[&id(6)])], &[], false).await;
    assert_eq!(after.bodies(), sent[7..]);
    assert!(after.complete());
    let before = query(&mut a, &[("before-id", &[&id(4)])], &[("max", "3")], false).await;
    assert_eq!(before.bodies(), sent[..3]);
    assert!(!before.complete());
    let before_all = query(&mut a, &[("before-id", &[&id(4)])], &[("max", "4")], false).await;
    assert_eq!(before_all.bodies(), sent[..4]);
    assert!(before_all.complete());
    // Bounds the wrong way round: nothing.
    let none = query(
        &mut a,
        &[("after-id", &[&id(8)]), ("before-id", &[&id(2)])],
        &[],
        false,
    )
    .await;
    assert!(none.items.is_empty());
    assert!(none.complete());
    // RSM <after/> together with after-id: the later one wins.
    let both = query(
        &mut a,
        &[("after-id", &[&id(1)])],
        &[("after", &id(5))],
        false,
    )
    .await;
    assert_eq!(both.bodies(), sent[6..]);
    srv.stop().await;
}

#[tokio::test]
async fn unknown_ids_are_item_not_found() {
    let srv = start_server(|_| {}).await;
    let (mut a, b) = srv.logged_in_pair().await;
    send_many(&mut a, b.bare_jid(), "u", 3).await;
    for iq in [
        query_iq(&[], &[("after", "nope")], false, None),
        query_iq(&[], &[("before", "nope")], false, None),
        query_iq(&[("after-id", &["nope"])], &[], false, None),
        query_iq(&[("before-id", &["nope"])], &[], false, None),
        query_iq(&[("ids", &["nope"])], &[], false, None),
    ] {
        assert_eq!(query_error(&mut a, iq).await, "item-not-found");
    }
    // An id from someone else's archive is unknown in mine.
    let mut b = b;
    let theirs = query(&mut b, &[], &[], false).await;
    let iq = query_iq(&[], &[("after", &theirs.items[0].id)], false, None);
    assert_eq!(query_error(&mut a, iq).await, "item-not-found");
    srv.stop().await;
}

#[tokio::test]
async fn another_users_archive_is_forbidden() {
    let srv = start_server(|_| {}).await;
    let (mut a, mut b) = srv.logged_in_pair().await;
    let bob = b.bare_jid().to_string();
    send_many(&mut b, a.bare_jid(), "secret", 2).await;
    let iq = query_iq(&[], &[], false, Some(&bob));
    assert_eq!(query_error(&mut a, iq).await, "forbidden");
    let prefs = Element::new("iq", NS_CLIENT)
        .with_attr("type", "get")
        .with_attr("to", bob.clone())
        .with_child(Element::new("prefs", NS_MAM));
    assert_eq!(query_error(&mut a, prefs).await, "forbidden");
    // The owner may address the archive explicitly.
    let own = query_iq(&[], &[], false, Some(&bob));
    let r = b.iq(own).await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    let results: Vec<_> = b
        .take_buffered()
        .into_iter()
        .filter(|m| m.get_child("result", NS_MAM).is_some())
        .collect();
    assert_eq!(results.len(), 2);
    srv.stop().await;
}

async fn set_prefs(c: &mut Client, default: &str, always: &[&str], never: &[&str]) -> Element {
    let list = |name: &str, jids: &[&str]| {
        let mut e = Element::new(name, NS_MAM);
        for j in jids {
            e.append_child(Element::new("jid", NS_MAM).with_text(*j));
        }
        e
    };
    let iq = Element::new("iq", NS_CLIENT)
        .with_attr("type", "set")
        .with_child(
            Element::new("prefs", NS_MAM)
                .with_attr("default", default)
                .with_child(list("always", always))
                .with_child(list("never", never)),
        );
    let r = c.iq(iq).await;
    assert_eq!(r.attr("type"), Some("result"), "{r}");
    r.get_child("prefs", NS_MAM)
        .expect("prefs in result")
        .clone()
}

fn pref_jids(p: &Element, list: &str) -> Vec<String> {
    p.get_child(list, NS_MAM)
        .map(|l| l.children().map(|j| j.text()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn preferences_are_honoured() {
    let srv = start_server(|_| {}).await;
    let (mut a, mut b) = srv.logged_in_pair().await;
    let carol = srv.add_user("carol_prefs", "password").await;
    let dave = srv.add_user("dave_prefs", "password").await;
    let bob = b.bare_jid().to_string();
    b.send(&xml("<presence/>")).await;
    b.sync().await;

    // Defaults: always, empty lists.
    let get = Element::new("iq", NS_CLIENT)
        .with_attr("type", "get")
        .with_child(Element::new("prefs", NS_MAM));
    let r = a.iq(get.clone()).await;
    let p = r.get_child("prefs", NS_MAM).expect("prefs");
    assert_eq!(p.attr("default"), Some("always"));

    // Alice: never, except with Carol. Bob: always, except with Dave... and Alice never.
    let p = set_prefs(&mut a, "never", &[&carol], &[]).await;
    assert_eq!(p.attr("default"), Some("never"));
    assert_eq!(pref_jids(&p, "always"), vec![carol.clone()]);
    let r = a.iq(get).await;
    assert_eq!(
        r.get_child("prefs", NS_MAM).unwrap().attr("default"),
        Some("never")
    );
    set_prefs(&mut b, "always", &[], &[a.bare_jid()]).await;

    send_many(&mut a, &bob, "to-bob", 2).await;
    send_many(&mut a, &carol, "to-carol", 1).await;
    send_many(&mut a, &dave, "to-dave", 1).await;
    let mine = query(&mut a, &[], &[], false).await;
    assert_eq!(mine.bodies(), vec!["to-carol0".to_string()]);
    // The message to Bob was delivered, without a stanza-id ...
    let got = b.recv_until(|m| m.name == "message").await;
    assert_eq!(
        got.child_text("body", NS_CLIENT).as_deref(),
        Some("to-bob0")
    );
    assert!(got.get_child("stanza-id", NS_SID).is_none(), "{got}");
    // ... and Bob keeps nothing from Alice.
    let his = query(&mut b, &[], &[], false).await;
    assert!(his.items.is_empty(), "{:?}", his.bodies());

    // Roster mode: only contacts in the roster are archived.
    set_prefs(&mut a, "roster", &[], &[]).await;
    let add = xml(&format!(
        "<iq type='set'><query xmlns='jabber:iq:roster'><item jid='{dave}'/></query></iq>"
    ));
    assert_eq!(a.iq(add).await.attr("type"), Some("result"));
    send_many(&mut a, &dave, "roster-dave", 1).await;
    send_many(&mut a, &bob, "roster-bob", 1).await;
    let mine = query(
        &mut a,
        &[("start", &[mine.items[0].stamp.as_str()])],
        &[],
        false,
    )
    .await;
    assert_eq!(
        strs(&mine.bodies()),
        vec!["to-carol0", "roster-dave0"],
        "roster mode keeps only roster contacts"
    );
    // Invalid default.
    let bad = Element::new("iq", NS_CLIENT)
        .with_attr("type", "set")
        .with_child(Element::new("prefs", NS_MAM).with_attr("default", "sometimes"));
    let r = a.iq(bad).await;
    assert_eq!(stanza_error(&r).as_deref(), Some("bad-request"));
    srv.stop().await;
}

#[tokio::test]
async fn metadata_form_and_disco() {
    let srv = start_server(|_| {}).await;
    let (mut a, b) = srv.logged_in_pair().await;
    let md = Element::new("iq", NS_CLIENT)
        .with_attr("type", "get")
        .with_child(Element::new("metadata", NS_MAM));
    let r = a.iq(md.clone()).await;
    let m = r.get_child("metadata", NS_MAM).expect("metadata");
    assert!(m.children().next().is_none(), "empty archive: {m}");

    send_many(&mut a, b.bare_jid(), "md", 3).await;
    let all = query(&mut a, &[], &[], false).await;
    let r = a.iq(md).await;
    let m = r.get_child("metadata", NS_MAM).expect("metadata");
    let start = m.get_child("start", NS_MAM).expect("start");
    let end = m.get_child("end", NS_MAM).expect("end");
    assert_eq!(start.attr("id"), Some(all.items[0].id.as_str()));
    assert_eq!(end.attr("id"), Some(all.items[2].id.as_str()));
    assert_eq!(end.attr("timestamp"), Some(all.items[2].stamp.as_str()));

    // The query form lists the fields.
    let form = a
        .iq(Element::new("iq", NS_CLIENT)
            .with_attr("type", "get")
            .with_child(Element::new("query", NS_MAM)))
        .await;
    let x = form
        .get_child("query", NS_MAM)
        .and_then(|q| q.get_child("x", NS_DATA))
        .expect("form");
    let vars: Vec<_> = x.children().filter_map(|f| f.attr("var")).collect();
    for v in [
        "FORM_TYPE",
        "with",
        "start",
        "end",
        "before-id",
        "after-id",
        "ids",
    ] {
        assert!(vars.contains(&v), "field {v} missing: {x}");
    }

    // Disco on the account.
    let disco = Element::new("iq", NS_CLIENT)
        .with_attr("type", "get")
        .with_attr("to", a.bare_jid().to_string())
        .with_child(Element::new("query", NS_DISCO_INFO));
    let r = a.iq(disco).await;
    let feats: Vec<_> = r
        .get_child("query", NS_DISCO_INFO)
        .unwrap()
        .children()
        .filter_map(|f| f.attr("var"))
        .map(str::to_owned)
        .collect();
    for f in [NS_MAM, "urn:xmpp:mam:2#extended", NS_SID] {
        assert!(feats.iter().any(|x| x == f), "{f} not announced: {feats:?}");
    }
    srv.stop().await;
}

#[tokio::test]
async fn receipts_markers_and_corrections_are_archived_chat_states_not() {
    let srv = start_server(|_| {}).await;
    let (mut a, mut b) = srv.logged_in_pair().await;
    let alice = a.jid().to_string();
    let bob = b.bare_jid().to_string();
    b.send(&xml("<presence/>")).await;
    b.sync().await;
    send_many(&mut a, &bob, "hello", 1).await;
    let got = b.recv_until(|m| m.name == "message").await;
    let sid = got
        .get_child("stanza-id", NS_SID)
        .expect("delivered message carries a stanza-id");
    assert_eq!(sid.attr("by"), Some(bob.as_str()));
    let id = got.attr("id").unwrap().to_string();
    for payload in [
        format!("<received xmlns='urn:xmpp:receipts' id='{id}'/>"),
        format!("<displayed xmlns='urn:xmpp:chat-markers:0' id='{id}'/>"),
        "<composing xmlns='http://jabber.org/protocol/chatstates'/>".to_string(),
        format!(
            "<reactions xmlns='urn:xmpp:reactions:0' id='{id}'><reaction>👍</reaction></reactions>"
        ),
    ] {
        b.send(&xml(&format!(
            "<message to='{alice}' type='chat'>{payload}</message>"
        )))
        .await;
    }
    b.sync().await;
    let mine = query(&mut b, &[], &[], false).await;
    // hello + receipt + marker + reaction; the chat state is not kept.
    assert_eq!(mine.items.len(), 4, "{:?}", mine.items);
    let alices = query(&mut a, &[], &[], false).await;
    assert_eq!(alices.items.len(), 4);
    srv.stop().await;
}

#[tokio::test]
async fn carbons_carry_the_owners_stanza_id() {
    let srv = start_server(|_| {}).await;
    let (mut a, mut b) = srv.logged_in_pair().await;
    let alice = a.bare_jid().to_string();
    let bob = b.bare_jid().to_string();
    let mut a2 = srv.login(&alice, "password", "laptop").await;
    let enable = xml("<iq type='set'><enable xmlns='urn:xmpp:carbons:2'/></iq>");
    assert_eq!(a2.iq(enable).await.attr("type"), Some("result"));
    b.send(&xml("<presence/>")).await;
    b.sync().await;
    send_many(&mut a, &bob, "carbon", 1).await;
    let carbon = a2.recv_until(|m| m.name == "message").await;
    let fwd = carbon
        .get_child("sent", "urn:xmpp:carbons:2")
        .and_then(|s| s.get_child("forwarded", NS_FORWARD))
        .and_then(|f| f.get_child("message", NS_CLIENT))
        .unwrap_or_else(|| panic!("sent carbon expected: {carbon}"));
    let sid = fwd
        .get_child("stanza-id", NS_SID)
        .expect("stanza-id in the carbon");
    assert_eq!(sid.attr("by"), Some(alice.as_str()));
    // Only Alice's: the copy is built from Bob's delivered one, minus Bob's id.
    let in_carbon = fwd.children().filter(|c| c.is("stanza-id", NS_SID)).count();
    assert_eq!(in_carbon, 1, "{carbon}");
    let mine = query(&mut a, &[], &[], false).await;
    assert_eq!(sid.attr("id"), Some(mine.items[0].id.as_str()));
    // Bob's copy names Bob's archive only.
    let got = b.recv_until(|m| m.name == "message").await;
    let ids: Vec<_> = got
        .children()
        .filter(|c| c.is("stanza-id", NS_SID))
        .map(|c| c.attr("by").unwrap_or_default().to_string())
        .collect();
    assert_eq!(ids, vec![bob]);
    srv.stop().await;
}
