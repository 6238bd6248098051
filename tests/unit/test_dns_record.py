"""The recording resolver and the resolver that answers from a record, against a real
DNS server on loopback: every kind of outcome replays as it was seen."""

from __future__ import annotations

import asyncio
from typing import Any

import dns.exception
import dns.resolver
import pytest

from gateway.dns import DNS_TAP, DnsNotFound, DnsTemporaryError, RecordedResolver, lookup, make_resolver
from tests.dnsserver import DnsTestServer, dns_settings

ZONE = """
$TTL 300
test.              IN SOA ns.test. hostmaster.test. 1 3600 600 86400 60
host.test.         IN A   192.0.2.7
host.test.         IN TXT "v=spf1 -all"
broken.test.       IN A   192.0.2.8
slow.test.         IN A   192.0.2.9
"""
QUERIES = [("host.test", "A"), ("host.test", "TXT"), ("host.test", "MX"), ("nothing.test", "A"),
           ("broken.test", "A"), ("slow.test", "A")]


async def outcome(resolver: Any, name: str, rdtype: str) -> Any:
    try:
        answer = await lookup(resolver, name, rdtype)
    except DnsNotFound:
        return "not found"
    except DnsTemporaryError:
        return "temporary"
    return None if answer is None else sorted(r.to_text() for r in answer)


def test_each_outcome_replays_from_the_record_as_it_was_seen() -> None:
    recorded: list[list[Any]] = []

    async def live() -> list[Any]:
        with DnsTestServer(ZONE) as server:
            server.fail("broken.test")
            server.drop("slow.test")
            resolver = make_resolver(dns_settings(server.port, timeout=0.5))
            DNS_TAP.set(lambda *entry: recorded.append(list(entry)))
            return [await outcome(resolver, name, rdtype) for name, rdtype in QUERIES]

    seen = asyncio.run(live())
    assert seen == [["192.0.2.7"], ['"v=spf1 -all"'], None, "not found", "temporary", "temporary"]
    assert [entry[2] for entry in recorded] == ["answer", "answer", "noanswer", "nxdomain", "servfail", "timeout"]

    async def replayed() -> tuple[list[Any], list[Any]]:
        resolver = RecordedResolver({(name, rdtype): (kind, wire) for name, rdtype, kind, wire in recorded})
        again = [await outcome(resolver, name, rdtype) for name, rdtype in QUERIES]
        return again, [await outcome(resolver, "other.test", "A"), resolver.missing]

    again, (missing, keys) = asyncio.run(replayed())
    assert again == seen  # no server is running any more
    assert missing == "temporary" and keys == [("other.test", "A")]


def test_nothing_is_recorded_without_a_tap() -> None:
    async def run() -> Any:
        with DnsTestServer(ZONE) as server:
            resolver = make_resolver(dns_settings(server.port))
            assert DNS_TAP.get() is None
            return await outcome(resolver, "host.test", "A")

    assert asyncio.run(run()) == ["192.0.2.7"]


@pytest.mark.parametrize("rdtype", ["A", 1])
def test_a_recorded_answer_is_found_by_name_object_or_text_and_type_number(rdtype: Any) -> None:
    import dns.name

    async def run() -> Any:
        with DnsTestServer(ZONE) as server:
            resolver = make_resolver(dns_settings(server.port))
            seen: list[list[Any]] = []
            DNS_TAP.set(lambda *entry: seen.append(list(entry)))
            await resolver.resolve(dns.name.from_text("Host.Test."), rdtype)
        replay = RecordedResolver({(n, t): (k, w) for n, t, k, w in seen})
        return [r.to_text() for r in await replay.resolve("host.test", "A")]

    assert asyncio.run(run()) == ["192.0.2.7"]


def _blocking_outcome(resolver: Any, name: str, rdtype: str) -> Any:
    """As pyspf's lookups ask (plugins/_spf_dns.py): an empty answer is not raised."""
    try:
        answer = resolver.resolve(name, rdtype, search=False, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        return "not found"
    except dns.exception.DNSException:
        return "temporary"
    return sorted(r.to_text() for r in answer.rrset) if answer.rrset is not None else None


def test_the_blocking_view_records_and_replays_alike() -> None:
    # The view libraries in the thread pool use (SPF): recorded in the async form, and
    # replayed from the record by both the blocking and the asynchronous resolver.
    recorded: list[list[Any]] = []
    with DnsTestServer(ZONE) as server:
        server.fail("broken.test")
        server.drop("slow.test")
        blocking = make_resolver(dns_settings(server.port, timeout=0.5)).blocking()
        token = DNS_TAP.set(lambda *entry: recorded.append(list(entry)))
        try:
            seen = [_blocking_outcome(blocking, name, rdtype) for name, rdtype in QUERIES]
        finally:
            DNS_TAP.reset(token)
    assert seen == [["192.0.2.7"], ['"v=spf1 -all"'], None, "not found", "temporary", "temporary"]
    assert [entry[:3] for entry in recorded] == [
        ["host.test", "A", "answer"], ["host.test", "TXT", "answer"], ["host.test", "MX", "answer"],
        ["nothing.test", "A", "nxdomain"], ["broken.test", "A", "servfail"], ["slow.test", "A", "timeout"],
    ]

    record = RecordedResolver({(name, rdtype): (kind, wire) for name, rdtype, kind, wire in recorded})
    assert [_blocking_outcome(record.blocking(), name, rdtype) for name, rdtype in QUERIES] == seen
    assert _blocking_outcome(record.blocking(), "other.test", "A") == "temporary"
    assert record.missing == [("other.test", "A")]
    # The empty MX answer, asked by an asynchronous caller that wants NoAnswer, is one.
    again = asyncio.run(outcome(record, "host.test", "MX"))
    assert again is None
