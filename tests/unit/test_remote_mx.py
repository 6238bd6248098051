"""gateway.delivery.remote.mx against a real DNS server serving a test zone."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from gateway.delivery.remote.mx import Destination, parse_address_literal, resolve_destinations, resolve_host
from gateway.dns import make_resolver
from gateway.verdicts import PermanentFailure, TemporaryFailure
from tests.dnsserver import DnsTestServer, dns_settings

ZONE = """
$ORIGIN test.example.
$TTL 300
@          IN SOA ns1.test.example. hostmaster.test.example. 1 3600 600 86400 300
@          IN NS  ns1.test.example.
ns1        IN A   127.0.0.1
a.mx       IN A   127.0.0.11
b.mx       IN A   127.0.0.12
c.mx       IN A   127.0.0.13
c.mx       IN AAAA ::1
e1.mx      IN A   127.0.0.21
e2.mx      IN A   127.0.0.22
gw         IN A   127.0.0.99
ordered    IN MX  20 b.mx.test.example.
ordered    IN MX  10 a.mx.test.example.
ordered    IN MX  30 c.mx.test.example.
equal      IN MX  10 e1.mx.test.example.
equal      IN MX  10 e2.mx.test.example.
equal      IN MX  5  a.mx.test.example.
implicit   IN A   127.0.0.31
implicit   IN AAAA ::1
nomail     IN TXT "no mail here"
nullmx     IN MX  0 .
self       IN MX  10 a.mx.test.example.
self       IN MX  20 gw.test.example.
self       IN MX  20 b.mx.test.example.
self       IN MX  30 c.mx.test.example.
selfbest   IN MX  10 GW.test.example.
selfbest   IN MX  20 a.mx.test.example.
broken     IN MX  10 missing.test.example.
broken     IN MX  20 b.mx.test.example.
allbroken  IN MX  10 missing.test.example.
flaky      IN MX  10 flakyhost.test.example.
flakyhost  IN A   127.0.0.41
dup        IN MX  10 a.mx.test.example.
dup        IN MX  20 alias-a.test.example.
alias-a    IN A   127.0.0.11
"""

LOCAL = {"gw.test.example"}


@pytest.fixture(scope="module")
def server() -> Iterator[DnsTestServer]:
    with DnsTestServer(ZONE) as server:
        yield server


@pytest.fixture
def resolver(server: DnsTestServer):  # type: ignore[no-untyped-def]
    server.heal()
    return make_resolver(dns_settings(server.port, timeout=0.5))


def resolve(resolver, domain: str, **kwargs) -> list[Destination]:  # type: ignore[no-untyped-def]
    return asyncio.run(resolve_destinations(domain, resolver, port=25, local_names=LOCAL, **kwargs))


def test_mx_sorted_by_preference_with_all_addresses(resolver) -> None:  # type: ignore[no-untyped-def]
    got = resolve(resolver, "ordered.test.example")
    assert [(d.host, d.address, d.preference) for d in got] == [
        ("a.mx.test.example", "127.0.0.11", 10),
        ("b.mx.test.example", "127.0.0.12", 20),
        ("c.mx.test.example", "127.0.0.13", 30),
        ("c.mx.test.example", "::1", 30),
    ]
    assert all(d.port == 25 for d in got)


def test_equal_preference_is_shuffled(resolver) -> None:  # type: ignore[no-untyped-def]
    async def orders() -> set[tuple[str, ...]]:
        seen = set()
        for _ in range(200):
            got = await resolve_destinations("equal.test.example", resolver, port=25)
            assert got[0].host == "a.mx.test.example"  # the better preference always leads
            seen.add(tuple(d.host for d in got[1:]))
        return seen

    assert asyncio.run(orders()) == {
        ("e1.mx.test.example", "e2.mx.test.example"),
        ("e2.mx.test.example", "e1.mx.test.example"),
    }


def test_implicit_mx_from_address_records(resolver) -> None:  # type: ignore[no-untyped-def]
    got = resolve(resolver, "implicit.test.example")
    assert [(d.host, d.address, d.preference) for d in got] == [
        ("implicit.test.example", "127.0.0.31", 0),
        ("implicit.test.example", "::1", 0),
    ]


def test_no_mx_and_no_address_is_permanent(resolver) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PermanentFailure) as info:
        resolve(resolver, "nomail.test.example")
    assert (info.value.reply.code, info.value.reply.status) == (550, "5.1.2")


def test_null_mx_is_permanent(resolver) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PermanentFailure) as info:
        resolve(resolver, "nullmx.test.example")
    assert (info.value.reply.code, info.value.reply.status) == (556, "5.1.10")


def test_nxdomain_is_permanent(resolver) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PermanentFailure) as info:
        resolve(resolver, "nosuch.test.example")
    assert (info.value.reply.code, info.value.reply.status) == (550, "5.1.2")


def test_servfail_is_temporary(server: DnsTestServer, resolver) -> None:  # type: ignore[no-untyped-def]
    server.fail("ordered.test.example", "MX")
    with pytest.raises(TemporaryFailure) as info:
        resolve(resolver, "ordered.test.example")
    assert (info.value.reply.code, info.value.reply.status) == (451, "4.4.3")


def test_timeout_is_temporary(server: DnsTestServer, resolver) -> None:  # type: ignore[no-untyped-def]
    server.drop("ordered.test.example")
    with pytest.raises(TemporaryFailure) as info:
        resolve(resolver, "ordered.test.example")
    assert info.value.reply.status == "4.4.3"


def test_we_are_an_mx_keep_only_better_hosts(resolver) -> None:  # type: ignore[no-untyped-def]
    got = resolve(resolver, "self.test.example")
    assert [d.host for d in got] == ["a.mx.test.example"]  # b.mx shares our preference: dropped too


def test_we_are_the_best_mx_is_a_loop(resolver) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PermanentFailure) as info:
        resolve(resolver, "selfbest.test.example")
    assert (info.value.reply.code, info.value.reply.status) == (554, "5.4.6")
    assert "loops back to myself" in info.value.reply.text


def test_unresolvable_exchange_is_skipped(resolver) -> None:  # type: ignore[no-untyped-def]
    assert [d.host for d in resolve(resolver, "broken.test.example")] == ["b.mx.test.example"]


def test_no_exchange_resolves_is_temporary(server: DnsTestServer, resolver) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TemporaryFailure) as info:
        resolve(resolver, "allbroken.test.example")
    assert info.value.reply.status == "4.4.4"
    server.fail("flakyhost.test.example")
    with pytest.raises(TemporaryFailure) as info:
        resolve(resolver, "flaky.test.example")
    assert info.value.reply.status == "4.4.4"


def test_one_address_under_two_names_is_tried_once(resolver) -> None:  # type: ignore[no-untyped-def]
    assert [d.address for d in resolve(resolver, "dup.test.example")] == ["127.0.0.11"]


def test_domain_literals(resolver) -> None:  # type: ignore[no-untyped-def]
    assert resolve(resolver, "[192.0.2.7]") == [Destination("[192.0.2.7]", "192.0.2.7", 25, 0)]
    assert resolve(resolver, "[IPv6:2001:db8::1]")[0].address == "2001:db8::1"
    with pytest.raises(PermanentFailure):
        resolve(resolver, "[999.1.1.1]")
    assert parse_address_literal("192.0.2.1") == "192.0.2.1"
    assert parse_address_literal("mx.example") is None
    with pytest.raises(PermanentFailure):
        parse_address_literal("[2001:db8::1]")  # IPv6 literals need the tag


def test_smarthost_resolution(server: DnsTestServer, resolver) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        got = await resolve_host("c.mx.test.example", resolver, port=587)
        assert [(d.address, d.port) for d in got] == [("127.0.0.13", 587), ("::1", 587)]
        assert await resolve_host("127.0.0.1", resolver, port=2525) == [Destination("127.0.0.1", "127.0.0.1", 2525)]
        with pytest.raises(TemporaryFailure):  # a bad smarthost waits for a fix, never bounces
            await resolve_host("nosuch.test.example", resolver, port=25)

    asyncio.run(main())
    assert ("c.mx.test.example", "MX") not in server.queries  # a smarthost has no MX lookup
