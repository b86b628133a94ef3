"""slixmpp-based test client for natter.

`Client` is a plain slixmpp ClientXMPP configured for the three c2s transports
natter offers:

* ``starttls``  - TCP to ``listen.c2s`` and STARTTLS (RFC 6120)
* ``directtls`` - TLS from the first byte on ``listen.c2s_tls`` (XEP-0368)
* ``websocket`` - RFC 7395 on ``ws://HOST:HTTP/xmpp-websocket``

slixmpp (1.17) has no WebSocket transport, so `WsTransport` below is a small
shim: an asyncio-transport look-alike over the ``websockets`` package that maps
slixmpp's stream header/footer onto RFC 7395 ``<open/>``/``<close/>`` frames,
sends each stanza as one text frame (adding ``xmlns='jabber:client'`` as
RFC 7395 section 3.3.3 asks), and feeds received frames back into slixmpp's own
XML stream parser. Everything above the framing (SASL SCRAM, bind, roster,
presence, plugins) is slixmpp's own code.

Every wait has a timeout, so a broken server fails a test instead of hanging it.
"""
from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
import struct
from contextlib import suppress
from typing import Any, Callable
from xml.etree import ElementTree as ET
from xml.sax.saxutils import quoteattr

import slixmpp
from slixmpp.exceptions import IqError, IqTimeout  # noqa: F401  (re-exported for tests)

TRANSPORTS = ("starttls", "directtls", "websocket")
TLS_TRANSPORTS = ("starttls", "directtls")

#: Upper bound for one step of a test (a login, one stanza's round trip).
STEP = 15.0

FRAMING_NS = "urn:ietf:params:xml:ns:xmpp-framing"
STREAM_NS = "http://etherx.jabber.org/streams"
XML_NS = "http://www.w3.org/XML/1998/namespace"

log = logging.getLogger("natter.interop")


class LoginFailed(AssertionError):
    pass


class Inbox:
    """Received stanzas/events, waited on with a predicate and a timeout."""

    def __init__(self, name: str):
        self.name = name
        self.items: list[Any] = []
        self._changed = asyncio.Event()

    def put(self, item: Any) -> None:
        self.items.append(item)
        self._changed.set()

    async def wait_for(self, pred: Callable[[Any], bool], what: str,
                       timeout: float = STEP) -> Any:
        """Remove and return the first item matching `pred`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for i, item in enumerate(self.items):
                if pred(item):
                    return self.items.pop(i)
            self._changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                seen = "\n".join("  " + _short(x) for x in self.items[-10:]) or "  (nothing)"
                raise AssertionError(
                    f"{self.name}: timed out after {timeout:.0f}s waiting for {what}; "
                    f"received instead:\n{seen}")
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def matching(self, pred: Callable[[Any], bool]) -> list[Any]:
        return [x for x in self.items if pred(x)]


def _short(x: Any, limit: int = 400) -> str:
    s = str(x)
    return s if len(s) <= limit else s[:limit] + f"... ({len(s)} chars)"


def insecure_tls_context() -> ssl.SSLContext:
    """natter generates a self-signed certificate: skip verification."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Client(slixmpp.ClientXMPP):
    """A slixmpp client bound to one natter test server and one transport."""

    PLUGINS = ("xep_0030", "xep_0004", "xep_0066", "xep_0077", "xep_0199",
               "xep_0297", "xep_0280", "xep_0054")

    def __init__(self, server, jid: str, password: str, transport: str = "starttls",
                 *, mech: str | None = None, register: bool = False):
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {transport!r}")
        plugin_config = {}
        if transport == "websocket":
            # ws:// is plain HTTP on loopback: allow SCRAM (never PLAIN) without TLS.
            plugin_config["feature_mechanisms"] = {"unencrypted_scram": True}
        super().__init__(jid, password, sasl_mech=mech, plugin_config=plugin_config)
        self.natter = server
        self.kind = transport
        for p in self.PLUGINS:
            self.register_plugin(p)

        self.ssl_context = insecure_tls_context()
        self.enable_plaintext = False
        self.enable_starttls = transport == "starttls"
        self.enable_direct_tls = transport == "directtls"
        self.whitespace_keepalive = False
        # The tests answer subscription requests themselves.
        self.auto_authorize = None
        self.auto_subscribe = False

        self.messages = Inbox(f"{jid} messages")
        self.message_errors = Inbox(f"{jid} message errors")
        self.presences = Inbox(f"{jid} presences")
        self.carbons = Inbox(f"{jid} carbons")
        self.auth_failures: list[Any] = []
        self.stream_errors: list[Any] = []
        self.registration_result: Any = None  # Iq result or IqError
        self.registration_attempted = False
        self.roster_error: Exception | None = None
        self.want_register = register
        self._outcome: asyncio.Future = self.loop.create_future()
        self.gone: asyncio.Future = self.loop.create_future()

        self.add_event_handler("session_start", lambda _e: self._settle("session"))
        # XEP-0198 resumption (only with the xep_0198 plugin): see reconnect().
        self.add_event_handler("session_resumed", lambda _e: self._settle("resumed"))
        self.add_event_handler("failed_all_auth", lambda _e: self._settle("auth_failed"))
        self.add_event_handler("failed_auth", self.auth_failures.append)
        self.add_event_handler("stream_error", self.stream_errors.append)
        self.add_event_handler("disconnected", self._on_disconnected)
        self.add_event_handler("message", self._on_message)
        self.add_event_handler("message_error", self.message_errors.put)
        self.add_event_handler("presence", self.presences.put)
        self.add_event_handler("carbon_received", lambda m: self.carbons.put(("received", m)))
        self.add_event_handler("carbon_sent", lambda m: self.carbons.put(("sent", m)))
        if register:
            self.add_event_handler("register", self._on_register)

    # -- events -------------------------------------------------------------
    def _settle(self, outcome: str) -> None:
        if not self._outcome.done():
            self._outcome.set_result(outcome)

    def _on_disconnected(self, _reason: Any) -> None:
        self._settle("disconnected")
        if not self.gone.done():
            self.gone.set_result(True)

    def _on_message(self, msg) -> None:
        # Carbons are reported through self.carbons; keep `messages` for real ones.
        if msg.xml.find("{urn:xmpp:carbons:2}received") is not None or \
                msg.xml.find("{urn:xmpp:carbons:2}sent") is not None:
            return
        self.messages.put(msg)

    async def _on_register(self, _form) -> None:
        """XEP-0077 in-band registration, before SASL (slixmpp feature order 50)."""
        self.registration_attempted = True
        iq = self.Iq()
        iq["type"] = "set"
        iq["register"]["username"] = self.boundjid.user
        iq["register"]["password"] = self.password
        try:
            self.registration_result = await iq.send(timeout=STEP)
        except (IqError, IqTimeout) as exc:
            self.registration_result = exc

    # -- lifecycle ----------------------------------------------------------
    def _address(self) -> tuple[str, int]:
        if self.kind == "starttls":
            return self.natter.host, self.natter.c2s_port
        return self.natter.host, self.natter.c2s_tls_port

    async def start(self, timeout: float = STEP) -> str:
        """Connect and negotiate; returns 'session', 'auth_failed',
        'disconnected' or 'timeout'."""
        host, port = self._address()
        self.connect(host, port)
        try:
            return await asyncio.wait_for(asyncio.shield(self._outcome), timeout)
        except asyncio.TimeoutError:
            return "timeout"

    @property
    def used_mech(self) -> str | None:
        mech = self.plugin["feature_mechanisms"].mech
        return mech.name if mech is not None else None

    @property
    def offered_mechs(self) -> set[str]:
        return set(self.plugin["feature_mechanisms"].mech_list)

    def describe_failure(self, outcome: str) -> str:
        parts = [f"{self.kind} login of {self.requested_jid} ended with {outcome!r}"]
        for f in self.auth_failures:
            parts.append(f"  SASL failure: {_short(f)}")
        for e in self.stream_errors:
            parts.append(f"  stream error: {_short(e)}")
        return "\n".join(parts)

    async def login(self, *, presence: bool = True, roster: bool = True) -> "Client":
        outcome = await self.start()
        if outcome != "session":
            await self.close()
            raise LoginFailed(self.describe_failure(outcome))
        if self.kind in TLS_TRANSPORTS:
            assert isinstance(self.socket, (ssl.SSLObject, ssl.SSLSocket)), \
                f"{self.kind}: session established without TLS"
        if roster:
            # As real clients do; a roster error must not hide other results
            # (test_roster_subscription_and_presence checks the roster).
            try:
                await self.get_roster(timeout=STEP)
            except (IqError, IqTimeout) as exc:
                self.roster_error = exc
                log.warning("%s: roster get failed: %s", self.boundjid, exc)
        if presence:
            self.send_presence()
        return self

    async def fetch_roster(self) -> dict[str, dict]:
        """The whole roster from the server, keyed by bare JID string.

        Not slixmpp's get_roster(): that sends the cached roster version, and
        a server that supports versioning may then answer with an empty result."""
        iq = self.Iq()
        iq["type"] = "get"
        iq.enable("roster")
        res = await iq.send(timeout=STEP)
        return {str(k): v for k, v in res["roster"]["items"].items()}

    async def sync(self) -> None:
        """A ping round trip to the server (XEP-0199): every stanza sent
        before it has been handled, and every stanza the server queued for
        this client before the pong has arrived."""
        res = await self.plugin["xep_0199"].send_ping(self.boundjid.domain, timeout=STEP)
        assert res["type"] == "result", res

    async def cut(self) -> None:
        """Lose the connection the way a network does: no </stream>, no TLS
        close_notify, the TCP connection reset (SO_LINGER 0). Returns once
        slixmpp has noticed; with XEP-0198 enabled its stream state (SM-ID,
        handled count, unacked queue) survives for reconnect(). TCP
        transports (starttls, directtls) only."""
        if self.transport is None:
            raise AssertionError(f"{self.boundjid}: cut() without a connection")
        if self.gone.done():
            self.gone = self.loop.create_future()
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()
        await asyncio.wait_for(asyncio.shield(self.gone), STEP)

    async def reconnect(self, timeout: float = STEP) -> str:
        """Connect again after cut() or a lost server. With XEP-0198 state
        slixmpp sends <resume/>: returns 'resumed', or 'session' when the
        server refused to resume and slixmpp bound a new session instead
        (no initial presence is sent here). Else as start()."""
        self._outcome = self.loop.create_future()
        if self.gone.done():
            self.gone = self.loop.create_future()
        return await self.start(timeout)

    async def close(self) -> None:
        """Close the stream politely, then the connection; never hangs."""
        self.cancel_connection_attempt()
        if self.transport is not None:
            with suppress(Exception):
                await asyncio.wait_for(self.disconnect(wait=2), 5)
        if self.transport is not None:
            with suppress(Exception):
                self.abort()


class WsClient(Client):
    """slixmpp over RFC 7395 WebSocket via `WsTransport`."""

    async def start(self, timeout: float = STEP) -> str:
        self.connect()  # address is ignored by our _connect_loop
        try:
            return await asyncio.wait_for(asyncio.shield(self._outcome), timeout)
        except asyncio.TimeoutError:
            return "timeout"

    async def _connect_loop(self):  # overrides XMLStream._connect_loop
        from websockets.asyncio.client import connect as ws_connect
        try:
            ws = await ws_connect(self.natter.ws_url, subprotocols=["xmpp"],
                                  proxy=None, compression=None, open_timeout=STEP,
                                  close_timeout=2, max_size=4 * 1024 * 1024)
        except Exception as exc:  # noqa: BLE001
            log.error("WebSocket connect to %s failed: %r", self.natter.ws_url, exc)
            self.event("connection_failed", exc)
            self._current_connection_attempt = None
            self._settle("connection_failed")
            return None
        if ws.subprotocol != "xmpp":
            log.error("server did not select the 'xmpp' WebSocket subprotocol: %r",
                      ws.subprotocol)
            self.stream_errors.append(f"WebSocket subprotocol {ws.subprotocol!r}, not 'xmpp'")
            await ws.close()
            self._current_connection_attempt = None
            self._settle("connection_failed")
            return None
        self.connection_made(WsTransport(self, ws))
        return None


_HEADER_ATTR = re.compile(r"""([\w:]+)=(?:'([^']*)'|"([^"]*)")""")
_FIRST_TAG = re.compile(r"\s*<([A-Za-z_][\w.\-]*(?::[A-Za-z_][\w.\-]*)?)")


class WsTransport(asyncio.Transport):
    """Just enough of an asyncio Transport for slixmpp, over one WebSocket."""

    def __init__(self, proto: Client, ws):
        super().__init__()
        self.proto = proto
        self.ws = ws
        self.frames_out: asyncio.Queue = asyncio.Queue()
        self._closing = False
        self._lost = False
        self.sent_frames: list[str] = []
        self.received_frames: list[str] = []
        self._writer = asyncio.ensure_future(self._write_loop())
        self._reader = asyncio.ensure_future(self._read_loop())

    # slixmpp -> server
    def write(self, data: bytes | str) -> None:
        if self._closing:
            return
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        if not text.strip():
            return  # whitespace keepalives do not exist in RFC 7395
        self.frames_out.put_nowait(self.to_frame(text))

    @staticmethod
    def to_frame(text: str) -> str:
        stripped = text.strip()
        if stripped.startswith("<stream:stream"):
            attrs = {m.group(1): (m.group(2) if m.group(2) is not None else m.group(3))
                     for m in _HEADER_ATTR.finditer(stripped)}
            out = [f'<open xmlns="{FRAMING_NS}"']
            for name in ("to", "from", "version", "xml:lang"):
                if name in attrs:
                    out.append(f" {name}={quoteattr(attrs[name])}")
            return "".join(out) + "/>"
        if stripped == "</stream:stream>":
            return f'<close xmlns="{FRAMING_NS}"/>'
        m = _FIRST_TAG.match(stripped)
        if m is None:
            return stripped
        start_tag = stripped[:stripped.find(">") + 1]
        if "xmlns=" not in start_tag and ":" not in m.group(1):
            stripped = stripped[:m.end()] + ' xmlns="jabber:client"' + stripped[m.end():]
        return stripped

    async def _write_loop(self) -> None:
        try:
            while True:
                frame = await self.frames_out.get()
                if frame is None:
                    break
                self.sent_frames.append(frame)
                await self.ws.send(frame)
        except Exception as exc:  # noqa: BLE001
            log.debug("ws write loop ended: %r", exc)
        finally:
            with suppress(Exception):
                await self.ws.close()

    # server -> slixmpp
    async def _read_loop(self) -> None:
        try:
            async for frame in self.ws:
                if isinstance(frame, bytes):
                    raise ValueError("RFC 7395 forbids binary frames; got one")
                self.received_frames.append(frame)
                self.proto.data_received(self.from_frame(frame))
        except Exception as exc:  # noqa: BLE001
            log.debug("ws read loop ended: %r", exc)
        finally:
            self._connection_lost()

    @staticmethod
    def from_frame(frame: str) -> str:
        stripped = frame.strip()
        if stripped.startswith("<open") or stripped.startswith("<close"):
            el = ET.fromstring(stripped)
            if el.tag == f"{{{FRAMING_NS}}}close":
                return "</stream:stream>"
            if el.tag == f"{{{FRAMING_NS}}}open":
                header = [f"<stream:stream xmlns='jabber:client' xmlns:stream='{STREAM_NS}'"]
                for key, value in el.attrib.items():
                    name = key.replace(f"{{{XML_NS}}}", "xml:")
                    header.append(f" {name}={quoteattr(value)}")
                return "".join(header) + ">"
        return frame

    def _connection_lost(self) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self.frames_out.put_nowait(None)
        self.proto.connection_lost(None)

    # asyncio.Transport API used by slixmpp
    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self.frames_out.put_nowait(None)  # flush queued frames, then close

    def abort(self) -> None:
        self.close()

    def is_closing(self) -> bool:
        return self._closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return default
        transport = getattr(self.ws, "transport", None)
        if transport is None:
            return default
        return transport.get_extra_info(name, default)


def make_client(server, jid: str, password: str, transport: str = "starttls",
                **kwargs) -> Client:
    cls = WsClient if transport == "websocket" else Client
    return cls(server, jid, password, transport, **kwargs)


class Clients:
    """Async context manager: creates clients, closes all of them on exit."""

    def __init__(self, server):
        self.server = server
        self.all: list[Client] = []

    def new(self, jid: str, password: str, transport: str = "starttls", **kwargs) -> Client:
        c = make_client(self.server, jid, password, transport, **kwargs)
        self.all.append(c)
        return c

    async def login(self, jid: str, password: str, transport: str = "starttls", *,
                    presence: bool = True, **kwargs) -> Client:
        c = self.new(jid, password, transport, **kwargs)
        return await c.login(presence=presence)

    async def __aenter__(self) -> "Clients":
        return self

    async def __aexit__(self, *exc) -> None:
        await asyncio.gather(*(c.close() for c in self.all), return_exceptions=True)


def run(coro, timeout: float = 90.0):
    """Run one test scenario on a fresh event loop with an overall timeout."""
    async def guarded():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(guarded())
