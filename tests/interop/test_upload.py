"""XEP-0363 HTTP File Upload with slixmpp's xep_0363 plugin (the
discovery, slot request and PUT a client does) against the real binary:
alice uploads a photo and sends its URL (XEP-0066 OOB), bob downloads the
same bytes with the caching headers a CDN needs; a file over the limit is
refused before any byte is sent; forged, resized, borrowed and expired
slots are refused; the same bytes are stored once; a retraction frees
what only it used. Every test runs on the disk and on S3 (moto)."""
from __future__ import annotations

import asyncio
import io
import os
import xml.etree.ElementTree as ET

import aiohttp
import pytest
from slixmpp.exceptions import IqError
from slixmpp.plugins.xep_0363 import FileTooBig

from conftest import stored_blobs
from helpers import add_users
from natter_client import STEP, Clients, run

ALICE, BOB = "alice@localhost", "bob@localhost"
PW = {ALICE: "alice-upload", BOB: "bob-upload"}
MAX = 300_000


@pytest.mark.natter_config({"upload": {"max_file_size": MAX}})
def test_upload_share_and_download(server, blob_storage):
    add_users(server, PW, ALICE, BOB)
    photo = os.urandom(200_000)

    async def scenario():
        async with Clients(server) as cs:
            alice = await cs.login(ALICE, PW[ALICE])
            bob = await cs.login(BOB, PW[BOB], "websocket")
            for c in (alice, bob):
                c.register_plugin("xep_0363")
                c.register_plugin("xep_0066")
            url = await alice.plugin["xep_0363"].upload_file(
                "holiday.jpg", size=len(photo), content_type="image/jpeg",
                input_file=io.BytesIO(photo), timeout=STEP)
            assert url.startswith("http://localhost:"), url
            assert alice.plugin["xep_0363"].max_file_size == MAX
            msg = alice.make_message(mto=BOB, mbody=url, mtype="chat")
            msg["oob"]["url"] = url
            msg.send()
            got = await bob.messages.wait_for(lambda m: m["oob"]["url"] == url, "the link")
            async with aiohttp.ClientSession() as http:
                async with http.get(got["oob"]["url"]) as resp:
                    assert resp.status == 200
                    assert await resp.read() == photo
                    assert resp.headers["Content-Type"] == "image/jpeg"
                    assert "immutable" in resp.headers["Cache-Control"]
                    assert resp.headers["X-Content-Type-Options"] == "nosniff"
                    etag = resp.headers["ETag"]
                async with http.get(url, headers={"If-None-Match": etag}) as resp:
                    assert resp.status == 304
            # Over the advertised limit: refused by the client from disco, and
            # by the server when asked anyway.
            with pytest.raises(FileTooBig):
                await alice.plugin["xep_0363"].upload_file(
                    "big.bin", size=MAX + 1, input_file=io.BytesIO(b"x" * (MAX + 1)),
                    timeout=STEP)
            alice.plugin["xep_0363"].max_file_size = float("+inf")
            with pytest.raises(IqError) as err:
                await alice.plugin["xep_0363"].request_slot(
                    alice.plugin["xep_0363"].upload_service, "big.bin", MAX + 1,
                    "application/octet-stream", timeout=STEP)
            assert err.value.condition == "not-acceptable", err.value
            too_large = err.value.iq.xml.find(
                "{jabber:client}error/{urn:xmpp:http:upload:0}file-too-large/"
                "{urn:xmpp:http:upload:0}max-file-size")
            assert too_large is not None and too_large.text == str(MAX), err.value.iq

    run(scenario())


def test_large_files_and_ranges(server, blob_storage):
    """1 MB and 50 MB uploads come back byte-identical, whole and in ranges."""
    add_users(server, PW, ALICE)

    async def scenario():
        async with Clients(server) as cs:
            alice = await cs.login(ALICE, PW[ALICE])
            alice.register_plugin("xep_0363")
            for size in (1_000_000, 50_000_000):
                data = os.urandom(size)
                url = await alice.plugin["xep_0363"].upload_file(
                    f"file-{size}.bin", size=size, content_type="application/octet-stream",
                    input_file=io.BytesIO(data), timeout=6 * STEP)
                async with aiohttp.ClientSession() as http:
                    async with http.get(url) as resp:
                        assert resp.status == 200
                        assert await resp.read() == data
                        assert resp.headers["Content-Disposition"].startswith("attachment")
                    start, end = size // 3, size // 3 + 65_535
                    async with http.get(url, headers={"Range": f"bytes={start}-{end}"}) as resp:
                        assert resp.status == 206
                        assert await resp.read() == data[start:end + 1]

    run(scenario(), timeout=180)


async def put(http, url: str, data: bytes, headers: dict) -> int:
    async with http.put(url, data=data, headers=headers) as resp:
        return resp.status


async def slot(client, name: str, data: bytes, content_type: str = "application/octet-stream"):
    """A slot as slixmpp requests it: (URL, PUT headers)."""
    iq = await client.plugin["xep_0363"].request_slot(
        "upload.localhost", name, len(data), content_type, timeout=STEP)
    s = iq["http_upload_slot"]
    headers = {h["name"]: h["value"] for h in s["put"]["headers"]}
    headers["Content-Type"] = content_type
    return s["put"]["url"], headers


@pytest.mark.natter_config({"upload": {"slot_ttl_secs": 3}})
def test_forged_resized_borrowed_and_expired_slots_are_refused(server, blob_storage):
    add_users(server, PW, ALICE, BOB)
    data = os.urandom(10_000)

    async def scenario():
        async with Clients(server) as cs:
            alice = await cs.login(ALICE, PW[ALICE])
            bob = await cs.login(BOB, PW[BOB])
            for c in (alice, bob):
                c.register_plugin("xep_0363")
            async with aiohttp.ClientSession() as http:
                url, headers = await slot(alice, "a.bin", data)
                # Wrong signature.
                forged = dict(headers, Authorization=headers["Authorization"][:-2] + "00")
                assert await put(http, url, data, forged) == 403
                # Wrong size, either way.
                assert await put(http, url, data + b"x", headers) == 413
                assert await put(http, url, data[:-1], headers) == 400
                # Wrong user: bob's genuine grant on alice's slot.
                bob_url, bob_headers = await slot(bob, "a.bin", data)
                assert await put(http, url, data, bob_headers) == 403
                # Nothing stored so far; the genuine PUT works.
                assert stored_blobs(server) == []
                assert await put(http, url, data, headers) == 201
                async with http.get(url) as resp:
                    assert resp.status == 200 and await resp.read() == data
                # Expired: bob's slot outlived its 3 s.
                await asyncio.sleep(3.5)
                async with http.put(bob_url, data=data, headers=bob_headers) as resp:
                    assert resp.status == 403
                    assert "expired" in await resp.text()
                assert len(stored_blobs(server)) == 1

    run(scenario(), timeout=60)


def test_same_bytes_stored_once_and_retraction_frees_files(server, blob_storage):
    add_users(server, PW, ALICE, BOB)
    shared, own = os.urandom(30_000), os.urandom(20_000)

    async def scenario():
        async with Clients(server) as cs:
            alice = await cs.login(ALICE, PW[ALICE])
            bob = await cs.login(BOB, PW[BOB])
            for c in (alice, bob):
                c.register_plugin("xep_0363")
            up = lambda c, name, data: c.plugin["xep_0363"].upload_file(  # noqa: E731
                name, size=len(data), content_type="image/png",
                input_file=io.BytesIO(data), timeout=STEP)
            alice_shared = await up(alice, "meme.png", shared)
            bob_shared = await up(bob, "meme.png", shared)
            alice_own = await up(alice, "mine.png", own)
            assert alice_shared != bob_shared
            # Two users, the same bytes: one blob.
            assert len(stored_blobs(server)) == 2
            msg = alice.make_message(mto=bob.boundjid, mbody=f"{alice_shared} {alice_own}",
                                     mtype="chat")
            msg["id"] = "with-files"
            msg.send()
            await bob.messages.wait_for(lambda m: m["id"] == "with-files", "the message")
            # XEP-0424: alice retracts it.
            retraction = alice.make_message(mto=bob.boundjid, mtype="chat",
                                            mbody="/me retracted a message")
            retraction.append(ET.fromstring(
                "<retract xmlns='urn:xmpp:message-retract:1' id='with-files'/>"))
            retraction.send()
            await bob.messages.wait_for(
                lambda m: m.xml.find("{urn:xmpp:message-retract:1}retract") is not None,
                "the retraction")
            async with aiohttp.ClientSession() as http:
                for url, status in ((alice_own, 404), (alice_shared, 404), (bob_shared, 200)):
                    async with http.get(url) as resp:
                        assert resp.status == status, (url, resp.status)
                async with http.get(bob_shared) as resp:
                    assert await resp.read() == shared
            # Freed what nothing else used; kept what bob's upload shares.
            assert len(stored_blobs(server)) == 1

    run(scenario(), timeout=60)
