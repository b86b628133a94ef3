"""24-hour statuses (stories) with slixmpp against the real binary: alice
posts a story with an image uploaded through XEP-0363 (slixmpp's xep_0363
plugin) to her `urn:xmpp:pubsub-stories:0` PEP node; her contact bob reads
it, carol (no contact) cannot; on a whitelist only the chosen list reads;
bob's seen receipt reaches alice's devices and no one else; after the short
TTL the story is gone and its image's URL answers 404."""
from __future__ import annotations

import asyncio
import io
import os
import xml.etree.ElementTree as ET

import aiohttp
from slixmpp.exceptions import IqError
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from helpers import add_users, poll, refused, subscribe
from natter_client import STEP, Clients, Inbox, run

ALICE, BOB, CAROL = "alice@localhost", "bob@localhost", "carol@localhost"
PW = {ALICE: "alice-stories", BOB: "bob-stories", CAROL: "carol-stories"}
NODE = "urn:xmpp:pubsub-stories:0"
NS_PUBSUB = "http://jabber.org/protocol/pubsub"
NS_OWNER = "http://jabber.org/protocol/pubsub#owner"
NS_STORIES = "urn:natter:stories:0"
TTL = 3


def iq_payload(xml: str) -> ET.Element:
    return ET.fromstring(xml)


async def send_iq(client, kind: str, payload: str, to: str | None = None):
    iq = client.make_iq_set() if kind == "set" else client.make_iq_get()
    if to:
        iq["to"] = to
    iq.append(iq_payload(payload))
    return await iq.send(timeout=STEP)


def story(title: str, image: str | None) -> str:
    link = f"<link rel='enclosure' type='image/png' href='{image}'/>" if image else ""
    return f"<entry xmlns='http://www.w3.org/2005/Atom'><title>{title}</title>{link}</entry>"


async def post(client, item_id: str, entry: str, ttl: int | None = None):
    options = ""
    if ttl is not None:
        options = (
            "<publish-options><x xmlns='jabber:x:data' type='submit'>"
            "<field var='FORM_TYPE' type='hidden'>"
            "<value>http://jabber.org/protocol/pubsub#publish-options</value></field>"
            f"<field var='pubsub#item_expire'><value>{ttl}</value></field></x></publish-options>")
    return await send_iq(client, "set",
                         f"<pubsub xmlns='{NS_PUBSUB}'><publish node='{NODE}'>"
                         f"<item id='{item_id}'>{entry}</item></publish>{options}</pubsub>")


async def story_items(client, author: str) -> list[ET.Element]:
    res = await send_iq(client, "get",
                        f"<pubsub xmlns='{NS_PUBSUB}'><items node='{NODE}'/></pubsub>", author)
    return res.xml.findall(f"{{{NS_PUBSUB}}}pubsub/{{{NS_PUBSUB}}}items/{{{NS_PUBSUB}}}item")


def seen_of(msg) -> ET.Element | None:
    return msg.xml.find(f"{{{NS_STORIES}}}seen")


def seen_inbox(client) -> Inbox:
    """Every message carrying a seen receipt (they come as headlines,
    which slixmpp's `message` event leaves out)."""
    inbox = Inbox(f"{client.boundjid} seen receipts")
    client.register_handler(Callback(
        "stories seen", MatchXPath(f"{{jabber:client}}message/{{{NS_STORIES}}}seen"), inbox.put))
    return inbox


def test_story_visibility_seen_receipts_and_expiry_with_its_image(server):
    add_users(server, PW, ALICE, BOB, CAROL)
    photo = os.urandom(50_000)

    async def scenario():
        async with Clients(server) as cs:
            alice = await cs.login(ALICE, PW[ALICE])
            alice2 = await cs.login(ALICE, PW[ALICE], "websocket")
            bob = await cs.login(BOB, PW[BOB])
            carol = await cs.login(CAROL, PW[CAROL])
            await subscribe(bob, alice)
            await subscribe(alice, bob)
            seen = {c: seen_inbox(c) for c in (alice, alice2, bob, carol)}

            # Advertised.
            info = await alice.plugin["xep_0030"].get_info(jid="localhost", timeout=STEP)
            assert NS_STORIES in info["disco_info"]["features"]

            alice.register_plugin("xep_0363")
            url = await alice.plugin["xep_0363"].upload_file(
                "story.png", size=len(photo), content_type="image/png",
                input_file=io.BytesIO(photo), timeout=STEP)
            async with aiohttp.ClientSession() as http:
                async with http.get(url) as resp:
                    assert resp.status == 200 and await resp.read() == photo
            await post(alice, "beach", story("At the beach", url), ttl=TTL)
            posted = asyncio.get_running_loop().time()

            # The contact sees it (with the image link); the stranger does not.
            items = await story_items(bob, ALICE)
            assert [i.get("id") for i in items] == ["beach"]
            assert url in ET.tostring(items[0], encoding="unicode")
            await refused(story_items(carol, ALICE), "not-authorized", "carol reads alice's stories")

            # Seen receipt: to alice's two devices, not to bob's nor carol's.
            receipt = bob.make_message(mto=ALICE)
            receipt.append(ET.fromstring(f"<seen xmlns='{NS_STORIES}' node='{NODE}' item='beach'/>"))
            receipt.send()
            for dev in (alice, alice2):
                got = await seen[dev].wait_for(lambda m: True, "bob's seen")
                assert got["from"].bare == BOB
                assert seen_of(got).get("item") == "beach"
            for other in (bob, carol):
                await other.sync()
                assert not seen[other].items, seen[other].items
                assert not other.carbons.matching(lambda m: NS_STORIES in str(m))
            # A stranger's receipt is refused.
            fake = carol.make_message(mto=ALICE)
            fake.append(ET.fromstring(f"<seen xmlns='{NS_STORIES}' item='beach'/>"))
            fake.send()
            err = await carol.message_errors.wait_for(lambda m: True, "carol's refused receipt")
            assert err["error"]["condition"] == "not-authorized", err
            # Alice (only) reads who saw it.
            res = await send_iq(alice, "get", f"<query xmlns='{NS_STORIES}' item='beach'/>")
            viewers = [s.get("jid") for s in res.xml.iter(f"{{{NS_STORIES}}}seen")]
            assert viewers == [BOB], res
            await refused(send_iq(bob, "get", f"<query xmlns='{NS_STORIES}' item='beach'/>", ALICE),
                          "forbidden", "bob reads alice's viewers")

            # After the TTL: the item is gone and so is the image.
            await poll(lambda: story_items(bob, ALICE), lambda items: items == [],
                       "the story to expire", timeout=TTL + STEP, every=0.2)
            assert asyncio.get_running_loop().time() - posted >= TTL - 0.5

            async def status():
                async with aiohttp.ClientSession() as http:
                    async with http.get(url) as resp:
                        return resp.status
            await poll(status, lambda s: s == 404, "the image to be deleted",
                       timeout=STEP, every=0.2)
            res = await send_iq(alice, "get", f"<query xmlns='{NS_STORIES}'/>")
            assert list(res.xml.iter(f"{{{NS_STORIES}}}seen")) == [], res

    run(scenario())


def test_whitelist_shows_stories_to_the_chosen_list_only(server):
    add_users(server, PW, ALICE, BOB, CAROL)

    async def scenario():
        async with Clients(server) as cs:
            alice = await cs.login(ALICE, PW[ALICE])
            bob = await cs.login(BOB, PW[BOB])
            carol = await cs.login(CAROL, PW[CAROL])
            await subscribe(bob, alice)
            await subscribe(alice, bob)
            await post(alice, "s1", story("Only for carol", None))
            await send_iq(alice, "set",
                          f"<pubsub xmlns='{NS_OWNER}'><configure node='{NODE}'>"
                          "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' "
                          "type='hidden'><value>http://jabber.org/protocol/pubsub#node_config"
                          "</value></field><field var='pubsub#access_model'><value>whitelist"
                          "</value></field></x></configure></pubsub>")
            await send_iq(alice, "set",
                          f"<pubsub xmlns='{NS_OWNER}'><affiliations node='{NODE}'>"
                          f"<affiliation jid='{CAROL}' affiliation='member'/></affiliations></pubsub>")
            assert [i.get("id") for i in await story_items(carol, ALICE)] == ["s1"]
            # bob is a contact but not on the list.
            await refused(story_items(bob, ALICE), "not-allowed", "bob reads a whitelist story")
            # Not an Atom entry: a clear error.
            try:
                await send_iq(alice, "set",
                              f"<pubsub xmlns='{NS_PUBSUB}'><publish node='{NODE}'><item id='x'>"
                              "<note xmlns='urn:example'/></item></publish></pubsub>")
            except IqError as e:
                assert e.iq["error"]["condition"] == "bad-request"
                assert "Atom" in e.iq["error"]["text"]
            else:
                raise AssertionError("a non-Atom story was accepted")

    run(scenario())
