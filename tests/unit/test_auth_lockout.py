"""plugins/auth_lockout.py: counting and locking against the embedded state store."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from types import SimpleNamespace

from gateway.model import Session
from gateway.verdicts import Action
from plugins.auth_lockout import REPLY_LOCKED, Plugin, Settings, failure_keys


def session(ip: str = "192.0.2.1") -> Session:
    return Session(peer_ip=ip, peer_port=1, listener="submission")


def test_failure_keys() -> None:
    settings = Settings(max_failures_per_ip=4, max_failures_per_login=2)
    keys = failure_keys(session(), "Alice", settings)
    assert [(k.split(":")[1], limit) for k, _, limit in keys] == [("ip", 4), ("login", 2)]
    assert keys[1] == failure_keys(session(), "alice", settings)[1]  # case-folded
    assert "Alice" not in keys[1][0] and "alice" not in keys[1][0]  # digested
    assert len(failure_keys(session(), "x", Settings(max_failures_per_ip=0))) == 1
    exempt = Settings(exempt_networks=(ipaddress.ip_network("192.0.2.0/24"),))
    assert failure_keys(session(), "alice", exempt) == []


def test_locks_after_the_limit_then_refuses_even_before_the_backend(tmp_path: Path) -> None:
    settings = Settings(max_failures_per_ip=0, max_failures_per_login=2, window=60, lockout=60)
    gateway = SimpleNamespace(policy=SimpleNamespace(server=SimpleNamespace(var_dir=tmp_path)))
    plugin = Plugin()

    async def scenario() -> list[object]:
        await plugin.gateway_startup(gateway, settings)
        try:
            seen = [await plugin.gateway_auth(session(), "alice", settings)]
            await plugin.gateway_auth_result(session(), "PLAIN", "alice", "failure", settings)
            await plugin.gateway_auth_result(session(), "PLAIN", "alice", "tempfail", settings)
            await plugin.gateway_auth_result(session(), "PLAIN", "alice", "success", settings)
            seen.append(await plugin.gateway_auth(session(), "alice", settings))
            await plugin.gateway_auth_result(session("192.0.2.99"), "LOGIN", "ALICE", "failure", settings)
            seen.append(await plugin.gateway_auth(session("198.51.100.1"), "alice", settings))
            seen.append(await plugin.gateway_auth(session(), "bob", settings))
            return seen
        finally:
            await plugin.gateway_shutdown(settings)

    before, after_one, locked, other = asyncio.run(scenario())
    assert before is None and after_one is None and other is None
    assert locked.action is Action.DISCONNECT and locked.reply == REPLY_LOCKED
