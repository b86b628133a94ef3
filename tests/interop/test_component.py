"""XEP-0114: slixmpp's ComponentXMPP logs in to natter's component port and
exchanges messages with a slixmpp client."""
from __future__ import annotations

import asyncio

import pytest
import slixmpp

from conftest import free_ports
from natter_client import STEP, Clients, Inbox, run

BOT = "bot.localhost"
SECRET = "component-secret"
COMPONENT_PORT = free_ports(1)[0]


class Bot(slixmpp.ComponentXMPP):
    def __init__(self, port: int):
        super().__init__(BOT, SECRET, "127.0.0.1", port)
        self.messages = Inbox("bot messages")
        self.ready: asyncio.Future = self.loop.create_future()
        self.add_event_handler("session_start", lambda _e: self.ready.done() or
                               self.ready.set_result(True))
        self.add_event_handler("message", self.messages.put)


@pytest.mark.natter_config({
    "listen": {"component": f"127.0.0.1:{COMPONENT_PORT}"},
    "components": {BOT: {"secret": SECRET}},
})
def test_component_echo(server):
    server.add_user("ann@localhost", "ann-pw")

    async def scenario():
        bot = Bot(COMPONENT_PORT)
        bot.connect()
        await asyncio.wait_for(bot.ready, STEP)
        try:
            async with Clients(server) as cs:
                ann = await cs.login("ann@localhost", "ann-pw")
                ann.send_message(mto=f"echo@{BOT}", mbody="hello bot", mtype="chat")
                got = await bot.messages.wait_for(lambda m: m["body"] == "hello bot",
                                                  "ann's message at the component")
                assert str(got["from"]) == str(ann.boundjid), got
                bot.send_message(mto=got["from"], mfrom=f"echo@{BOT}",
                                 mbody="hello ann", mtype="chat")
                reply = await ann.messages.wait_for(lambda m: m["body"] == "hello ann",
                                                    "the component's reply")
                assert str(reply["from"].bare) == f"echo@{BOT}", reply
        finally:
            bot.disconnect()
            await asyncio.sleep(0.2)

    run(scenario())
