"""Shared part of the plugins that keep state: ``auth_lockout``, ``connect_limits``,
``mail_rate_limit`` and ``rcpt_greylist``.

Each holds the store its entry's ``state`` setting names: acquired at start-up,
released at shutdown (once per chain entry), looked up by the other hooks with
``self._stores.require(settings.state)``. A store on a server (Redis) is tried once at
start-up, for at most :data:`gateway.probe.STARTUP_TIMEOUT`: if it does not answer, a
WARNING names the plugin and what its ``on_state_error`` makes of that. ``gateway check
--probe`` tries it the same way (``gateway_probe``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from gateway.context import Gateway
from gateway.hooks import hookimpl
from gateway.policy import Policy
from gateway.probe import Probes, startup_probe
from gateway.state import PluginStores, StateStore, canonical_url
from gateway.state.registry import create_store

__all__ = ["StatePlugin"]


def _is_server(url: str) -> bool:
    return not (url == "sqlite" or url.startswith("sqlite:"))


class StatePlugin:
    """Base of a stateful plugin's ``Plugin`` class; its ``Settings`` has ``state``.

    A subclass that extends a hook overrides it with ``@hookimpl`` and calls ``super()``.
    """

    def __init__(self) -> None:
        self._stores = PluginStores()

    @property
    def _name(self) -> str:
        return type(self).__module__.rpartition(".")[2]

    @hookimpl
    async def gateway_startup(self, gateway: Gateway, settings: Any) -> None:
        store = await self._stores.open(settings.state, Path(gateway.policy.server.var_dir))
        if _is_server(settings.state):
            await startup_probe(
                logging.getLogger(f"plugins.{self._name}"), self._name, "Redis", store.url, store.ping,
                _consequence(getattr(settings, "on_state_error", "continue")),
            )

    @hookimpl
    async def gateway_shutdown(self, settings: Any) -> None:
        await self._stores.close(settings.state)

    @hookimpl
    async def gateway_probe(self, policy: Policy, settings: Any, probes: Probes) -> None:
        if not _is_server(settings.state):
            return
        store: StateStore = create_store(canonical_url(settings.state, Path(policy.server.var_dir)))
        try:
            await probes.add(self._name, "Redis", store.url, store.ping)
        finally:
            await store.close()


def _consequence(on_state_error: str) -> str:
    if on_state_error == "tempfail":
        return 'everything it checks will get a temporary failure, 4xx (on_state_error = "tempfail")'
    return f'its checks will be skipped, mail passes them (on_state_error = "{on_state_error}")'
