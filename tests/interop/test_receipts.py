"""XEP-0184 delivery receipts and XEP-0333 chat markers with slixmpp's own
plugins against the real natter binary: they route between two users, sync
to the sender's other devices through carbons (XEP-0280), are archived for
both parties (XEP-0313), and wait in offline storage for a recipient who is
away."""
from __future__ import annotations

from helpers import add_users
from natter_client import STEP, Clients, Inbox, run

ALICE, BOB = "alice@localhost", "bob@localhost"
PW = {ALICE: "alice-pw", BOB: "bob-pw"}
NS_RECEIPTS = "urn:xmpp:receipts"
NS_MARKERS = "urn:xmpp:chat-markers:0"



def with_plugins(client):
    for p in ("xep_0184", "xep_0333", "xep_0059", "xep_0313", "xep_0203", "xep_0359"):
        client.register_plugin(p)
    # Receipts and markers have no body: slixmpp reports them through its
    # plugins' events, not the "message" event behind Client.messages.
    client.marks = Inbox(f"{client.requested_jid} receipts and markers")
    client.add_event_handler("receipt_received", client.marks.put)
    client.add_event_handler("marker", client.marks.put)
    return client


def kind(m) -> str:
    """What a message carries: body text, 'receipt:ID', 'received:ID', 'displayed:ID'."""
    if m.xml.find(f"{{{NS_RECEIPTS}}}received") is not None:
        return f"receipt:{m['receipt']}"
    for marker in ("received", "displayed", "acknowledged"):
        if m.xml.find(f"{{{NS_MARKERS}}}{marker}") is not None:
            return f"{marker}:{m[marker]['id']}"
    return m["body"]


async def archive(client, with_jid) -> list[tuple[str, str]]:
    """(from bare JID, kind) of every archived message with `with_jid`."""
    out = []
    async for r in client.plugin["xep_0313"].iterate(with_jid=with_jid, rsm={"max": 50}):
        st = r["mam_result"]["forwarded"]["stanza"]
        out.append((st["from"].bare, kind(st)))
    return out


def test_receipts_and_markers_route_sync_and_are_archived(server):
    add_users(server, PW, ALICE, BOB)

    async def scenario():
        async with Clients(server) as cs:
            a = with_plugins(cs.new(ALICE, PW[ALICE]))
            phone = with_plugins(cs.new(BOB + "/phone", PW[BOB]))
            laptop = with_plugins(cs.new(BOB + "/laptop", PW[BOB]))
            for c in (a, phone, laptop):
                await c.login()
            for c in (phone, laptop):
                res = await c.plugin["xep_0280"].enable(timeout=STEP)
                assert res["type"] == "result"

            # Alice asks for a receipt; Bob's phone (slixmpp auto_ack) sends it.
            msg = a.make_message(mto=phone.boundjid.full, mbody="read me", mtype="chat")
            msg["id"] = "msg-1"
            msg["request_receipt"] = True
            msg.enable("markable")
            msg.send()
            got = await phone.messages.wait_for(lambda m: m["body"] == "read me", "the message")
            assert got["id"] == "msg-1" and got["request_receipt"], got
            assert got.xml.find(f"{{{NS_MARKERS}}}markable") is not None, got
            # The laptop saw it through a received carbon.
            await laptop.carbons.wait_for(
                lambda c: c[0] == "received" and c[1]["carbon_received"]["body"] == "read me",
                "received carbon of the message on the laptop")

            receipt = await a.marks.wait_for(lambda m: kind(m) == "receipt:msg-1",
                                                "the XEP-0184 receipt")
            assert receipt["from"] == phone.boundjid, receipt
            # The receipt syncs to Bob's laptop too (sent carbon).
            await laptop.carbons.wait_for(
                lambda c: c[0] == "sent" and kind(c[1]["carbon_sent"]) == "receipt:msg-1",
                "sent carbon of the receipt on the laptop")

            # Chat markers: received, then displayed, from the phone.
            for marker in ("received", "displayed"):
                phone.plugin["xep_0333"].send_marker(a.boundjid.full, "msg-1", marker,
                                                     mtype="chat")
                m = await a.marks.wait_for(lambda m, k=f"{marker}:msg-1": kind(m) == k,
                                              f"the {marker} marker")
                assert m["from"] == phone.boundjid, m
            # The displayed marker reaches the laptop: it can clear its unread
            # badge for that conversation.
            carbon = await laptop.carbons.wait_for(
                lambda c: c[0] == "sent" and kind(c[1]["carbon_sent"]) == "displayed:msg-1",
                "sent carbon of the displayed marker on the laptop")
            inner = carbon[1]["carbon_sent"]
            assert inner["from"] == phone.boundjid and inner["to"] == a.boundjid, inner
            assert not phone.message_errors.items and not a.message_errors.items

            # Both archives: the message, the receipt and both markers, in order.
            want = [(ALICE, "read me"), (BOB, "receipt:msg-1"),
                    (BOB, "received:msg-1"), (BOB, "displayed:msg-1")]
            assert await archive(a, BOB) == want
            assert await archive(laptop, ALICE) == want

            # Alice goes away; what Bob sends meanwhile waits for her.
            msg = a.make_message(mto=phone.boundjid.full, mbody="second", mtype="chat")
            msg["id"] = "msg-2"
            msg["request_receipt"] = True
            msg.send()
            await phone.messages.wait_for(lambda m: m["body"] == "second", "the second message")
            await a.marks.wait_for(lambda m: kind(m) == "receipt:msg-2", "receipt 2")
            await a.close()
            phone.plugin["xep_0333"].send_marker(ALICE, "msg-2", "displayed", mtype="chat")
            await phone.sync()
            assert not phone.message_errors.items, phone.message_errors.items
            a2 = with_plugins(cs.new(ALICE + "/back", PW[ALICE]))
            await a2.login()
            m = await a2.marks.wait_for(lambda m: kind(m) == "displayed:msg-2",
                                           "the displayed marker, from offline storage")
            assert m["delay"]["stamp"] is not None, m
            assert m["from"] == phone.boundjid, m
            assert await archive(a2, BOB) == want + [
                (ALICE, "second"), (BOB, "receipt:msg-2"), (BOB, "displayed:msg-2")]

    run(scenario())
