//! XEP-0045 group chats with member semantics: rooms on
//! conference.localhost, created members-only, persistent, non-anonymous
//! and archived; members get every message (joined, at their bare JID when
//! opted in, or from the room archive); affiliations and roles enforced;
//! retraction, moderation, read markers, invitations, self-ping, limits.

mod common;

use common::*;
use natter_xml::NS_CLIENT;

const PASSWORD: &str = "password";
const SERVICE: &str = "conference.localhost";
const NS_MUC: &str = "http://jabber.org/protocol/muc";
const NS_USER: &str = "http://jabber.org/protocol/muc#user";
const NS_ADMIN: &str = "http://jabber.org/protocol/muc#admin";
const NS_OWNER: &str = "http://jabber.org/protocol/muc#owner";
const NS_DATA: &str = "jabber:x:data";
const NS_MAM: &str = "urn:xmpp:mam:2";
const NS_SID: &str = "urn:xmpp:sid:0";
const NS_OCCUPANT_ID: &str = "urn:xmpp:occupant-id:0";
const NS_RETRACT: &str = "urn:xmpp:message-retract:1";
const NS_MODERATE: &str = "urn:xmpp:message-moderate:1";
const NS_MARKERS: &str = "urn:xmpp:chat-markers:0";
const NS_READ: &str = "urn:natter:muc:read:0";
const OFFLINE_FIELD: &str = "{http://tigase.org/protocol/muc}offline";

async fn online(srv: &TestServer, user: &str, resource: &str) -> Client {
    let mut c = srv.login(user, PASSWORD, resource).await;
    c.send(&xml("<presence/>")).await;
    c.sync().await;
    c
}

fn join_presence(room: &str, nick: &str, history: Option<usize>) -> Element {
    let mut x = Element::new("x", NS_MUC);
    if let Some(n) = history {
        x.append_child(Element::new("history", NS_MUC).with_attr("maxstanzas", n.to_string()));
    }
    Element::new("presence", NS_CLIENT)
        .with_attr("to", format!("{room}/{nick}"))
        .with_child(x)
}

fn status_codes(p: &Element) -> Vec<String> {
    p.get_child("x", NS_USER)
        .map(|x| {
            x.children()
                .filter(|c| c.is("status", NS_USER))
                .filter_map(|c| c.attr("code").map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn is_self_presence(p: &Element) -> bool {
    p.name == "presence" && status_codes(p).iter().any(|c| c == "110")
}

/// Join and wait for the self-presence; then the subject. Returns the
/// self-presence.
async fn join(c: &mut Client, room: &str, nick: &str) -> Element {
    c.send(&join_presence(room, nick, Some(0))).await;
    let me = c
        .recv_until(|e| is_self_presence(e) || e.attr("type") == Some("error"))
        .await;
    assert_ne!(me.attr("type"), Some("error"), "join failed: {me}");
    c.recv_until(|e| e.name == "message" && e.get_child("subject", NS_CLIENT).is_some())
        .await;
    me
}

fn groupchat(room: &str, body: &str) -> Element {
    Element::new("message", NS_CLIENT)
        .with_attr("to", room)
        .with_attr("type", "groupchat")
        .with_attr("id", next_id())
        .with_child(Element::new("body", NS_CLIENT).with_text(body))
}

fn admin_set(room: &str, items: &[(&str, &str)]) -> Element {
    let mut q = Element::new("query", NS_ADMIN);
    for (jid, aff) in items {
        q.append_child(
            Element::new("item", NS_ADMIN)
                .with_attr("jid", *jid)
                .with_attr("affiliation", *aff),
        );
    }
    Element::new("iq", NS_CLIENT)
        .with_attr("type", "set")
        .with_attr("to", room)
        .with_child(q)
}

fn is_body(e: &Element, body: &str) -> bool {
    e.name == "message" && e.child_text("body", NS_CLIENT).as_deref() == Some(body)
}

fn register_form(room: &str, nick: &str, offline: bool) -> Element {
    let field = |var: &str, v: &str| {
        Element::new("field", NS_DATA)
            .with_attr("var", var)
            .with_child(Element::new("value", NS_DATA).with_text(v))
    };
    Element::new("iq", NS_CLIENT)
        .with_attr("type", "set")
        .with_attr("to", room)
        .with_child(
            Element::new("query", NS_REGISTER).with_child(
                Element::new("x", NS_DATA)
                    .with_attr("type", "submit")
                    .with_child(field(
                        "FORM_TYPE",
                        "http://jabber.org/protocol/muc#register",
                    ))
                    .with_child(field("muc#register_roomnick", nick))
                    .with_child(field(OFFLINE_FIELD, if offline { "1" } else { "0" })),
            ),
        )
}

fn mam_query(room: &str, max: usize) -> Element {
    Element::new("iq", NS_CLIENT)
        .with_attr("type", "set")
        .with_attr("to", room)
        .with_child(
            Element::new("query", NS_MAM)
                .with_attr("queryid", "q1")
                .with_child(
                    Element::new("set", "http://jabber.org/protocol/rsm").with_child(
                        Element::new("max", "http://jabber.org/protocol/rsm")
                            .with_text(max.to_string()),
                    ),
                ),
        )
}

/// The bodies of the archived messages a MAM query returned, in order.
async fn room_archive_bodies(c: &mut Client, room: &str) -> Result<Vec<String>, String> {
    let res = c.iq(mam_query(room, 250)).await;
    if let Some(e) = stanza_error(&res) {
        return Err(e);
    }
    let got = c.sync().await;
    Ok(got
        .iter()
        .filter_map(|m| m.get_child("result", NS_MAM))
        .filter_map(|r| r.get_child("forwarded", "urn:xmpp:forward:0"))
        .filter_map(|f| f.get_child("message", NS_CLIENT))
        .filter_map(|m| m.child_text("body", NS_CLIENT))
        .collect())
}

struct Group {
    room: String,
    names: Vec<String>,
    clients: Vec<Client>,
}

/// alice creates `room`, adds the others as members in one IQ, and all join.
async fn group(srv: &TestServer, room: &str, users: &[&str]) -> Group {
    let room = format!("{room}@{SERVICE}");
    let mut names = Vec::new();
    let mut clients = Vec::new();
    for u in users {
        let jid = srv.add_user(u, PASSWORD).await;
        clients.push(online(srv, &jid, "phone").await);
        names.push(jid);
    }
    let me = join(&mut clients[0], &room, users[0]).await;
    assert!(
        status_codes(&me).contains(&"201".to_string()),
        "created: {me}"
    );
    let items: Vec<(&str, &str)> = names[1..].iter().map(|n| (n.as_str(), "member")).collect();
    let res = clients[0].iq(admin_set(&room, &items)).await;
    assert_eq!(res.attr("type"), Some("result"), "{res}");
    for (i, c) in clients.iter_mut().enumerate().skip(1) {
        join(c, &room, users[i]).await;
    }
    for c in clients.iter_mut() {
        c.sync().await;
    }
    Group {
        room,
        names,
        clients,
    }
}

#[tokio::test]
async fn a_new_room_is_a_whatsapp_group_and_members_chat() {
    let srv = start_server(|_| {}).await;
    let mut g = group(&srv, "team", &["alice", "bob", "carol"]).await;
    // Defaults: persistent, members-only, non-anonymous, archived.
    let info = g.clients[0]
        .iq(xml(&format!(
            "<iq type='get' to='{}'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>",
            g.room
        )))
        .await;
    let features: Vec<&str> = info
        .get_child("query", NS_DISCO_INFO)
        .unwrap()
        .children()
        .filter_map(|f| f.attr("var"))
        .collect();
    for f in [
        "muc_persistent",
        "muc_membersonly",
        "muc_nonanonymous",
        NS_MAM,
        NS_OCCUPANT_ID,
    ] {
        assert!(features.contains(&f), "{f} in {features:?}");
    }
    // A message reaches every occupant, from room/nick, with the room's
    // stanza-id and the sender's occupant-id.
    g.clients[1].send(&groupchat(&g.room, "hello all")).await;
    for c in g.clients.iter_mut() {
        let m = c.recv_until(|e| is_body(e, "hello all")).await;
        assert_eq!(m.attr("from"), Some(format!("{}/bob", g.room).as_str()));
        assert_eq!(m.attr("type"), Some("groupchat"));
        let sid = m.get_child("stanza-id", NS_SID).expect("stanza-id");
        assert_eq!(sid.attr("by"), Some(g.room.as_str()));
        assert!(m.get_child("occupant-id", NS_OCCUPANT_ID).is_some());
    }
    // A non-member is refused with registration-required.
    let eve = srv.add_user("eve", PASSWORD).await;
    let mut e = online(&srv, &eve, "x").await;
    e.send(&join_presence(&g.room, "eve", None)).await;
    let err = e
        .recv_until(|p| p.name == "presence" && p.attr("type") == Some("error"))
        .await;
    assert_eq!(stanza_error(&err).as_deref(), Some("registration-required"));
    // ... cannot read the archive nor the member list.
    assert_eq!(
        room_archive_bodies(&mut e, &g.room).await,
        Err("forbidden".into())
    );
    let list = e
        .iq(xml(&format!(
            "<iq type='get' to='{}'><query xmlns='{NS_ADMIN}'><item affiliation='member'/></query></iq>",
            g.room
        )))
        .await;
    assert_eq!(stanza_error(&list).as_deref(), Some("forbidden"));
    // ... nor the subject.
    let subject = Element::new("message", NS_CLIENT)
        .with_attr("to", g.room.clone())
        .with_attr("type", "groupchat")
        .with_child(Element::new("subject", NS_CLIENT).with_text("secret plans"));
    g.clients[0].send(&subject).await;
    g.clients[1]
        .recv_until(|m| m.child_text("subject", NS_CLIENT).as_deref() == Some("secret plans"))
        .await;
    let info = xml(&format!(
        "<iq type='get' to='{}'><query xmlns='{NS_DISCO_INFO}'/></iq>",
        g.room
    ));
    assert!(!e
        .iq(info.clone())
        .await
        .to_string()
        .contains("secret plans"));
    let seen = g.clients[2].iq(info).await.to_string();
    assert!(seen.contains("secret plans"), "{seen}");
    // Members see the member list, present or not (OMEMO needs it).
    let list = g.clients[2]
        .iq(xml(&format!(
            "<iq type='get' to='{}'><query xmlns='{NS_ADMIN}'><item affiliation='member'/></query></iq>",
            g.room
        )))
        .await;
    let jids: Vec<&str> = list
        .get_child("query", NS_ADMIN)
        .unwrap()
        .children()
        .filter_map(|i| i.attr("jid"))
        .collect();
    assert_eq!(jids, vec![g.names[1].as_str(), g.names[2].as_str()]);
    srv.assert_healthy().await;
}

#[tokio::test]
async fn members_added_one_by_one_and_the_room_survives_a_restart() {
    let srv = start_server(|_| {}).await;
    let alice = srv.add_user("alice", PASSWORD).await;
    let bob = srv.add_user("bob", PASSWORD).await;
    let carol = srv.add_user("carol", PASSWORD).await;
    let mut a = online(&srv, &alice, "r").await;
    let room = format!("club@{SERVICE}");
    join(&mut a, &room, "alice").await;
    for who in [&bob, &carol] {
        let res = a.iq(admin_set(&room, &[(who.as_str(), "member")])).await;
        assert_eq!(res.attr("type"), Some("result"), "{res}");
    }
    a.send(&groupchat(&room, "kept")).await;
    a.recv_until(|e| is_body(e, "kept")).await;
    a.close().await;
    let config = srv.state().config.as_ref().clone();
    let _kept = srv.stop_keeping_store().await;
    let running = natter::start(config).await.expect("restart");
    let port = running.bound.c2s_tls.unwrap();
    let mut c = Client::connect_tls(port).await;
    c.login(&carol, PASSWORD, "r").await;
    c.send(&xml("<presence/>")).await;
    c.sync().await;
    join(&mut c, &room, "carol").await;
    assert_eq!(
        room_archive_bodies(&mut c, &room).await.unwrap(),
        vec!["kept".to_string()]
    );
    // bob too is still a member.
    let mut b = Client::connect_tls(port).await;
    b.login(&bob, PASSWORD, "r").await;
    join(&mut b, &room, "bob").await;
    c.close().await;
    b.close().await;
    running.shutdown().await;
}

#[tokio::test]
async fn an_offline_member_gets_every_message_once_and_in_order() {
    let srv = start_server(|_| {}).await;
    let mut g = group(&srv, "team", &["alice", "bob", "carol"]).await;
    // bob opts in to delivery at his bare JID; carol does not.
    let res = g.clients[1].iq(register_form(&g.room, "bob", true)).await;
    assert_eq!(res.attr("type"), Some("result"), "{res}");
    for i in [1, 2] {
        g.clients[i].close().await;
        // Gone from the room before anything is sent.
        let nick = ["alice", "bob", "carol"][i];
        g.clients[0]
            .recv_until(|e| {
                e.name == "presence"
                    && e.attr("type") == Some("unavailable")
                    && e.attr("from") == Some(format!("{}/{nick}", g.room).as_str())
            })
            .await;
    }
    let mut sent = Vec::new();
    for n in 0..20 {
        let body = format!("m{n}");
        g.clients[0].send(&groupchat(&g.room, &body)).await;
        g.clients[0].recv_until(|e| is_body(e, &body)).await;
        sent.push(body);
    }
    // bob: all 20 at login, once, in order (offline queue).
    let mut b = srv.login(&g.names[1], PASSWORD, "laptop").await;
    b.send(&xml("<presence/>")).await;
    let mut got = Vec::new();
    while got.len() < sent.len() {
        let m = b
            .recv_until(|m| m.name == "message" && m.attr("type") == Some("groupchat"))
            .await;
        assert_eq!(m.attr("from"), Some(format!("{}/alice", g.room).as_str()));
        got.extend(m.child_text("body", NS_CLIENT));
    }
    assert_eq!(got, sent);
    queue_emptied(&srv, &g.names[1]).await;
    let more = b.sync().await;
    assert!(
        more.iter().all(|m| m.attr("type") != Some("groupchat")),
        "duplicates: {more:?}"
    );
    // carol: nothing at login; all 20 from the room archive after rejoining.
    let mut c = srv.login(&g.names[2], PASSWORD, "laptop").await;
    c.send(&xml("<presence/>")).await;
    let early: Vec<Element> = c.sync().await;
    assert!(
        early.iter().all(|m| m.attr("type") != Some("groupchat")),
        "{early:?}"
    );
    join(&mut c, &g.room, "carol").await;
    let bodies = room_archive_bodies(&mut c, &g.room).await.unwrap();
    assert_eq!(bodies, sent);
}

#[tokio::test]
async fn kick_ban_and_affiliation_changes_are_enforced() {
    let srv = start_server(|_| {}).await;
    let mut g = group(&srv, "team", &["alice", "bob", "carol"]).await;
    // Kick carol: she leaves with 307 and may come back.
    let kick = xml(&format!(
        "<iq type='set' to='{}'><query xmlns='{NS_ADMIN}'><item nick='carol' role='none'><reason>calm down</reason></item></query></iq>",
        g.room
    ));
    assert_eq!(g.clients[0].iq(kick).await.attr("type"), Some("result"));
    let gone = g.clients[2]
        .recv_until(|e| e.name == "presence" && e.attr("type") == Some("unavailable"))
        .await;
    assert!(status_codes(&gone).contains(&"307".to_string()), "{gone}");
    let seen = g.clients[1]
        .recv_until(|e| e.name == "presence" && e.attr("type") == Some("unavailable"))
        .await;
    assert_eq!(
        seen.attr("from"),
        Some(format!("{}/carol", g.room).as_str())
    );
    join(&mut g.clients[2], &g.room, "carol").await;
    // A member may not kick or ban.
    let res = g.clients[1]
        .iq(admin_set(&g.room, &[(g.names[2].as_str(), "outcast")]))
        .await;
    assert_eq!(stanza_error(&res).as_deref(), Some("not-allowed"));
    // Ban carol: out with 301, cannot rejoin under another nick nor read.
    let res = g.clients[0]
        .iq(admin_set(&g.room, &[(g.names[2].as_str(), "outcast")]))
        .await;
    assert_eq!(res.attr("type"), Some("result"), "{res}");
    let gone = g.clients[2]
        .recv_until(|e| e.name == "presence" && e.attr("type") == Some("unavailable"))
        .await;
    assert!(status_codes(&gone).contains(&"301".to_string()), "{gone}");
    g.clients[2]
        .send(&join_presence(&g.room, "notcarol", None))
        .await;
    let err = g.clients[2]
        .recv_until(|p| p.name == "presence" && p.attr("type") == Some("error"))
        .await;
    assert_eq!(stanza_error(&err).as_deref(), Some("forbidden"));
    assert_eq!(
        room_archive_bodies(&mut g.clients[2], &g.room).await,
        Err("forbidden".into())
    );
    g.clients[2].send(&groupchat(&g.room, "let me in")).await;
    let err = g.clients[2]
        .recv_until(|e| e.attr("type") == Some("error"))
        .await;
    assert_eq!(stanza_error(&err).as_deref(), Some("not-acceptable"));
    // Several items in one IQ: bob becomes admin and carol is let back in as member.
    let res = g.clients[0]
        .iq(admin_set(
            &g.room,
            &[
                (g.names[1].as_str(), "admin"),
                (g.names[2].as_str(), "member"),
            ],
        ))
        .await;
    assert_eq!(res.attr("type"), Some("result"), "{res}");
    join(&mut g.clients[2], &g.room, "carol").await;
    // The last owner cannot leave the room ownerless.
    let res = g.clients[0]
        .iq(admin_set(&g.room, &[(g.names[0].as_str(), "member")]))
        .await;
    assert_eq!(stanza_error(&res).as_deref(), Some("conflict"));
    srv.assert_healthy().await;
}

#[tokio::test]
async fn retraction_and_moderation_reach_everyone_and_leave_tombstones() {
    let srv = start_server(|_| {}).await;
    let mut g = group(&srv, "team", &["alice", "bob", "carol"]).await;
    g.clients[1].send(&groupchat(&g.room, "oops")).await;
    let mut sid = String::new();
    for c in g.clients.iter_mut() {
        let m = c.recv_until(|e| is_body(e, "oops")).await;
        sid = m
            .get_child("stanza-id", NS_SID)
            .unwrap()
            .attr("id")
            .unwrap()
            .to_string();
    }
    // carol may not retract bob's message.
    let retract = |id: &str| {
        Element::new("message", NS_CLIENT)
            .with_attr("to", g.room.clone())
            .with_attr("type", "groupchat")
            .with_child(Element::new("retract", NS_RETRACT).with_attr("id", id))
    };
    g.clients[2].send(&retract(&sid)).await;
    let err = g.clients[2]
        .recv_until(|e| e.attr("type") == Some("error"))
        .await;
    assert_eq!(stanza_error(&err).as_deref(), Some("forbidden"));
    // bob may.
    g.clients[1].send(&retract(&sid)).await;
    for c in g.clients.iter_mut() {
        let m = c
            .recv_until(|e| e.get_child("retract", NS_RETRACT).is_some())
            .await;
        assert_eq!(
            m.get_child("retract", NS_RETRACT).unwrap().attr("id"),
            Some(sid.as_str())
        );
    }
    let bodies = room_archive_bodies(&mut g.clients[2], &g.room)
        .await
        .unwrap();
    assert!(!bodies.contains(&"oops".to_string()), "{bodies:?}");
    // A moderator (alice, owner) removes carol's message.
    g.clients[2].send(&groupchat(&g.room, "spam")).await;
    let m = g.clients[0].recv_until(|e| is_body(e, "spam")).await;
    let sid = m
        .get_child("stanza-id", NS_SID)
        .unwrap()
        .attr("id")
        .unwrap()
        .to_string();
    let moderate = |id: &str| {
        xml(&format!(
            "<iq type='set' to='{}'><moderate xmlns='{NS_MODERATE}' id='{id}'><retract xmlns='{NS_RETRACT}'/><reason>spam</reason></moderate></iq>",
            g.room
        ))
    };
    let res = g.clients[1].iq(moderate(&sid)).await;
    assert_eq!(
        stanza_error(&res).as_deref(),
        Some("forbidden"),
        "bob is no moderator"
    );
    let res = g.clients[0].iq(moderate(&sid)).await;
    assert_eq!(res.attr("type"), Some("result"), "{res}");
    for c in g.clients.iter_mut() {
        let m = c
            .recv_until(|e| {
                e.get_child("retract", NS_RETRACT)
                    .is_some_and(|r| r.get_child("moderated", NS_MODERATE).is_some())
            })
            .await;
        assert_eq!(m.attr("from"), Some(g.room.as_str()));
    }
    let bodies = room_archive_bodies(&mut g.clients[1], &g.room)
        .await
        .unwrap();
    assert!(!bodies.contains(&"spam".to_string()), "{bodies:?}");
}

#[tokio::test]
async fn read_markers_reach_the_sender_and_read_by_n_of_m_is_right() {
    let srv = start_server(|_| {}).await;
    let mut g = group(&srv, "team", &["alice", "bob", "carol", "dave"]).await;
    g.clients[0].send(&groupchat(&g.room, "read me")).await;
    let m = g.clients[0].recv_until(|e| is_body(e, "read me")).await;
    let sid = m
        .get_child("stanza-id", NS_SID)
        .unwrap()
        .attr("id")
        .unwrap()
        .to_string();
    for i in [1, 2] {
        g.clients[i].recv_until(|e| is_body(e, "read me")).await;
        let marker = Element::new("message", NS_CLIENT)
            .with_attr("to", g.room.clone())
            .with_attr("type", "groupchat")
            .with_child(Element::new("displayed", NS_MARKERS).with_attr("id", sid.clone()));
        g.clients[i].send(&marker).await;
        // The sender sees it.
        let seen = g.clients[0]
            .recv_until(|e| e.get_child("displayed", NS_MARKERS).is_some())
            .await;
        assert_eq!(
            seen.attr("from"),
            Some(format!("{}/{}", g.room, ["alice", "bob", "carol"][i]).as_str())
        );
    }
    let q = xml(&format!(
        "<iq type='get' to='{}'><read xmlns='{NS_READ}' id='{sid}'/></iq>",
        g.room
    ));
    let res = g.clients[0].iq(q).await;
    let read = res
        .get_child("read", NS_READ)
        .unwrap_or_else(|| panic!("{res}"));
    assert_eq!(read.attr("members"), Some("4"));
    assert_eq!(read.attr("displayed"), Some("2"));
    let who: Vec<&str> = read
        .children()
        .filter(|c| c.name == "displayed")
        .filter_map(|c| c.attr("jid"))
        .collect();
    assert_eq!(who, vec![g.names[1].as_str(), g.names[2].as_str()]);
}

#[tokio::test]
async fn invitations_make_members_and_occupants_leave_when_sessions_end() {
    let srv = start_server(|_| {}).await;
    let mut g = group(&srv, "team", &["alice", "bob"]).await;
    let carol = srv.add_user("carol", PASSWORD).await;
    let dave = srv.add_user("dave", PASSWORD).await;
    let mut c = online(&srv, &carol, "r").await;
    // Mediated invitation by the owner: carol becomes a member and is told.
    let invite = xml(&format!(
        "<message to='{}'><x xmlns='{NS_USER}'><invite to='{carol}'><reason>join us</reason></invite></x></message>",
        g.room
    ));
    g.clients[0].send(&invite).await;
    let got = c.recv_until(|e| e.get_child("x", NS_USER).is_some()).await;
    assert_eq!(got.attr("from"), Some(g.room.as_str()));
    join(&mut c, &g.room, "carol").await;
    // A plain member may not invite to a members-only room.
    let invite = xml(&format!(
        "<message to='{}'><x xmlns='{NS_USER}'><invite to='{dave}'/></x></message>",
        g.room
    ));
    g.clients[1].send(&invite).await;
    let err = g.clients[1]
        .recv_until(|e| e.attr("type") == Some("error"))
        .await;
    assert_eq!(stanza_error(&err).as_deref(), Some("forbidden"));
    // A direct invitation (XEP-0249) from the owner makes dave a member too.
    let direct = xml(&format!(
        "<message to='{dave}'><x xmlns='jabber:x:conference' jid='{}'/></message>",
        g.room
    ));
    g.clients[0].send(&direct).await;
    g.clients[0].sync().await;
    let mut d = online(&srv, &dave, "r").await;
    join(&mut d, &g.room, "dave").await;
    // Self-ping (XEP-0410) is answered for a joined occupant only.
    let ping = |to: String| {
        xml(&format!(
            "<iq type='get' to='{to}'><ping xmlns='urn:xmpp:ping'/></iq>"
        ))
    };
    let res = d.iq(ping(format!("{}/dave", g.room))).await;
    assert_eq!(res.attr("type"), Some("result"), "{res}");
    let res = d.iq(ping(format!("{}/alice", g.room))).await;
    assert_eq!(res.attr("type"), Some("error"), "{res}");
    // A session that ends leaves: the others see dave go.
    d.close().await;
    let gone = g.clients[0]
        .recv_until(|e| e.name == "presence" && e.attr("type") == Some("unavailable"))
        .await;
    assert_eq!(gone.attr("from"), Some(format!("{}/dave", g.room).as_str()));
}

#[tokio::test]
async fn configuration_form_limits_and_destroy() {
    let srv = start_server(|c| {
        c.muc.burst = 3;
        c.muc.messages_per_minute = 1;
    })
    .await;
    let mut g = group(&srv, "team", &["alice", "bob"]).await;
    // Only owners configure.
    let get = xml(&format!(
        "<iq type='get' to='{}'><query xmlns='{NS_OWNER}'/></iq>",
        g.room
    ));
    assert_eq!(
        stanza_error(&g.clients[1].iq(get.clone()).await).as_deref(),
        Some("forbidden")
    );
    let form = g.clients[0].iq(get).await;
    let x = form
        .get_child("query", NS_OWNER)
        .and_then(|q| q.get_child("x", NS_DATA))
        .unwrap();
    assert!(x
        .children()
        .any(|f| f.attr("var") == Some("muc#roomconfig_membersonly")));
    let set = xml(&format!(
        "<iq type='set' to='{}'><query xmlns='{NS_OWNER}'><x xmlns='{NS_DATA}' type='submit'>\
         <field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#roomconfig</value></field>\
         <field var='muc#roomconfig_roomname'><value>The Team</value></field>\
         <field var='muc#roomconfig_maxusers'><value>lots</value></field></x></query></iq>",
        g.room
    ));
    assert_eq!(
        stanza_error(&g.clients[0].iq(set).await).as_deref(),
        Some("not-acceptable")
    );
    // Rate: the burst of 3, then a wait error.
    for n in 0..3 {
        g.clients[1]
            .send(&groupchat(&g.room, &format!("r{n}")))
            .await;
        g.clients[1]
            .recv_until(|e| is_body(e, &format!("r{n}")))
            .await;
    }
    g.clients[1].send(&groupchat(&g.room, "one too many")).await;
    let err = g.clients[1]
        .recv_until(|e| e.attr("type") == Some("error"))
        .await;
    assert_eq!(stanza_error(&err).as_deref(), Some("policy-violation"));
    // Destroy: everyone is told, the room is gone.
    let destroy = xml(&format!(
        "<iq type='set' to='{}'><query xmlns='{NS_OWNER}'><destroy><reason>done</reason></destroy></query></iq>",
        g.room
    ));
    assert_eq!(g.clients[0].iq(destroy).await.attr("type"), Some("result"));
    let p = g.clients[1]
        .recv_until(|e| e.name == "presence" && e.attr("type") == Some("unavailable"))
        .await;
    assert!(
        p.get_child("x", NS_USER)
            .and_then(|x| x.get_child("destroy", NS_USER))
            .is_some(),
        "{p}"
    );
    assert!(srv.state().store.room_get(&g.room).await.unwrap().is_none());
}

/// Records which members a group message missed (what push listens to).
#[derive(Default)]
struct MissedProbe {
    missed: parking_lot::Mutex<Vec<(String, String, String)>>,
}

#[async_trait::async_trait]
impl natter::modules::Module for MissedProbe {
    fn name(&self) -> &'static str {
        "test-missed-probe"
    }
    fn events(&self) -> &'static [(natter::modules::EventKind, i32)] {
        &[(natter::modules::EventKind::GroupMessageMissed, 0)]
    }
    async fn on_event(
        &self,
        _state: &natter::state::ServerState,
        _session: Option<&std::sync::Arc<natter::router::SessionHandle>>,
        event: &natter::modules::Event<'_>,
    ) {
        if let natter::modules::Event::GroupMessageMissed { user, room, stanza } = event {
            self.missed.lock().push((
                user.to_string(),
                room.to_string(),
                stanza.child_text("body", NS_CLIENT).unwrap_or_default(),
            ));
        }
    }
}

#[tokio::test]
async fn a_member_who_is_away_and_not_opted_in_is_reported_for_push() {
    let probe = std::sync::Arc::new(MissedProbe::default());
    let srv = start_server_with(|_| {}, vec![probe.clone()]).await;
    let mut g = group(&srv, "team", &["alice", "bob", "carol"]).await;
    // carol opts in (her copy goes to her offline queue instead); bob does not.
    let res = g.clients[2].iq(register_form(&g.room, "carol", true)).await;
    assert_eq!(res.attr("type"), Some("result"), "{res}");
    for i in [1, 2] {
        g.clients[i]
            .send(&xml(&format!(
                "<presence to='{}/x' type='unavailable'/>",
                g.room
            )))
            .await;
        g.clients[i].sync().await;
    }
    g.clients[0]
        .send(&groupchat(&g.room, "you missed this"))
        .await;
    g.clients[0]
        .recv_until(|e| is_body(e, "you missed this"))
        .await;
    g.clients[0].sync().await;
    let missed = probe.missed.lock().clone();
    assert_eq!(
        missed,
        vec![(
            g.names[1].clone(),
            g.room.clone(),
            "you missed this".to_string()
        )]
    );
    // carol, still online but not joined, got it live at her bare JID.
    let got = g.clients[2]
        .recv_until(|e| is_body(e, "you missed this"))
        .await;
    assert_eq!(got.attr("from"), Some(format!("{}/alice", g.room).as_str()));
}

const NS_SM: &str = "urn:xmpp:sm:3";

/// An occupant whose connection drops with stream management stays joined
/// while it may resume (no leave/join storm), gets what was said meanwhile
/// on resumption, and leaves once resumption times out.
#[tokio::test]
async fn a_parked_occupant_stays_joined_until_resumption_times_out() {
    let srv = start_server(|c| c.c2s.resume_timeout_secs = 2).await;
    let mut g = group(&srv, "team", &["alice", "bob"]).await;
    let bob = g.names[1].clone();
    let bob_jid = g.clients[1].jid().to_string();
    let mut b = g.clients.pop().expect("bob");
    b.send(&Element::new("enable", NS_SM).with_attr("resume", "true"))
        .await;
    let enabled = b.recv_matching(|e| e.ns == NS_SM).await;
    let previd = enabled.attr("id").expect("SM-ID").to_string();
    // No stanza reached bob since <enable/>: he has handled 0 when the
    // connection dies.
    drop(b);
    g.clients[0]
        .send(&groupchat(&g.room, "while you were away"))
        .await;
    g.clients[0]
        .recv_until(|e| is_body(e, "while you were away"))
        .await;
    let meanwhile = g.clients[0].sync().await;
    assert!(
        meanwhile
            .iter()
            .all(|e| e.attr("type") != Some("unavailable")),
        "bob left while parked: {meanwhile:?}"
    );
    // Resume: the message is there, bob is still an occupant.
    let mut c = Client::connect_tls(srv.c2s_tls).await;
    c.authenticate(natter_sasl::Mechanism::ScramSha256, &bob, PASSWORD, None)
        .await
        .expect("login");
    c.send(
        &Element::new("resume", NS_SM)
            .with_attr("previd", previd.clone())
            .with_attr("h", "0"),
    )
    .await;
    let r = c.recv_matching(|e| e.ns == NS_SM && e.name != "r").await;
    assert!(r.is("resumed", NS_SM), "{r}");
    c.full_jid = Some(bob_jid);
    c.recv_until(|e| is_body(e, "while you were away")).await;
    // Now it drops for good: after the resume timeout bob leaves the room.
    drop(c);
    let gone = g.clients[0]
        .recv_until(|e| e.name == "presence" && e.attr("type") == Some("unavailable"))
        .await;
    assert_eq!(gone.attr("from"), Some(format!("{}/bob", g.room).as_str()));
}

/// History on join: a member who read up to a message gets what came
/// after it (the chat opens where they left it); `maxstanzas` gets the last
/// N; `maxchars='0'` none.
#[tokio::test]
async fn rejoining_member_gets_the_history_from_where_they_read() {
    let srv = start_server(|_| {}).await;
    let mut g = group(&srv, "team", &["alice", "bob"]).await;
    let mut last_sid = String::new();
    for n in 0..3 {
        let body = format!("early{n}");
        g.clients[0].send(&groupchat(&g.room, &body)).await;
        let m = g.clients[1].recv_until(|e| is_body(e, &body)).await;
        last_sid = m
            .get_child("stanza-id", NS_SID)
            .unwrap()
            .attr("id")
            .unwrap()
            .to_string();
    }
    let marker = Element::new("message", NS_CLIENT)
        .with_attr("to", g.room.clone())
        .with_attr("type", "groupchat")
        .with_child(Element::new("displayed", NS_MARKERS).with_attr("id", last_sid));
    g.clients[1].send(&marker).await;
    g.clients[1]
        .send(&xml(&format!(
            "<presence to='{}/bob' type='unavailable'/>",
            g.room
        )))
        .await;
    g.clients[1].sync().await;
    for n in 0..3 {
        let body = format!("late{n}");
        g.clients[0].send(&groupchat(&g.room, &body)).await;
        g.clients[0].recv_until(|e| is_body(e, &body)).await;
    }
    let plain = Element::new("presence", NS_CLIENT)
        .with_attr("to", format!("{}/bob", g.room))
        .with_child(Element::new("x", NS_MUC));
    let got = history(&mut g.clients[1], &g.room, plain.clone()).await;
    assert_eq!(got, ["late0", "late1", "late2"]);
    let leave = xml(&format!(
        "<presence to='{}/bob' type='unavailable'/>",
        g.room
    ));
    g.clients[1].send(&leave).await;
    g.clients[1].sync().await;
    let got = history(
        &mut g.clients[1],
        &g.room,
        join_presence(&g.room, "bob", Some(2)),
    )
    .await;
    assert_eq!(got, ["late1", "late2"]);
    g.clients[1].send(&leave).await;
    g.clients[1].sync().await;
    let none = xml(&format!(
        "<presence to='{}/bob'><x xmlns='{NS_MUC}'><history maxchars='0'/></x></presence>",
        g.room
    ));
    assert!(history(&mut g.clients[1], &g.room, none).await.is_empty());
}

/// Join with `presence` and return the bodies of the history messages
/// (delayed) that come before the subject.
async fn history(c: &mut Client, room: &str, presence: Element) -> Vec<String> {
    c.send(&presence).await;
    let mut bodies = Vec::new();
    loop {
        let e = c.recv().await;
        if e.name == "message" && e.get_child("subject", NS_CLIENT).is_some() {
            return bodies;
        }
        if e.name == "message" && e.get_child("delay", "urn:xmpp:delay").is_some() {
            assert!(e.attr("from").unwrap().starts_with(room), "{e}");
            bodies.extend(e.child_text("body", NS_CLIENT));
        }
    }
}

/// What a room keeps per occupant is bounded: rooms per session, and the
/// bytes of the presence it stores.
#[tokio::test]
async fn joins_per_session_and_kept_presence_are_bounded() {
    let srv = start_server(|c| c.muc.max_joined_per_session = 2).await;
    let alice = srv.add_user("alice", PASSWORD).await;
    let mut a = online(&srv, &alice, "r").await;
    for n in 0..2 {
        join(&mut a, &format!("room{n}@{SERVICE}"), "alice").await;
    }
    a.send(&join_presence(&format!("room2@{SERVICE}"), "alice", None))
        .await;
    let e = a
        .recv_until(|p| p.name == "presence" && p.attr("type") == Some("error"))
        .await;
    assert_eq!(stanza_error(&e).as_deref(), Some("policy-violation"), "{e}");
    // A huge status is refused, not kept.
    let big = join_presence(&format!("room0@{SERVICE}"), "alice", None)
        .with_child(Element::new("status", NS_CLIENT).with_text("x".repeat(20_000)));
    a.send(&big).await;
    let e = a
        .recv_until(|p| p.name == "presence" && p.attr("type") == Some("error"))
        .await;
    assert_eq!(stanza_error(&e).as_deref(), Some("policy-violation"), "{e}");
    srv.assert_healthy().await;
}
