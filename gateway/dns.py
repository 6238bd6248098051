"""The gateway's asynchronous DNS resolver and a lookup with classified failures.

:func:`make_resolver` builds a ``dns.asyncresolver.Resolver`` from the policy's ``[dns]``
section. :func:`lookup` runs one query and sorts every outcome into the three cases a mail
system must tell apart: an answer (possibly empty: the name exists without records of that
type, NODATA), a name that does not exist (NXDOMAIN: permanent), and a failure to find out
(SERVFAIL, timeout, no reachable server: temporary). Remote delivery, DNSBL and SPF all
build on these.

For ``gateway replay`` (docs/replay.md) the resolver :func:`make_resolver` returns is a
:class:`RecordingResolver`: while a session is being captured (:data:`DNS_TAP` set in its
task), every answer and failure is handed to the capture as well. A
:class:`RecordedResolver` answers from such a record instead of the network.

Libraries that resolve on their own in the thread pool (pyspf) ask the gateway's
resolver for its :meth:`~RecordingResolver.blocking` view: the same servers and limits,
recording in the same form (the pool carries the session's context along), or, for a
recorded one, the same record.
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import logging
from functools import cached_property
from typing import Any, Callable, Mapping, NamedTuple, Protocol, cast

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rdataclass
import dns.rdatatype
import dns.resolver

from gateway.policy.model import DnsSettings

__all__ = [
    "BlockingResolver",
    "DnsError",
    "DnsNotFound",
    "DnsTemporaryError",
    "DNS_TAP",
    "HostAddresses",
    "RecordedResolver",
    "RecordingResolver",
    "is_authenticated",
    "lookup",
    "make_resolver",
    "parse_nameserver",
    "resolve_addresses",
    "resolve_authenticated_addresses",
]

log = logging.getLogger(__name__)

_DEFAULT_PORT = 53


class DnsError(Exception):
    """A lookup that gave no usable answer."""


class DnsNotFound(DnsError):
    """The name does not exist (NXDOMAIN), or is not a valid DNS name: permanent."""


class DnsTemporaryError(DnsError):
    """SERVFAIL, timeout, or no server answered: try again later."""


def parse_nameserver(entry: str) -> tuple[str, int]:
    """Split a policy nameserver entry into address and port.

    Accepts ``"192.0.2.53"``, ``"192.0.2.53:5353"``, ``"2001:db8::53"`` and
    ``"[2001:db8::53]:5353"``.

    :raises ValueError: the entry is not an IP address with an optional port
    """
    text = entry.strip()
    port = _DEFAULT_PORT
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"malformed nameserver {entry!r}")
        if rest:
            port = _parse_port(rest[1:], entry)
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = _parse_port(port_text, entry)
    else:
        host = text
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"nameserver {entry!r} is not an IP address") from None
    return str(address), port


def _parse_port(text: str, entry: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"bad port in nameserver {entry!r}")
    return int(text)


DnsTap = Callable[[str, str, str, "bytes | None"], None]
DNS_TAP: contextvars.ContextVar[DnsTap | None] = contextvars.ContextVar("gateway_dns_tap", default=None)
"""Set by a captured session's task: called with (name, type, outcome, response wire) for
each lookup. Outcomes: ``answer``, ``noanswer``, ``nxdomain`` (with the response when
dnspython kept it), ``timeout``, ``servfail``, ``error``."""


def dns_key(qname: Any, rdtype: Any) -> tuple[str, str]:
    """The record's key of a query: lower-case name without the final dot, type text."""
    name = qname.to_text() if isinstance(qname, dns.name.Name) else str(qname)
    kind = dns.rdatatype.to_text(dns.rdatatype.RdataType.make(rdtype)) if isinstance(rdtype, int) else str(rdtype).upper()
    return name.lower().rstrip("."), kind


def _outcome(exc: BaseException) -> tuple[str, bytes | None]:
    if isinstance(exc, dns.resolver.NXDOMAIN):
        responses = (getattr(exc, "kwargs", None) or {}).get("responses") or {}
        response = next(iter(responses.values()), None)
        return "nxdomain", response.to_wire() if response is not None else None
    if isinstance(exc, dns.resolver.NoAnswer):
        response = (getattr(exc, "kwargs", None) or {}).get("response")
        return "noanswer", response.to_wire() if isinstance(response, dns.message.Message) else None
    if isinstance(exc, (dns.resolver.LifetimeTimeout, TimeoutError)):
        return "timeout", None
    if isinstance(exc, dns.resolver.NoNameservers):
        return "servfail", None
    return "error", None


class BlockingResolver(Protocol):
    """A resolver for code in the thread pool: ``dns.resolver.Resolver``'s ``resolve``."""

    lifetime: float

    def resolve(self, qname: Any, rdtype: Any = dns.rdatatype.A, *args: Any, **kwargs: Any) -> dns.resolver.Answer:
        """As ``dns.resolver.Resolver.resolve``: blocks until the answer or the failure."""
        ...


# Configuration a blocking view shares with its asynchronous resolver (besides the servers).
_SHARED_SETTINGS = (
    "domain", "search", "use_search_by_default", "ndots", "rotate", "retry_servfail", "timeout", "lifetime",
    "edns", "ednsflags", "ednsoptions", "payload", "flags", "keyring", "keyname", "keyalgorithm",
)


class RecordingResolver(dns.asyncresolver.Resolver):
    """The gateway's resolver; hands each outcome to :data:`DNS_TAP` when one is set.

    Costs one context-variable read per lookup when nothing is captured.
    """

    async def resolve(self, qname: Any, rdtype: Any = dns.rdatatype.A, *args: Any, **kwargs: Any) -> Any:
        tap = DNS_TAP.get()
        if tap is None:
            return await super().resolve(qname, rdtype, *args, **kwargs)
        key = dns_key(qname, rdtype)
        try:
            answer = await super().resolve(qname, rdtype, *args, **kwargs)
        except (dns.exception.DNSException, TimeoutError) as exc:
            tap(*key, *_outcome(exc))
            raise
        tap(*key, "answer", answer.response.to_wire())
        return answer

    @cached_property
    def _blocking(self) -> _BlockingRecordingResolver:
        view = _BlockingRecordingResolver(configure=False)
        for attr in _SHARED_SETTINGS:
            setattr(view, attr, getattr(self, attr))
        view.nameservers = list(self.nameservers)
        return view

    def blocking(self) -> BlockingResolver:
        """A blocking resolver asking the same servers within the same limits, recording
        to :data:`DNS_TAP` in the same form, for a library that runs in the thread pool
        (``Gateway.run_in_thread`` carries the tap along). One per resolver, shared by the
        pool's threads (dnspython keeps no per-query state on it); reads no file.
        """
        return self._blocking


class _BlockingRecordingResolver(dns.resolver.Resolver):
    """:class:`RecordingResolver`'s blocking view."""

    def resolve(self, qname: Any, rdtype: Any = dns.rdatatype.A, *args: Any, **kwargs: Any) -> dns.resolver.Answer:
        tap = DNS_TAP.get()
        if tap is None:
            return super().resolve(qname, rdtype, *args, **kwargs)
        key = dns_key(qname, rdtype)
        try:
            answer = super().resolve(qname, rdtype, *args, **kwargs)
        except (dns.exception.DNSException, TimeoutError) as exc:
            tap(*key, *_outcome(exc))
            raise
        tap(*key, "answer", answer.response.to_wire())
        return answer


class RecordedResolver:
    """Answers lookups from recorded outcomes (see :data:`DNS_TAP`), never the network.

    :attr:`session` holds the outcomes recorded in the session being replayed and is
    asked first; then :attr:`everything` (what any session of the capture saw, since a
    plugin's cache hid repeated lookups from later sessions). A query in neither goes to
    ``live`` (a :class:`RecordingResolver`) when given, else fails as a timeout would,
    counted in :attr:`missing`. :meth:`blocking` answers from the same record, for
    libraries in the thread pool.
    """

    def __init__(self, everything: Mapping[tuple[str, str], tuple[str, bytes | None]], live: Any = None) -> None:
        self.everything = everything
        self.session: Mapping[tuple[str, str], tuple[str, bytes | None]] = {}
        self.live = live
        self.missing: list[tuple[str, str]] = []
        self.lifetime = 5.0
        self.timeout = 5.0

    def find(self, key: tuple[str, str]) -> tuple[str, bytes | None] | None:
        """The recorded outcome of ``key``; ``None``: ask :attr:`live`.

        :raises dns.resolver.LifetimeTimeout: not in the record and no live resolver
            (counted in :attr:`missing`)
        """
        found = self.session.get(key) or self.everything.get(key)
        if found is None and self.live is None:
            self.missing.append(key)
            raise dns.resolver.LifetimeTimeout(timeout=0.0, errors=[])  # type: ignore[no-untyped-call]
        return found

    async def resolve(self, qname: Any, rdtype: Any = dns.rdatatype.A, *args: Any, **kwargs: Any) -> Any:
        key = dns_key(qname, rdtype)
        found = self.find(key)
        if found is None:
            return await self.live.resolve(qname, rdtype, *args, **kwargs)
        return _replayed(qname, key, found, raise_on_no_answer=kwargs.get("raise_on_no_answer", True))

    @cached_property
    def _blocking(self) -> _BlockingRecordedResolver:
        return _BlockingRecordedResolver(self, self.live.blocking() if self.live is not None else None)

    def blocking(self) -> BlockingResolver:
        """A blocking view of this record: the same lookup table and :attr:`missing`
        list; queries the record lacks go to the live resolver's blocking view."""
        return self._blocking


class _BlockingRecordedResolver:
    """:class:`RecordedResolver`'s blocking view."""

    def __init__(self, record: RecordedResolver, live: BlockingResolver | None) -> None:
        self._record = record
        self._live = live

    @property
    def lifetime(self) -> float:
        return self._record.lifetime

    @lifetime.setter
    def lifetime(self, value: float) -> None:
        self._record.lifetime = value

    def resolve(self, qname: Any, rdtype: Any = dns.rdatatype.A, *args: Any, **kwargs: Any) -> dns.resolver.Answer:
        key = dns_key(qname, rdtype)
        found = self._record.find(key)
        if found is None:
            assert self._live is not None  # find() raised otherwise
            return self._live.resolve(qname, rdtype, *args, **kwargs)
        return _replayed(qname, key, found, raise_on_no_answer=kwargs.get("raise_on_no_answer", True))


def _replayed(
    qname: Any, key: tuple[str, str], found: tuple[str, bytes | None], *, raise_on_no_answer: bool
) -> dns.resolver.Answer:
    """The answer recorded as ``found`` for ``key``, or the exception recorded, raised.

    :raises dns.exception.DNSException: as the resolver did when the record was made
    """
    outcome, wire = found
    name = qname if isinstance(qname, dns.name.Name) else dns.name.from_text(str(qname))
    response = cast("dns.message.QueryMessage", dns.message.from_wire(wire)) if wire is not None else None
    if outcome in ("answer", "noanswer") and response is not None:
        answer = dns.resolver.Answer(name, dns.rdatatype.from_text(key[1]), dns.rdataclass.IN, response)
        # A recorded empty answer (asked with raise_on_no_answer=False, as SPF does)
        # raises for a caller that wants NoAnswer, as the resolver would have.
        if answer.rrset is not None or not raise_on_no_answer:
            return answer
        raise dns.resolver.NoAnswer(response=response)  # type: ignore[no-untyped-call]
    if outcome == "nxdomain":
        raise dns.resolver.NXDOMAIN(  # type: ignore[no-untyped-call]
            qnames=[name], responses={name: response} if response else {}
        )
    if outcome == "noanswer":
        raise dns.resolver.NoAnswer()  # type: ignore[no-untyped-call]
    if outcome == "servfail":
        request = dns.message.make_query(name, key[1])
        raise dns.resolver.NoNameservers(request=request, errors=[])  # type: ignore[no-untyped-call]
    raise dns.resolver.LifetimeTimeout(timeout=0.0, errors=[])  # type: ignore[no-untyped-call]


def make_resolver(settings: DnsSettings) -> RecordingResolver:
    """A resolver for the policy's ``[dns]`` section.

    With ``nameservers`` set, only those are asked (each at its own port); otherwise the
    system configuration (``/etc/resolv.conf``) applies. If that names no server, the
    resolver asks 127.0.0.1 as the C library does, and says so in the log.
    ``settings.timeout`` bounds one whole lookup (all servers and retries together).

    :raises ValueError: a nameserver entry is malformed
    """
    if settings.nameservers:
        resolver = RecordingResolver(configure=False)
        servers: list[dns.nameserver.Nameserver | str] = []
        for entry in settings.nameservers:
            address, port = parse_nameserver(entry)
            servers.append(dns.nameserver.Do53Nameserver(address, port))
        resolver.nameservers = servers
    else:
        try:
            resolver = RecordingResolver()
        except dns.resolver.NoResolverConfiguration:
            log.warning("no nameserver in the system configuration; asking 127.0.0.1")
            resolver = RecordingResolver(configure=False)
            resolver.nameservers = ["127.0.0.1"]
    resolver.lifetime = float(settings.timeout)
    # One server's share of the lifetime; dnspython retries the others within it.
    resolver.timeout = min(float(resolver.timeout), float(settings.timeout))
    return resolver


async def lookup(
    resolver: dns.asyncresolver.Resolver, name: str, rdtype: str
) -> dns.resolver.Answer | None:
    """Query ``name`` for ``rdtype``; ``None`` means the name exists without such records.

    Follows CNAMEs as the resolver does. The resolver's lifetime bounds the wait.

    :raises DnsNotFound: NXDOMAIN, or ``name`` is not a valid domain name
    :raises DnsTemporaryError: SERVFAIL, timeout, or no server could answer
    """
    try:
        qname = dns.name.from_text(name)
    except (dns.exception.DNSException, UnicodeError, ValueError) as exc:
        raise DnsNotFound(f"{name[:255]!r} is not a valid domain name: {exc}") from None
    try:
        return await resolver.resolve(qname, rdtype, raise_on_no_answer=True, search=False)
    except dns.resolver.NoAnswer:
        return None
    except dns.resolver.NXDOMAIN:
        raise DnsNotFound(f"{qname.to_text(omit_final_dot=True)}: no such domain") from None
    except dns.resolver.YXDOMAIN:
        raise DnsNotFound(f"{qname.to_text(omit_final_dot=True)}: name too long") from None
    except dns.resolver.LifetimeTimeout:
        raise DnsTemporaryError(f"{name} {rdtype}: DNS timeout") from None
    except dns.resolver.NoNameservers as exc:
        # Every server answered SERVFAIL/REFUSED or could not be reached.
        raise DnsTemporaryError(f"{name} {rdtype}: DNS failure ({exc})") from None
    except dns.exception.DNSException as exc:
        raise DnsTemporaryError(f"{name} {rdtype}: DNS error ({exc})") from None


def is_authenticated(answer: dns.resolver.Answer | None) -> bool:
    """Whether the resolver said it validated ``answer`` with DNSSEC (the AD bit, RFC 4035
    §3.2.3). Worth something only from a validating resolver on a trusted path, asked
    with AD or DO set (RFC 6840 §5.7); see ``[dns] dnssec``."""
    return answer is not None and bool(answer.response.flags & dns.flags.AD)


async def resolve_addresses(resolver: dns.asyncresolver.Resolver, name: str) -> list[str]:
    """The IPv4 then IPv6 addresses of ``name``: :func:`resolve_authenticated_addresses`
    without the DNSSEC state."""
    return (await resolve_authenticated_addresses(resolver, name))[0]


class HostAddresses(NamedTuple):
    """What :func:`resolve_authenticated_addresses` found for a name."""

    addresses: list[str]
    #: every answer that gave addresses was DNSSEC-validated (:func:`is_authenticated`),
    #: CNAME records on the way included
    is_secure: bool
    #: the name the address records are at once CNAMEs are followed (lower case, no
    #: final dot): the name asked for when there was no CNAME
    canonical: str


async def resolve_authenticated_addresses(resolver: dns.asyncresolver.Resolver, name: str) -> HostAddresses:
    """The IPv4 then IPv6 addresses of ``name`` (A and AAAA asked in parallel), whether
    every answer that gave addresses was DNSSEC-validated (:func:`is_authenticated`), and
    the fully CNAME-expanded name they are at.

    IPv4 comes first because a gateway without IPv6 routing fails slowly on it; both
    families are returned, so a client moves on to the other on a connection failure.
    One family may fail as long as the other answers.

    :raises DnsNotFound: the name does not exist, or exists without any address
    :raises DnsTemporaryError: neither lookup gave an answer and one failed temporarily
    """
    results = await asyncio.gather(
        lookup(resolver, name, "A"), lookup(resolver, name, "AAAA"), return_exceptions=True
    )
    addresses: list[str] = []
    errors: list[BaseException] = []
    secure = True
    canonical = ""
    for result in results:
        if isinstance(result, BaseException):
            if not isinstance(result, DnsError):
                raise result
            errors.append(result)
        elif result is not None:
            addresses.extend(str(rdata.address) for rdata in result)
            secure = secure and is_authenticated(result)
            canonical = canonical or result.canonical_name.to_text(omit_final_dot=True).lower()
    if addresses:
        return HostAddresses(addresses, secure, canonical or name.rstrip(".").lower())
    for error in errors:
        if isinstance(error, DnsTemporaryError):
            raise error
    if errors:
        raise errors[0]
    raise DnsNotFound(f"{name}: no A or AAAA records")
