"""Rate and connection limits through real SMTP sessions, on SQLite and on Redis."""

from __future__ import annotations

import pytest

from tests.conftest import RawClient, smtp, wait_for
from tests.integration.state._policy import policy, specs

RATE_LIMITED = 451
# Windows are fixed: a long one keeps a test from straddling a boundary (and a reset).
WINDOW = 'window = "1000d"'


@pytest.fixture(params=["sqlite", "redis"])
def state(request: pytest.FixtureRequest) -> str:
    """Each test once on the embedded store and once on the shared Redis."""
    if request.param == "sqlite":
        return "sqlite"
    return str(request.getfixturevalue("redis_url"))


def test_messages_per_ip_n_pass_then_451(gateway_factory, state: str) -> None:
    entry = f'name = "mail_rate_limit"\nstate = "{state}"\nmessages_per_ip = 3\n{WINDOW}'
    gw = gateway_factory(policy(entry), specs=specs())
    with smtp(gw.port) as client:
        client.ehlo()
        for _ in range(3):
            assert client.mail("a@example.org")[0] == 250
            assert client.rset()[0] == 250
        code, text = client.mail("a@example.org")
        assert (code, text) == (RATE_LIMITED, b"4.7.1 Message rate limit exceeded, try again later")
    with smtp(gw.port) as client:  # a new session does not reset the window
        client.ehlo()
        assert client.mail("a@example.org")[0] == RATE_LIMITED


def test_recipients_per_ip_are_counted_across_messages(gateway_factory, state: str) -> None:
    entry = f'name = "mail_rate_limit"\nstate = "{state}"\nrecipients_per_ip = 3\n{WINDOW}'
    gw = gateway_factory(policy(entry), specs=specs())
    with smtp(gw.port) as client:
        client.ehlo()
        client.mail("a@example.org")
        assert client.rcpt("alice@local.example")[0] == 250
        assert client.rcpt("bob@local.example")[0] == 250
        assert client.data(b"Subject: one\r\n\r\nhi\r\n")[0] == 250
        client.mail("a@example.org")
        assert client.rcpt("carol@local.example")[0] == 250
        code, text = client.rcpt("dave@local.example")
        assert (code, text) == (RATE_LIMITED, b"4.7.1 Recipient rate limit exceeded, try again later")
        assert client.data(b"Subject: two\r\n\r\nhi\r\n")[0] == 250  # to carol only
    assert len(gw.queue_ids()) == 2


def test_connections_per_ip_across_sessions(gateway_factory, state: str) -> None:
    entry = f'name = "connect_limits"\nstate = "{state}"\nconnections_per_ip = 1\nexempt_networks = []'
    gw = gateway_factory(policy(entry), specs=specs())
    first = RawClient(gw.port)
    try:
        assert first.reply()[0] == 220
        second = RawClient(gw.port)
        try:
            code, lines = second.reply()
            assert code == 421 and lines[0].startswith("4.7.0 ")
            assert second.is_closed()
        finally:
            second.close()
        assert first.cmd("NOOP")[0] == 250  # the admitted session is untouched
        assert first.cmd("QUIT")[0] == 221
    finally:
        first.close()

    def greeted() -> bool:  # the disconnect gave the count back
        client = RawClient(gw.port)
        try:
            return client.reply()[0] == 220
        finally:
            client.close()

    assert wait_for(greeted)


def test_connections_are_limited_across_two_gateways(gateway_factory, redis_url: str) -> None:
    entry = f'name = "connect_limits"\nstate = "{redis_url}"\nconnections_per_ip = 1\nexempt_networks = []'
    node_a = gateway_factory(policy(entry), specs=specs())
    node_b = gateway_factory(policy(entry), specs=specs())
    held = RawClient(node_a.port)
    try:
        assert held.reply()[0] == 220
        other = RawClient(node_b.port)
        try:
            assert other.reply()[0] == 421
        finally:
            other.close()
    finally:
        held.close()
