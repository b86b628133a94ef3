"""Accounts and authentication, driven by slixmpp against the real natter binary:
XEP-0077 registration and password change, SASL mechanisms, wrong passwords,
TLS enforcement, and the `natter user` CLI."""
from __future__ import annotations

import pytest
from slixmpp.stanza import Iq

from helpers import STREAM_OPEN, plain_auth, raw_exchange
from natter_client import (TLS_TRANSPORTS, TRANSPORTS, Clients, IqError, LoginFailed, run)


def assert_not_authorized(client, outcome: str) -> None:
    assert outcome != "session", f"{client.kind}: login with bad credentials succeeded"
    assert client.auth_failures, (
        f"{client.kind}: no SASL <failure/> received (outcome {outcome!r}, "
        f"stream errors {client.stream_errors})")
    cond = client.auth_failures[0]["condition"]
    assert cond == "not-authorized", f"SASL failure condition {cond!r}, want not-authorized"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_register_two_users_then_login(server, transport):
    users = [(f"reg1-{transport}@localhost", "pw-one-✓"), (f"reg2-{transport}@localhost", "pw-two")]

    async def scenario():
        async with Clients(server) as cs:
            for jid, pw in users:
                c = cs.new(jid, pw, transport, register=True)
                outcome = await c.start()
                assert c.registration_attempted, (
                    "server did not advertise the in-band registration stream feature "
                    "<register xmlns='http://jabber.org/features/iq-register'/>")
                res = c.registration_result
                assert isinstance(res, Iq) and res["type"] == "result", \
                    f"registration of {jid} failed: {res}"
                assert outcome == "session", c.describe_failure(outcome)
                await c.close()

            # Fresh connections with the new accounts; they can talk to each other.
            a = await cs.login(*users[0], transport)
            b = await cs.login(*users[1], transport)
            assert a.boundjid.bare == users[0][0]
            assert b.boundjid.bare == users[1][0]
            a.send_message(mto=b.boundjid.full, mbody="hello new account", mtype="chat")
            got = await b.messages.wait_for(lambda m: m["body"] == "hello new account",
                                            "message between registered users")
            assert got["from"] == a.boundjid

    run(scenario())
    listed = server.cli("user", "list", "localhost").stdout
    for jid, _ in users:
        assert jid in listed, f"`natter user list` does not show {jid}:\n{listed}"


def test_register_existing_user_conflicts(server):
    server.add_user("taken@localhost", "original")

    async def scenario():
        async with Clients(server) as cs:
            c = cs.new("taken@localhost", "hijack", "starttls", register=True)
            await c.start()
            res = c.registration_result
            assert isinstance(res, IqError), f"re-registering an existing user gave {res}"
            assert res.iq["error"]["condition"] == "conflict", res.iq
            await c.close()
            # The original password still works, the attacker's does not.
            await cs.login("taken@localhost", "original")
            bad = cs.new("taken@localhost", "hijack")
            assert_not_authorized(bad, await bad.start())

    run(scenario())


@pytest.mark.natter_config({"registration": {"enabled": False}})
def test_registration_disabled(server):
    async def scenario():
        async with Clients(server) as cs:
            c = cs.new("nope@localhost", "secret", "starttls", register=True)
            outcome = await c.start()
            if c.registration_attempted:
                res = c.registration_result
                assert isinstance(res, IqError), f"registration allowed while disabled: {res}"
            assert outcome != "session", "account was created although registration is disabled"

    run(scenario())
    assert "nope@localhost" not in server.cli("user", "list").stdout


MECH_CASES = [(t, m) for t in TLS_TRANSPORTS for m in ("SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN")] + \
             [("websocket", m) for m in ("SCRAM-SHA-256", "SCRAM-SHA-1")]


@pytest.mark.parametrize("transport,mech", MECH_CASES)
def test_sasl_mechanism(server, transport, mech):
    server.add_user("mech@localhost", "pässwörd ✓ Ω")

    async def scenario():
        async with Clients(server) as cs:
            c = await cs.login("mech@localhost", "pässwörd ✓ Ω", transport, mech=mech)
            assert c.used_mech == mech
            assert c.boundjid.bare == "mech@localhost" and c.boundjid.resource

    run(scenario())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_offered_mechanisms(server, transport):
    server.add_user("offer@localhost", "offer-pw")

    async def scenario():
        async with Clients(server) as cs:
            c = await cs.login("offer@localhost", "offer-pw", transport)
            offered = c.offered_mechs
            assert {"SCRAM-SHA-256", "SCRAM-SHA-1"} <= offered, offered
            if transport in TLS_TRANSPORTS:
                assert "PLAIN" in offered, offered
                assert {"SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS"} <= offered, \
                    f"no channel-binding (-PLUS) mechanisms offered over TLS: {offered}"
            else:
                # ws:// has no TLS, so no channel binding. natter treats WebSocket
                # from loopback as secure (TLS terminated by a local proxy), so
                # PLAIN may be offered here; these tests can only connect from
                # loopback, so the non-loopback case (no PLAIN) is not covered.
                assert not any(m.endswith("-PLUS") for m in offered), \
                    f"-PLUS offered without TLS: {offered}"

    run(scenario())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_wrong_password_fails(server, transport):
    server.add_user("carol@localhost", "right password")

    async def scenario():
        async with Clients(server) as cs:
            c = cs.new("carol@localhost", "wrong password", transport)
            assert_not_authorized(c, await c.start())
            await c.close()
            ghost = cs.new("ghost@localhost", "whatever", transport)
            assert_not_authorized(ghost, await ghost.start())
            await ghost.close()
            ok = await cs.login("carol@localhost", "right password", transport)
            assert ok.boundjid.bare == "carol@localhost"

    run(scenario())


@pytest.mark.parametrize("transport", ["starttls", "websocket"])
def test_password_change_xep0077(server, transport):
    server.add_user("dave@localhost", "old-password")

    async def scenario():
        async with Clients(server) as cs:
            a = await cs.login("dave@localhost", "old-password", transport)
            res = await a.plugin["xep_0077"].change_password("new-pässword", timeout=15)
            assert res["type"] == "result"
            await a.close()
            old = cs.new("dave@localhost", "old-password", transport)
            assert_not_authorized(old, await old.start())
            await old.close()
            new = await cs.login("dave@localhost", "new-pässword", transport)
            assert new.boundjid.bare == "dave@localhost"

    run(scenario())


def test_cli_user_lifecycle(server):
    # Password from stdin when omitted.
    server.cli("user", "add", "erin@localhost", input="from-stdin\n")
    server.add_user("frank@localhost", "frank-pw")
    listed = server.cli("user", "list", "localhost").stdout
    assert "erin@localhost" in listed and "frank@localhost" in listed, listed
    dup = server.cli("user", "add", "erin@localhost", "again", check=False)
    assert dup.returncode != 0, "adding an existing user succeeded"

    async def login_ok(jid, pw):
        async with Clients(server) as cs:
            await cs.login(jid, pw, presence=False)

    async def login_fails(jid, pw):
        async with Clients(server) as cs:
            c = cs.new(jid, pw)
            assert_not_authorized(c, await c.start())

    run(login_ok("erin@localhost", "from-stdin"))
    server.cli("user", "passwd", "erin@localhost", "changed")
    run(login_fails("erin@localhost", "from-stdin"))
    run(login_ok("erin@localhost", "changed"))
    server.cli("user", "del", "frank@localhost")
    assert "frank@localhost" not in server.cli("user", "list").stdout
    run(login_fails("frank@localhost", "frank-pw"))


def test_no_sasl_before_starttls(server):
    """On the STARTTLS port, credentials must not be accepted in the clear."""
    server.add_user("eve@localhost", "eve-password")

    async def scenario():
        features = await raw_exchange(server.host, server.c2s_port, [STREAM_OPEN],
                                      [b"</stream:features>"])
        assert b"urn:ietf:params:xml:ns:xmpp-tls" in features, \
            f"no <starttls/> offered:\n{features!r}"
        replies = await raw_exchange(server.host, server.c2s_port,
                                     [STREAM_OPEN, plain_auth("eve", "eve-password")],
                                     [b"</stream:features>", b"</failure>", b"<failure",
                                      b"</stream:stream>", b"<success"])
        assert b"<success" not in replies, f"SASL PLAIN succeeded without TLS:\n{replies!r}"

    run(scenario())


def test_login_failure_is_reported_not_hung(server):
    """Sanity check of the harness itself: LoginFailed carries the reason."""
    async def scenario():
        async with Clients(server) as cs:
            with pytest.raises(LoginFailed, match="auth_failed|disconnected"):
                await cs.login("nobody@localhost", "x")

    run(scenario())
