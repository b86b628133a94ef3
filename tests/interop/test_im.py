"""Instant messaging with slixmpp against the real natter binary: roster and
subscriptions (RFC 6121), presence, 1:1 chat, carbons (XEP-0280),
vCard (XEP-0054), ping (XEP-0199)."""
from __future__ import annotations

from xml.etree import ElementTree as ET

import pytest
from slixmpp.jid import JID

from helpers import BIG_BODY, UNICODE_TEXT, add_users, assert_same_text, is_presence
from natter_client import STEP, TRANSPORTS, Clients, IqError, run

ALICE, BOB, CAROL = "alice@localhost", "bob@localhost", "carol@localhost"
PW = {ALICE: "alice-pw", BOB: "bob-pw ß", CAROL: "carol-pw"}



async def send_and_receive(sender, receiver, to, body: str, what: str):
    msg = sender.make_message(mto=to, mbody=body, mtype="chat")
    mid = msg["id"] = sender.new_id()
    msg.send()
    try:
        got = await receiver.messages.wait_for(
            lambda m: m["id"] == mid or m["body"] == body, f"{what} (id {mid})")
    except AssertionError as exc:
        bounced = sender.message_errors.matching(lambda m: m["id"] == mid)
        if bounced:
            raise AssertionError(f"{exc}\nthe sender got an error instead: {bounced[0]}") from None
        raise
    assert_same_text(got["body"], body, what)
    assert got["id"] == mid, f"{what}: id changed from {mid} to {got['id']}"
    assert got["from"] == sender.boundjid, \
        f"{what}: from={got['from']}, want the sender's full JID {sender.boundjid}"
    assert got["to"].bare == receiver.boundjid.bare, f"{what}: to={got['to']}"
    assert got["type"] == "chat", f"{what}: type={got['type']}"
    return got


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_chat_unicode_and_64k_both_ways(server, transport):
    add_users(server, PW, ALICE, BOB)

    async def scenario():
        async with Clients(server) as cs:
            a = await cs.login(ALICE, PW[ALICE], transport)
            b = await cs.login(BOB, PW[BOB], transport)
            for to in ("full", "bare"):  # bare JIDs need presence (RFC 6121 8.5.2)
                await send_and_receive(a, b, getattr(b.boundjid, to), UNICODE_TEXT,
                                       f"unicode a->b ({to} JID)")
                await send_and_receive(b, a, getattr(a.boundjid, to), UNICODE_TEXT,
                                       f"unicode b->a ({to} JID)")
                await send_and_receive(a, b, getattr(b.boundjid, to), BIG_BODY,
                                       f"64 KiB a->b ({to} JID)")
                await send_and_receive(b, a, getattr(a.boundjid, to), BIG_BODY,
                                       f"64 KiB b->a ({to} JID)")

    run(scenario())


def test_chat_across_transports(server):
    add_users(server, PW, ALICE, BOB, CAROL)

    async def scenario():
        async with Clients(server) as cs:
            a = await cs.login(ALICE, PW[ALICE], "websocket")
            b = await cs.login(BOB, PW[BOB], "directtls")
            c = await cs.login(CAROL, PW[CAROL], "starttls")
            ring = [(a, b), (b, c), (c, a), (a, c), (c, b), (b, a)]
            for i, (x, y) in enumerate(ring):
                await send_and_receive(x, y, y.boundjid.full, f"{i}: {UNICODE_TEXT}",
                                       f"{x.kind}->{y.kind}")

    run(scenario())


def test_roster_subscription_and_presence(server):
    add_users(server, PW, ALICE, BOB)

    async def subscribe(x, y):
        """x asks y for a subscription, y approves."""
        x.send_presence(pto=y.boundjid.bare, ptype="subscribe")
        await y.presences.wait_for(lambda p: is_presence(p, x.boundjid.bare, "subscribe"),
                                   f"subscribe from {x.boundjid.bare}")
        y.send_presence(pto=x.boundjid.bare, ptype="subscribed")
        await x.presences.wait_for(lambda p: is_presence(p, y.boundjid.bare, "subscribed"),
                                   f"subscribed from {y.boundjid.bare}")
        # RFC 6121 3.1.6: the contact's available resources' presence follows.
        await x.presences.wait_for(lambda p: is_presence(p, y.boundjid.full),
                                   f"available presence of {y.boundjid.full}")

    def roster_items(iq):
        return {str(k): v for k, v in iq["roster"]["items"].items()}

    async def scenario():
        async with Clients(server) as cs:
            a = await cs.login(ALICE, PW[ALICE])
            b = await cs.login(BOB, PW[BOB])
            a_pushes, b_pushes = [], []
            a.add_event_handler("roster_update", lambda iq: iq["type"] == "set" and a_pushes.append(iq))
            b.add_event_handler("roster_update", lambda iq: iq["type"] == "set" and b_pushes.append(iq))

            await a.update_roster(BOB, name="Bobby 🐝", groups=["Friends", "Работа"], timeout=STEP)
            items = await a.fetch_roster()
            assert BOB in items, items
            assert items[BOB]["name"] == "Bobby 🐝"
            assert sorted(items[BOB]["groups"]) == ["Friends", "Работа"]
            assert items[BOB]["subscription"] == "none"

            await subscribe(a, b)
            await subscribe(b, a)

            for x, y in ((a, b), (b, a)):
                items = await x.fetch_roster()
                assert y.boundjid.bare in items, f"{y.boundjid.bare} missing from roster {items}"
                sub = items[y.boundjid.bare]["subscription"]
                assert sub == "both", f"{x.boundjid.bare}'s roster: {y.boundjid.bare} is {sub!r}"
                assert not items[y.boundjid.bare]["ask"], items[y.boundjid.bare]
            assert (await a.fetch_roster())[BOB]["name"] == "Bobby 🐝"
            for name, pushes, other in (("alice", a_pushes, BOB), ("bob", b_pushes, ALICE)):
                subs = [roster_items(p).get(other, {}).get("subscription") for p in pushes]
                assert "both" in subs, f"{name} got no roster push with subscription both: {subs}"

            # Presence broadcast: a status change reaches the contact.
            a.send_presence(pshow="away", pstatus="lunch 🍕 غداء")
            p = await b.presences.wait_for(
                lambda p: is_presence(p, a.boundjid.full) and p["show"] == "away",
                "alice's away presence")
            assert p["status"] == "lunch 🍕 غداء"
            # Going offline is broadcast too.
            await b.close()
            await a.presences.wait_for(lambda p: is_presence(p, BOB, "unavailable"),
                                       "bob's unavailable presence")

    run(scenario())


def test_carbons_two_resources(server):
    add_users(server, PW, ALICE, BOB)

    def forwarded(carbon):
        direction, msg = carbon
        return direction, msg[f"carbon_{direction}"]  # the forwarded <message/>

    async def scenario():
        async with Clients(server) as cs:
            a1 = await cs.login(ALICE + "/phone", PW[ALICE])
            a2 = await cs.login(ALICE + "/laptop", PW[ALICE])
            b = await cs.login(BOB, PW[BOB])
            assert a1.boundjid != a2.boundjid
            info = await a1.plugin["xep_0030"].get_info(jid=server.domain, timeout=STEP)
            assert "urn:xmpp:carbons:2" in info["disco_info"]["features"], \
                info["disco_info"]["features"]
            for c in (a1, a2):
                res = await c.plugin["xep_0280"].enable(timeout=STEP)
                assert res["type"] == "result"

            # Sent carbon: a1 -> bob, a2 gets a copy.
            a1.send_message(mto=b.boundjid.full, mbody="sent from phone ☎", mtype="chat")
            await b.messages.wait_for(lambda m: m["body"] == "sent from phone ☎", "a1's message")
            carbon = await a2.carbons.wait_for(
                lambda c: c[0] == "sent" and c[1]["carbon_sent"]["body"] == "sent from phone ☎",
                "sent carbon on a2")
            outer, inner = carbon[1], carbon[1]["carbon_sent"]
            assert outer["from"] == JID(ALICE), f"carbon from {outer['from']}, want bare {ALICE}"
            assert inner["from"] == a1.boundjid and inner["to"].bare == BOB, inner

            # Received carbon: bob -> a1's full JID, a2 gets a copy.
            b.send_message(mto=a1.boundjid.full, mbody="to the phone 📱", mtype="chat")
            await a1.messages.wait_for(lambda m: m["body"] == "to the phone 📱", "bob's message")
            carbon = await a2.carbons.wait_for(
                lambda c: c[0] == "received" and c[1]["carbon_received"]["body"] == "to the phone 📱",
                "received carbon on a2")
            inner = carbon[1]["carbon_received"]
            assert inner["from"] == b.boundjid and inner["to"] == a1.boundjid, inner
            assert not a2.messages.matching(lambda m: m["body"] == "to the phone 📱"), \
                "message to a1's full JID was delivered to a2 directly"

            # <private/> messages are not copied; a normal one right after is.
            priv = a1.make_message(mto=b.boundjid.full, mbody="private 🤫", mtype="chat")
            priv.enable("carbon_private")
            priv.xml.append(ET.Element("{urn:xmpp:hints}no-copy"))
            priv.send()
            a1.send_message(mto=b.boundjid.full, mbody="public after private", mtype="chat")
            await a2.carbons.wait_for(
                lambda c: c[0] == "sent" and c[1]["carbon_sent"]["body"] == "public after private",
                "carbon of the message after the private one")
            assert not a2.carbons.matching(
                lambda c: c[1][f"carbon_{c[0]}"]["body"] == "private 🤫"), \
                "a <private/> message was carbon-copied"

    run(scenario())


def test_vcard_set_and_get(server):
    add_users(server, PW, ALICE, BOB, CAROL)

    async def scenario():
        async with Clients(server) as cs:
            a = await cs.login(ALICE, PW[ALICE])
            b = await cs.login(BOB, PW[BOB], "websocket")
            info = await a.plugin["xep_0030"].get_info(jid=server.domain, timeout=STEP)
            assert "vcard-temp" in info["disco_info"]["features"], info["disco_info"]["features"]

            vc = a.plugin["xep_0054"].make_vcard()
            vc["FN"] = "Alice Ærøskøbing 🌸"
            vc["NICKNAME"] = "ally"
            vc["DESC"] = UNICODE_TEXT
            await a.plugin["xep_0054"].publish_vcard(vc, timeout=STEP)

            own = await a.plugin["xep_0054"].get_vcard(ALICE, local=False, timeout=STEP)
            assert own["vcard_temp"]["FN"] == "Alice Ærøskøbing 🌸"
            assert own["vcard_temp"]["NICKNAME"] == ["ally"]  # slixmpp returns a list
            other = await b.plugin["xep_0054"].get_vcard(ALICE, local=False, timeout=STEP)
            assert other["from"].bare == ALICE
            assert other["vcard_temp"]["FN"] == "Alice Ærøskøbing 🌸"
            assert_same_text(other["vcard_temp"]["DESC"], UNICODE_TEXT, "vCard DESC")

            # An update replaces the old card.
            vc2 = a.plugin["xep_0054"].make_vcard()
            vc2["FN"] = "Alice v2"
            await a.plugin["xep_0054"].publish_vcard(vc2, timeout=STEP)
            other = await b.plugin["xep_0054"].get_vcard(ALICE, local=False, timeout=STEP)
            assert other["vcard_temp"]["FN"] == "Alice v2"
            assert not other["vcard_temp"]["NICKNAME"], "old NICKNAME survived the update"

            # No vCard yet: empty result or item-not-found, never a hang.
            try:
                empty = await b.plugin["xep_0054"].get_vcard(CAROL, local=False, timeout=STEP)
            except IqError as e:
                assert e.iq["error"]["condition"] == "item-not-found", e.iq
            else:
                assert not empty["vcard_temp"]["FN"], empty

    run(scenario())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_ping_server(server, transport):
    add_users(server, PW, ALICE)

    async def scenario():
        async with Clients(server) as cs:
            a = await cs.login(ALICE, PW[ALICE], transport, presence=False)
            info = await a.plugin["xep_0030"].get_info(jid=server.domain, timeout=STEP)
            assert "urn:xmpp:ping" in info["disco_info"]["features"], info["disco_info"]["features"]
            # send_ping, not ping(): slixmpp's ping() treats an error reply from
            # the own server as success.
            for _ in range(3):
                res = await a.plugin["xep_0199"].send_ping(server.domain, timeout=STEP)
                assert res["type"] == "result", res
                assert res["from"] in (JID(server.domain), JID("")), res

    run(scenario())
