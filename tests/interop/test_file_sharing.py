"""Stateless file sharing (XEP-0447) with XEP-0446 metadata and a XEP-0264
thumbnail, as Conversations-class clients send images: the server relays
and stores the element untouched, every element, attribute and text the
same, to an online recipient (over TCP and WebSocket), through offline
storage, and in the message archive (XEP-0313). An OMEMO-style `aesgcm://`
link passes the same way: the server does not read it."""
from __future__ import annotations

import asyncio
import copy
from xml.etree import ElementTree as ET

from helpers import add_users, register_mam
from natter_client import STEP, Clients, run

ALICE, BOB = "alice@localhost", "bob@localhost"
PW = {ALICE: "alice-sfs", BOB: "bob-sfs"}

SFS = "urn:xmpp:sfs:0"
FILE = "urn:xmpp:file:metadata:0"
THUMBS = "urn:xmpp:thumbs:1"
URL_DATA = "http://jabber.org/protocol/url-data"
HASHES = "urn:xmpp:hashes:2"
XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"


def sharing(n: int, url: str) -> ET.Element:
    """The XEP-0447 example's shape: metadata with hashes, a description with
    xml:lang and XML specials, two thumbnails (an HTTP preview and a BoB
    cid:), and the sources. Built without whitespace between elements, so
    that text compares exactly."""
    fs = ET.Element(f"{{{SFS}}}file-sharing", {"disposition": "inline", "id": f"share-{n}"})
    f = ET.SubElement(fs, f"{{{FILE}}}file")
    for tag, text in (("media-type", "image/jpeg"), ("name", f"summit {n} ☃.jpg"),
                      ("size", "3032449"), ("width", "4096"), ("height", "2160")):
        ET.SubElement(f, f"{{{FILE}}}{tag}").text = text
    ET.SubElement(f, f"{{{HASHES}}}hash", {"algo": "sha-256"}).text = \
        "2XarmwTlNxDAMkvymloX3S5+VbylNrJt/l5QyPa+YoU="
    desc = ET.SubElement(f, f"{{{FILE}}}desc", {XML_LANG: "en"})
    desc.text = "Photo from the summit <3 & \"friends\" 🏔"
    ET.SubElement(f, f"{{{THUMBS}}}thumbnail", {
        "uri": f"{url}?thumb=256", "media-type": "image/jpeg", "width": "256", "height": "135"})
    ET.SubElement(f, f"{{{THUMBS}}}thumbnail", {
        "uri": "cid:sha1+ffd7c8d28e9c5e82afea41f97108c6b4@bob.xmpp.org",
        "media-type": "image/png", "width": "128", "height": "67"})
    sources = ET.SubElement(fs, f"{{{SFS}}}sources")
    ET.SubElement(sources, f"{{{URL_DATA}}}url-data", {"target": url})
    return fs


def canon(el: ET.Element) -> tuple:
    """Tag, attributes, text and children, recursively: what two
    serialisations of the same element share."""
    return (el.tag, sorted(el.attrib.items()), el.text or "", el.tail or "",
            [canon(c) for c in el])


def assert_intact(got_msg: ET.Element, want: ET.Element, where: str) -> None:
    found = got_msg.findall(f"{{{SFS}}}file-sharing")
    assert len(found) == 1, f"{where}: {len(found)} file-sharing elements in " \
                            f"{ET.tostring(got_msg, encoding='unicode')}"
    got = copy.copy(found[0])
    got.tail = None
    assert canon(got) == canon(want), (
        f"{where}: file-sharing changed\n got: {ET.tostring(got, encoding='unicode')}\n"
        f"want: {ET.tostring(want, encoding='unicode')}")


def send_share(alice, to: str, n: int, url: str) -> ET.Element:
    want = sharing(n, url)
    msg = alice.make_message(mto=to, mbody=url, mtype="chat")
    msg["id"] = f"share-msg-{n}"
    msg.xml.append(copy.deepcopy(want))
    msg.send()
    return want


def has_share(n: int):
    return lambda m: m.xml.find(f"{{{SFS}}}file-sharing[@id='share-{n}']") is not None


def test_thumbnail_metadata_survives_delivery_offline_and_archive(server):
    add_users(server, PW, ALICE, BOB)
    https = "https://upload.localhost/upload/0123456789abcdef0123456789abcdef/summit.jpg"
    # OMEMO media: the URL's fragment is the key; the bytes are ciphertext.
    aesgcm = ("aesgcm://upload.localhost/upload/fedcba9876543210fedcba9876543210/x.jpg"
              "#" + "ab" * 12 + "cd" * 32)

    async def scenario():
        async with Clients(server) as cs:
            alice = await cs.login(ALICE, PW[ALICE])
            # Offline first: bob has never logged in.
            offline = {n: send_share(alice, BOB, n, url) for n, url in ((1, https), (2, aesgcm))}
            await alice.sync()
            assert not alice.message_errors.matching(lambda m: True)

            bob = cs.new(BOB, PW[BOB])
            register_mam(bob)
            await bob.login()
            for n, want in offline.items():
                got = await bob.messages.wait_for(has_share(n), f"offline share {n}")
                assert got["delay"]["stamp"] is not None, "not from offline storage"
                assert_intact(got.xml, want, f"offline share {n}")

            # Online, to a TCP and a WebSocket session (serialised apart).
            bob_ws = await cs.login(BOB + "/ws", PW[BOB], "websocket")
            online = {}
            for n, (to, who) in enumerate(((bob.boundjid.full, bob),
                                           (bob_ws.boundjid.full, bob_ws)), start=3):
                online[n] = send_share(alice, to, n, https if n == 3 else aesgcm)
                got = await who.messages.wait_for(has_share(n), f"online share {n} ({who.kind})")
                assert got["body"] == (https if n == 3 else aesgcm)
                assert_intact(got.xml, online[n], f"online share {n} over {who.kind}")

            # Bob's archive holds all four, each intact.
            res = await bob.plugin["xep_0313"].retrieve(with_jid=ALICE, rsm={"max": 50},
                                                        timeout=STEP)
            archived = {}
            for r in res["mam"]["results"]:
                stanza = r["mam_result"]["forwarded"]["stanza"].xml
                fs = stanza.find(f"{{{SFS}}}file-sharing")
                if fs is not None:
                    archived[fs.get("id")] = stanza
            wants = {**offline, **online}
            assert sorted(archived) == sorted(f"share-{n}" for n in wants), sorted(archived)
            for n, want in wants.items():
                assert_intact(archived[f"share-{n}"], want, f"archived share {n}")
            # Nothing was delivered twice along the way.
            await asyncio.sleep(0.2)
            dups = bob.messages.matching(lambda m: m.xml.find(f"{{{SFS}}}file-sharing")
                                         is not None and m.xml.find("{urn:xmpp:mam:2}result")
                                         is None)
            assert not dups, dups

    run(scenario())
