"""gateway.dns: resolver construction and classified lookups against a real test server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import dns.nameserver
import pytest

from gateway.dns import (
    DnsNotFound,
    DnsTemporaryError,
    lookup,
    make_resolver,
    parse_nameserver,
    resolve_addresses,
)
from gateway.policy.model import DnsSettings
from tests.dnsserver import DnsTestServer, dns_settings

ZONE = """
$ORIGIN test.example.
$TTL 300
@        IN SOA ns1.test.example. hostmaster.test.example. 1 3600 600 86400 300
@        IN NS  ns1.test.example.
ns1      IN A   127.0.0.1
both     IN A   127.0.0.5
both     IN AAAA ::1
v4       IN A   127.0.0.6
v6       IN AAAA ::1
text     IN TXT "only text"
alias    IN CNAME v4.test.example.
"""


@pytest.fixture(scope="module")
def server() -> Iterator[DnsTestServer]:
    with DnsTestServer(ZONE) as server:
        yield server


@pytest.fixture
def resolver(server: DnsTestServer):  # type: ignore[no-untyped-def]
    server.heal()
    return make_resolver(dns_settings(server.port, timeout=0.5))


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("192.0.2.53", ("192.0.2.53", 53)),
        ("192.0.2.53:5353", ("192.0.2.53", 5353)),
        ("2001:db8::53", ("2001:db8::53", 53)),
        ("[2001:db8::53]:5353", ("2001:db8::53", 5353)),
        ("[::1]", ("::1", 53)),
    ],
)
def test_parse_nameserver(entry: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver(entry) == expected


@pytest.mark.parametrize("entry", ["ns.example", "192.0.2.1:0", "192.0.2.1:x", "[::1", "[::1]x", "1.2.3.4:70000"])
def test_parse_nameserver_refuses_garbage(entry: str) -> None:
    with pytest.raises(ValueError):
        parse_nameserver(entry)


def test_make_resolver_with_ports_and_lifetime() -> None:
    resolver = make_resolver(DnsSettings(nameservers=("127.0.0.1:5300", "::1"), timeout=2.5))
    servers = resolver.nameservers
    assert all(isinstance(s, dns.nameserver.Do53Nameserver) for s in servers)
    assert [(s.address, s.port) for s in servers] == [("127.0.0.1", 5300), ("::1", 53)]  # type: ignore[union-attr]
    assert resolver.lifetime == 2.5
    assert resolver.timeout <= 2.5


def test_make_resolver_system_configuration() -> None:
    resolver = make_resolver(DnsSettings(timeout=3.0))
    assert resolver.nameservers  # resolv.conf, or 127.0.0.1 when it names none
    assert resolver.lifetime == 3.0


def test_lookup_answer_nodata_nxdomain(resolver) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        answer = await lookup(resolver, "v4.test.example", "A")
        assert answer is not None and [r.address for r in answer] == ["127.0.0.6"]
        assert await lookup(resolver, "v4.test.example", "MX") is None  # NODATA, not NXDOMAIN
        with pytest.raises(DnsNotFound):
            await lookup(resolver, "missing.test.example", "A")
        with pytest.raises(DnsNotFound):
            await lookup(resolver, "bad..name", "A")
        alias = await lookup(resolver, "alias.test.example", "A")
        assert alias is not None and [r.address for r in alias] == ["127.0.0.6"]

    asyncio.run(main())


def test_lookup_servfail_and_timeout_are_temporary(server: DnsTestServer, resolver) -> None:  # type: ignore[no-untyped-def]
    server.fail("v4.test.example")
    server.drop("v6.test.example", "AAAA")

    async def main() -> None:
        with pytest.raises(DnsTemporaryError):
            await lookup(resolver, "v4.test.example", "A")
        started = time.monotonic()
        with pytest.raises(DnsTemporaryError):
            await lookup(resolver, "v6.test.example", "AAAA")
        assert time.monotonic() - started < 2  # bounded by the 0.5 s lifetime

    asyncio.run(main())


def test_resolve_addresses(server: DnsTestServer, resolver) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        assert await resolve_addresses(resolver, "both.test.example") == ["127.0.0.5", "::1"]
        assert await resolve_addresses(resolver, "v6.test.example") == ["::1"]
        with pytest.raises(DnsNotFound):
            await resolve_addresses(resolver, "text.test.example")  # exists, no address
        with pytest.raises(DnsNotFound):
            await resolve_addresses(resolver, "missing.test.example")
        server.fail("both.test.example", "AAAA")
        assert await resolve_addresses(resolver, "both.test.example") == ["127.0.0.5"]  # one family is enough
        server.fail("v4.test.example", "A")
        with pytest.raises(DnsTemporaryError):
            await resolve_addresses(resolver, "v4.test.example")

    asyncio.run(main())


def test_test_server_records_queries(server: DnsTestServer, resolver) -> None:  # type: ignore[no-untyped-def]
    asyncio.run(lookup(resolver, "v4.test.example", "TXT"))
    assert ("v4.test.example", "TXT") in server.queries
