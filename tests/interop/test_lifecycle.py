"""Server lifecycle seen from real clients: graceful shutdown with sessions open."""
from __future__ import annotations

import asyncio

from natter_client import STEP, Clients, run


def test_graceful_shutdown_with_connected_clients(server):
    server.add_user("zoe@localhost", "zoe-pw")

    async def scenario():
        async with Clients(server) as cs:
            clients = [await cs.login("zoe@localhost", "zoe-pw", t)
                       for t in ("starttls", "directtls", "websocket")]
            rc = await asyncio.to_thread(server.stop)
            assert rc is not None, "natter still running 10 s after SIGTERM with clients connected"
            assert rc == 0, f"natter exited with status {rc} after SIGTERM"
            for c in clients:
                try:
                    await asyncio.wait_for(asyncio.shield(c.gone), STEP)
                except asyncio.TimeoutError:
                    raise AssertionError(f"{c.kind} client was not disconnected by shutdown")
                # RFC 6120 4.9.3.22: the server says why it closes the stream.
                conditions = [e["condition"] for e in c.stream_errors]
                assert conditions == ["system-shutdown"], \
                    f"{c.kind}: stream errors at shutdown {conditions}, want ['system-shutdown']"

    run(scenario())
