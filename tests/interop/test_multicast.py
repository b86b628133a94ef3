"""XEP-0033 multicast with slixmpp's xep_0033 plugin against the real
binary: one message to the server's domain with to/cc/bcc addresses reaches
every recipient as its own message from the sender (an offline one at its
next login), bcc addresses hidden from everyone, delivered ones marked."""
from __future__ import annotations

from helpers import add_users
from natter_client import STEP, Clients, run

NS_ADDRESS = "http://jabber.org/protocol/address"
ALICE, BOB, CAROL, DAVE, EVE = (f"{n}@localhost" for n in ("alice", "bob", "carol", "dave", "eve"))
PW = {j: j.split("@")[0] + "-pw" for j in (ALICE, BOB, CAROL, DAVE, EVE)}
ADDRESSES = [("to", BOB), ("cc", CAROL), ("to", DAVE), ("bcc", EVE)]


def shown(msg) -> list[tuple[str, str, bool]]:
    """(type, jid, delivered) of each address a received copy shows."""
    return [(a["type"], str(a["jid"]), a["delivered"]) for a in msg["addresses"]["addresses"]]


def test_multicast_reaches_each_recipient_bcc_hidden(server):
    add_users(server, PW, ALICE, BOB, CAROL, DAVE, EVE)

    async def scenario():
        async with Clients(server) as cs:
            alice = await cs.login(ALICE, PW[ALICE])
            alice.register_plugin("xep_0033")
            online = [await cs.login(j, PW[j], t)
                      for j, t in ((BOB, "starttls"), (CAROL, "websocket"), (EVE, "directtls"))]
            info = await alice.plugin["xep_0030"].get_info(jid=server.domain, timeout=STEP)
            assert NS_ADDRESS in info["disco_info"]["features"], info["disco_info"]["features"]

            msg = alice.make_message(mto=server.domain, mbody="to all of you", mtype="chat")
            for kind, jid in ADDRESSES:
                msg["addresses"].add_address(atype=kind, jid=jid)
            msg.send()

            visible = [(k, j, True) for k, j in ADDRESSES if k != "bcc"]
            for c in online:
                got = await c.messages.wait_for(lambda m: m["body"] == "to all of you",
                                                "the multicast copy")
                assert got["from"] == alice.boundjid, got
                assert got["to"].bare == c.boundjid.bare, got
                assert shown(got) == visible, got
            # dave was offline: his copy waits for him.
            dave = await cs.login(DAVE, PW[DAVE])
            got = await dave.messages.wait_for(lambda m: m["body"] == "to all of you",
                                               "the copy queued offline")
            assert got["from"] == alice.boundjid, got
            assert shown(got) == visible, got
            assert not alice.message_errors.items, alice.message_errors.items
            # One copy each, nothing else.
            for c in [*online, dave]:
                assert not c.messages.matching(lambda m: m["body"]), c.messages.items

    run(scenario())
