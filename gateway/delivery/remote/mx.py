"""Where mail for a domain goes: MX lookup with null MX, implicit MX and loop prevention.

:func:`resolve_destinations` turns a recipient domain into the ordered list of addresses
to try (RFC 5321 §5.1); :func:`resolve_host` does the same for a smarthost, without MX.
Failures are classified: a domain that cannot receive mail is a
:class:`~gateway.verdicts.PermanentFailure`, a DNS problem a
:class:`~gateway.verdicts.TemporaryFailure`.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import random
from collections.abc import Collection
from dataclasses import dataclass
from itertools import groupby

import dns.asyncresolver

from gateway.dns import (
    DnsNotFound,
    DnsTemporaryError,
    HostAddresses,
    is_authenticated,
    lookup,
    resolve_addresses,
    resolve_authenticated_addresses,
)
from gateway.verdicts import PermanentFailure, Reply, TemporaryFailure

__all__ = ["Destination", "parse_address_literal", "resolve_destinations", "resolve_host"]


@dataclass(frozen=True, slots=True)
class Destination:
    """One address to try: the host name it came from, its IP address and port.

    ``is_secure``: the MX RRset (for an implicit MX, the domain's address records) and
    this host's address records all came DNSSEC-validated (the AD bit), so its TLSA
    records may be used (RFC 7672 §2.2). Only as good as the resolver: the caller
    decides whether it trusts it (``[dns] dnssec``).
    """

    host: str
    address: str
    port: int
    preference: int = 0
    is_secure: bool = False
    #: the host's fully CNAME-expanded name when it is an alias (and ``is_secure``: the
    #: expansion was DNSSEC-validated), else empty: TLSA records are looked for there
    #: first (RFC 7672 §2.2.2)
    canonical: str = ""

    def __str__(self) -> str:
        return f"{self.host}[{self.address}]:{self.port}"


def _normal(name: str) -> str:
    return name.rstrip(".").lower()


@functools.lru_cache(maxsize=1024)  # smarthosts and literal domains repeat with every message
def parse_address_literal(text: str) -> str | None:
    """The IP address in an RFC 5321 §4.1.3 address literal, or ``None`` if it is not one.

    ``[192.0.2.1]`` and ``[IPv6:2001:db8::1]`` are literals; a bare ``192.0.2.1`` is
    accepted too (smarthost settings are usually written that way).

    :raises PermanentFailure: bracketed, but not a valid address
    """
    if not text.startswith("["):
        try:
            return str(ipaddress.ip_address(text))
        except ValueError:
            return None
    inner = text[1:-1] if text.endswith("]") else ""
    is_v6 = inner[:5].lower() == "ipv6:"
    try:
        address = ipaddress.ip_address(inner[5:] if is_v6 else inner)
    except ValueError:
        address = None
    if address is None or (address.version == 6) != is_v6:
        raise PermanentFailure(Reply(553, "5.1.3", f"malformed address literal {text[:64]}"))
    return str(address)


async def resolve_destinations(
    domain: str,
    resolver: dns.asyncresolver.Resolver,
    *,
    port: int,
    local_names: Collection[str] = frozenset(),
    rng: random.Random | None = None,
) -> list[Destination]:
    """The addresses to try for mail to ``domain``, best first.

    :param domain: the recipient domain, or an address literal (which is its own host)
    :param resolver: the gateway's resolver
    :param port: SMTP port of the MX hosts
    :param local_names: our own host names; an MX naming one of them ends the list
    :param rng: randomness for ordering equal preferences (tests pass a seeded one)
    :raises PermanentFailure: no such domain (5.1.2), null MX (5.1.10), the best MX is
        ourselves (5.4.6), or no host has an address and none could fail temporarily
    :raises TemporaryFailure: the DNS could not answer (4.4.3) or no MX host resolved (4.4.4)
    """
    literal = parse_address_literal(domain) if domain.startswith("[") else None
    if literal is not None:
        return [Destination(domain, literal, port, 0)]
    try:
        answer = await lookup(resolver, domain, "MX")
    except DnsNotFound as exc:
        raise PermanentFailure(Reply(550, "5.1.2", f"domain {domain} not found"), str(exc)) from None
    except DnsTemporaryError as exc:
        raise TemporaryFailure(
            Reply(451, "4.4.3", f"DNS lookup for {domain} failed, will retry"), str(exc)
        ) from None

    if answer is None:
        # RFC 5321 §5.1: no MX records, so the domain itself is the implicit MX.
        return await _implicit_mx(domain, resolver, port)

    is_mx_secure = is_authenticated(answer)
    records = [(int(r.preference), _normal(r.exchange.to_text())) for r in answer]
    # RFC 7505 §3: a single MX with the root as exchange says "no mail here".
    if len(records) == 1 and records[0][1] == "":
        raise PermanentFailure(Reply(556, "5.1.10", f"domain {domain} does not accept mail (null MX)"))
    records = [r for r in records if r[1]]  # a "." among real MX hosts is ignored
    records.sort(key=lambda r: r[0])

    # RFC 5321 §5.1: if we are listed, use only hosts strictly more preferred than us.
    ours = {_normal(n) for n in local_names}
    own = [pref for pref, host in records if host in ours]
    if own:
        records = [r for r in records if r[0] < min(own)]
        if not records:
            raise PermanentFailure(
                Reply(554, "5.4.6", f"mail for {domain} loops back to myself"),
                "we are the best MX for the domain but it is not local",
            )

    # RFC 5321 §5.1: hosts of equal preference are tried in random order.
    rng = rng or random.Random()
    hosts: list[tuple[int, str]] = []
    for _, group in groupby(records, key=lambda r: r[0]):
        same = list(dict.fromkeys(group))
        rng.shuffle(same)
        hosts.extend(same)

    resolved = await asyncio.gather(*(_host_addresses(resolver, h) for _, h in hosts))
    out: list[Destination] = []
    seen: set[str] = set()
    temporary = False
    for (preference, host), result in zip(hosts, resolved):
        if isinstance(result, DnsTemporaryError):
            temporary = True
            continue
        if isinstance(result, DnsNotFound):
            continue
        is_secure = is_mx_secure and result.is_secure
        canonical = _expanded(host, result)
        for address in result.addresses:
            if address not in seen:  # one address under two names is tried once
                seen.add(address)
                out.append(Destination(host, address, port, preference, is_secure, canonical))
    if not out:
        reply = Reply(451, "4.4.4", f"no MX host of {domain} has an address, will retry")
        detail = "temporary DNS failure resolving MX hosts" if temporary else "no MX host resolved"
        raise TemporaryFailure(reply, detail)
    return out


def _expanded(host: str, found: HostAddresses) -> str:
    """The CNAME-expanded name of ``host`` for :attr:`Destination.canonical`."""
    return found.canonical if found.is_secure and found.canonical != host else ""


async def _host_addresses(
    resolver: dns.asyncresolver.Resolver, host: str
) -> HostAddresses | DnsNotFound | DnsTemporaryError:
    """The addresses of one MX host and whether they are DNSSEC-validated, or the
    failure (so one bad host skips only itself)."""
    try:
        return await resolve_authenticated_addresses(resolver, host)
    except (DnsNotFound, DnsTemporaryError) as exc:
        return exc


async def _implicit_mx(domain: str, resolver: dns.asyncresolver.Resolver, port: int) -> list[Destination]:
    try:
        found = await resolve_authenticated_addresses(resolver, domain)
    except DnsNotFound as exc:
        # The name exists (no NXDOMAIN for MX) but has neither MX nor an address.
        raise PermanentFailure(
            Reply(550, "5.1.2", f"domain {domain} has no MX or address records"), str(exc)
        ) from None
    except DnsTemporaryError as exc:
        raise TemporaryFailure(
            Reply(451, "4.4.3", f"DNS lookup for {domain} failed, will retry"), str(exc)
        ) from None
    host = _normal(domain)
    # RFC 7672 §2.2.1: without MX records the domain's own address records decide.
    canonical = _expanded(host, found)
    return [Destination(host, address, port, 0, found.is_secure, canonical) for address in found.addresses]


async def resolve_host(host: str, resolver: dns.asyncresolver.Resolver, *, port: int) -> list[Destination]:
    """The addresses of a smarthost (no MX lookup): an IP (literal or bare) or a name.

    A smarthost that does not resolve is our configuration's problem, not the
    recipient's, so every failure here is temporary: the mail waits for a fix.

    :raises TemporaryFailure: the name has no address or the DNS failed (4.4.4 / 4.4.3)
    """
    try:
        literal = parse_address_literal(host)
    except PermanentFailure as exc:
        raise TemporaryFailure(Reply(451, "4.4.4", f"smarthost {host[:64]} is malformed")) from exc
    if literal is not None:
        return [Destination(host, literal, port, 0)]
    try:
        addresses = await resolve_addresses(resolver, host)
    except DnsNotFound as exc:
        raise TemporaryFailure(
            Reply(451, "4.4.4", f"smarthost {host} has no address"), str(exc)
        ) from None
    except DnsTemporaryError as exc:
        raise TemporaryFailure(
            Reply(451, "4.4.3", f"DNS lookup for smarthost {host} failed, will retry"), str(exc)
        ) from None
    return [Destination(_normal(host), address, port, 0) for address in addresses]
