"""Durability of the real natter binary under kill -9: a slixmpp client with
XEP-0198 stream management sends a burst of 2,000 messages, the server is
killed (SIGKILL) in the middle of it, restarted on the same data directory
and ports, and every message it had acknowledged with <a h/> is there: once
each, in order, as offline messages for the recipient and in both archives
(XEP-0313). An ack means durable (tests/delivery.rs does the same in Rust)."""
from __future__ import annotations

import asyncio

from helpers import register_mam
from natter_client import Clients, run

ALICE, BOB = "alice@localhost", "bob@localhost"
PW = {ALICE: "alice-pw", BOB: "bob-pw"}
BURST = 2000
CHUNK = 50
KILL_AFTER = 1000  # sent in chunks, each fully acked; then the other 1,000 at
                   # once, and the kill after a quarter of those were acked
WAIT = 20.0



async def until(cond, what: str, timeout: float = WAIT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.005)


async def archive_bodies(client, with_jid) -> list[str]:
    return [m["mam_result"]["forwarded"]["stanza"]["body"]
            async for m in client.plugin["xep_0313"].iterate(with_jid=with_jid,
                                                            rsm={"max": 250})]


def check_acked_kept(bodies: list[str], acked: int, sent: int, what: str) -> None:
    """The first `acked` messages, in order; after them maybe some of the
    unacknowledged ones (durable, ack lost in the kill), in order, none twice."""
    want = [f"burst {i}" for i in range(acked)]
    assert bodies[:acked] == want, \
        f"{what}: acked messages missing or out of order: " \
        f"first difference at {next((i for i, (x, y) in enumerate(zip(bodies, want)) if x != y), len(bodies))}" \
        f" ({len(bodies)} present, {acked} acked)"
    nums = [int(b.split()[1]) for b in bodies]
    assert nums == sorted(set(nums)), f"{what}: duplicates or disorder after the acked ones"
    assert not nums or nums[-1] < sent, f"{what}: a message never sent: {nums[-1]}"


def test_kill_dash_nine_mid_burst_loses_no_acked_message(server):
    server.add_user(ALICE, PW[ALICE])
    server.add_user(BOB, PW[BOB])

    async def scenario():
        async with Clients(server) as cs:
            a = cs.new(ALICE + "/burst", PW[ALICE])
            # An ack request after every stanza: an <a h/> per message.
            a.register_plugin("xep_0198", {"window": 1})
            await a.login()
            await a.sync()
            sm = a.plugin["xep_0198"]
            assert sm.enabled_in and sm.enabled_out, "stream management not enabled"
            base = sm.seq  # roster get, presence, ping
            # slixmpp writes its <r/> before the stanza that triggered it (and
            # <r/> at once, stanzas through a queue): ask once more when
            # everything is on the wire to get the ack of the last one too.
            sm.request_ack()
            await until(lambda: sm.last_ack == base, "the acks of the login stanzas")

            sent = 0
            while True:
                n = CHUNK if sent < KILL_AFTER else BURST - sent
                for _ in range(n):
                    a.send_message(mto=BOB, mbody=f"burst {sent}", mtype="chat")
                    sent += 1
                if sent <= KILL_AFTER:
                    await until(lambda: sm.seq - base == sent, f"{sent} written")
                    sm.request_ack()
                    await until(lambda: sm.last_ack - base == sent, f"acks up to {sent}")
                    continue
                mark = sent - n + n // 4
                await until(lambda: sm.last_ack - base >= mark, f"acks up to {mark}")
                rc = server.crash()
                break
            assert rc == -9, rc
            # Acks already on their way to us still count: take what slixmpp
            # read before the connection was gone.
            await asyncio.wait_for(asyncio.shield(a.gone), WAIT)
            acked = sm.last_ack - base
            assert acked >= KILL_AFTER, acked
            assert acked < sent, f"the kill was not mid-burst: all {sent} acked"
            assert not a.message_errors.items, a.message_errors.items[:3]

            server.start()  # same data dir, same ports
            b = cs.new(BOB + "/phone", PW[BOB])
            register_mam(b)
            await b.login()  # initial presence: the offline queue follows
            await until(lambda: len(b.messages.items) >= acked,
                        f"{acked} offline messages ({len(b.messages.items)} so far)")
            a2 = cs.new(ALICE + "/after", PW[ALICE])
            register_mam(a2)
            await a2.login()
            a2.send_message(mto=BOB, mbody="after the crash", mtype="chat")
            # Anything still queued offline arrives before this one.
            await b.messages.wait_for(lambda m: m["body"] == "after the crash", "a new message",
                                      timeout=WAIT)
            offline = [m["body"] for m in b.messages.items]
            check_acked_kept(offline, acked, sent, "offline delivery")
            for m in b.messages.items[:3]:
                assert m["delay"]["stamp"] is not None, m

            archived = await archive_bodies(b, ALICE)
            assert archived[-1] == "after the crash", archived[-3:]
            check_acked_kept(archived[:-1], acked, sent, "bob's archive")
            # Unacknowledged messages may be archived without having been
            # queued yet when the kill came (archive first, then queue);
            # the archive has everything offline delivery had.
            missing = sorted(set(offline) - set(archived))
            assert not missing, f"delivered offline but not archived: {missing[:5]}"
            sender_side = await archive_bodies(a2, BOB)
            assert sender_side == archived, "alice's archive differs from bob's"
            print(f"killed after {acked} of {sent} messages were acked; "
                  f"{len(offline)} delivered offline, {len(archived) - 1} archived")

    run(scenario(), timeout=60)
