"""IP block and allow lists against a real DNS server: connect, delayed reject, codes, cache."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.conftest import MESSAGE, RawClient, no_verify_context
from tests.integration.dnsbl.conftest import (
    DEFERRED,
    REFUSED,
    REFUSED_AT_CONNECT,
    SENT,
    SPECS,
    client,
    count,
    envelope_notes,
    policy,
    split,
    users_file,
    zone,
)

def test_client_listed_in_one_zone_is_refused_at_connect_with_list_and_txt(
    gateway_factory, dns
) -> None:
    plugin = 'reject_at = "connect"\n' + zone("clean.test") + zone("bl.test")
    gw = gateway_factory(policy(dns.port, plugin), specs=SPECS)
    c = RawClient(gw.port)
    code, lines = c.reply()
    assert (code, lines[0].split()[0]) == REFUSED_AT_CONNECT
    assert "blocked using bl.test" in lines[0]
    assert "https://bl.test/lookup?ip=127.0.0.1" in lines[0]
    assert c.is_closed()
    c.close()


def test_client_not_listed_is_served(gateway_factory, dns) -> None:
    gw = gateway_factory(policy(dns.port, 'reject_at = "connect"\n' + zone("clean.test")), specs=SPECS)
    with client(gw.port) as c:
        assert c.sendmail("a@example.org", ["alice@localhost"], MESSAGE) == {}
    assert len(gw.queue_ids()) == 1


def test_delayed_reject_names_the_list_and_lets_postmaster_and_abuse_through(
    gateway_factory, dns
) -> None:
    gw = gateway_factory(policy(dns.port, zone("bl.test")), specs=SPECS)
    with client(gw.port) as c:
        assert c.mail("a@example.org")[0] == SENT
        status, text = split(c.rcpt("alice@localhost"))
        assert status == REFUSED
        assert "bl.test" in text and "https://bl.test/lookup?ip=127.0.0.1" in text
        assert c.rcpt("postmaster@local.example")[0] == SENT
        assert c.rcpt("Abuse@localhost")[0] == SENT
        assert c.rcpt("<postmaster>")[0] == SENT
        assert c.data(MESSAGE)[0] == SENT
    (qid,) = gw.queue_ids()
    recipients = [r.address for r in gw.queue.load(qid).envelope.recipients]
    assert recipients == ["postmaster@local.example", "Abuse@localhost", "postmaster"]
    assert any("listed at bl.test" in note for note in envelope_notes(gw, qid))


def test_per_code_actions_in_one_zone(gateway_factory, dns) -> None:
    codes = '{ "127.0.0.2" = "reject", "127.0.0.4" = "tempfail", "127.0.0.10" = { action = "score", score = 2.5 } }'
    gw = gateway_factory(policy(dns.port, zone("zen.test", codes=codes)), specs=SPECS)
    with client(gw.port, "127.0.0.2") as c:  # 127.0.0.2: reject, with the list's TXT
        c.mail("a@example.org")
        status, text = split(c.rcpt("alice@localhost"))
        assert status == REFUSED
        assert "zen.test" in text and "https://zen.test/query/ip/127.0.0.2" in text
    with client(gw.port, "127.0.0.3") as c:  # 127.0.0.3: tempfail
        c.mail("a@example.org")
        status, text = split(c.rcpt("alice@localhost"))
        assert status == DEFERRED and "zen.test" in text
    with client(gw.port) as c:  # 127.0.0.1: only a score
        assert c.sendmail("a@example.org", ["alice@localhost"], MESSAGE) == {}
    (qid,) = gw.queue_ids()
    scores = [(n["plugin"], n["score"]) for n in gw.queue.load(qid).envelope.notes]
    assert ("connect_dnsbl", 2.5) in scores


def test_score_counts_towards_the_scoring_threshold(gateway_factory, dns) -> None:
    plugin = zone("zen.test", action='"score"', score=5.0)
    gw = gateway_factory(policy(dns.port, plugin, extra="[scoring]\nreject = 4.0\n"), specs=SPECS)
    with client(gw.port) as c:
        c.mail("a@example.org")
        assert c.rcpt("alice@localhost")[0] == SENT
        assert split(c.data(MESSAGE))[0] == REFUSED
    assert gw.queue_ids() == []


def test_allow_list_short_circuits_block_lists(gateway_factory, dns) -> None:
    plugin = (
        'reject_at = "connect"\n'
        + zone("wl.test", type='"ip-allow"')
        + zone("bl.test")
        + zone("dbl.test", type='"domain"')
    )
    before = count(dns, "spam.example.dbl.test")
    gw = gateway_factory(policy(dns.port, plugin), specs=SPECS)
    with client(gw.port) as c:
        # Listed at bl.test, and the sender's domain at dbl.test: the allow list wins.
        assert c.sendmail("a@spam.example", ["alice@localhost"], MESSAGE) == {}
    (qid,) = gw.queue_ids()
    assert any("allow-listed by wl.test" in note for note in envelope_notes(gw, qid))
    assert count(dns, "spam.example.dbl.test") == before


def test_authenticated_session_is_not_refused_at_rcpt(gateway_factory, dns, tmp_path: Path) -> None:
    extra = f'[auth]\nusers_file = "{users_file(tmp_path)}"\n'
    gw = gateway_factory(policy(dns.port, zone("bl.test"), extra=extra, tls="starttls"), specs=SPECS)
    with client(gw.port) as c:
        c.starttls(context=no_verify_context())
        c.ehlo()
        c.login("alice", "s3cret")
        assert c.sendmail("alice@local.example", ["someone@example.net"], MESSAGE) == {}
    assert len(gw.queue_ids()) == 1


def test_relay_client_is_not_looked_up(gateway_factory, dns) -> None:
    before = count(dns, "1.0.0.127.bl.test")
    extra = '[relay]\nclients = ["127.0.0.0/8"]\n'
    plugin = 'reject_at = "connect"\n' + zone("bl.test")
    gw = gateway_factory(policy(dns.port, plugin, extra=extra), specs=SPECS)
    with client(gw.port) as c:
        assert c.sendmail("a@example.org", ["someone@example.net"], MESSAGE) == {}
    assert count(dns, "1.0.0.127.bl.test") == before


def test_second_session_is_answered_from_the_cache(gateway_factory, dns) -> None:
    listed, clean = "1.0.0.127.bl.test", "1.0.0.127.clean.test"
    before = (count(dns, listed), count(dns, listed, "TXT"), count(dns, clean))
    gw = gateway_factory(policy(dns.port, zone("clean.test") + zone("bl.test")), specs=SPECS)
    for _ in range(2):
        with client(gw.port) as c:
            c.mail("a@example.org")
            assert split(c.rcpt("alice@localhost"))[0] == REFUSED
    after = (count(dns, listed), count(dns, listed, "TXT"), count(dns, clean))
    # One A and one TXT for the listing, one A for the negative answer: then the cache.
    assert [a - b for a, b in zip(after, before)] == [1, 1, 1]


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback (::1) on this host")
def test_ipv6_client_is_looked_up_by_nibbles(gateway_factory, dns) -> None:
    plugin = 'reject_at = "connect"\n' + zone("v6bl.test")
    gw = gateway_factory(policy(dns.port, plugin, address="::1"), specs=SPECS)
    c = RawClient(gw.port, host="::1")
    code, lines = c.reply()
    assert (code, lines[0].split()[0]) == REFUSED_AT_CONNECT
    assert "Client host [::1] blocked using v6bl.test" in lines[0]
    c.close()
