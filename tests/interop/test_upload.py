"""XEP-0363 HTTP File Upload with slixmpp's xep_0363 plugin (the
discovery, slot request and PUT a client does) against the real binary:
alice uploads a photo and sends its URL (XEP-0066 OOB), bob downloads the
same bytes with the caching headers a CDN needs; a file over the limit is
refused before any byte is sent."""
from __future__ import annotations

import io
import os

import aiohttp
import pytest
from slixmpp.exceptions import IqError
from slixmpp.plugins.xep_0363 import FileTooBig

from helpers import add_users
from natter_client import STEP, Clients, run

ALICE, BOB = "alice@localhost", "bob@localhost"
PW = {ALICE: "alice-upload", BOB: "bob-upload"}
MAX = 300_000


@pytest.mark.natter_config({"upload": {"max_file_size": MAX}})
def test_upload_share_and_download(server):
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


def test_large_files_and_ranges(server):
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
