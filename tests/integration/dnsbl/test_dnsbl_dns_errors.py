"""DNS failures of a list (SERVFAIL, timeout, a refusal code) give the configured answer."""

from __future__ import annotations

import pytest

from tests.conftest import MESSAGE, RawClient
from tests.integration.dnsbl.conftest import (
    DNS_FAILURE,
    DNS_FAILURE_AT_CONNECT,
    SENT,
    SPECS,
    client,
    count,
    envelope_notes,
    policy,
    split,
    zone,
)

FAST = 'lookup_timeout = "300ms"\n'


def failing(dns, how: str) -> str:
    """Make the list ``<how>.test`` fail for 127.0.0.1 as ``how`` says; its zone name."""
    name = f"{how}.test"
    if how == "broken":
        dns.fail(f"1.0.0.127.{name}")
    elif how == "slow":
        dns.drop(f"1.0.0.127.{name}")
    return name


@pytest.mark.parametrize("how", ["broken", "slow", "refusing"])
def test_dns_failure_tempfails_at_rcpt_when_asked_to(gateway_factory, dns, how: str) -> None:
    plugin = FAST + 'on_dns_error = "tempfail"\n' + zone(failing(dns, how))
    gw = gateway_factory(policy(dns.port, plugin), specs=SPECS)
    with client(gw.port) as c:
        c.mail("a@example.org")
        status, text = split(c.rcpt("alice@localhost"))
        assert status == DNS_FAILURE and f"{how}.test" in text
        assert c.rcpt("postmaster@localhost")[0] == SENT


@pytest.mark.parametrize("how", ["broken", "slow", "refusing"])
def test_dns_failure_lets_mail_through_by_default(gateway_factory, dns, how: str) -> None:
    gw = gateway_factory(policy(dns.port, FAST + zone(failing(dns, how))), specs=SPECS)
    with client(gw.port) as c:
        assert c.sendmail("a@example.org", ["alice@localhost"], MESSAGE) == {}
    (qid,) = gw.queue_ids()
    assert any(note.startswith(f"{how}.test failed") for note in envelope_notes(gw, qid))


def test_timeout_at_connect_answers_421(gateway_factory, dns) -> None:
    plugin = FAST + 'on_dns_error = "tempfail"\nreject_at = "connect"\n' + zone(failing(dns, "slow"))
    gw = gateway_factory(policy(dns.port, plugin), specs=SPECS)
    c = RawClient(gw.port)
    code, lines = c.reply()
    assert (code, lines[0].split()[0]) == DNS_FAILURE_AT_CONNECT
    assert c.is_closed()
    c.close()


def test_failing_allow_list_only_means_not_allow_listed(gateway_factory, dns) -> None:
    dns.fail("1.0.0.127.brokenwl.test")
    plugin = 'on_dns_error = "tempfail"\n' + zone("brokenwl.test", type='"ip-allow"') + zone("clean.test")
    gw = gateway_factory(policy(dns.port, plugin), specs=SPECS)
    with client(gw.port) as c:
        assert c.sendmail("a@example.org", ["alice@localhost"], MESSAGE) == {}


def test_failures_are_not_cached(gateway_factory, dns) -> None:
    name = "1.0.0.127.broken.test"
    before = count(dns, name)
    gw = gateway_factory(policy(dns.port, zone(failing(dns, "broken"))), specs=SPECS)
    for _ in range(2):
        with client(gw.port) as c:
            assert c.noop()[0] == SENT
    assert count(dns, name) - before >= 2
