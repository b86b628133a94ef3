"""OMEMO (XEP-0384) in a group: natter's default room is members-only and
non-anonymous, which is what OMEMO group chats need. Three slixmpp-omemo
clients; carol is offline when alice writes. alice encrypts to every member
from the room's member list (carol is listed though not joined: the
WhatsApp-style member list), bob decrypts at once, carol gets the message at
her bare JID at login (she opted in) and decrypts it once she has rejoined
(the sender's real JID comes from the room's presence). The server's store
holds only ciphertext."""
from __future__ import annotations

import secrets

from slixmpp.jid import JID

from natter_client import STEP, Clients, run
from omemo_support import OLDMEMO, STORAGES, omemo_login
from test_muc import register_nick
from test_omemo import stored_stanzas

SERVICE = "conference.localhost"
ROOM = f"team@{SERVICE}"
USERS = tuple(f"{n}@localhost" for n in ("alice", "bob", "carol"))
ALICE, BOB, CAROL = USERS
PW = {j: j.split("@")[0] + "-group-omemo" for j in USERS}


def test_omemo_in_a_group_with_an_offline_member(server):
    for j in USERS:
        server.add_user(j, PW[j])
    STORAGES.clear()
    text = f"group secret {secrets.token_hex(6)}"

    async def login(cs, jid):
        return await omemo_login(cs, jid, PW[jid], plugins=("xep_0045",))

    async def scenario():
        async with Clients(server) as cs:
            alice, bob, carol = [await login(cs, j) for j in USERS]
            await alice.plugin["xep_0045"].join_muc_wait(ROOM, "alice", maxstanzas=0, timeout=STEP)
            await alice.plugin["xep_0045"].send_affiliation_list(
                ROOM, [(BOB, "member"), (CAROL, "member")], timeout=STEP)
            await bob.plugin["xep_0045"].join_muc_wait(ROOM, "bob", maxstanzas=0, timeout=STEP)
            # carol asks for messages while away, then goes (her keys stay published).
            await register_nick(carol, "carol", offline=True)
            await carol.close()

            members = await alice.plugin["xep_0045"].get_affiliation_list(ROOM, "member",
                                                                           timeout=STEP)
            assert sorted(str(j) for j in members) == [BOB, CAROL], members
            msg = alice.make_message(mto=JID(ROOM), mtype="groupchat")
            msg["body"] = text
            encrypted, errors = await alice.plugin["xep_0384"].encrypt_message(
                msg, {JID(j) for j in members})
            assert encrypted is not None and not errors, errors
            assert text not in str(encrypted)
            encrypted.send()

            got = await bob.messages.wait_for(
                lambda m: m["type"] == "groupchat" and bob.plugin["xep_0384"].is_encrypted(m),
                "the encrypted group message")
            assert str(got["from"]) == f"{ROOM}/alice", got
            plain, device = await bob.plugin["xep_0384"].decrypt_message(got)
            assert plain["body"] == text and device.bare_jid == ALICE

            carol = await login(cs, CAROL)
            got = await carol.messages.wait_for(
                lambda m: carol.plugin["xep_0384"].is_encrypted(m),
                "the group message kept for carol", timeout=2 * STEP)
            assert got["type"] == "groupchat" and str(got["from"]) == f"{ROOM}/alice", got
            await carol.plugin["xep_0045"].join_muc_wait(ROOM, "carol", maxstanzas=0,
                                                         timeout=STEP)
            plain, device = await carol.plugin["xep_0384"].decrypt_message(got)
            assert plain["body"] == text and device.bare_jid == ALICE

    run(scenario(), timeout=180)
    stored = stored_stanzas(server, "room_archive")
    assert any(OLDMEMO in s for s in stored), "the encrypted message was not archived"
    for table in ("room_archive", "offline_messages", "archive"):
        for s in stored_stanzas(server, table):
            assert text not in s, f"plaintext in {table}"
