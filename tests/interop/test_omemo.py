"""OMEMO (XEP-0384) end to end with a real client library: two
slixmpp-omemo clients exchange encrypted messages through natter, online and
offline, and the server's store never holds the plaintext.

natter's part is PEP (XEP-0163/0223): the clients publish their device
lists and key bundles with publish-options (`pubsub#access_model=open`) and
fetch each other's. Two cases:

* strangers: no roster subscription, so the clients download device lists
  and bundles themselves (the open access model must let them: ejabberd
  #4103, dino #1139);
* contacts with a mutual subscription: slixmpp-omemo then relies on PEP
  notifications alone (`+notify` in its entity capabilities, which natter
  learns by asking the client for its disco#info).

The OMEMO identity of each account lives in an in-memory storage kept across
its logins, like a real device's.
"""
from __future__ import annotations

import asyncio
import secrets
import sqlite3
import subprocess
from pathlib import Path

import pytest
from slixmpp.jid import JID

from helpers import is_presence
from natter_client import STEP, Clients, run
from omemo_support import OLDMEMO, STORAGES, omemo_login

ALICE, BOB = "alice@localhost", "bob@localhost"
PW = {ALICE: "alice-omemo", BOB: "bob-omemo"}


async def befriend(a, b) -> None:
    """Mutual presence subscription, as clients do it."""
    for x, y in ((a, b), (b, a)):
        x.send_presence(pto=y.boundjid.bare, ptype="subscribe")
        await y.presences.wait_for(lambda p: is_presence(p, x.boundjid.bare, "subscribe"),
                                   f"subscribe from {x.boundjid.bare}")
        y.send_presence(pto=x.boundjid.bare, ptype="subscribed")
        await x.presences.wait_for(lambda p: is_presence(p, y.boundjid.bare, "subscribed"),
                                   f"subscribed from {y.boundjid.bare}")


async def known_devices(c, jid: str) -> None:
    """Wait until `c` learned `jid`'s OMEMO devices (from PEP notifications:
    with a mutual subscription slixmpp-omemo downloads nothing itself)."""
    session_manager = await c.plugin["xep_0384"].get_session_manager()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STEP
    while not await session_manager.get_device_information(jid):
        assert loop.time() < deadline, f"{c.boundjid.bare} never got {jid}'s device list"
        await asyncio.sleep(0.05)


async def send_encrypted(sender, to: str, plaintext: str) -> str:
    msg = sender.make_message(mto=JID(to), mtype="chat")
    msg["body"] = plaintext
    encrypted, errors = await sender.plugin["xep_0384"].encrypt_message(msg, JID(to))
    assert encrypted is not None, f"nothing to send (errors: {errors})"
    assert not errors, f"encryption errors: {errors}"
    wire = str(encrypted)
    assert plaintext not in wire, "the stanza on the wire holds the plaintext"
    assert OLDMEMO in wire, wire
    mid = encrypted["id"]
    encrypted.send()
    return mid


async def receive_decrypted(receiver, sender, plaintext: str, what: str) -> None:
    got = await receiver.messages.wait_for(
        lambda m: bool(receiver.plugin["xep_0384"].is_encrypted(m)),
        f"{what}: an OMEMO message", timeout=2 * STEP)
    assert got["from"].bare == JID(sender).bare, got
    assert plaintext not in str(got), f"{what}: plaintext visible in the stanza"
    decrypted, device = await receiver.plugin["xep_0384"].decrypt_message(got)
    assert decrypted["body"] == plaintext, f"{what}: decrypted {decrypted['body']!r}"
    assert device.bare_jid == JID(sender).bare


def stored_stanzas(server, table: str) -> list[str]:
    """Every stanza in `table` of the server's store (SQLite file or PostgreSQL)."""
    if server.pg_database is not None:
        from conftest import pg_database_url
        # Hex, so stanzas with newlines come back one per line.
        res = subprocess.run(
            ["psql", pg_database_url(server.pg_database), "-qAtc",
             f"SELECT encode(convert_to(stanza, 'UTF8'), 'hex') FROM {table}"],  # noqa: S608
            capture_output=True, text=True, timeout=30, check=True)
        return [bytes.fromhex(line).decode() for line in res.stdout.split()]
    db = Path(server.data_dir) / "natter.db"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return [s for (s,) in con.execute(f"SELECT stanza FROM {table}").fetchall()]  # noqa: S608
    finally:
        con.close()


def assert_store_has_no_plaintext(server, plaintexts: list[str]) -> dict[str, int]:
    """No plaintext in the store (with SQLite: also not in the raw main and WAL
    files); returns row counts of the archive/offline tables that hold OMEMO
    payloads."""
    if server.pg_database is None:
        db = Path(server.data_dir) / "natter.db"
        assert db.exists(), f"no store at {db}"
        for f in [db, Path(f"{db}-wal")]:
            if f.exists():
                raw = f.read_bytes()
                for p in plaintexts:
                    assert p.encode() not in raw, f"plaintext {p!r} found in {f.name}"
    counts: dict[str, int] = {}
    for table in ("archive", "offline_messages"):
        rows = stored_stanzas(server, table)
        for stanza in rows:
            for p in plaintexts:
                assert p not in stanza, f"plaintext in {table}: {stanza[:300]}"
        counts[table] = sum(1 for s in rows if OLDMEMO in s)
    return counts


@pytest.mark.parametrize("relation", ["strangers", "contacts"])
def test_omemo_online_and_offline(server, relation):
    server.add_user(ALICE, PW[ALICE])
    server.add_user(BOB, PW[BOB])
    STORAGES.clear()
    tag = secrets.token_hex(6)
    texts = [f"omemo-{relation}-{tag}-{n}" for n in ("hello", "reply", "offline")]

    async def scenario() -> dict[str, int]:
        async with Clients(server) as cs:
            a = await omemo_login(cs, ALICE, PW[ALICE])
            b = await omemo_login(cs, BOB, PW[BOB])
            if relation == "contacts":
                await befriend(a, b)
                await known_devices(a, BOB)
                await known_devices(b, ALICE)
            # Online, both ways.
            await send_encrypted(a, BOB, texts[0])
            await receive_decrypted(b, ALICE, texts[0], "alice -> bob (online)")
            await send_encrypted(b, ALICE, texts[1])
            await receive_decrypted(a, BOB, texts[1], "bob -> alice (online)")

            # Offline: bob logs out, alice writes, bob comes back.
            await b.close()
            await asyncio.sleep(0.2)
            mid = await send_encrypted(a, BOB, texts[2])
            await asyncio.sleep(0.5)
            bounced = a.message_errors.matching(lambda m: m["id"] == mid)
            assert not bounced, (
                "the message to offline bob bounced (offline storage missing?): "
                f"{bounced[0]}")
        async with Clients(server) as cs:
            b = await omemo_login(cs, BOB, PW[BOB])
            await receive_decrypted(b, ALICE, texts[2], "alice -> bob (offline)")
        return assert_store_has_no_plaintext(server, texts)

    counts = run(scenario(), timeout=180)
    # Archived (XEP-0313) in encrypted form: both parties' copies of 3 messages.
    assert counts.get("archive", 0) >= 3, f"encrypted messages not archived: {counts}"
