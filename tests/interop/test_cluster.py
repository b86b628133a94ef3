"""natter as a cluster (issue 14) with slixmpp: three `natter serve`
processes on one PostgreSQL database and a real NATS JetStream server
(NATTER_TEST_NATS_URL, default nats://127.0.0.1:4222), Debian's HAProxy in
front of them round-robin (so consecutive logins land on different nodes).
Clients on different nodes: presence subscriptions, 1:1 chat with carbons
to the sender's other device on another node, MAM on the shared archive,
offline delivery, and a group whose members sit on all three nodes."""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time

import pytest

from conftest import NatterServer, _psql, free_ports, pg_database_url
from helpers import add_users, register_mam, subscribe
from natter_client import STEP, Clients, run

NATS_URL = os.environ.get("NATTER_TEST_NATS_URL", "nats://127.0.0.1:4222")
ALICE, BOB, CAROL = "alice@localhost", "bob@localhost", "carol@localhost"
PW = {ALICE: "alice-cl", BOB: "bob-cl", CAROL: "carol-cl"}
ROOM = "crew@conference.localhost"


class Balanced:
    """What the clients see: HAProxy's ports, the accounts of node 0."""
    host = "127.0.0.1"
    domain = "localhost"

    def __init__(self, nodes: list[NatterServer], c2s: int, c2s_tls: int, http: int):
        self.nodes = nodes
        self.c2s_port, self.c2s_tls_port, self.http_port = c2s, c2s_tls, http

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.http_port}/xmpp-websocket"

    def add_user(self, jid: str, password: str) -> None:
        self.nodes[0].add_user(jid, password)


def wait_listening(port: int, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{what} did not listen on {port}", pytrace=False)
            time.sleep(0.05)


@pytest.fixture
def cluster(tmp_path):
    if shutil.which("haproxy") is None and not os.path.exists("/usr/sbin/haproxy"):
        pytest.fail("the cluster tests need HAProxy (apt-get install haproxy)", pytrace=False)
    db = f"natter_test_{secrets.token_hex(8)}"
    _psql(f'CREATE DATABASE "{db}"')
    name = f"it{secrets.token_hex(6)}"
    nodes: list[NatterServer] = []
    lb = None
    try:
        for i in range(3):
            d = tmp_path / f"node{i}"
            d.mkdir()
            n = NatterServer(d, {
                "listen": {"s2s": "", "s2s_tls": ""},
                "store": {"backend": "postgres", "url": pg_database_url(db)},
                "cluster": {"enabled": True, "nats_url": NATS_URL, "name": name,
                            "node_name": f"n{i}", "lease_secs": 3},
            })
            n.start()
            nodes.append(n)
        front = free_ports(3)
        cfg = ["global", "  maxconn 1000", "defaults", "  mode tcp", "  timeout connect 1s",
               "  timeout client 120s", "  timeout server 120s"]
        for port, what in zip(front, ("c2s", "c2s_tls", "http")):
            cfg += [f"frontend f_{what}", f"  bind 127.0.0.1:{port}", f"  default_backend b_{what}",
                    f"backend b_{what}", "  balance roundrobin"]
            cfg += [f"  server n{i} 127.0.0.1:{n.ports[what]} check inter 200ms"
                    for i, n in enumerate(nodes)]
        path = tmp_path / "haproxy.cfg"
        path.write_text("\n".join(cfg) + "\n")
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        lb = subprocess.Popen([haproxy, "-db", "-f", str(path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for port in front:
            wait_listening(port, lb, "haproxy")
        time.sleep(1.0)  # every node has heard of the others
        yield Balanced(nodes, *front)
        for n in nodes:
            rc = n.stop()
            assert rc == 0, f"node {n.workdir.name} did not stop cleanly ({rc})\n{n.log_tail()}"
    finally:
        if lb is not None:
            lb.terminate()
            lb.wait(10)
        for n in nodes:
            n.kill()
        _psql(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def test_clients_on_three_nodes_chat_with_carbons_mam_offline_and_groups(cluster):
    add_users(cluster, PW, ALICE, BOB, CAROL)

    async def scenario():
        async with Clients(cluster) as cs:
            # Round-robin: the phone on n0, the laptop on n1, bob on n2.
            phone = await cs.login(ALICE + "/phone", PW[ALICE])
            laptop = await cs.login(ALICE + "/laptop", PW[ALICE])
            bob = await cs.login(BOB, PW[BOB])
            # Three nodes, one client each (`natter admin sessions` per node).
            where = {}
            for n in cluster.nodes:
                out = n.cli("admin", "sessions").stdout
                for c in (phone, laptop, bob):
                    if str(c.boundjid) in out:
                        where[str(c.boundjid)] = n.workdir.name
            assert len(set(where.values())) == 3, f"clients not spread over the nodes: {where}"
            await subscribe(phone, bob)
            await subscribe(bob, phone)
            for c in (phone, laptop):
                res = await c.plugin["xep_0280"].enable(timeout=STEP)
                assert res["type"] == "result"

            # 1:1 across nodes; the sent carbon reaches the laptop on a
            # third node.
            phone.send_message(mto=BOB, mbody="hello across nodes", mtype="chat")
            got = await bob.messages.wait_for(lambda m: m["body"] == "hello across nodes",
                                              "phone's message at bob")
            assert got["from"] == phone.boundjid, got
            await laptop.carbons.wait_for(
                lambda c: c[0] == "sent" and c[1]["carbon_sent"]["body"] == "hello across nodes",
                "sent carbon on the laptop")
            # bob's reply to the bare JID reaches both devices.
            bob.send_message(mto=ALICE, mbody="hi, both of you", mtype="chat")
            for c in (phone, laptop):
                await c.messages.wait_for(lambda m: m["body"] == "hi, both of you",
                                          f"bob's reply at {c.boundjid}")

            # The archive is shared: bob's node answers for what n0 stored.
            register_mam(bob)
            res = await bob.plugin["xep_0313"].retrieve(with_jid=ALICE, rsm={"max": 10},
                                                        timeout=STEP)
            bodies = [r["mam_result"]["forwarded"]["stanza"]["body"]
                      for r in res["mam"]["results"]]
            assert bodies == ["hello across nodes", "hi, both of you"], bodies

            # Offline on one node, delivered on another.
            await bob.close()
            await phone.presences.wait_for(
                lambda p: p["from"].bare == BOB and p["type"] == "unavailable", "bob left")
            phone.send_message(mto=BOB, mbody="while you were away", mtype="chat")
            await phone.sync()
            bob2 = await cs.login(BOB + "/again", PW[BOB])
            await bob2.messages.wait_for(lambda m: m["body"] == "while you were away",
                                         "offline message at bob's next login")

            # A group with members on different nodes.
            carol = await cs.login(CAROL, PW[CAROL])
            for c in (phone, bob2, carol):
                c.register_plugin("xep_0045")
            me, _, _, _ = await phone.plugin["xep_0045"].join_muc_wait(ROOM, "alice",
                                                                        maxstanzas=0, timeout=STEP)
            assert 201 in me["muc"]["status_codes"], me
            await phone.plugin["xep_0045"].send_affiliation_list(
                ROOM, [(BOB, "member"), (CAROL, "member")], timeout=STEP)
            for c, nick in ((bob2, "bob"), (carol, "carol")):
                await c.plugin["xep_0045"].join_muc_wait(ROOM, nick, maxstanzas=0, timeout=STEP)
            carol.send_message(mto=ROOM, mbody="group hello", mtype="groupchat")
            for c in (phone, bob2, carol):
                got = await c.messages.wait_for(
                    lambda m: m["type"] == "groupchat" and m["body"] == "group hello",
                    f"group message at {c.boundjid}")
                assert str(got["from"]) == f"{ROOM}/carol", got

    run(scenario())
