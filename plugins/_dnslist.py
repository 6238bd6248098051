"""DNS list lookups: query names, a TTL-honouring cache, return codes, body domains.

Shared code of ``connect_dnsbl`` (the leading ``_`` keeps it from being a plugin).

- :func:`ip_query_name` and :func:`domain_query_name` build the names RFC 5782 defines:
  reversed IPv4 octets (§2.1), reversed IPv6 nibbles (§2.4), a domain prepended as is (§3).
- :class:`RecordCache` is a bounded LRU map of (name, type) to records with an expiry.
- :func:`lookup_records` asks the gateway's shared asynchronous resolver through the cache,
  honouring the answer's TTL and caching a negative answer (NXDOMAIN, NODATA) for the SOA
  minimum (RFC 2308 §5) or a fallback.
- :func:`classify_code` tells a listing from an error code and from garbage.
- :func:`extract_body_domains` finds the host names of URLs in a message's text parts.
- :class:`Listing` and :class:`Findings` hold what the lists said; :func:`render_reply`
  writes the reply text that names the list.
"""

from __future__ import annotations

import asyncio
import email
import email.message
import email.policy
import ipaddress
import re
import string
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal

import dns.exception
import dns.message
import dns.name
import dns.rdatatype
import dns.resolver

from gateway.dns import DnsTemporaryError

__all__ = [
    "KIND_TEXT",
    "ActionName",
    "Findings",
    "Kind",
    "Listing",
    "RecordCache",
    "check_template",
    "classify_code",
    "clean_text",
    "domain_query_name",
    "extract_body_domains",
    "ip_query_name",
    "lookup_records",
    "negative_ttl",
    "normalise_domain",
    "render_reply",
]

ActionName = Literal["reject", "tempfail", "score", "accept", "ignore"]
Kind = Literal["client", "helo", "mail_from", "body"]
KIND_TEXT = {"client": "Client host", "helo": "HELO name", "mail_from": "Sender domain",
             "body": "Message body domain"}
TEMPLATE_FIELDS = frozenset({"kind", "target", "zone", "code", "txt"})
_MAX_LINE = 400  # RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets

_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_UNPRINTABLE = re.compile(r"[^\x21-\x7e]+")
_URL = re.compile(rb"(?i)\b(?:https?://|(?=www\.))([^\s/?#<>\"'\\()\[\]{}|^`]+)")
_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
# Codes that are not listings but a list telling the querier something: 127.0.0.1 must
# never be a listing (RFC 5782 §5) and some lists answer it to refused queriers;
# Spamhaus answers 127.255.255.0/24 to public resolvers and over-quota users, DNSWL
# 127.0.0.255.
_ERROR_CODES = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("127.0.0.255/32"),
                ipaddress.ip_network("127.255.255.0/24"))


def ip_query_name(ip: str, zone: str) -> str:
    """The DNSBL query name of ``ip`` in ``zone`` (RFC 5782 §2.1, §2.4).

    ``192.0.2.99`` in ``bl.example`` is ``99.2.0.192.bl.example``; an IPv6 address is
    written as 32 reversed nibbles. An IPv4-mapped IPv6 address is queried as IPv4.

    :param ip: the client address
    :param zone: the list's zone, without a trailing dot
    :raises ValueError: ``ip`` is not an IP address
    """
    address = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    # reverse_pointer is "4.3.2.1.in-addr.arpa" or the 32 nibbles plus ".ip6.arpa".
    reversed_part = address.reverse_pointer.rsplit(".", 2)[0]
    return f"{reversed_part}.{zone}"


def normalise_domain(name: str) -> str | None:
    """``name`` as an ASCII, lower-case domain of at least two labels, or ``None``.

    Address literals, single labels, IP addresses and names that are not valid in DNS
    give ``None``: there is nothing to look up.

    :param name: a HELO name, the domain of an address, or a URL's host
    """
    name = name.strip().rstrip(".").lower()
    if not name or name.startswith("["):
        return None
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    labels = name.split(".")
    if len(labels) < 2 or len(name) > 253 or not all(_LABEL.match(label) for label in labels):
        return None
    if labels[-1].isdigit():  # a dotted IP address, not a domain
        return None
    return name


def domain_query_name(domain: str, zone: str) -> str | None:
    """The RHSBL query name of ``domain`` in ``zone`` (RFC 5782 §3), or ``None``.

    :param domain: the domain to check (any case, trailing dot allowed)
    :param zone: the list's zone
    :returns: ``None`` if ``domain`` is not a checkable domain or the name would be too long
    """
    normal = normalise_domain(domain)
    if normal is None:
        return None
    qname = f"{normal}.{zone}"
    return qname if len(qname) <= 253 else None


def classify_code(code: str) -> Literal["listed", "error", "invalid"]:
    """What one A record of a list means.

    RFC 5782 §2.3: listings are addresses in 127.0.0.0/8. Anything else is ``invalid``
    (a list that answers everything with a web server's address must not block all
    mail); the known refusal codes are ``error``.

    :param code: the address from the A record
    """
    try:
        address = ipaddress.ip_address(code)
    except ValueError:
        return "invalid"
    if not isinstance(address, ipaddress.IPv4Address) or address not in _LOOPBACK:
        return "invalid"
    if any(address in net for net in _ERROR_CODES):
        return "error"
    return "listed"


def clean_text(text: str, limit: int = 200) -> str:
    """Text from DNS or a client made safe for a reply line: printable ASCII, one line.

    Runs of anything else (control characters, CR LF, non-ASCII) become one space; the
    result is cut at ``limit`` characters with ``...``.

    :param text: the untrusted text
    :param limit: the longest result
    """
    text = _UNPRINTABLE.sub(" ", text).strip()
    if len(text) > limit:
        text = text[: max(limit - 3, 0)].rstrip() + "..."
    return text


def check_template(template: str) -> None:
    """Refuse a reply template with fields other than :data:`TEMPLATE_FIELDS`.

    :raises ValueError: naming the unknown field
    """
    for _, name, spec, conv in string.Formatter().parse(template):
        if name is not None and (name not in TEMPLATE_FIELDS or spec or conv):
            fields = ", ".join(sorted(TEMPLATE_FIELDS))
            raise ValueError(f"reply template {template!r}: unknown field {{{name}}}; use {fields}")


def render_reply(template: str, kind: Kind, target: str, zone: str, code: str, txt: str) -> str:
    """The reply text for a listing; the TXT is appended after ``; `` unless placed.

    :param template: a checked template (see :func:`check_template`)
    :param kind: what was looked up
    :param target: the address or name looked up (client-supplied: it is cleaned)
    :param zone: the list's zone
    :param code: the A record's address
    :param txt: the cleaned TXT text, or ``""``
    """
    text = template.format(
        kind=KIND_TEXT[kind], target=clean_text(target, 100), zone=zone, code=code, txt=txt
    )
    if txt and "{txt}" not in template:
        text = f"{text}; {txt}"
    return "\n".join(clean_text(line, _MAX_LINE) for line in text.split("\n"))


@dataclass(frozen=True, slots=True)
class Listing:
    """One finding: a target listed in a zone, or the zone failing (action ``error``)."""

    zone: str
    kind: Kind
    target: str
    code: str
    action: ActionName | Literal["error"]
    score: float
    text: str


@dataclass(slots=True)
class Findings:
    """What the lists said about a session or transaction, kept for a delayed verdict."""

    items: list[Listing] = field(default_factory=list)

    def set(self, kind: Kind, found: Iterable[Listing]) -> None:
        """Replace the findings of ``kind`` (a second EHLO replaces the first's)."""
        self.items = [i for i in self.items if i.kind != kind] + list(found)


class RecordCache:
    """A bounded LRU cache of DNS records with per-entry expiry.

    :param size: the most entries kept (0 turns caching off); the least recently
        used entry goes first
    :param clock: a monotonic clock (replaceable in tests)
    """

    def __init__(self, size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.size = size
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], tuple[float, tuple[str, ...]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[str, str]) -> tuple[str, ...] | None:
        """The records stored for ``key`` if still fresh, else ``None``."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, records = entry
        if expires <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return records

    def put(self, key: tuple[str, str], records: tuple[str, ...], ttl: float) -> None:
        """Keep ``records`` for ``ttl`` seconds (nothing is kept for a TTL of 0)."""
        if self.size <= 0 or ttl <= 0:
            return
        self._entries[key] = (self._clock() + ttl, records)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


def negative_ttl(response: dns.message.Message | None, fallback: float) -> float:
    """How long a negative answer may be cached: RFC 2308 §5, min(SOA TTL, SOA MINIMUM).

    :param response: the negative response, if dnspython kept it
    :param fallback: the time to use when the response carries no SOA
    """
    if response is not None:
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                return float(min(rrset.ttl, rrset[0].minimum))
    return fallback


def _negative_response(exc: dns.exception.DNSException) -> dns.message.Message | None:
    kwargs: dict[str, Any] = getattr(exc, "kwargs", {}) or {}
    if isinstance(exc, dns.resolver.NXDOMAIN):
        responses = kwargs.get("responses") or {}
        return next(iter(responses.values()), None)
    response = kwargs.get("response")
    return response if isinstance(response, dns.message.Message) else None


def _records(answer: dns.resolver.Answer, rdtype: str) -> tuple[str, ...]:
    if rdtype == "TXT":
        # RFC 1035 §3.3.14: one TXT record may hold several strings; they form one text.
        return tuple(
            b"".join(rdata.strings).decode("utf-8", "replace") for rdata in answer
        )
    return tuple(rdata.to_text() for rdata in answer)


async def lookup_records(
    resolver: Any,
    cache: RecordCache,
    qname: str,
    rdtype: Literal["A", "TXT"],
    *,
    timeout: float,
    fallback_negative_ttl: float,
    max_ttl: float,
) -> tuple[str, ...]:
    """The ``rdtype`` records of ``qname``, from the cache or the resolver.

    An empty tuple means "not listed" (NXDOMAIN, NODATA or a name DNS cannot hold) and is
    cached like an answer. Temporary failures are not cached.

    :param resolver: the gateway's ``dns.asyncresolver.Resolver``
    :param cache: the record cache
    :param qname: the full query name
    :param rdtype: ``A`` for the listing, ``TXT`` for the reason
    :param timeout: the longest wait for this lookup
    :param fallback_negative_ttl: cache time of a negative answer without SOA
    :param max_ttl: no entry is cached longer than this
    :raises DnsTemporaryError: SERVFAIL, timeout or no server answered
    """
    key = (qname.lower(), rdtype)
    cached = cache.get(key)
    if cached is not None:
        return cached
    try:
        name = dns.name.from_text(qname)
    except (dns.exception.DNSException, UnicodeError, ValueError):
        return ()
    try:
        async with asyncio.timeout(timeout):
            answer = await resolver.resolve(
                name, rdtype, raise_on_no_answer=True, search=False, lifetime=timeout
            )
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer) as exc:
        ttl = negative_ttl(_negative_response(exc), fallback_negative_ttl)
        cache.put(key, (), min(ttl, max_ttl))
        return ()
    except dns.resolver.YXDOMAIN:
        return ()
    except (TimeoutError, dns.resolver.LifetimeTimeout):
        raise DnsTemporaryError(f"{qname} {rdtype}: DNS timeout") from None
    except dns.exception.DNSException as exc:
        # NoNameservers: every server answered SERVFAIL/REFUSED or was unreachable.
        raise DnsTemporaryError(f"{qname} {rdtype}: DNS failure ({exc})") from None
    records = _records(answer, rdtype)
    ttl = answer.rrset.ttl if answer.rrset is not None else 0
    cache.put(key, records, min(float(ttl), max_ttl))
    return records


def _host(raw: bytes) -> str | None:
    text = raw.decode("utf-8", "replace")
    text = text.rpartition("@")[2]  # user:password@host
    text = text.split(":", 1)[0]  # host:port
    return normalise_domain(text)


def _text_parts(raw: bytes, max_bytes: int) -> list[bytes]:
    """The decoded text/* parts of a message (transfer encodings undone), bounded."""
    message = email.message_from_bytes(raw[:max_bytes], policy=email.policy.compat32)
    out: list[bytes] = []
    budget = max_bytes * 2  # base64 and QP only shrink; the bound is for odd encodings
    for part in message.walk():
        if part.is_multipart() or part.get_content_maintype() != "text":
            continue
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes) and payload:
            out.append(payload[:budget])
            budget -= len(out[-1])
            if budget <= 0:
                break
    return out


def extract_body_domains(raw: bytes, max_bytes: int, max_domains: int) -> list[str]:
    """Host names of the URLs (``http://``, ``https://``, ``www.``) in a message's text.

    Blocking (it parses MIME): run it in the gateway's thread pool. Only the first
    ``max_bytes`` of the message are read; IP-address hosts are left out.

    :param raw: the message as received
    :param max_bytes: how much of the message to read
    :param max_domains: the most names returned, first found first
    :returns: distinct lower-case names in order of appearance
    """
    found: dict[str, None] = {}
    for text in _text_parts(raw, max_bytes):
        # Undo HTML's &#46; style escapes only for the dot: enough to see the host.
        text = text.replace(b"&#46;", b".").replace(b"&#x2e;", b".")
        for match in _URL.finditer(text):
            host = _host(match.group(1))
            if host is not None and host not in found:
                found[host] = None
                if len(found) >= max_domains:
                    return list(found)
    return list(found)
