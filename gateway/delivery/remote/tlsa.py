"""TLSA lookups for DANE (RFC 7672 §2.2), believed only from a trusted validating resolver.

DANE rests on DNSSEC: a TLSA record is worth something only when a validating resolver
says it checked the signatures (the AD bit) and the gateway can trust that resolver and
the path to it. ``[dns] dnssec`` says when it can (:func:`trusts_resolver`): ``auto``
when every nameserver is on loopback, ``trusted`` when the operator vouches for them,
``off`` never. Queries for DANE set the AD bit (RFC 6840 §5.7), which a validating resolver
answers with AD on what it validated (:func:`validating_resolver`).

:func:`lookup_tlsa` gives the TLSA RRset of ``_<port>._tcp.<host>`` with its state:
``secure`` (validated records), ``none`` (no records: NXDOMAIN or NODATA), ``insecure``
(records without validation: ignored, RFC 7672 §2.2), ``bogus`` (the resolver failed: with
a validating resolver a SERVFAIL is most often a signature that does not verify, and
either way the host's TLS requirement is unknown, so it must not get the mail, §2.2).

:class:`DaneConfig` is DANE's part of the policy: the mode for a domain (``[delivery]
dane``, or the ``dane`` of a ``[[routes]]`` entry without a host) and the resolver to ask.
"""

from __future__ import annotations

import copy
import ipaddress
from dataclasses import dataclass
from typing import Any, Literal

import dns.asyncresolver
import dns.flags

from gateway.delivery.remote.dane import TlsaRecord
from gateway.dns import DnsNotFound, DnsTemporaryError, is_authenticated, lookup, make_resolver

__all__ = ["DaneConfig", "TlsaAnswer", "lookup_tlsa", "trusts_resolver", "validating_resolver"]

TlsaState = Literal["secure", "insecure", "none", "bogus"]
DaneMode = Literal["dane", "dane-only", "off"]


@dataclass(frozen=True, slots=True)
class TlsaAnswer:
    """The TLSA RRset of one host and port, and how far to believe it."""

    name: str
    state: TlsaState
    records: tuple[TlsaRecord, ...] = ()
    detail: str = ""

    @property
    def usable(self) -> tuple[TlsaRecord, ...]:
        """The records DANE can use for SMTP (DANE-TA, DANE-EE; RFC 7672 §3.1.3)."""
        return tuple(r for r in self.records if r.is_usable)


def _nameserver_address(server: Any) -> str:
    return str(getattr(server, "address", server))


def trusts_resolver(setting: str, resolver: dns.asyncresolver.Resolver) -> bool:
    """Whether the AD bit of ``resolver``'s answers may be believed under ``[dns] dnssec``."""
    if setting == "trusted":
        return True
    if setting != "auto":
        return False
    servers = list(getattr(resolver, "nameservers", []) or [])
    try:
        return bool(servers) and all(ipaddress.ip_address(_nameserver_address(s)).is_loopback for s in servers)
    except ValueError:  # a DoH URL or other non-address nameserver: not on this host
        return False


def dane_warnings(policy: Any) -> list[str]:
    """What an operator should hear about the policy's DANE settings: ``dane-only`` (the
    default or an MX route's) while ``[dns] dnssec`` does not believe the resolver's
    validation. Then no TLSA record is ever believed, so every MX host is without DANE
    and gets no mail: it waits in the queue (4.7.5) until it expires. Synchronous (it
    may read ``/etc/resolv.conf`` for the nameservers)."""
    only = [f"route {r.domain!r}" for r in policy.routes if not r.host and r.dane == "dane-only"]
    if policy.delivery.dane == "dane-only":
        only.insert(0, "[delivery] dane")
    if not only or trusts_resolver(policy.dns.dnssec, make_resolver(policy.dns)):
        return []
    why = (
        "dnssec = \"off\"" if policy.dns.dnssec == "off"
        else "dnssec = \"auto\" and not every nameserver is on loopback"
    )
    return [
        f"{', '.join(only)}: dane-only, but [dns] {why}: no TLSA record is believed, so mail to "
        "those MX hosts waits in the queue (4.7.5) until it expires; run a validating resolver "
        "on this host or set [dns] dnssec = \"trusted\" for one on a trusted path"
    ]


def validating_resolver(resolver: dns.asyncresolver.Resolver) -> dns.asyncresolver.Resolver:
    """A copy of ``resolver`` whose queries ask for the AD bit (RFC 6840 §5.7)."""
    view = copy.copy(resolver)
    view.flags = dns.flags.RD | dns.flags.AD
    return view


def tlsa_name(host: str, port: int) -> str:
    """``_<port>._tcp.<host>`` (RFC 6698 §3, RFC 7672 §2.2.3)."""
    return f"_{port}._tcp.{host.rstrip('.')}"


async def lookup_tlsa(resolver: dns.asyncresolver.Resolver, host: str, port: int) -> TlsaAnswer:
    """The TLSA records of ``host`` at ``port`` and their DNSSEC state (never raises).

    :param resolver: a :func:`validating_resolver`
    """
    name = tlsa_name(host, port)
    try:
        answer = await lookup(resolver, name, "TLSA")
    except DnsNotFound:
        return TlsaAnswer(name, "none", detail="no such name")
    except DnsTemporaryError as exc:
        return TlsaAnswer(name, "bogus", detail=str(exc)[:300])
    if answer is None:
        return TlsaAnswer(name, "none", detail="no TLSA records")
    records = tuple(TlsaRecord.from_rdata(r) for r in answer)
    if not is_authenticated(answer):
        return TlsaAnswer(name, "insecure", records, "not DNSSEC-validated; ignored")
    return TlsaAnswer(name, "secure", records, "DNSSEC-validated")


@dataclass(frozen=True)
class DaneConfig:
    """DANE's part of the policy.

    :param mode: ``[delivery] dane``
    :param routes: ``[[routes]]``, whose ``dane`` overrides ``mode`` for their domains
    :param resolver: the :func:`validating_resolver` to ask, ``None`` when the policy does
        not trust the resolver's validation (then no TLSA record is believed)
    """

    mode: DaneMode = "off"
    routes: tuple[Any, ...] = ()
    resolver: dns.asyncresolver.Resolver | None = None

    @classmethod
    def from_policy(cls, policy: Any, resolver: dns.asyncresolver.Resolver) -> DaneConfig:
        trusted = trusts_resolver(policy.dns.dnssec, resolver)
        return cls(policy.delivery.dane, tuple(policy.routes), validating_resolver(resolver) if trusted else None)

    def mode_for(self, domain: str) -> DaneMode:
        """The DANE mode for mail to ``domain``: its route's ``dane``, else the default."""
        from gateway.delivery.router import _matching_route  # the router's own matching rule

        route = _matching_route(domain, self)
        if route is not None and not route.host and route.dane:
            mode: DaneMode = route.dane
            return mode
        return self.mode
