"""Where a DMARC aggregate report may go, and the mail that carries it (RFC 7489 §7).

- :func:`parse_uri`: a ``rua`` URI, ``mailto:dmarc@example.org!10m``: the address and the
  size limit (§6.2: a number with an optional unit ``k``, ``m``, ``g`` or ``t``, powers
  of 1024; no unit: octets). Other schemes are not supported (``None``).
- :func:`is_authorized`: the external destination check (§7.1): a report for
  ``example.com`` goes to an address at ``reports.example.net`` (another organisational
  domain) only if ``example.com._report._dmarc.reports.example.net`` has a TXT record
  starting with ``v=DMARC1``; otherwise anyone could publish a ``rua`` that makes us
  mail a third party.
- :func:`report_mail`: the message (§7.2.1.1): a short text part and the gzip'd XML as an
  ``application/gzip`` attachment named ``receiver!policy-domain!begin!end.xml.gz``,
  subject ``Report Domain: <domain> Submitter: <org> Report-ID: <id>``.
"""

from __future__ import annotations

import email.utils
import gzip
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from gateway.reports import report_message
from plugins._mailauth import fetch_txt, normalize_domain, organizational_domain

__all__ = ["ReportUri", "is_authorized", "parse_uri", "report_filename", "report_mail"]

_SIZE = re.compile(r"^(\d{1,15})([kmgt]?)$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


@dataclass(frozen=True, slots=True)
class ReportUri:
    """A ``mailto:`` report URI.

    :param address: the mailbox
    :param domain: its domain, normalised
    :param limit: the largest report (octets of the whole message) it takes, ``None``: any
    """

    address: str
    domain: str
    limit: int | None = None


def parse_uri(text: str) -> ReportUri | None:
    """A ``rua`` entry as a :class:`ReportUri`; ``None`` if it is not a usable ``mailto:``."""
    uri, bang, size = text.strip().partition("!")
    limit = None
    if bang:
        match = _SIZE.match(size.strip())
        if match is None:
            return None
        limit = int(match.group(1)) * _UNITS[match.group(2).lower()]
    scheme, colon, rest = uri.partition(":")
    if not colon or scheme.strip().lower() != "mailto":
        return None
    # RFC 6068: percent-encoded, possibly with ?headers (ignored); one address only.
    address = unquote(rest.split("?", 1)[0]).strip()
    local, at, host = address.rpartition("@")
    domain = normalize_domain(host) if at and local and "," not in address else None
    if domain is None or any(c in local for c in " <>\r\n\t"):
        return None
    return ReportUri(f"{local}@{domain}", domain, limit)


async def is_authorized(
    resolver: Any, policy_domain: str, uri: ReportUri, timeout: float, suffixes: tuple[str, ...] = ()
) -> bool:
    """Whether ``uri`` may receive ``policy_domain``'s reports (RFC 7489 §7.1).

    :raises gateway.dns.DnsTemporaryError: the authorisation could not be looked up now
    """
    if organizational_domain(uri.domain, suffixes) == organizational_domain(policy_domain, suffixes):
        return True
    records = await fetch_txt(resolver, f"{policy_domain}._report._dmarc.{uri.domain}", timeout)
    return any(record.lstrip().startswith(b"v=DMARC1") for record in records)


def report_filename(receiver: str, domain: str, begin: int, end: int) -> str:
    """``receiver!policy-domain!begin!end.xml.gz`` (RFC 7489 §7.2.1.1)."""
    return f"{receiver}!{domain}!{begin}!{end}.xml.gz"


def report_mail(
    xml: bytes, *, receiver: str, org_name: str, domain: str, report_id: str, begin: int, end: int,
    sender: str, recipients: list[str], hostname: str, now: float,
) -> bytes:
    """The report message, CRLF line ends.

    :param xml: the report document
    :param receiver: our domain, for the file name
    :param sender: the ``From:`` address (the reporting address)
    :param recipients: the ``To:`` addresses
    """
    message = report_message(
        sender=sender, recipients=recipients, domain=domain, org_name=org_name, report_id=report_id,
        kind="dmarc", hostname=hostname, now=now,
    )
    message.set_content(
        f"This is a DMARC aggregate report (RFC 7489) for {domain}\n"
        f"from {org_name}, covering {email.utils.formatdate(begin, usegmt=True)}"
        f" to {email.utils.formatdate(end, usegmt=True)}.\n"
    )
    # mtime=0: the same report always compresses to the same octets.
    data = gzip.compress(xml, mtime=0)
    message.add_attachment(
        data, maintype="application", subtype="gzip", filename=report_filename(receiver, domain, begin, end)
    )
    return message.as_bytes()
