"""``check_spf`` against the real test DNS server: results, limits, errors, HELO identity."""

from __future__ import annotations

import dns.resolver
import pytest

from plugins._spf_dns import make_sync_resolver
from plugins.mail_spf import check_spf
from tests.dnsserver import DnsTestServer, dns_settings

OUTSIDER = "198.51.100.7"  # in no record of the zone


@pytest.mark.parametrize(
    ("sender", "client_ip", "expected"),
    [
        ("a@pass.spf.example", "127.0.0.1", "pass"),
        ("a@pass.spf.example", OUTSIDER, "fail"),
        ("a@fail.spf.example", "127.0.0.1", "fail"),
        ("a@fail.spf.example", "192.0.2.9", "pass"),
        ("a@softfail.spf.example", "127.0.0.1", "softfail"),
        ("a@neutral.spf.example", "127.0.0.1", "neutral"),
        ("a@nopolicy.spf.example", "127.0.0.1", "none"),  # TXT, but not v=spf1
        ("a@no-such-name.spf.example", "127.0.0.1", "none"),  # NXDOMAIN
        ("a@include.spf.example", "127.0.0.1", "pass"),
        ("a@include.spf.example", OUTSIDER, "fail"),
        ("a@include-none.spf.example", "127.0.0.1", "permerror"),  # RFC 7208 §5.2
        ("a@redirect.spf.example", "127.0.0.1", "pass"),
        ("a@redirect.spf.example", OUTSIDER, "fail"),
        # Two TXT strings joined without a space (RFC 7208 §3.3), then a redirect.
        ("a@redirect-split.spf.example", "192.0.2.5", "pass"),
        ("a@redirect-split.spf.example", "127.0.0.1", "fail"),
        ("a@mx.spf.example", "192.0.2.20", "pass"),
        ("a@mx.spf.example", "192.0.2.21", "fail"),
        ("a@macro-i.spf.example", "192.0.2.30", "pass"),  # exists:%{i}.allow...
        ("a@macro-i.spf.example", "192.0.2.31", "fail"),
        ("a@macro-d.spf.example", "192.0.2.40", "pass"),  # a:mail.%{d}
        ("alice@macro-l.spf.example", "192.0.2.1", "pass"),  # exists:%{l}.users.%{d}
        ("bob@macro-l.spf.example", "192.0.2.1", "fail"),
        ("a@two-void.spf.example", "192.0.2.1", "pass"),  # two void lookups are allowed
        ("a@void.spf.example", "192.0.2.1", "permerror"),  # the third is not (§4.6.4)
        ("a@too-many.spf.example", "192.0.2.1", "permerror"),  # 11 lookup terms (§4.6.4)
        ("a@syntax.spf.example", "192.0.2.1", "permerror"),
        ("a@two-records.spf.example", "192.0.2.1", "permerror"),  # §4.5
        ("a@servfail.spf.example", "192.0.2.1", "temperror"),
        ("a@include-servfail.spf.example", "192.0.2.1", "temperror"),
        ("a@[192.0.2.1]", "192.0.2.1", "none"),  # a domain literal is not checked (§4.3)
        ('"a@b"@fail.spf.example', "127.0.0.1", "fail"),  # the domain is after the last @
        ("a@pass.spf.example", "::ffff:127.0.0.1", "pass"),  # IPv4-mapped is IPv4
        ("jörg@bücher.spf.example", "127.0.0.1", "pass"),  # SMTPUTF8: looked up as its A-label
    ],
)
def test_mailfrom_results(
    spf_resolver: dns.resolver.Resolver, sender: str, client_ip: str, expected: str
) -> None:
    result = check_spf(spf_resolver, client_ip, sender, "client.example", max_time=5)
    assert result.result == expected, result.problem
    assert result.identity == "mailfrom"
    assert result.sender == sender


def test_fail_reports_the_domains_explanation(spf_resolver: dns.resolver.Resolver) -> None:
    result = check_spf(spf_resolver, "127.0.0.1", "a@fail-exp.spf.example", "x.example")
    assert result.result == "fail"
    assert result.explanation == "127.0.0.1 may not send mail for fail-exp.spf.example, see https://spf.example/why"
    assert result.mechanism == "-all"


def test_fail_without_exp_has_no_explanation(spf_resolver: dns.resolver.Resolver) -> None:
    assert check_spf(spf_resolver, "127.0.0.1", "a@fail.spf.example", "x.example").explanation is None


def test_errors_say_what_went_wrong(spf_resolver: dns.resolver.Resolver) -> None:
    void = check_spf(spf_resolver, "192.0.2.1", "a@void.spf.example", "x.example")
    assert "void lookup" in void.problem.lower()
    servfail = check_spf(spf_resolver, "192.0.2.1", "a@servfail.spf.example", "x.example")
    assert "servfail.spf.example" in servfail.problem


def test_timeout_is_a_temperror_within_max_time(spf_resolver: dns.resolver.Resolver) -> None:
    # The server never answers the TXT query; max_time ends the check early.
    result = check_spf(spf_resolver, "192.0.2.1", "a@timeout.spf.example", "x.example", max_time=0.3)
    assert result.result == "temperror"
    assert "timeout" in result.problem.lower()


def test_null_sender_checks_the_helo_name(spf_resolver: dns.resolver.Resolver) -> None:
    good = check_spf(spf_resolver, "127.0.0.1", "", "mta.spf.example")
    assert (good.result, good.identity, good.domain) == ("pass", "helo", "mta.spf.example")
    bad = check_spf(spf_resolver, "127.0.0.1", "", "badhelo.spf.example")
    assert (bad.result, bad.identity) == ("fail", "helo")


@pytest.mark.parametrize("helo", ["[127.0.0.1]", "localhost", ""])
def test_null_sender_with_an_uncheckable_helo_is_none(spf_resolver: dns.resolver.Resolver, helo: str) -> None:
    # RFC 7208 §2.3/§4.3: an address literal or a single-label name gives "none".
    result = check_spf(spf_resolver, "127.0.0.1", "", helo)
    assert (result.result, result.identity) == ("none", "helo")


def test_each_resolver_asks_its_own_server(spf_dns: DnsTestServer, other_dns: DnsTestServer) -> None:
    # Two DNS configurations in one process (two gateways): no global is shared.
    ours = make_sync_resolver(dns_settings(spf_dns.port))
    theirs = make_sync_resolver(dns_settings(other_dns.port))
    assert check_spf(ours, "127.0.0.1", "a@pass.spf.example", "x").result == "pass"
    assert check_spf(theirs, "127.0.0.1", "a@pass.spf.example", "x").result == "fail"
    assert check_spf(ours, "127.0.0.1", "a@pass.spf.example", "x").result == "pass"
