"""slixmpp-omemo as a test client uses it: an in-memory OMEMO identity per
account kept across logins (like a real device's), blind trust before
verification, and a login that returns once the keys are on the server.
Shared by the 1:1 and the group OMEMO tests."""
from __future__ import annotations

import asyncio
import sys
from typing import Dict, FrozenSet, Optional

from omemo.storage import Just, Maybe, Nothing, Storage
from omemo.types import DeviceInformation, JSONType
from slixmpp.plugins import register_plugin
from slixmpp_omemo import TrustLevel, XEP_0384

from natter_client import STEP, Clients

OLDMEMO = "eu.siacs.conversations.axolotl"


class MemoryStorage(Storage):
    """python-omemo storage in a dict (one per account, kept across logins)."""

    def __init__(self) -> None:
        super().__init__()
        self.data: Dict[str, JSONType] = {}

    async def _load(self, key: str) -> Maybe[JSONType]:
        return Just(self.data[key]) if key in self.data else Nothing()

    async def _store(self, key: str, value: JSONType) -> None:
        self.data[key] = value

    async def _delete(self, key: str) -> None:
        self.data.pop(key, None)


STORAGES: Dict[str, MemoryStorage] = {}


class XEP_0384Impl(XEP_0384):  # noqa: N801 (slixmpp plugin naming)
    """slixmpp-omemo with blind trust before verification (BTBV) and an
    automatic trust decision: a test has no human to ask."""

    default_config = {"fallback_message": "This message is OMEMO encrypted.", "account": None}

    @property
    def storage(self) -> Storage:
        return STORAGES.setdefault(self.account, MemoryStorage())

    @property
    def _btbv_enabled(self) -> bool:
        return True

    async def _devices_blindly_trusted(self, blindly_trusted: FrozenSet[DeviceInformation],
                                       identifier: Optional[str]) -> None:
        pass

    async def _prompt_manual_trust(self, manually_trusted: FrozenSet[DeviceInformation],
                                   identifier: Optional[str]) -> None:
        session_manager = await self.get_session_manager()
        for device in manually_trusted:
            await session_manager.set_trust(device.bare_jid, device.identity_key,
                                            TrustLevel.TRUSTED.value)


register_plugin(XEP_0384Impl)


async def omemo_login(cs: Clients, jid: str, password: str, plugins: tuple[str, ...] = ()):
    """Log in with slixmpp-omemo loaded; returns once its keys are on the server."""
    c = cs.new(jid, password)
    for p in ("xep_0060", "xep_0115", "xep_0163", "xep_0334", *plugins):
        c.register_plugin(p)
    c.register_plugin("xep_0384", {"account": jid}, module=sys.modules[__name__])
    initialized = asyncio.get_running_loop().create_future()
    c.add_event_handler("omemo_initialized",
                        lambda *_: initialized.done() or initialized.set_result(True))
    await c.login()
    # slixmpp-omemo registers its `+notify` features when the plugin loads,
    # under the JID the client had then (no resource yet), and slixmpp
    # attaches <c/> to presence only once the bound JID's caps are
    # computed: register them for the bound JID and broadcast presence with
    # the caps again, as a client that loads plugins after login would.
    c.plugin["xep_0163"].add_interest([f"{OLDMEMO}.devicelist", "urn:xmpp:omemo:2:devices"],
                                      jid=c.boundjid)
    await c.plugin["xep_0115"].update_caps(jid=c.boundjid, broadcast=True)
    await asyncio.wait_for(initialized, 3 * STEP)
    return c


