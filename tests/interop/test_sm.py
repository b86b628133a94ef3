"""XEP-0198 Stream Management with slixmpp's xep_0198 plugin against the real
natter binary: acks both ways, resumption after a connection lost without
</stream> (every message exactly once, in order), and a resumption that comes
too late still losing nothing (offline delivery, archive)."""
from __future__ import annotations

import asyncio
import fcntl
import struct
import termios

import pytest
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from helpers import add_users, is_presence, poll, register_mam, subscribe
from natter_client import STEP, Clients, Inbox, run

ALICE, BOB = "alice@localhost", "bob@localhost"
PW = {ALICE: "alice-pw", BOB: "bob-pw"}
NS_SM = "urn:xmpp:sm:3"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"


def with_sm(client, **config):
    """slixmpp's own XEP-0198 implementation, plus a record of every SM
    nonza the server sends and of the stanzas the server acknowledged."""
    client.register_plugin("xep_0198", config or None)
    name = client.requested_jid
    client.sm_in = Inbox(f"{name} SM nonzas")  # (name, element) in arrival order
    client.sm_requests = Inbox(f"{name} server <r/>")  # handled count at each <r/>
    for tag in ("a", "r", "enabled", "resumed", "failed"):
        client.register_handler(Callback(
            f"natter test sm {tag}", MatchXPath(f"{{{NS_SM}}}{tag}"),
            lambda st, tag=tag: client.sm_in.put((tag, st.xml)), instream=True))
    client.register_handler(Callback(
        "natter test sm r count", MatchXPath(f"{{{NS_SM}}}r"),
        lambda _st: client.sm_requests.put(client.plugin["xep_0198"].handled),
        instream=True))
    client.sm_failed = []
    client.add_event_handler("sm_failed", client.sm_failed.append)
    client.sm_acked = []  # stanzas the server acknowledged, in order
    client.add_event_handler("stanza_acked", client.sm_acked.append)
    return client


def sm(client):
    return client.plugin["xep_0198"]


async def archive_bodies(client, with_jid=None) -> list[str]:
    kw = {"with_jid": with_jid} if with_jid else {}
    return [m["mam_result"]["forwarded"]["stanza"]["body"]
            async for m in client.plugin["xep_0313"].iterate(rsm={"max": 100}, **kw)]


def bodies_with(client, prefix: str) -> list[str]:
    return [m["body"] for m in client.messages.items if m["body"].startswith(prefix)]


async def wait_bodies(client, prefix: str, n: int, what: str) -> list[str]:
    """Wait until `client` has received `n` messages whose body starts with
    `prefix` (they stay in the inbox); returns their bodies in order."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STEP
    while True:
        got = bodies_with(client, prefix)
        if len(got) >= n:
            return got
        if loop.time() > deadline:
            raise AssertionError(f"{what}: {len(got)} of {n} messages arrived: {got}")
        client.messages._changed.clear()
        try:
            await asyncio.wait_for(client.messages._changed.wait(), deadline - loop.time())
        except asyncio.TimeoutError:
            pass


def send_numbered(client, to: str, lo: int, hi: int) -> None:
    for i in range(lo, hi):
        client.send_message(mto=to, mbody=f"m{i:02}", mtype="chat")


def numbered(lo: int, hi: int) -> list[str]:
    return [f"m{i:02}" for i in range(lo, hi)]


async def enabled(client, not_id: str | None = None) -> str:
    """The server's <enabled resume='true' id=…/> (one with an id other than
    `not_id`); slixmpp took that SM-ID. Returns it."""
    _, el = await client.sm_in.wait_for(
        lambda x: x[0] == "enabled" and x[1].get("id") != not_id, "<enabled/>")
    sm_id = el.get("id")
    assert el.get("resume") in ("true", "1") and sm_id, el.attrib
    assert sm(client).sm_id == sm_id and sm(client).enabled_in, (sm(client).sm_id, sm_id)
    return sm_id


async def ack_everything(client) -> int:
    """Ask for an ack once everything `client` sent is on the wire (slixmpp
    writes its <r/> ahead of queued stanzas: sync first). Returns the h of
    the <a/>, which acknowledges every stanza sent since <enable/>."""
    await client.sync()
    sent = sm(client).seq
    sm(client).request_ack()
    _, a = await client.sm_in.wait_for(
        lambda x: x[0] == "a" and int(x[1].get("h")) == sent, f"<a h='{sent}'/>")
    assert sm(client).last_ack == sent and not sm(client).unacked_queue, \
        (sm(client).last_ack, list(sm(client).unacked_queue))
    return sent


async def server_asked_for_all(client) -> int:
    """Wait for the server's <r/> sent after every stanza `client` has
    handled so far; slixmpp answers it with <a h/> at once."""
    handled = sm(client).handled
    await client.sm_requests.wait_for(lambda h: h >= handled,
                                      f"an <r/> after {handled} handled stanzas")
    return handled


def test_acks_both_ways(server):
    add_users(server, PW, ALICE, BOB)

    async def scenario():
        async with Clients(server) as cs:
            # A large window: only the <r/>s this test sends.
            a = with_sm(cs.new(ALICE + "/desk", PW[ALICE]), window=1000)
            b = with_sm(cs.new(BOB + "/phone", PW[BOB]))
            for c in (a, b):
                await c.login()
                await enabled(c)
            await b.sync()  # his presence is in: his bare JID routes to him

            # Alice's <r/>: h counts what she sent (roster, presence, ping).
            sent = await ack_everything(a)
            assert sent >= 3, sent
            assert len(a.sm_acked) == sent, a.sm_acked

            # Twelve messages, one <r/>: all acked, in order.
            send_numbered(a, BOB, 0, 12)
            assert await ack_everything(a) == sent + 13  # the messages, the sync ping
            acked = [st["body"] for st in a.sm_acked[sent:] if st.name == "message"]
            assert acked == numbered(0, 12), acked
            assert [st.name for st in a.sm_acked[sent:]] == ["message"] * 12 + ["iq"]

            # The server asks Bob too; slixmpp answers with what he handled.
            got = await wait_bodies(b, "m", 12, "bob's messages")
            assert got == numbered(0, 12), got
            await server_asked_for_all(b)
            # Proof the server took Bob's <a/>: after a clean close nothing
            # unacknowledged is requeued for his next login.
            await b.close()
            b2 = await cs.login(BOB + "/again", PW[BOB])
            await b2.sync()
            a.send_message(mto=BOB, mbody="fresh", mtype="chat")
            first = await b2.messages.wait_for(lambda m: True, "the fresh message")
            assert first["body"] == "fresh", first
            await b2.sync()
            assert not b2.messages.items, [m["body"] for m in b2.messages.items]

    run(scenario())


def unread_bytes(client) -> int:
    """Bytes that reached `client`'s connection but that it has not read:
    the kernel's receive queue plus the TLS records asyncio's SSL layer
    buffers while reading is paused."""
    sock = client.transport.get_extra_info("socket")
    queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]
    ssl_proto = getattr(client.transport, "_ssl_protocol", None)
    return queued + (ssl_proto._incoming.pending if ssl_proto is not None else 0)


def test_cut_connection_resumes_every_message_exactly_once_in_order(server):
    add_users(server, PW, ALICE, BOB)

    async def scenario():
        async with Clients(server) as cs:
            a = await cs.login(ALICE, PW[ALICE])
            b = with_sm(cs.new(BOB + "/phone", PW[BOB]))
            await b.login()
            sm_id = await enabled(b)
            await b.sync()  # his presence is in: his bare JID routes to him
            full = b.boundjid.full

            send_numbered(a, BOB, 0, 8)
            assert await wait_bodies(b, "m", 8, "the first 8") == numbered(0, 8)
            # Bob's client stops reading; six more are written to him.
            b.transport.pause_reading()
            before = unread_bytes(b)
            send_numbered(a, BOB, 8, 14)
            await a.sync()
            # Written means the encrypted bytes of six messages like m07 are
            # there (slixmpp's serialization of m07 is a few characters longer
            # than the server's; TLS adds to each record).
            size = 6 * (len(str(b.messages.items[-1])) - 8)
            await poll(lambda: unread_bytes(b) - before, lambda n: n >= size,
                       f"{size} bytes (six messages) written into bob's connection")
            # The connection is reset: those six are lost in transit.
            await b.cut()
            assert bodies_with(b, "m") == numbered(0, 8)
            sent = sm(b).seq
            send_numbered(a, BOB, 14, 22)
            await a.sync()

            assert await b.reconnect() == "resumed", b.describe_failure("resume")
            _, resumed = await b.sm_in.wait_for(lambda x: x[0] == "resumed", "<resumed/>")
            assert resumed.get("previd") == sm_id, resumed.attrib
            assert int(resumed.get("h")) == sent, (resumed.attrib, sent)
            assert not sm(b).unacked_queue, "slixmpp had to resend"
            assert b.boundjid.full == full and not b.sm_failed
            # The server still routes Bob's full JID to the resumed session.
            pong = await a.plugin["xep_0199"].send_ping(full, timeout=STEP)
            assert pong["type"] == "result", pong

            send_numbered(a, BOB, 22, 30)
            await wait_bodies(b, "m", 30, "all 30")
            await b.sync()
            assert bodies_with(b, "m") == numbered(0, 30), bodies_with(b, "m")
            # All live or resent, none through offline storage.
            assert not [m for m in b.messages.items if m["delay"]["stamp"]], b.messages.items

    run(scenario())


@pytest.mark.natter_config({"c2s": {"resume_timeout_secs": 1}})
def test_resume_too_late_loses_nothing(server):
    add_users(server, PW, ALICE, BOB)

    async def scenario():
        async with Clients(server) as cs:
            a = cs.new(ALICE, PW[ALICE])
            b = with_sm(cs.new(BOB + "/phone", PW[BOB]))
            for c in (a, b):
                register_mam(c)
                await c.login()
            old_id = await enabled(b)
            await subscribe(a, b)

            send_numbered(a, BOB, 0, 10)
            assert await wait_bodies(b, "m", 10, "the first 10") == numbered(0, 10)
            await server_asked_for_all(b)
            await b.sync()  # the server has Bob's <a/>
            await b.cut()
            sent = sm(b).seq
            send_numbered(a, BOB, 10, 20)
            await a.sync()
            # The session waits a second for Bob, then ends.
            await a.presences.wait_for(lambda p: is_presence(p, b.boundjid.full, "unavailable"),
                                       "bob's session to end")

            assert await b.reconnect() == "session", b.describe_failure("reconnect")
            _, failed = await b.sm_in.wait_for(lambda x: x[0] == "failed", "<failed/>")
            assert failed.find(f"{{{NS_STANZAS}}}item-not-found") is not None, failed
            assert failed.get("h") == str(sent), (failed.attrib, sent)
            assert len(b.sm_failed) == 1, b.sm_failed
            # slixmpp reports the session before it has enabled SM again.
            assert await enabled(b, not_id=old_id) != old_id

            b.send_presence()
            await wait_bodies(b, "m", 20, "the offline messages")
            await b.sync()
            assert bodies_with(b, "m") == numbered(0, 20), bodies_with(b, "m")
            live, offline = b.messages.items[:10], b.messages.items[10:]
            assert not [m for m in live if m["delay"]["stamp"]], live
            for m in offline:
                assert m["delay"]["stamp"] is not None, m
                assert m["stanza_id"]["by"] == BOB and m["stanza_id"]["id"], m

            a.send_message(mto=BOB, mbody="afterwards", mtype="chat")
            await b.messages.wait_for(lambda m: m["body"] == "afterwards", "a new message")
            want = numbered(0, 20) + ["afterwards"]
            assert await archive_bodies(a, BOB) == want
            assert await archive_bodies(b, ALICE) == want

    run(scenario())
