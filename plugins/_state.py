"""Shared part of the plugins that keep state: ``auth_lockout``, ``connect_limits``,
``mail_rate_limit`` and ``rcpt_greylist``.

Each holds the store its entry's ``state`` setting names: acquired at start-up,
released at shutdown (once per chain entry), looked up by the other hooks with
``self._stores.require(settings.state)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.context import Gateway
from gateway.hooks import hookimpl
from gateway.state import PluginStores

__all__ = ["StatePlugin"]


class StatePlugin:
    """Base of a stateful plugin's ``Plugin`` class; its ``Settings`` has ``state``.

    A subclass that extends a hook overrides it with ``@hookimpl`` and calls ``super()``.
    """

    def __init__(self) -> None:
        self._stores = PluginStores()

    @hookimpl
    async def gateway_startup(self, gateway: Gateway, settings: Any) -> None:
        await self._stores.open(settings.state, Path(gateway.policy.server.var_dir))

    @hookimpl
    async def gateway_shutdown(self, settings: Any) -> None:
        await self._stores.close(settings.state)
