"""Concurrent connections per client address and per client network, across nodes.

Hooks: ``gateway_startup``, ``gateway_connect``, ``gateway_disconnect``,
``gateway_shutdown``. The core's ``[limits] max_connections_per_ip`` counts the
sessions of one listener in one process; this plugin counts in the shared state store
named by ``state``, so the limit holds for a cluster of gateway nodes, and it also
limits whole networks (a botnet's neighbours, a /64 that rotates addresses).

At connect it adds one to the client's address counter and to its network counter (the
/``ipv4_prefix`` or /``ipv6_prefix`` around it). If either is now above
``connections_per_ip`` or ``connections_per_network`` (0: no limit) it takes the counts
back and answers ``421 4.7.0 Too many connections from your network, rate limit
exceeded, try again later`` instead of the greeting (421 because RFC 5321 §3.1 only
allows 220 or a refusal there, and this refusal is temporary). ``gateway_disconnect``,
which always runs, takes the counts back for an admitted session.

A node that crashes never takes its counts back, so every counter expires
``connection_ttl`` after it was created (then counting starts again from zero; a session
still open at that moment is undercounted, never overcounted for long). Keep
``connection_ttl`` above ``[limits] session_timeout``.

Clients in ``exempt_networks`` (loopback by default) and relay clients (``[relay]
clients``, while ``exempt_relay_clients``) are not counted, as Postfix exempts its own
networks from its connection limits: local submitters and content filters open many
sessions on purpose. If the store fails, ``on_state_error`` decides: ``"continue"`` (default: greet the client; the core's own
per-listener limit still applies) or ``"tempfail"`` (421 4.3.0).
Adds no headers or results.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from ipaddress import ip_network
from typing import Literal

from gateway.context import Gateway
from gateway.hooks import hookimpl
from gateway.model import Session, StashKey
from gateway.policy import Duration, IPNetwork, setting
from gateway.state import StateStore, StateUnavailable, check_url
from gateway.state.keys import client_network, in_networks
from gateway.verdicts import Reply, Verdict
from plugins._state import StatePlugin

__all__ = ["COUNTED", "REPLY_TOO_MANY", "Plugin", "Settings", "connection_keys"]

log = logging.getLogger("plugins.connect_limits")

REPLY_TOO_MANY = Reply(
    421, "4.7.0", "Too many connections from your network, rate limit exceeded, try again later"
)
REPLY_STATE_DOWN = Reply(421, "4.3.0", "Temporary local problem, please try again later")

#: The counters this session holds, with the store they live in, for the disconnect.
COUNTED = StashKey[list[tuple[StateStore, str, float]]]("connect_limits.counted")


@dataclass(frozen=True)
class Settings:
    """Settings of ``connect_limits``."""

    state: str = setting("sqlite", 'state store: "sqlite" (embedded) or "redis://host:port/db"')
    connections_per_ip: int = setting(20, "concurrent sessions per client address (0: no limit)", min=0)
    connections_per_network: int = setting(100, "concurrent sessions per client network (0: no limit)", min=0)
    ipv4_prefix: int = setting(24, "IPv4 network prefix length for connections_per_network", min=8, max=32)
    ipv6_prefix: int = setting(64, "IPv6 network prefix length for connections_per_network", min=16, max=128)
    connection_ttl: Duration = setting(3600.0, "counters expire this long after creation (crashed nodes)", min=1)
    exempt_networks: tuple[IPNetwork, ...] = setting(
        (ip_network("127.0.0.0/8"), ip_network("::1/128")), "clients not counted (default: loopback)"
    )
    exempt_relay_clients: bool = setting(True, "[relay] clients are not counted either")
    on_state_error: Literal["continue", "tempfail"] = setting(
        "continue", "state store down: greet the client, or answer 421 4.3.0"
    )

    def __post_init__(self) -> None:
        check_url(self.state)


def connection_keys(client_ip: str, settings: Settings) -> list[tuple[str, int]]:
    """The counters a connection from ``client_ip`` adds to, with their limits.

    :param client_ip: the client's address
    :param settings: limits and prefix lengths; a limit of 0 adds no counter
    """
    keys = []
    if settings.connections_per_ip:
        keys.append((f"conn:ip:{client_ip}", settings.connections_per_ip))
    if settings.connections_per_network:
        network = client_network(client_ip, settings.ipv4_prefix, settings.ipv6_prefix)
        keys.append((f"conn:net:{network}", settings.connections_per_network))
    return keys


async def _take_back(store: StateStore, key: str, ttl: float) -> None:
    """Subtract one; a counter that expired meanwhile went negative, so lift it to 0."""
    value = await store.incr(key, -1, ttl)
    if value < 0:
        await store.incr(key, -value, ttl)


class Plugin(StatePlugin):
    """Holds the state store."""

    @hookimpl
    async def gateway_startup(self, gateway: Gateway, settings: Settings) -> None:
        await super().gateway_startup(gateway, settings)
        if not (settings.connections_per_ip or settings.connections_per_network):
            log.warning("connect_limits: both limits are 0, nothing is limited")

    @hookimpl
    async def gateway_connect(self, session: Session, settings: Settings) -> Verdict | None:
        if session.is_relay_client and settings.exempt_relay_clients:
            return None
        if in_networks(session.peer_ip, settings.exempt_networks):
            return None
        counted = session.stash.get(COUNTED)
        if counted is None:
            counted = []
            session.stash[COUNTED] = counted
        ttl = settings.connection_ttl
        try:
            store = self._stores.require(settings.state)
            for key, limit in connection_keys(session.peer_ip, settings):
                value = await store.incr(key, 1, ttl)
                counted.append((store, key, ttl))
                if value > limit:
                    await self._release(session)
                    return Verdict.tempfail(REPLY_TOO_MANY, reason=f"{key} has {value} sessions, limit {limit}")
        except StateUnavailable as exc:
            if settings.on_state_error == "tempfail":
                return Verdict.tempfail(REPLY_STATE_DOWN, reason=f"connection limits unavailable: {exc}")
            log.warning("connection limits not checked, state unavailable: %s", exc)
        return None

    @hookimpl
    async def gateway_disconnect(self, session: Session) -> None:
        await self._release(session)

    @staticmethod
    async def _release(session: Session) -> None:
        """Take back every count this session holds (each at most once)."""
        counted = session.stash.get(COUNTED) or []
        while counted:
            store, key, ttl = counted.pop()
            try:
                # The store object, not this instance's lookup: after a policy reload
                # the old plugin instance has let go of it, the session has not.
                await _take_back(store, key, ttl)
            except StateUnavailable as exc:
                log.warning("could not take back %s (it expires by itself): %s", key, exc)
