"""Helpers shared by the DKIM and DMARC plugins.

- :func:`fetch_txt`: TXT records through the gateway's own asynchronous resolver (the
  policy's ``[dns]`` section, never the system resolver), failures classified.
- :func:`author_domain`: the RFC 5322.From domain, insisting on exactly one address
  (RFC 7489 §6.6.1).
- :func:`organizational_domain` and :func:`is_aligned`: identifier alignment
  (RFC 7489 §3.1, §3.2) with a small built-in public-suffix rule: the organisational
  domain is the last two labels, or the last three when the last two are a well-known
  multi-label public suffix (``co.uk``, ``com.au`` ...). Sites add more suffixes through
  the DMARC plugin's ``public_suffixes`` setting. This is a heuristic, not the full Public
  Suffix List: under an unlisted multi-label suffix (say ``example.gen.xx``), two
  unrelated registrations look like one organisation to relaxed alignment.
"""

from __future__ import annotations

import asyncio
import email.utils
import re
from collections.abc import Iterable
from typing import Any, Literal

from gateway.dns import DnsNotFound, DnsTemporaryError, lookup
from gateway.model import Message

__all__ = [
    "MULTI_LABEL_SUFFIXES",
    "author_domain",
    "fetch_txt",
    "is_aligned",
    "normalize_domain",
    "organizational_domain",
]

# Second-level public suffixes seen most in mail; anything else counts as one label.
MULTI_LABEL_SUFFIXES: frozenset[str] = frozenset(
    """
    co.uk org.uk ac.uk gov.uk me.uk ltd.uk plc.uk net.uk sch.uk nhs.uk police.uk
    com.au net.au org.au edu.au gov.au asn.au id.au
    co.nz net.nz org.nz ac.nz govt.nz school.nz geek.nz
    co.jp ne.jp or.jp ac.jp go.jp ad.jp ed.jp gr.jp lg.jp
    co.kr or.kr ne.kr ac.kr go.kr re.kr
    com.cn net.cn org.cn gov.cn edu.cn ac.cn
    com.tw net.tw org.tw edu.tw gov.tw idv.tw
    com.hk net.hk org.hk edu.hk gov.hk
    com.sg net.sg org.sg edu.sg gov.sg
    com.my net.my org.my edu.my gov.my
    co.in net.in org.in firm.in gen.in ind.in ac.in edu.in gov.in
    co.id or.id ac.id go.id web.id
    co.il org.il net.il ac.il gov.il
    co.th in.th ac.th go.th or.th
    co.za org.za net.za ac.za gov.za web.za
    com.br net.br org.br gov.br edu.br
    com.ar net.ar org.ar gob.ar
    com.mx net.mx org.mx gob.mx edu.mx
    com.co net.co org.co gov.co edu.co
    com.pe net.pe org.pe gob.pe
    com.tr net.tr org.tr gov.tr edu.tr
    com.ua net.ua org.ua gov.ua
    com.pl net.pl org.pl
    co.at or.at ac.at gv.at
    com.es org.es nom.es edu.es gob.es
    com.ph net.ph org.ph gov.ph
    com.vn net.vn org.vn gov.vn
    com.sa net.sa org.sa gov.sa
    com.eg net.eg org.eg gov.eg
    com.pk net.pk org.pk gov.pk
    com.ng org.ng gov.ng
    co.ke or.ke ac.ke go.ke
    """.split()
)

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def normalize_domain(text: str) -> str | None:
    """``text`` as a lower-case A-label domain, or ``None`` if it is not a host name.

    :param text: a domain as written in a header or a DKIM tag
    """
    domain = text.strip().rstrip(".").lower()
    if not domain or len(domain) > 253:
        return None
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    labels = domain.split(".")
    if len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        return None
    return domain


def author_domain(message: Message) -> tuple[str | None, str]:
    """The RFC 5322.From domain, or ``None`` and why there is not exactly one.

    RFC 7489 §6.6.1: DMARC needs a single author domain. A missing From, several From
    fields, several addresses in one field or an address without a valid domain all
    answer ``None`` with a short reason for the logs and the header.

    :param message: the message whose From field is read
    """
    values = message.header_values("From")
    if not values:
        return None, "no From header"
    if len(values) > 1:
        return None, "several From headers"
    addresses = [addr for _, addr in email.utils.getaddresses(values) if addr]
    if len(addresses) != 1:
        return None, "no From address" if not addresses else "several From addresses"
    local, at, domain = addresses[0].rpartition("@")
    normal = normalize_domain(domain) if at and local else None
    if normal is None:
        return None, "From address has no valid domain"
    return normal, ""


def organizational_domain(domain: str, extra_suffixes: Iterable[str] = ()) -> str:
    """The organisational domain of ``domain`` (RFC 7489 §3.2), by the built-in rule.

    :param domain: a normalised domain (lower case, no trailing dot)
    :param extra_suffixes: more multi-label public suffixes (``"gen.xx"``) known to the site
    """
    labels = domain.split(".")
    if len(labels) <= 2:
        return domain
    suffixes = MULTI_LABEL_SUFFIXES.union(s.lower().strip(".") for s in extra_suffixes)
    # The longest listed suffix wins, so "a.b.gen.xx" with "b.gen.xx" listed keeps 4 labels.
    for size in range(len(labels) - 1, 1, -1):
        if ".".join(labels[-size:]) in suffixes:
            return ".".join(labels[-size - 1 :]) if size < len(labels) else domain
    return ".".join(labels[-2:])


def is_aligned(
    identifier: str, author: str, mode: Literal["r", "s"], extra_suffixes: Iterable[str] = ()
) -> bool:
    """Whether an authenticated domain aligns with the author domain (RFC 7489 §3.1).

    :param identifier: the SPF MAIL FROM domain or the DKIM ``d=`` domain
    :param author: the RFC 5322.From domain
    :param mode: ``s`` (strict: equal) or ``r`` (relaxed: same organisational domain)
    :param extra_suffixes: site-specific multi-label public suffixes
    """
    identifier, author = identifier.lower().rstrip("."), author.lower().rstrip(".")
    if identifier == author:
        return True
    if mode == "s":
        return False
    return organizational_domain(identifier, extra_suffixes) == organizational_domain(author, extra_suffixes)


async def fetch_txt(resolver: Any, name: str, timeout: float) -> list[bytes]:
    """The TXT records at ``name``, each record's strings joined (RFC 6376 §3.6.2.2).

    An empty list means there are none: the name does not exist (NXDOMAIN), has no TXT
    records (NODATA) or is not a valid DNS name. Both DKIM (key not found) and DMARC (no
    policy) treat those alike.

    :param resolver: the gateway's ``dns.asyncresolver.Resolver``
    :param name: the owner name to ask for
    :param timeout: a bound on the whole lookup, on top of the resolver's own lifetime
    :raises DnsTemporaryError: SERVFAIL, timeout or no server answered
    """
    try:
        async with asyncio.timeout(timeout):
            answer = await lookup(resolver, name, "TXT")
    except DnsNotFound:
        return []
    except TimeoutError:
        raise DnsTemporaryError(f"{name} TXT: DNS timeout") from None
    if answer is None:
        return []
    return [b"".join(rdata.strings) for rdata in answer]
