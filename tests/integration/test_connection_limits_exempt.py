"""Per-address connection limits leave loopback and relay clients alone by default.

Postfix exempts its own networks from its per-client connection limits; so does the core's
``[limits] max_connections_per_ip`` (``per_ip_exempt_networks``, ``per_ip_exempt_relay_clients``)
and the ``connect_limits`` plugin (``exempt_networks``, ``exempt_relay_clients``). The test
clients connect from 127.0.0.1, so the non-exempt cases turn the exemption off.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import pytest

from gateway.smtp.protocol import R_TOO_MANY_CONN
from plugins.connect_limits import REPLY_TOO_MANY
from tests.conftest import BASE_POLICY, RawClient

DEFAULT_PER_IP = 20  # [limits] max_connections_per_ip and connect_limits connections_per_ip
GREETING = 220


@contextlib.contextmanager
def sessions(port: int, count: int) -> Iterator[list[tuple[int, str]]]:
    """``count`` simultaneous connections, all open until the block ends: their first replies."""
    clients = []
    try:
        replies = []
        for _ in range(count):
            clients.append(RawClient(port))
            code, lines = clients[-1].reply()
            replies.append((code, lines[0]))
        yield replies
    finally:
        for c in clients:
            c.close()


def refused_with(reply) -> tuple[int, str]:
    """What a client reads: code, and the enhanced code with the text."""
    return reply.code, f"{reply.status} {reply.text}"


def test_25_sessions_from_loopback_are_all_greeted_on_the_default_limits(gateway_factory) -> None:
    gw = gateway_factory(BASE_POLICY)
    with sessions(gw.port, 25) as replies:
        assert [code for code, _ in replies] == [GREETING] * 25


def test_without_the_exemption_loopback_is_limited_like_anyone(gateway_factory) -> None:
    gw = gateway_factory(BASE_POLICY + "\n[limits]\nper_ip_exempt_networks = []\n")
    with sessions(gw.port, DEFAULT_PER_IP + 1) as replies:
        assert [code for code, _ in replies[:DEFAULT_PER_IP]] == [GREETING] * DEFAULT_PER_IP
        assert replies[DEFAULT_PER_IP] == refused_with(R_TOO_MANY_CONN)


@pytest.mark.parametrize("exempt", [True, False])
def test_relay_clients_are_exempt_unless_the_switch_is_off(gateway_factory, exempt: bool) -> None:
    policy = BASE_POLICY + (
        '\n[relay]\nclients = ["127.0.0.1"]\n'
        "\n[limits]\nmax_connections_per_ip = 2\nper_ip_exempt_networks = []\n"
        f"per_ip_exempt_relay_clients = {str(exempt).lower()}\n"
    )
    gw = gateway_factory(policy)
    with sessions(gw.port, 3) as replies:
        codes = [code for code, _ in replies]
        if exempt:
            assert codes == [GREETING] * 3
        else:
            assert codes[:2] == [GREETING] * 2 and replies[2] == refused_with(R_TOO_MANY_CONN)


def _with_connect_limits(settings: str = "") -> str:
    return BASE_POLICY + f'\n[[plugins]]\nname = "connect_limits"\n{settings}\n'


def test_connect_limits_does_not_count_loopback_by_default(gateway_factory) -> None:
    gw = gateway_factory(_with_connect_limits())
    with sessions(gw.port, 25) as replies:
        assert [code for code, _ in replies] == [GREETING] * 25


def test_connect_limits_counts_loopback_when_told_to(gateway_factory) -> None:
    gw = gateway_factory(_with_connect_limits("exempt_networks = []"))
    with sessions(gw.port, DEFAULT_PER_IP + 1) as replies:
        assert [code for code, _ in replies[:DEFAULT_PER_IP]] == [GREETING] * DEFAULT_PER_IP
        assert replies[DEFAULT_PER_IP] == refused_with(REPLY_TOO_MANY)
