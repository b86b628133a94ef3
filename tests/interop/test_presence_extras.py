"""Presence-related extensions with slixmpp's own plugins against the real
natter binary: XEP-0191 blocking, XEP-0012 last activity ("last seen"), and
XEP-0352 client state indication."""
from __future__ import annotations

from xml.etree import ElementTree as ET

from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchMany, MatchXPath

from helpers import add_users, is_presence, poll, refused, subscribe
from natter_client import STEP, Clients, Inbox, run

ALICE, BOB, CAROL = "alice@localhost", "bob@localhost", "carol@localhost"
PW = {ALICE: "alice-pw", BOB: "bob-pw", CAROL: "carol-pw"}
NS_BLOCKING_ERRORS = "urn:xmpp:blocking:errors"
NS_CHATSTATES = "http://jabber.org/protocol/chatstates"


def with_plugins(client, *plugins):
    """Register slixmpp plugins, and record every message, presence and IQ
    request the client receives, in arrival order, in `client.stanzas`
    (slixmpp's "message" event, behind `client.messages`, skips messages
    without a body)."""
    for p in plugins:
        client.register_plugin(p)
    client.stanzas = Inbox(f"{client.requested_jid} stanzas")

    def record(stanza):
        if stanza.name != "iq" or stanza["type"] in ("get", "set"):
            client.stanzas.put(stanza)

    client.register_handler(Callback(
        "natter test stanzas",
        MatchMany([MatchXPath(f"{{jabber:client}}{name}")
                   for name in ("message", "presence", "iq")]),
        record))
    return client


def from_bare(client, bare: str) -> list:
    return client.stanzas.matching(lambda s: s["from"].bare == bare)


async def synced(*clients) -> None:
    """Everything these clients sent is handled, and everything on its way
    to them has arrived."""
    for c in clients:
        await c.sync()


async def settle(*clients) -> None:
    """As synced(), then forget what they received so far."""
    await synced(*clients)
    for c in clients:
        c.stanzas.items.clear()


def next_stanza(client, what: str):
    return client.stanzas.wait_for(lambda _s: True, what)


def blocked_error(stanza, condition: str = "not-acceptable") -> None:
    assert stanza["type"] == "error" and stanza["error"]["condition"] == condition, stanza
    assert stanza["error"].xml.find(f"{{{NS_BLOCKING_ERRORS}}}blocked") is not None, stanza


def is_push(stanza, kind: str) -> bool:
    """A block list push (`kind`: block or unblock)."""
    return stanza.name == "iq" and stanza["type"] == "set" and \
        stanza.xml.find(f"{{urn:xmpp:blocking}}{kind}") is not None


async def push(client, kind: str) -> list[str]:
    """The JIDs of the next block list push."""
    iq = await client.stanzas.wait_for(lambda s: is_push(s, kind), f"the {kind} push")
    return [str(i["jid"]) for i in iq[kind]["items"]]


async def sees(watcher, others, ptype: str = "available") -> list:
    """`watcher` gets a presence of type `ptype` from each of `others`."""
    return [await watcher.presences.wait_for(
        lambda p, j=o.boundjid.full: is_presence(p, j, ptype),
        f"{ptype} presence of {o.boundjid.full} for {watcher.boundjid.full}")
        for o in others]


def test_blocking_messages_iqs_presence_and_pushes(server):
    add_users(server, PW, ALICE, BOB)

    async def scenario():
        async with Clients(server) as cs:
            a1 = with_plugins(cs.new(ALICE + "/one", PW[ALICE]), "xep_0191")
            a2 = with_plugins(cs.new(ALICE + "/two", PW[ALICE]), "xep_0191")
            b = with_plugins(cs.new(BOB + "/laptop", PW[BOB]))
            for c in (a1, a2, b):
                await c.login()
            await subscribe(a1, b)
            await subscribe(b, a1)
            await sees(b, [a2])
            await sees(a2, [b])
            # Only the second resource asks for the list: it gets the pushes.
            assert await a2.plugin["xep_0191"].get_blocked_jids(timeout=STEP) == set()

            await a1.plugin["xep_0191"].block(BOB, timeout=STEP)
            assert await push(a2, "block") == [BOB]
            await a1.sync()  # never asked for the list: no push
            assert not a1.stanzas.matching(lambda s: is_push(s, "block")), a1.stanzas.items
            # Each side sees the other go offline.
            await sees(b, [a1, a2], "unavailable")
            for alice in (a1, a2):
                await sees(alice, [b], "unavailable")
            await settle(a1, a2, b)

            # Bob cannot reach Alice: errors for his message and pings,
            # his presence dropped without one.
            b.send_message(mto=ALICE, mbody="hello?", mtype="chat")
            err = await b.message_errors.wait_for(lambda m: True, "an error for bob's message")
            assert err["error"]["condition"] == "service-unavailable", err
            for to in (a1.boundjid.full, ALICE):
                await refused(b.plugin["xep_0199"].send_ping(to, timeout=STEP),
                              "service-unavailable", f"bob's ping to {to}")
            b.send_presence(pshow="away")
            b.send_presence(pto=ALICE)
            await synced(b, a1, a2)
            assert not b.stanzas.matching(
                lambda s: s.name == "presence" and s["type"] == "error"), b.stanzas.items
            for alice in (a1, a2):
                assert not from_bare(alice, BOB), from_bare(alice, BOB)
            await settle(b)

            # Alice cannot reach Bob: not-acceptable with <blocked/>.
            a1.send_message(mto=BOB, mbody="hi", mtype="chat")
            blocked_error(await a1.message_errors.wait_for(lambda m: True,
                                                           "an error for alice's message"))
            blocked_error(await refused(a1.plugin["xep_0199"].send_ping(b.boundjid.full,
                                                                        timeout=STEP),
                                        "not-acceptable", "alice's ping to bob"))
            a1.send_presence(pshow="dnd")
            await synced(a1, b)
            assert not from_bare(b, ALICE), from_bare(b, ALICE)

            # Unblocked: presence both ways, messages, an empty list.
            await a1.plugin["xep_0191"].unblock(BOB, timeout=STEP)
            assert await push(a2, "unblock") == [BOB]
            one, two = await sees(b, [a1, a2])
            assert (one["show"], two["show"]) == ("dnd", ""), (one, two)
            for alice in (a1, a2):
                (back,) = await sees(alice, [b])
                assert back["show"] == "away", back
            b.send_message(mto=a1.boundjid.full, mbody="friends again", mtype="chat")
            await a1.messages.wait_for(lambda m: m["body"] == "friends again", "bob's message")
            a1.send_message(mto=BOB, mbody="welcome back", mtype="chat")
            await b.messages.wait_for(lambda m: m["body"] == "welcome back", "alice's message")
            assert not b.messages.matching(lambda m: m["body"] == "hi"), "a blocked message came"
            assert await a2.plugin["xep_0191"].get_blocked_jids(timeout=STEP) == set()

    run(scenario())


async def last_activity(client, jid: str) -> tuple[int, str]:
    res = await client.plugin["xep_0012"].get_last_activity(jid, timeout=STEP)
    return res["last_activity"]["seconds"], res["last_activity"]["status"] or ""


async def forbidden(client, jid: str) -> None:
    await refused(client.plugin["xep_0012"].get_last_activity(jid, timeout=STEP),
                  "forbidden", f"{client.boundjid.bare} asking for {jid}'s last activity")


def test_last_activity_for_contacts_only(server):
    add_users(server, PW, ALICE, BOB, CAROL)

    async def scenario():
        async with Clients(server) as cs:
            a = with_plugins(cs.new(ALICE + "/phone", PW[ALICE]), "xep_0012")
            b = with_plugins(cs.new(BOB, PW[BOB]), "xep_0012")
            c = with_plugins(cs.new(CAROL, PW[CAROL]), "xep_0012")
            for x in (a, b, c):
                await x.login()
            await subscribe(b, a)  # Bob may see Alice's presence, Carol may not

            assert await last_activity(b, ALICE) == (0, "")
            await forbidden(c, ALICE)

            # Logged out with a status.
            a.send_presence(ptype="unavailable", pstatus="Heading home")
            await a.close()
            await sees(b, [a], "unavailable")
            seconds, status = await last_activity(b, ALICE)
            assert 0 <= seconds < 5 and status == "Heading home", (seconds, status)
            await forbidden(c, ALICE)

            # Back, and then the connection simply drops.
            a2 = await cs.login(ALICE + "/laptop", PW[ALICE])
            await sees(b, [a2])
            await a2.cut()
            await sees(b, [a2], "unavailable")
            seen = await poll(lambda: last_activity(b, ALICE), lambda v: v[0] >= 2,
                              "alice's last activity to count past 1", timeout=6, every=0.2)
            seconds = [s for s, _ in seen]
            assert seconds[0] <= 1 and seconds == sorted(seconds), seconds
            assert {status for _, status in seen} == {""}, seen
            await forbidden(c, ALICE)

    run(scenario())


def chat_state(sender, to: str, state: str):
    m = sender.make_message(mto=to, mtype="chat")
    m.xml.append(ET.Element(f"{{{NS_CHATSTATES}}}{state}"))
    return m


def test_csi_holds_presence_and_chat_states_while_inactive(server):
    add_users(server, PW, ALICE, BOB)

    async def scenario():
        async with Clients(server) as cs:
            phone = with_plugins(cs.new(ALICE + "/phone", PW[ALICE]), "xep_0352")
            desk = with_plugins(cs.new(ALICE + "/desk", PW[ALICE]))
            b = with_plugins(cs.new(BOB, PW[BOB]))
            for x in (phone, desk, b):
                await x.login()
            assert phone.plugin["xep_0352"].enabled, "no CSI feature"
            await sees(phone, [desk])
            # The phone may get the desk's initial presence twice (broadcast,
            # and the answer to its own probe): let both land first.
            await settle(desk, phone)

            phone.plugin["xep_0352"].send_inactive()
            await phone.sync()
            for show in ("away", "dnd", "xa"):
                desk.send_presence(pshow=show)
            chat_state(b, phone.boundjid.full, "composing").send()
            await synced(desk, b, phone)
            assert not phone.stanzas.items, phone.stanzas.items

            # A message with a body goes out at once, right after the held
            # chat state from its sender; the presence is still held.
            b.send_message(mto=phone.boundjid.full, mbody="hello", mtype="chat")
            composing = await next_stanza(phone, "bob's chat state")
            assert composing.xml.find(f"{{{NS_CHATSTATES}}}composing") is not None, composing
            assert composing["from"] == b.boundjid, composing
            hello = await next_stanza(phone, "bob's message")
            assert hello["body"] == "hello", hello
            await synced(desk, phone)
            assert not phone.stanzas.items, phone.stanzas.items

            # Active: only the latest presence.
            phone.plugin["xep_0352"].send_active()
            await phone.sync()
            held = phone.stanzas.items
            assert [(s.name, s["from"], s["show"]) for s in held] == \
                [("presence", desk.boundjid, "xa")], held
            held.clear()

            # Live again.
            desk.send_presence(pshow="chat")
            p = await next_stanza(phone, "the desk's next presence")
            assert (p.name, p["from"], p["show"]) == ("presence", desk.boundjid, "chat"), p

    run(scenario())
