"""Security: relay control refuses everything not explicitly allowed (5.7.1)."""

from __future__ import annotations

import pytest

from tests.conftest import BASE_POLICY, RawClient


def session(port: int) -> RawClient:
    c = RawClient(port)
    c.reply()
    c.cmd("EHLO client.test.example")
    c.cmd("MAIL FROM:<a@example.org>")
    return c


@pytest.mark.parametrize(
    "rcpt",
    [
        "<victim@elsewhere.example>",
        "<user%victim.example@localhost>",
        '<"user@victim.example"@localhost>',
        "<@localhost:user@victim.example>",
        "<victim.example!user@localhost>",
        "<user@victim.example@localhost>",
    ],
)
def test_open_relay_tricks_are_refused(gateway, rcpt: str) -> None:
    c = session(gateway.port)
    code, text = c.cmd(f"RCPT TO:{rcpt}")
    assert code in (550, 501), (rcpt, code, text)
    if code != 501:
        assert text[0].startswith("5.7.1")
    c.close()
    assert gateway.queue_ids() == []


def test_loopback_is_not_trusted_by_default(gateway) -> None:
    c = session(gateway.port)
    code, text = c.cmd("RCPT TO:<someone@example.net>")
    assert code == 550 and text[0] == "5.7.1 Relay access denied"
    c.close()


def test_relay_client_network_may_relay(gateway_factory) -> None:
    gw = gateway_factory(BASE_POLICY + '\n[relay]\nclients = ["127.0.0.0/8"]\n')
    c = session(gw.port)
    assert c.cmd("RCPT TO:<someone@example.net>")[0] == 250
    # ...but never with routing syntax aimed at a local domain.
    assert c.cmd("RCPT TO:<user%example.net@localhost>")[0] == 550
    c.close()


def test_relay_domain_is_accepted_from_anyone(gateway_factory) -> None:
    gw = gateway_factory(BASE_POLICY + '\n[relay]\ndomains = [".relayed.example"]\n')
    c = session(gw.port)
    assert c.cmd("RCPT TO:<x@relayed.example>")[0] == 250
    assert c.cmd("RCPT TO:<x@sub.relayed.example>")[0] == 250
    assert c.cmd("RCPT TO:<x@notrelayed.example>")[0] == 550
    c.close()
