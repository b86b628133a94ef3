"""Forged server wrappers (issue 9 item 7) seen by a real client: slixmpp's
own carbons plugin (XEP-0280) would report a carbon from anyone; natter
refuses a client's <sent>/<received> wrapper, so the victim sees nothing
and the forger gets not-acceptable."""
from __future__ import annotations

from xml.etree import ElementTree as ET

from helpers import add_users
from natter_client import Clients, run

ALICE, BOB, MALLORY = "alice@localhost", "bob@localhost", "mallory@localhost"
PW = {ALICE: "alice-pw", BOB: "bob-pw", MALLORY: "mallory-pw"}


def test_forged_carbon_from_another_user_is_refused(server):
    add_users(server, PW, ALICE, BOB, MALLORY)

    async def scenario():
        async with Clients(server) as cs:
            alice = await cs.login(ALICE, PW[ALICE])
            mallory = await cs.login(MALLORY, PW[MALLORY])
            await alice.plugin["xep_0280"].enable()
            for direction in ("received", "sent"):
                forged = mallory.make_message(mto=alice.boundjid.full, mtype="chat")
                mid = forged["id"] = mallory.new_id()
                wrapper = ET.SubElement(forged.xml, f"{{urn:xmpp:carbons:2}}{direction}")
                fwd = ET.SubElement(wrapper, "{urn:xmpp:forward:0}forwarded")
                inner = ET.SubElement(fwd, "{jabber:client}message", {
                    "from": f"{BOB}/phone", "to": ALICE, "type": "chat"})
                ET.SubElement(inner, "{jabber:client}body").text = f"forged {direction}"
                forged.send()
                err = await mallory.message_errors.wait_for(
                    lambda m, mid=mid: m["id"] == mid, f"error for the forged {direction}")
                assert err["error"]["condition"] == "not-acceptable", err
            # An honest message after them arrives; the forgeries never did.
            mallory.send_message(mto=alice.boundjid.full, mbody="honest", mtype="chat")
            await alice.messages.wait_for(lambda m: m["body"] == "honest", "honest message")
            assert not alice.carbons.matching(lambda c: True), alice.carbons.matching(lambda c: True)
            assert not alice.messages.matching(lambda m: m["body"] != "honest")

    run(scenario())
