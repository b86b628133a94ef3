"""Durable delivery with slixmpp against the real natter binary: offline
messages (XEP-0160) arrive once and in order at the next login, and the
message archive (XEP-0313) answers slixmpp's xep_0313 plugin, paged with
RSM (XEP-0059)."""
from __future__ import annotations

import asyncio

from helpers import add_users, register_mam
from natter_client import STEP, Clients, run

ALICE, BOB = "alice@localhost", "bob@localhost"
PW = {ALICE: "alice-pw", BOB: "bob-pw"}




def test_twenty_offline_messages_once_in_order(server):
    add_users(server, PW, ALICE, BOB)
    bodies = [f"offline #{i} ✉" for i in range(20)]

    async def scenario():
        async with Clients(server) as cs:
            a = await cs.login(ALICE, PW[ALICE])
            for b in bodies:
                a.send_message(mto=BOB, mbody=b, mtype="chat")
            # Round trip: every message was handled (and is durable) before the pong.
            await a.plugin["xep_0199"].ping(jid=server.domain, timeout=STEP)
            errors = a.message_errors.matching(lambda m: True)
            assert not errors, f"messages to an offline user bounced: {errors}"

            b = cs.new(BOB, PW[BOB])
            register_mam(b)
            await b.login()  # roster, then initial presence: the queue follows
            got = []
            for i in range(20):
                m = await b.messages.wait_for(lambda m: m["body"].startswith("offline #"),
                                              f"offline message {i}")
                got.append(m)
            assert [m["body"] for m in got] == bodies, [m["body"] for m in got]
            for m in got:
                assert m["from"] == a.boundjid, m
                delay = m["delay"]
                assert delay["from"] == server.domain, m
                assert delay["stamp"] is not None, m
                sid = m["stanza_id"]
                assert sid["by"] == BOB and sid["id"], m
            # Exactly once: nothing more arrives, now or at the next login.
            await b.plugin["xep_0199"].ping(jid=server.domain, timeout=STEP)
            await asyncio.sleep(0.2)
            assert not b.messages.matching(lambda m: m["body"].startswith("offline #")), \
                "an offline message was delivered twice"
            await b.close()
            b2 = await cs.login(BOB + "/again", PW[BOB])
            await b2.plugin["xep_0199"].ping(jid=server.domain, timeout=STEP)
            await asyncio.sleep(0.2)
            assert not b2.messages.matching(lambda m: True), "offline messages delivered again"

    run(scenario())


def test_mam_query_with_slixmpp(server):
    add_users(server, PW, ALICE, BOB)
    bodies = [f"archived {i}" for i in range(25)]

    async def scenario():
        async with Clients(server) as cs:
            a = cs.new(ALICE, PW[ALICE])
            register_mam(a)
            await a.login()
            b = await cs.login(BOB, PW[BOB])
            for body in bodies:
                a.send_message(mto=BOB, mbody=body, mtype="chat")
            for body in bodies:
                await b.messages.wait_for(lambda m, body=body: m["body"] == body, body)

            info = await a.plugin["xep_0030"].get_info(jid=ALICE, timeout=STEP)
            features = info["disco_info"]["features"]
            assert "urn:xmpp:mam:2" in features, features

            # One page with the plain retrieve call.
            res = await a.plugin["xep_0313"].retrieve(with_jid=BOB, rsm={"max": 10},
                                                     timeout=STEP)
            page = [r["mam_result"]["forwarded"]["stanza"]["body"] for r in res["mam"]["results"]]
            assert page == bodies[:10], page
            fin = res["mam_fin"]
            assert fin["rsm"]["first"] and fin["rsm"]["last"], fin

            # The item count, asked for the XEP-0059 way (max=0); pages skip
            # it because counting walks the whole archive.
            res = await a.plugin["xep_0313"].retrieve(with_jid=BOB, rsm={"max": 0},
                                                     timeout=STEP)
            assert len(res["mam"]["results"]) == 0, res["mam"]["results"]
            assert str(res["mam_fin"]["rsm"]["count"]) == "25", res["mam_fin"]

            # Everything, paged forward by slixmpp's RSM iterator.
            got = [m["mam_result"]["forwarded"]["stanza"]["body"]
                   async for m in a.plugin["xep_0313"].iterate(with_jid=BOB, rsm={"max": 7})]
            assert got == bodies, got

            # Backward from the end (RSM <before/>), newest page first.
            back = [m["mam_result"]["forwarded"]["stanza"]["body"]
                    async for m in a.plugin["xep_0313"].iterate(with_jid=BOB, reverse=True,
                                                                rsm={"max": 10})]
            assert back == list(reversed(bodies)), back

            # Bob's archive has them too, as incoming; Alice may not read it.
            rb = cs.all[1]
            register_mam(rb)
            res = await rb.plugin["xep_0313"].retrieve(rsm={"max": 50}, timeout=STEP)
            assert len(res["mam"]["results"]) == 25
            try:
                await a.plugin["xep_0313"].retrieve(jid=BOB, timeout=STEP)
            except Exception as exc:  # noqa: BLE001 - IqError expected
                assert "forbidden" in str(exc) or getattr(exc, "condition", "") == "forbidden", exc
            else:
                raise AssertionError("querying another user's archive succeeded")

    run(scenario())
