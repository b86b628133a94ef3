"""XEP-0357 push notifications against the real binary, with a slixmpp
ComponentXMPP as the app server (the role Conversations' p2.siacs.eu plays):
a device that is offline, parked (XEP-0198) or not acknowledging gets a
notification with the right count and no body; an active one gets none; a
burst of 20 gives one or a few; a group message to an absent member gives
one; disable stops them; a restart keeps them."""
from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET

import pytest
import slixmpp
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from conftest import free_ports
from helpers import add_users
from natter_client import STEP, Clients, Inbox, run

APP = "push.localhost"
SECRET = "app-server-secret"
PORT = free_ports(1)[0]
NS_PUSH = "urn:xmpp:push:0"
NS_PUBSUB = "http://jabber.org/protocol/pubsub"
NS_DATA = "jabber:x:data"
ALICE, BOB = "alice@localhost", "bob@localhost"
PW = {ALICE: "alice-push", BOB: "bob-push"}
CONFIG = {
    "listen": {"component": f"127.0.0.1:{PORT}"},
    "components": {APP: {"secret": SECRET}},
    "push": {"coalesce_ms": 500},
    "c2s": {"ping_timeout_secs": 2},
}


class AppServer(slixmpp.ComponentXMPP):
    """Records each push (node, summary fields, raw XML) and answers it."""

    def __init__(self):
        super().__init__(APP, SECRET, "127.0.0.1", PORT)
        self.pushes = Inbox("pushes")
        self.ready: asyncio.Future = self.loop.create_future()
        self.add_event_handler("session_start",
                               lambda _e: self.ready.done() or self.ready.set_result(True))
        self.register_handler(Callback(
            "push", MatchXPath(f"{{jabber:component:accept}}iq/{{{NS_PUBSUB}}}pubsub"),
            self._on_push))

    def _on_push(self, iq):
        publish = iq.xml.find(f"{{{NS_PUBSUB}}}pubsub/{{{NS_PUBSUB}}}publish")
        form = publish.find(f"{{{NS_PUBSUB}}}item/{{{NS_PUSH}}}notification/{{{NS_DATA}}}x")
        fields = {f.get("var"): f.findtext(f"{{{NS_DATA}}}value") for f in form}
        self.pushes.put((publish.get("node"), fields, ET.tostring(iq.xml, "unicode"),
                         str(iq["from"])))
        iq.reply().send()

    async def quiet(self, secs: float) -> None:
        """No push arrives for `secs`."""
        before = len(self.pushes.matching(lambda _p: True))
        await asyncio.sleep(secs)
        after = self.pushes.matching(lambda _p: True)
        assert len(after) == before, f"unexpected push: {after[before:]}"


async def enable(client, node: str) -> None:
    iq = client.make_iq_set()
    iq.append(ET.fromstring(
        f"<enable xmlns='{NS_PUSH}' jid='{APP}' node='{node}'>"
        f"<x xmlns='{NS_DATA}' type='submit'><field var='FORM_TYPE'>"
        f"<value>http://jabber.org/protocol/pubsub#publish-options</value></field>"
        f"<field var='secret'><value>s-{node}</value></field></x></enable>"))
    await iq.send(timeout=STEP)


async def disable(client, node: str) -> None:
    iq = client.make_iq_set()
    iq.append(ET.fromstring(f"<disable xmlns='{NS_PUSH}' jid='{APP}' node='{node}'/>"))
    await iq.send(timeout=STEP)


async def app_server() -> AppServer:
    app = AppServer()
    app.connect()
    await asyncio.wait_for(app.ready, STEP)
    return app


@pytest.mark.natter_config(CONFIG)
def test_offline_burst_disable_and_restart(server):
    add_users(server, PW, ALICE, BOB)

    async def phase_one():
        app = await app_server()
        try:
            async with Clients(server) as cs:
                alice = await cs.login(ALICE, PW[ALICE])
                bob = await cs.login(BOB, PW[BOB])
                await enable(alice, "phone")
                await enable(alice, "tablet")
                await alice.close()
                for i in range(20):
                    bob.send_message(mto=ALICE, mbody=f"private words {i}", mtype="chat")
                await bob.sync()
                first = []
                for node in ("phone", "tablet"):
                    first.append(await app.pushes.wait_for(lambda p, n=node: p[0] == n,
                                                           f"a push to {node}"))
                await asyncio.sleep(1.5)
                every = first + app.pushes.matching(lambda _p: True)
                assert len(every) <= 4, f"20 messages gave {len(every)} pushes"
                for node, fields, raw, frm in every:
                    assert frm == ALICE
                    assert fields["FORM_TYPE"] == "urn:xmpp:push:summary"
                    assert fields["last-message-sender"].startswith(BOB)
                    assert "private words" not in raw, raw
                    assert f"s-{node}" in raw  # the device's secret as publish-options
                assert max(int(p[1]["message-count"]) for p in every if p[0] == "phone") == 20
                # Disabled from another session: "tablet" gets no more.
                laptop = await cs.login(ALICE + "/laptop", PW[ALICE])
                await disable(laptop, "tablet")
                await laptop.close()
                bob.send_message(mto=ALICE, mbody="one more", mtype="chat")
                await app.pushes.wait_for(
                    lambda p: p[0] == "phone" and p[1]["message-count"] == "21", "push 21")
                await asyncio.sleep(1)
                late = app.pushes.matching(
                    lambda p: p[0] == "tablet" and int(p[1]["message-count"]) > 20)
                assert not late, late
        finally:
            app.disconnect()
            await asyncio.sleep(0.2)

    run(phase_one())
    assert server.stop() == 0
    server.start()

    async def after_restart():
        app = await app_server()
        try:
            async with Clients(server) as cs:
                bob = await cs.login(BOB, PW[BOB])
                bob.send_message(mto=ALICE, mbody="after the restart", mtype="chat")
                node, fields, _, _ = await app.pushes.wait_for(lambda _p: True,
                                                               "a push after the restart")
                assert node == "phone"
        finally:
            app.disconnect()
            await asyncio.sleep(0.2)

    run(after_restart())


@pytest.mark.natter_config(CONFIG)
def test_active_parked_and_silent_devices(server):
    add_users(server, PW, ALICE, BOB)

    async def scenario():
        app = await app_server()
        try:
            async with Clients(server) as cs:
                bob = await cs.login(BOB, PW[BOB])
                alice = cs.new(ALICE + "/phone", PW[ALICE])
                alice.register_plugin("xep_0198")
                await alice.login()
                await enable(alice, "phone")
                # Active: the message arrives and is acknowledged; no push.
                bob.send_message(mto=ALICE, mbody="hi", mtype="chat")
                await alice.messages.wait_for(lambda m: m["body"] == "hi", "hi")
                await app.quiet(2.5)
                # Silent: alice stops answering ack requests (an app frozen
                # with its socket open); natter parks her session and pushes.
                alice.remove_handler("Stream Management Request Ack")
                bob.send_message(mto=ALICE, mbody="are you there", mtype="chat")
                _, fields, raw, _ = await app.pushes.wait_for(lambda _p: True,
                                                              "a push for the silent device",
                                                              timeout=3 * STEP)
                assert fields["message-count"] == "1", fields
                assert "are you there" not in raw
                # Still parked: more messages push, counted on.
                bob.send_message(mto=ALICE, mbody="hello?", mtype="chat")
                await app.pushes.wait_for(lambda p: p[1]["message-count"] == "2",
                                          "a push for the parked device")
                # The app wakes and resumes: it gets both; its count starts over.
                assert await alice.reconnect() == "resumed"
                await alice.messages.wait_for(lambda m: m["body"] == "hello?", "hello?")
                # The network drops (no </stream>): parked with "hello?" unacknowledged
                # (resent on resumption; this client no longer acknowledges), which
                # is pushed at once; its count started over at the resumption.
                await alice.cut()
                await app.pushes.wait_for(lambda p: p[1]["message-count"] == "1",
                                          "a push when the network dropped")
                # Still parked: the next message is counted on.
                bob.send_message(mto=ALICE, mbody="lost you", mtype="chat")
                await app.pushes.wait_for(lambda p: p[1]["message-count"] == "2",
                                          "a push for the message after the drop")
                await alice.close()
        finally:
            app.disconnect()
            await asyncio.sleep(0.2)

    run(scenario(), timeout=120)


@pytest.mark.natter_config(CONFIG)
def test_a_group_message_for_an_absent_member(server):
    add_users(server, PW, ALICE, BOB)
    room = "family@conference.localhost"

    async def scenario():
        app = await app_server()
        try:
            async with Clients(server) as cs:
                alice = await cs.login(ALICE, PW[ALICE])
                bob = await cs.login(BOB, PW[BOB])
                await enable(bob, "bobs-phone")
                alice.register_plugin("xep_0045")
                await alice.plugin["xep_0045"].join_muc_wait(room, "alice", timeout=STEP)
                await alice.plugin["xep_0045"].set_affiliation(room, "member", jid=BOB)
                await bob.close()
                alice.send_message(mto=room, mbody="dinner at 8", mtype="groupchat")
                node, fields, raw, frm = await app.pushes.wait_for(lambda _p: True,
                                                                   "bob's push")
                assert (node, frm, fields["message-count"]) == ("bobs-phone", BOB, "1")
                assert "dinner" not in raw
                await app.quiet(1.5)
        finally:
            app.disconnect()
            await asyncio.sleep(0.2)

    run(scenario())
