"""connect_limits and mail_rate_limit, hook by hook, with the embedded SQLite store."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from gateway.model import Session
from gateway.policy import parse_network
from gateway.verdicts import Action, Verdict
from plugins import connect_limits, mail_rate_limit
from plugins.connect_limits import REPLY_TOO_MANY, connection_keys
from plugins.mail_rate_limit import REPLY_MESSAGES, REPLY_RECIPIENTS, rate_key


def gateway_for(tmp_path: Path) -> Any:
    return SimpleNamespace(policy=SimpleNamespace(server=SimpleNamespace(var_dir=tmp_path)))


def session(ip: str = "192.0.2.10", **kw: Any) -> Session:
    return Session(peer_ip=ip, peer_port=4000, listener="smtp", **kw)


def refused_with(verdict: Verdict | None, reply: object) -> bool:
    return verdict is not None and verdict.action is Action.TEMPFAIL and verdict.reply == reply


# -- fixed windows and keys ---------------------------------------------------------


def test_rate_keys_follow_fixed_windows() -> None:
    s = mail_rate_limit.Settings(window=60.0, messages_per_ip=5)
    first = rate_key("msg", session(), s, 120.0)
    assert first == ("rate:msg:60:2:ip:192.0.2.10", 5)
    assert rate_key("msg", session(), s, 179.9) == first  # same window
    assert rate_key("msg", session(), s, 180.0) != first  # the next one


def test_rate_keys_pick_user_for_authenticated_sessions_and_skip_unlimited() -> None:
    s = mail_rate_limit.Settings(messages_per_ip=5, recipients_per_user=7)
    user = rate_key("rcpt", session(auth_login="Alice@Example.org"), s, 0.0)
    assert user is not None and user[1] == 7 and ":user:" in user[0]
    assert "Alice" not in user[0]  # logins are digested, never spelt out
    assert rate_key("msg", session(auth_login="alice"), s, 0.0) is None  # no user limit set
    assert rate_key("rcpt", session(), s, 0.0) is None  # no ip limit set
    assert rate_key("msg", session(is_relay_client=True), s, 0.0) is None
    exempt = dataclasses.replace(s, exempt_networks=(parse_network("192.0.2.0/24"),))
    assert rate_key("msg", session(), exempt, 0.0) is None


def test_connection_keys_cover_address_and_network() -> None:
    s = connect_limits.Settings(connections_per_ip=3, connections_per_network=10, ipv6_prefix=48)
    assert connection_keys("2001:db8:1:2::5", s) == [
        ("conn:ip:2001:db8:1:2::5", 3),
        ("conn:net:2001:db8:1::/48", 10),
    ]
    assert connection_keys("192.0.2.1", dataclasses.replace(s, connections_per_ip=0)) == [
        ("conn:net:192.0.2.0/24", 10)
    ]


# -- rate limits ------------------------------------------------------------------


class Started:
    """A plugin instance started on the SQLite store under ``tmp_path``."""

    def __init__(self, module: ModuleType, tmp_path: Path, **settings: Any) -> None:
        self.gateway = gateway_for(tmp_path)
        self.settings = module.Settings(**settings)
        self.plugin = module.Plugin()

    async def __aenter__(self) -> Any:
        await self.plugin.gateway_startup(self.gateway, self.settings)
        return self.plugin

    async def __aexit__(self, *exc: object) -> None:
        await self.plugin.gateway_shutdown(self.settings)


def test_messages_per_ip_in_a_window_then_the_next_window(tmp_path: Path) -> None:
    async def main() -> None:
        started = Started(mail_rate_limit, tmp_path, window=60.0, messages_per_ip=2)
        async with started as plugin:
            now = [600.0]
            plugin.clock = lambda: now[0]
            s, settings = session(), started.settings
            assert await plugin.gateway_mail(s, settings) is None
            assert await plugin.gateway_mail(s, settings) is None
            assert refused_with(await plugin.gateway_mail(s, settings), REPLY_MESSAGES)
            assert await plugin.gateway_mail(session("198.51.100.1"), settings) is None  # other client
            now[0] += 60  # next window: counting starts again
            assert await plugin.gateway_mail(s, settings) is None

    asyncio.run(main())


def test_recipients_per_user_count_across_sessions(tmp_path: Path) -> None:
    async def main() -> None:
        started = Started(mail_rate_limit, tmp_path, recipients_per_user=3, recipients_per_ip=100)
        async with started as plugin:
            settings = started.settings
            for ip in ("192.0.2.1", "198.51.100.1", "203.0.113.1"):
                assert await plugin.gateway_rcpt(session(ip, auth_login="bob"), settings) is None
            assert refused_with(await plugin.gateway_rcpt(session(auth_login="bob"), settings), REPLY_RECIPIENTS)
            assert await plugin.gateway_rcpt(session(auth_login="carol"), settings) is None

    asyncio.run(main())


def test_rate_limit_replies_are_temporary() -> None:
    for reply in (REPLY_MESSAGES, REPLY_RECIPIENTS, REPLY_TOO_MANY):
        assert reply.is_temporary and reply.status == "4.7." + reply.status.rsplit(".", 1)[-1]


# -- connection limits -------------------------------------------------------------


def test_connections_are_counted_refused_and_given_back(tmp_path: Path) -> None:
    async def main() -> None:
        started = Started(connect_limits, tmp_path, connections_per_ip=2, connections_per_network=3)
        async with started as plugin:
            settings = started.settings
            a, b, c = session("192.0.2.1"), session("192.0.2.1"), session("192.0.2.1")
            assert await plugin.gateway_connect(a, settings) is None
            assert await plugin.gateway_connect(b, settings) is None
            assert refused_with(await plugin.gateway_connect(c, settings), REPLY_TOO_MANY)
            await plugin.gateway_disconnect(c)  # refused: gave its count back already
            d = session("192.0.2.2")
            assert await plugin.gateway_connect(d, settings) is None  # network now at 3
            assert refused_with(await plugin.gateway_connect(session("192.0.2.3"), settings), REPLY_TOO_MANY)
            await plugin.gateway_disconnect(a)
            await plugin.gateway_disconnect(a)  # twice (two chain entries): counted once
            e = session("192.0.2.1")
            assert await plugin.gateway_connect(e, settings) is None
            for s in (b, d, e):
                await plugin.gateway_disconnect(s)
            store = plugin._stores.get("sqlite")
            assert await store.get("conn:ip:192.0.2.1") == "0"
            assert await store.get("conn:net:192.0.2.0/24") == "0"

    asyncio.run(main())


def test_expired_connection_counter_does_not_go_negative(tmp_path: Path) -> None:
    async def main() -> None:
        started = Started(connect_limits, tmp_path, connections_per_ip=5, connections_per_network=0)
        async with started as plugin:
            s = session()
            assert await plugin.gateway_connect(s, started.settings) is None
            store = plugin._stores.get("sqlite")
            await store.delete("conn:ip:192.0.2.10")  # as if it had expired
            await plugin.gateway_disconnect(s)
            assert await store.get("conn:ip:192.0.2.10") == "0"

    asyncio.run(main())


def test_relay_clients_and_exempt_networks_are_not_counted(tmp_path: Path) -> None:
    async def main() -> None:
        started = Started(
            connect_limits, tmp_path, connections_per_ip=1, exempt_networks=(parse_network("10.0.0.0/8"),)
        )
        async with started as plugin:
            for _ in range(3):
                assert await plugin.gateway_connect(session("10.1.1.1"), started.settings) is None
                assert await plugin.gateway_connect(session(is_relay_client=True), started.settings) is None

    asyncio.run(main())


def test_loopback_is_exempt_by_default_and_relay_clients_unless_switched_off(tmp_path: Path) -> None:
    async def main() -> None:
        started = Started(connect_limits, tmp_path, connections_per_ip=1, exempt_relay_clients=False)
        async with started as plugin:
            settings = started.settings
            for ip in ("127.0.0.1", "127.0.0.1", "::1", "::1"):
                assert await plugin.gateway_connect(session(ip), settings) is None
            assert await plugin.gateway_connect(session(is_relay_client=True), settings) is None
            relay_again = await plugin.gateway_connect(session(is_relay_client=True), settings)
            assert refused_with(relay_again, REPLY_TOO_MANY)

    asyncio.run(main())


@pytest.mark.parametrize("module", [connect_limits, mail_rate_limit])
def test_state_errors_follow_on_state_error(module: ModuleType, tmp_path: Path) -> None:
    limits = {"connections_per_ip": 1} if module is connect_limits else {"messages_per_ip": 1}

    async def main() -> list[Verdict | None]:
        out = []
        for mode in ("continue", "tempfail"):
            plugin = module.Plugin()  # never started: no store
            settings = module.Settings(on_state_error=mode, **limits)
            if module is connect_limits:
                out.append(await plugin.gateway_connect(session(), settings))
            else:
                out.append(await plugin.gateway_mail(session(), settings))
        return out

    open_, closed = asyncio.run(main())
    assert open_ is None
    assert closed is not None and closed.action is Action.TEMPFAIL and closed.reply.status == "4.3.0"


@pytest.mark.parametrize("module", [connect_limits, mail_rate_limit])
def test_module_docstring_names_hooks_and_settings(module: ModuleType) -> None:
    doc = module.__doc__ or ""
    names = [n for n in vars(module.Plugin) if n.startswith("gateway_")]
    names += [f.name for f in dataclasses.fields(module.Settings)]
    assert [n for n in names if f"``{n}``" not in doc] == []
