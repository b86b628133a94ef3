"""XEP-0045 group chats with slixmpp's xep_0045 plugin against the real
binary: a members-only persistent group (natter's default), members added in
one IQ and one by one, everyone chatting; a member offline during 20
messages gets all 20 once and in order at login when opted in (the
`{http://tigase.org/protocol/muc}offline` registration field), and from the
room archive (MAM on the room) after rejoining otherwise; kick, ban and
affiliation changes enforced; retraction and moderation reach everyone; read
markers reach the sender and "read by N of M" is right."""
from __future__ import annotations

import xml.etree.ElementTree as ET

from slixmpp.exceptions import IqError, PresenceError
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from helpers import add_users
from natter_client import STEP, Clients, Inbox, run

SERVICE = "conference.localhost"
ROOM = f"team@{SERVICE}"
USERS = tuple(f"{n}@localhost" for n in ("alice", "bob", "carol", "dave"))
ALICE, BOB, CAROL, DAVE = USERS
PW = {j: j.split("@")[0] + "-muc" for j in USERS}
NICK = {j: j.split("@")[0] for j in USERS}
NS_SID = "urn:xmpp:sid:0"
NS_MAM = "urn:xmpp:mam:2"
NS_RETRACT = "urn:xmpp:message-retract:1"
NS_MODERATE = "urn:xmpp:message-moderate:1"
NS_MARKERS = "urn:xmpp:chat-markers:0"
NS_READ = "urn:natter:muc:read:0"
OFFLINE_FIELD = "{http://tigase.org/protocol/muc}offline"


async def member(cs: Clients, jid: str, transport: str = "starttls"):
    c = await cs.login(jid, PW[jid], transport)
    for p in ("xep_0045", "xep_0004", "xep_0333", "xep_0359"):
        c.register_plugin(p)
    c.mam_results = Inbox(f"{jid} archive results")
    c.register_handler(Callback("mam results", MatchXPath(f"{{jabber:client}}message/{{{NS_MAM}}}result"),
                                c.mam_results.put))
    c.raw = Inbox(f"{jid} messages (raw)")
    c.register_handler(Callback("raw", MatchXPath("{jabber:client}message"), c.raw.put))
    c.muc_presences = Inbox(f"{jid} room presences")
    c.add_event_handler("groupchat_presence", c.muc_presences.put)
    return c


async def join(c, nick: str, maxstanzas: int = 0):
    return await c.plugin["xep_0045"].join_muc_wait(ROOM, nick, maxstanzas=maxstanzas,
                                                    timeout=STEP)


def is_group_body(m, body: str) -> bool:
    return m["type"] == "groupchat" and m["body"] == body


def stanza_id(m) -> str:
    el = m.xml.find(f"{{{NS_SID}}}stanza-id")
    assert el is not None and el.get("by") == ROOM, m
    return el.get("id")


async def raw_iq(c, xml: str, ito: str = ROOM):
    iq = c.make_iq(ito=ito, itype="set")
    payload = ET.fromstring(xml)
    if payload.tag.endswith("}read"):
        iq["type"] = "get"
    iq.append(payload)
    return await iq.send(timeout=STEP)


async def register_nick(c, nick: str, offline: bool):
    form = (f"<query xmlns='jabber:iq:register'><x xmlns='jabber:x:data' type='submit'>"
            f"<field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#register</value></field>"
            f"<field var='muc#register_roomnick'><value>{nick}</value></field>"
            f"<field var='{OFFLINE_FIELD}'><value>{'1' if offline else '0'}</value></field>"
            f"</x></query>")
    await raw_iq(c, form)


async def archive_bodies(c) -> list[str]:
    """Bodies of the room's archive, oldest first (MAM on the room JID)."""
    c.mam_results.items.clear()
    await raw_iq(c, f"<query xmlns='{NS_MAM}' queryid='q-{c.boundjid.user}'/>")
    await c.sync()
    results = list(c.mam_results.items)
    out = []
    for m in results:
        fwd = m.xml.find(f"{{{NS_MAM}}}result/{{urn:xmpp:forward:0}}forwarded/{{jabber:client}}message")
        body = fwd.find("{jabber:client}body") if fwd is not None else None
        if body is not None:
            out.append(body.text or "")
    return out


def test_group_members_get_every_message(server):
    add_users(server, PW, *USERS)

    async def scenario():
        async with Clients(server) as cs:
            alice = await member(cs, ALICE)
            bob = await member(cs, BOB, "websocket")
            carol = await member(cs, CAROL, "directtls")
            # alice creates the group: natter's default is a WhatsApp group.
            me, _, _, _ = await join(alice, "alice")
            assert 201 in me["muc"]["status_codes"], me
            info = await alice.plugin["xep_0030"].get_info(jid=ROOM, timeout=STEP)
            for f in ("muc_persistent", "muc_membersonly", "muc_nonanonymous", NS_MAM):
                assert f in info["disco_info"]["features"], info["disco_info"]["features"]
            # A stranger may not join a members-only room.
            try:
                await join(bob, "bob")
                raise AssertionError("bob joined before being a member")
            except PresenceError as e:
                assert e.condition == "registration-required", e
            # Members: two in one IQ, then one more alone.
            await alice.plugin["xep_0045"].send_affiliation_list(
                ROOM, [(BOB, "member"), (CAROL, "member")], timeout=STEP)
            await alice.plugin["xep_0045"].set_affiliation(ROOM, "member", jid=DAVE, timeout=STEP)
            members = await bob.plugin["xep_0045"].get_affiliation_list(ROOM, "member", timeout=STEP)
            assert sorted(str(j) for j in members) == [BOB, CAROL, DAVE], members
            await join(bob, "bob")
            await join(carol, "carol")
            # Everyone present gets everything.
            bob.send_message(mto=ROOM, mbody="hi group", mtype="groupchat")
            for c in (alice, bob, carol):
                got = await c.messages.wait_for(lambda m: is_group_body(m, "hi group"), "hi group")
                assert str(got["from"]) == f"{ROOM}/bob", got
                stanza_id(got)

            # bob opts in to messages while away; carol does not.
            await register_nick(bob, "bob", offline=True)
            for c in (bob, carol):
                await c.close()
            await alice.muc_presences.wait_for(
                lambda p: str(p["from"]) == f"{ROOM}/carol" and p["type"] == "unavailable",
                "carol left")
            sent = [f"m{i}" for i in range(20)]
            for body in sent:
                alice.send_message(mto=ROOM, mbody=body, mtype="groupchat")
            for body in sent:
                await alice.messages.wait_for(lambda m, b=body: is_group_body(m, b), body)
            bob = await member(cs, BOB)
            got = []
            while len(got) < 20:
                m = await bob.messages.wait_for(lambda m: m["type"] == "groupchat" and m["body"],
                                                "a group message at login")
                got.append(m["body"])
            assert got == sent, got
            await bob.sync()
            assert not bob.messages.matching(lambda m: m["type"] == "groupchat" and m["body"]), \
                "duplicates"
            carol = await member(cs, CAROL)
            await carol.sync()
            assert not carol.messages.matching(lambda m: m["type"] == "groupchat"), carol.messages.items
            await join(carol, "carol")
            assert (await archive_bodies(carol))[-20:] == sent

            # Retraction by the author reaches everyone.
            await join(bob, "bob")
            bob.send_message(mto=ROOM, mbody="oops", mtype="groupchat")
            sid = stanza_id(await alice.messages.wait_for(lambda m: is_group_body(m, "oops"), "oops"))
            msg = bob.make_message(mto=ROOM, mtype="groupchat")
            msg.append(ET.fromstring(f"<retract xmlns='{NS_RETRACT}' id='{sid}'/>"))
            msg.send()
            for c in (alice, bob, carol):
                await c.raw.wait_for(
                    lambda m: m.xml.find(f"{{{NS_RETRACT}}}retract") is not None, "the retraction")
            assert "oops" not in await archive_bodies(carol)
            # Moderation by the owner reaches everyone.
            carol.send_message(mto=ROOM, mbody="spam", mtype="groupchat")
            sid = stanza_id(await alice.messages.wait_for(lambda m: is_group_body(m, "spam"), "spam"))
            await raw_iq(alice, f"<moderate xmlns='{NS_MODERATE}' id='{sid}'>"
                                f"<retract xmlns='{NS_RETRACT}'/><reason>spam</reason></moderate>")
            for c in (alice, bob, carol):
                await c.raw.wait_for(
                    lambda m: m.xml.find(f"{{{NS_RETRACT}}}retract/{{{NS_MODERATE}}}moderated")
                    is not None, "the moderation")
            assert "spam" not in await archive_bodies(bob)

            # Read markers reach the sender; "read by N of M".
            alice.send_message(mto=ROOM, mbody="read me", mtype="groupchat")
            sid = stanza_id(await alice.messages.wait_for(lambda m: is_group_body(m, "read me"), "read me"))
            for c in (bob, carol):
                await c.messages.wait_for(lambda m: is_group_body(m, "read me"), "read me")
                c.plugin["xep_0333"].send_marker(ROOM, sid, "displayed", mtype="groupchat")
                await alice.raw.wait_for(
                    lambda m, c=c: m.xml.find(f"{{{NS_MARKERS}}}displayed") is not None
                    and str(m["from"]) == f"{ROOM}/{c.boundjid.user}", "the marker")
            res = await raw_iq(alice, f"<read xmlns='{NS_READ}' id='{sid}'/>")
            read = res.xml.find(f"{{{NS_READ}}}read")
            assert read.get("members") == "4" and read.get("displayed") == "2", ET.tostring(read)

            # Kick: carol leaves with 307 and may return; ban: out with 301,
            # no rejoin under another nick, no archive.
            await alice.plugin["xep_0045"].set_role(ROOM, "carol", "none", timeout=STEP)
            p = await carol.muc_presences.wait_for(
                lambda p: p["type"] == "unavailable" and 307 in p["muc"]["status_codes"], "kicked")
            await join(carol, "carol")
            try:
                await bob.plugin["xep_0045"].set_affiliation(ROOM, "outcast", jid=CAROL, timeout=STEP)
                raise AssertionError("a member banned someone")
            except IqError as e:
                assert e.condition == "not-allowed", e
            await alice.plugin["xep_0045"].set_affiliation(ROOM, "outcast", jid=CAROL, timeout=STEP)
            p = await carol.muc_presences.wait_for(
                lambda p: p["type"] == "unavailable" and 301 in p["muc"]["status_codes"], "banned")
            try:
                await join(carol, "someone-else")
                raise AssertionError("a banned user rejoined")
            except PresenceError as e:
                assert e.condition == "forbidden", e
            try:
                await archive_bodies(carol)
                raise AssertionError("a banned user read the archive")
            except IqError as e:
                assert e.condition == "forbidden", e

    run(scenario(), timeout=180)
