"""Shared test data and assertions for the interop tests."""
from __future__ import annotations

import asyncio
import base64
import inspect

from natter_client import STEP, IqError

# Emoji (incl. ZWJ sequences, flags, skin tones), RTL (Hebrew, Arabic), CJK,
# combining marks, an astral-plane symbol and the XML special characters.
UNICODE_TEXT = (
    "emoji 😀 👩‍👩‍👧‍👦 🏳️‍🌈 👍🏽 🇯🇵 | "
    "RTL: שלום עולם — مرحبا بالعالم | "
    "CJK: 你好，世界 こんにちは 안녕하세요 | "
    "combining: e\u0301 n\u0303 | astral: 𝄞 𐍈 | xml: <a href=\"x\">&amp;</a> '\"&<>"
)


def body_of_bytes(n: int) -> str:
    """A body whose UTF-8 encoding is exactly `n` bytes, mostly non-ASCII."""
    unit = UNICODE_TEXT + "\n"
    out, size = [], 0
    while True:
        for ch in unit:
            b = len(ch.encode("utf-8"))
            if size + b > n:
                pad = n - size
                out.append("x" * pad)
                return "".join(out)
            out.append(ch)
            size += b


BIG_BODY = body_of_bytes(64 * 1024)
assert len(BIG_BODY.encode("utf-8")) == 64 * 1024


def assert_same_text(got: str | None, want: str, what: str = "body") -> None:
    if got == want:
        return
    if got is None:
        raise AssertionError(f"{what}: missing (expected {len(want)} chars)")
    i = next((k for k, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
    raise AssertionError(
        f"{what} differs: got {len(got)} chars / {len(got.encode())} bytes, want "
        f"{len(want)} chars / {len(want.encode())} bytes; first difference at char {i}: "
        f"got {got[i:i + 40]!r}, want {want[i:i + 40]!r}")


def is_presence(p, frm, ptype: str = "available") -> bool:
    """`frm` is a full JID (exact match) or a bare one (matches any resource)."""
    frm = str(frm)
    pfrom = p["from"]
    same = str(pfrom) == frm if "/" in frm else pfrom.bare == frm
    # slixmpp reports <show/> as the type of an available presence.
    ptype_got = p["type"]
    if ptype == "available":
        return same and ptype_got in ("available", "away", "chat", "dnd", "xa")
    return same and ptype_got == ptype


async def raw_exchange(host: str, port: int, chunks: list[bytes], until: list[bytes],
                       timeout: float = 5.0) -> bytes:
    """Send raw bytes on plain TCP and read until one of `until` markers, EOF
    or timeout; returns everything read."""
    reader, writer = await asyncio.open_connection(host, port)
    buf = b""
    try:
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            start = len(buf)
            while not any(m in buf[start:] for m in until):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    data = await asyncio.wait_for(reader.read(65536), remaining)
                except asyncio.TimeoutError:
                    break
                if not data:
                    return buf
                buf += data
    finally:
        writer.close()
    return buf


def plain_auth(user: str, password: str) -> bytes:
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    return (f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{token}</auth>"
            ).encode()


STREAM_OPEN = (b"<?xml version='1.0'?><stream:stream to='localhost' xmlns='jabber:client' "
               b"xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>")

__all__ = ["UNICODE_TEXT", "BIG_BODY", "STEP", "assert_same_text", "is_presence",
           "raw_exchange", "plain_auth", "STREAM_OPEN"]


def add_users(server, passwords: dict[str, str], *jids: str) -> None:
    """Create accounts with the `natter user` CLI."""
    for j in jids:
        server.add_user(j, passwords[j])


async def subscribe(x, y) -> None:
    """x subscribes to y's presence and y approves; returns once x has seen
    y's available presence."""
    x.send_presence(pto=y.boundjid.bare, ptype="subscribe")
    await y.presences.wait_for(lambda p: is_presence(p, x.boundjid.bare, "subscribe"),
                               f"subscribe from {x.boundjid.bare}")
    y.send_presence(pto=x.boundjid.bare, ptype="subscribed")
    await x.presences.wait_for(lambda p: is_presence(p, y.boundjid.full),
                               f"available presence of {y.boundjid.full}")


def register_mam(client) -> None:
    """The plugins a MAM query needs (XEP-0313 with RSM, forms, delay, stanza-id)."""
    for p in ("xep_0059", "xep_0050", "xep_0313", "xep_0203", "xep_0359"):
        client.register_plugin(p)


async def poll(probe, done, what: str, timeout: float = STEP, every: float = 0.01) -> list:
    """Call `probe()` (a plain function, or one returning an awaitable) until
    `done(value)` holds for what it returns, at most `timeout` seconds;
    returns every value seen, in order. For state no inbox reports."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    seen = []
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        seen.append(value)
        if done(value):
            return seen
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; "
                                 f"last values: {seen[-5:]}")
        await asyncio.sleep(every)


async def refused(request, condition: str, what: str):
    """Await an IQ request (slixmpp future or coroutine) that must fail with
    the stanza error `condition`; returns the error IQ."""
    try:
        res = await request
    except IqError as exc:
        assert exc.iq["error"]["condition"] == condition, f"{what}: {exc.iq}"
        return exc.iq
    raise AssertionError(f"{what}: expected a {condition} error, got {res}")
