"""Where a TLS report goes and how it gets there (RFC 8460 §3, §5).

- :func:`parse_record`: the ``_smtp._tls`` TXT answer of a policy domain: exactly one
  record starting ``v=TLSRPTv1;`` (otherwise the domain does not take reports, §3), its
  ``rua`` a comma-separated list of ``mailto:`` and ``https:`` URIs.
- :func:`report_mail`: the message (§5.3): ``multipart/report; report-type="tlsrpt"``,
  a short text part and the gzip'd JSON as ``application/tlsrpt+gzip`` named
  ``submitter!policy-domain!begin!end!id.json.gz`` (§5.1), subject ``Report Domain: <domain>
  Submitter: <org> Report-ID: <id>``, ``TLS-Report-Domain`` and ``TLS-Report-Submitter``.
- :func:`post_report`: the HTTPS upload (§5.4): a POST of the gzip'd JSON with
  ``Content-Type: application/tlsrpt+gzip``, to the host the gateway's resolver finds,
  with a certificate that chains to the CA file (or the system's) and names it; any
  2xx answer is success.
"""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

import dns.asyncresolver

from gateway.dns import DnsError, resolve_addresses
from gateway.reports import report_message

__all__ = ["MEDIA_TYPE", "ReportUri", "ReportPostError", "parse_record", "post_report", "report_mail", "report_filename"]

MEDIA_TYPE = "application/tlsrpt+gzip"
_VERSION = "v=TLSRPTv1"
_MAX_URIS = 10
_MAX_ANSWER = 8 * 1024


@dataclass(frozen=True, slots=True)
class ReportUri:
    """One ``rua`` destination: ``mailto`` (an address) or ``https`` (a URL)."""

    scheme: Literal["mailto", "https"]
    target: str

    def __str__(self) -> str:
        return f"{self.scheme}:{self.target}" if self.scheme == "mailto" else self.target


def _uri(text: str) -> ReportUri | None:
    text = text.strip()
    scheme, colon, rest = text.partition(":")
    if not colon:
        return None
    scheme = scheme.lower()
    if scheme == "mailto":
        address = unquote(rest.split("?", 1)[0]).strip()
        local, at, domain = address.rpartition("@")
        if not (at and local and domain) or any(c in address for c in " <>,;\r\n\t\"") or len(address) > 254:
            return None
        return ReportUri("mailto", f"{local}@{domain.lower()}")
    if scheme == "https":
        parts = urlsplit(text)
        if not parts.hostname or any(c in text for c in " \r\n\t") or len(text) > 2048:
            return None
        return ReportUri("https", text)
    return None


def parse_record(texts: list[str]) -> tuple[ReportUri, ...]:
    """The ``rua`` URIs of the one ``v=TLSRPTv1`` record among ``texts`` (RFC 8460 §3).

    URIs of other schemes, or that do not parse, are left out.

    :raises ValueError: no such record, several, or one without ``rua``: the domain does
        not take reports
    """
    records = [t for t in texts if t.startswith(_VERSION) and t[len(_VERSION):].lstrip(" \t").startswith(";")]
    if len(records) != 1:
        raise ValueError(f"{len(records)} v=TLSRPTv1 TXT records, not one")
    fields: dict[str, str] = {}
    for part in records[0].split(";")[1:]:
        key, sep, value = part.strip().partition("=")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    if "rua" not in fields:
        raise ValueError("the v=TLSRPTv1 record has no rua")
    uris = tuple(u for u in (_uri(t) for t in fields["rua"].split(",")[:_MAX_URIS]) if u is not None)
    return tuple(dict.fromkeys(uris))


def report_filename(submitter: str, domain: str, begin: int, end: int, unique: str) -> str:
    """``submitter!policy-domain!begin!end!unique.json.gz`` (RFC 8460 §5.1)."""
    return f"{submitter}!{domain}!{begin}!{end}!{unique}.json.gz"


def report_mail(
    data: bytes, *, domain: str, org_name: str, report_id: str, filename: str, sender: str,
    recipients: list[str], hostname: str, begin: int, end: int, now: float,
) -> bytes:
    """The report message (RFC 8460 §5.3), CRLF line ends.

    :param data: the gzip'd report
    :param sender: ``From:`` (the reporting address)
    :param recipients: the ``To:`` addresses (the ``mailto:`` destinations)
    """
    message = report_message(
        sender=sender, recipients=recipients, domain=domain, org_name=org_name, report_id=report_id,
        kind="tlsrpt", hostname=hostname, now=now,
    )
    message["TLS-Report-Domain"] = domain
    message["TLS-Report-Submitter"] = org_name
    message.set_content(
        f"This is an aggregate TLS report (RFC 8460) for {domain} from {org_name},\n"
        f"covering {email.utils.formatdate(begin, usegmt=True)} to {email.utils.formatdate(end, usegmt=True)}.\n"
    )
    message.add_attachment(data, maintype="application", subtype="tlsrpt+gzip", filename=filename)
    message.set_type("multipart/report")
    message.set_param("report-type", "tlsrpt")
    return message.as_bytes()


def compress(document: bytes) -> bytes:
    """The gzip'd report; ``mtime=0``, so one report always compresses to the same octets."""
    return gzip.compress(document, mtime=0)


class ReportPostError(Exception):
    """An ``https:`` destination did not take the report. ``answered``: the server
    answered (or showed a bad certificate), so another of its addresses is not tried."""

    def __init__(self, detail: str, *, answered: bool = False) -> None:
        super().__init__(detail)
        self.answered = answered


def _context_sync(ca_file: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


async def https_context(ca_file: Path | None) -> ssl.SSLContext:
    """A verifying client context for report uploads (the CA bundle is read in a thread)."""
    return await asyncio.to_thread(_context_sync, ca_file)


async def post_report(
    url: str, data: bytes, resolver: dns.asyncresolver.Resolver, context: ssl.SSLContext, *,
    timeout: float, user_agent: str = "smtp-gateway TLSRPT",
) -> int:
    """POST ``data`` (the gzip'd report) to ``url``; the HTTP status of a 2xx answer.

    :raises ReportPostError: no address took it, or the answer was not 2xx
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or 443
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        async with asyncio.timeout(timeout):
            try:
                addresses = await resolve_addresses(resolver, host)
            except DnsError as exc:
                raise ReportPostError(f"{host} does not resolve: {exc}") from None
            last = ReportPostError(f"{host} has no address")
            for address in addresses:
                try:
                    return await _post(address, port, host, path, data, context, user_agent)
                except ReportPostError as exc:
                    last = exc
                    if exc.answered:
                        raise
            raise last
    except TimeoutError:
        raise ReportPostError(f"posting to {url} timed out after {timeout:g}s") from None


async def _post(
    address: str, port: int, host: str, path: str, data: bytes, context: ssl.SSLContext, user_agent: str
) -> int:
    try:
        reader, writer = await asyncio.open_connection(address, port, ssl=context, server_hostname=host)
    except ssl.SSLCertVerificationError as exc:
        raise ReportPostError(f"certificate of {host}: {exc.verify_message}", answered=True) from None
    except (OSError, ssl.SSLError) as exc:
        raise ReportPostError(f"cannot connect to {host} [{address}]:{port}: {exc}") from None
    try:
        authority = host if port == 443 else f"{host}:{port}"
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: {user_agent}\r\n"
            f"Content-Type: {MEDIA_TYPE}\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode("ascii") + data)
        await writer.drain()
        status_line = (await reader.readline())[:_MAX_ANSWER].decode("latin-1").strip()
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ReportPostError(f"posting to {host}: {type(exc).__name__}: {exc}") from None
    finally:
        writer.transport.abort()  # Connection: close; the answer's body is not needed
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ReportPostError(f"{host} answered something that is not HTTP: {status_line[:80]!r}", answered=True)
    if not parts[1].startswith("2"):
        raise ReportPostError(f"HTTP {status_line[9:80]} from {host}", answered=True)
    return int(parts[1])
