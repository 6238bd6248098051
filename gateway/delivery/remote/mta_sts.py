"""MTA-STS (RFC 8461): the ``_mta-sts`` TXT record, the policy file, its fetch and its cache.

The parts, each usable alone (``gateway tls check`` shows them one by one):

- :func:`parse_record` reads the TXT answer of ``_mta-sts.<domain>`` (§3.1) into its ``id``;
- :func:`fetch_policy` gets ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` over
  asyncio streams (§3.3): the gateway's resolver, a certificate that chains to the CA
  file (or the system's) and names ``mta-sts.<domain>``, HTTP/1.1 GET, no redirects, at
  most 64 KiB, within a timeout;
- :func:`parse_policy` reads the policy text (§3.2): ``version``, ``mode``, ``mx``,
  ``max_age``; anything that does not parse raises :class:`PolicyInvalid` (and the
  caller acts as if there were no policy);
- :class:`PolicyCache` keeps each domain's last good policy on disk with its ``id`` and
  when it was fetched, so a restart (or another worker) does not fetch again and an
  unreachable policy server cannot strip a cached ``enforce`` (§5.1).

What the agent should do for a destination is decided in
:mod:`gateway.delivery.remote.policy`, which uses these.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import dns.asyncresolver

from gateway.dns import DnsError, resolve_addresses

__all__ = [
    "MAX_POLICY_SIZE",
    "PolicyCache",
    "PolicyFetchError",
    "PolicyInvalid",
    "StsPolicy",
    "fetch_policy",
    "https_context",
    "mx_matches",
    "parse_policy",
    "parse_record",
]

#: RFC 8461 §3.3: senders may limit the policy body; 64 KiB is the limit the RFC suggests
MAX_POLICY_SIZE = 64 * 1024
#: RFC 8461 §3.2: max_age is at most 31557600 seconds (about one year)
MAX_AGE_LIMIT = 31_557_600
#: cached policies the background refresh looks at, at most
MAX_CACHED = 10_000
_WELL_KNOWN = "/.well-known/mta-sts.txt"
_MAX_HEADER_LINE = 8 * 1024
_MAX_HEADERS = 100
_ID_RE = re.compile(r"^[A-Za-z0-9]{1,32}$")
_VERSION_RE = re.compile(r"^v=STSv1[ \t]*(;|$)")  # RFC 8461 §3.1: sts-version *WSP ";"
_FIELD_RE = re.compile(r"^([A-Za-z0-9_.-]+):[ \t]*(.*?)[ \t]*$")
_DOMAIN_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)+[a-z0-9-]{1,63}$")

StsMode = Literal["enforce", "testing", "none"]


class PolicyInvalid(ValueError):
    """A TXT record or policy text that does not follow RFC 8461 (§3.1, §3.2)."""


class PolicyFetchError(Exception):
    """The policy could not be fetched. ``result`` is the RFC 8460 §4.3.2 type:
    ``sts-webpki-invalid`` (the HTTPS certificate) or ``sts-policy-fetch-error``."""

    def __init__(self, detail: str, result: str = "sts-policy-fetch-error", *, answered: bool = False) -> None:
        super().__init__(detail)
        self.result = result
        self.answered = answered  # the server answered (an HTTP error): no other address is tried


@dataclass(frozen=True, slots=True)
class StsPolicy:
    """A parsed policy (RFC 8461 §3.2) with the ``id`` of the TXT record it was fetched for."""

    mode: StsMode
    mx: tuple[str, ...]
    max_age: int
    policy_id: str = ""
    fetched: float = 0.0  # time.time() of the fetch

    @property
    def expires(self) -> float:
        return self.fetched + self.max_age

    def is_fresh(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) < self.expires

    def allows(self, host: str) -> bool:
        """Whether ``host`` matches one of the ``mx`` patterns (RFC 8461 §4.1)."""
        return any(mx_matches(pattern, host) for pattern in self.mx)


def is_domain(name: str) -> bool:
    """Whether ``name`` is a plain DNS name we may look up and use as a file name."""
    return bool(_DOMAIN_RE.match(name))


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 §4.1: ``mx1.example.com`` matches itself; ``*.example.com`` matches one
    label in its place (``mx1.example.com``), not ``example.com`` nor ``a.b.example.com``."""
    pattern = pattern.lower().rstrip(".")
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        first, _, rest = host.partition(".")
        return bool(first) and rest == pattern[2:]
    return host == pattern


def parse_record(texts: list[str]) -> str:
    """The ``id`` of the one ``v=STSv1`` TXT record among ``texts`` (RFC 8461 §3.1).

    :raises PolicyInvalid: none, several, or a malformed one (then the domain has no
        usable policy)
    """
    records = [t for t in texts if _VERSION_RE.match(t)]
    if not records:
        raise PolicyInvalid("no v=STSv1 TXT record")
    if len(records) > 1:
        raise PolicyInvalid(f"{len(records)} v=STSv1 TXT records, not one")
    fields: dict[str, str] = {}
    for part in records[0].split(";"):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise PolicyInvalid(f"malformed TXT field {part[:64]!r}")
        fields.setdefault(key.strip(), value.strip())
    policy_id = fields.get("id", "")
    if not _ID_RE.match(policy_id):
        raise PolicyInvalid(f"TXT record has no valid id ({policy_id[:40]!r})")
    return policy_id


def parse_policy(text: str, policy_id: str = "", fetched: float = 0.0) -> StsPolicy:
    """The policy in ``text`` (RFC 8461 §3.2: ``key: value`` lines, LF or CRLF).

    Unknown keys are ignored; ``version``, ``mode`` and ``max_age`` must be present and
    valid, and ``enforce`` and ``testing`` need at least one ``mx``.

    :raises PolicyInvalid: it does not parse; the RFC treats that as no policy
    """
    values: dict[str, str] = {}
    mx: list[str] = []
    for number, line in enumerate(text.replace("\r\n", "\n").split("\n"), 1):
        if not line.strip():
            continue
        match = _FIELD_RE.match(line)
        if match is None:
            raise PolicyInvalid(f"line {number} is not 'key: value': {line[:64]!r}")
        key, value = match.groups()
        if key == "mx":
            mx.append(value)
        else:
            values.setdefault(key, value)
    if values.get("version") != "STSv1":
        raise PolicyInvalid(f"version is {values.get('version', 'missing')!r}, not 'STSv1'")
    mode = values.get("mode", "")
    if mode not in ("enforce", "testing", "none"):
        raise PolicyInvalid(f"mode is {mode[:20]!r}, not enforce, testing or none")
    max_age = values.get("max_age", "")
    if not max_age.isdigit() or len(max_age) > 10 or int(max_age) > MAX_AGE_LIMIT:
        raise PolicyInvalid(f"max_age {max_age[:20]!r} is not a number of seconds up to {MAX_AGE_LIMIT}")
    for pattern in mx:
        name = pattern[2:] if pattern.startswith("*.") else pattern
        if not is_domain(name.lower().rstrip(".")):
            raise PolicyInvalid(f"mx {pattern[:64]!r} is not a host name or *.domain")
    if mode != "none" and not mx:
        raise PolicyInvalid(f"mode {mode} without any mx")
    return StsPolicy(mode, tuple(p.lower().rstrip(".") for p in mx), int(max_age), policy_id, fetched)  # type: ignore[arg-type]


# -- the fetch (RFC 8461 §3.3) ----------------------------------------------------------


def policy_url(domain: str, port: int = 443) -> str:
    authority = f"mta-sts.{domain}" + ("" if port == 443 else f":{port}")
    return f"https://{authority}{_WELL_KNOWN}"


def _context_sync(ca_file: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


async def https_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """A verifying client context for the fetch; the CA bundle is read in a thread."""
    return await asyncio.to_thread(_context_sync, ca_file)


async def fetch_policy(
    domain: str,
    resolver: dns.asyncresolver.Resolver,
    *,
    port: int = 443,
    ca_file: Path | None = None,
    timeout: float = 10.0,
    context: ssl.SSLContext | None = None,
) -> str:
    """The policy text of ``domain``, fetched over HTTPS.

    ``mta-sts.<domain>`` is resolved with the gateway's ``resolver`` and each address is
    tried in turn; the certificate must chain to ``ca_file`` (or the system's CAs) and
    name ``mta-sts.<domain>``. Only a 200 answer counts: redirects are not followed
    (§3.3). ``timeout`` bounds the whole fetch. ``context`` (from :func:`https_context`)
    spares reading the CA bundle at every fetch.

    :raises PolicyFetchError: no policy could be had (with its RFC 8460 result type)
    """
    host = f"mta-sts.{domain}"
    try:
        async with asyncio.timeout(timeout):
            if context is None:
                context = await https_context(ca_file)
            try:
                addresses = await resolve_addresses(resolver, host)
            except DnsError as exc:
                raise PolicyFetchError(f"{host} does not resolve: {exc}") from None
            last: PolicyFetchError | None = None
            for address in addresses:
                try:
                    return await _get(address, port, host, context)
                except PolicyFetchError as exc:
                    last = exc
                    if exc.result == "sts-webpki-invalid" or exc.answered:
                        raise  # the server answered: another address would say the same
            assert last is not None
            raise last
    except TimeoutError:
        raise PolicyFetchError(f"fetching {policy_url(domain, port)} timed out after {timeout:g}s") from None


async def _get(address: str, port: int, host: str, context: ssl.SSLContext) -> str:
    try:
        reader, writer = await asyncio.open_connection(
            address, port, ssl=context, server_hostname=host, limit=_MAX_HEADER_LINE
        )
    except ssl.SSLCertVerificationError as exc:
        raise PolicyFetchError(f"certificate of {host}: {exc.verify_message}", "sts-webpki-invalid") from None
    except (OSError, ssl.SSLError) as exc:
        raise PolicyFetchError(f"cannot connect to {host} [{address}]:{port}: {exc}") from None
    try:
        request = (
            f"GET {_WELL_KNOWN} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: smtp-gateway MTA-STS\r\n"
            "Accept: text/plain\r\nConnection: close\r\n\r\n"
        )
        writer.write(request.encode("ascii"))
        await writer.drain()
        return await _read_response(reader, host)
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
        raise PolicyFetchError(f"reading the policy from {host}: {type(exc).__name__}: {exc}") from None
    finally:
        writer.transport.abort()  # Connection: close; nothing to wait for


async def _read_response(reader: asyncio.StreamReader, host: str) -> str:
    status_line = (await reader.readuntil(b"\n")).decode("latin-1").strip()
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise PolicyFetchError(f"{host} answered something that is not HTTP: {status_line[:80]!r}")
    headers: dict[str, str] = {}
    for _ in range(_MAX_HEADERS):
        line = (await reader.readuntil(b"\n")).decode("latin-1").strip()
        if not line:
            break
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    else:
        raise PolicyFetchError(f"{host} sent more than {_MAX_HEADERS} header lines")
    if parts[1] != "200":
        # RFC 8461 §3.3: a 3xx is not followed; anything but 200 is no policy.
        raise PolicyFetchError(f"{host} answered HTTP {status_line[9:80]}", answered=True)
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = await _read_chunked(reader, host)
    elif "content-length" in headers:
        length = headers["content-length"]
        if not length.isdigit():
            raise PolicyFetchError(f"{host} sent a bad Content-Length {length[:20]!r}")
        if int(length) > MAX_POLICY_SIZE:
            raise PolicyFetchError(f"the policy at {host} is larger than {MAX_POLICY_SIZE} octets")
        body = await reader.readexactly(int(length))
    else:
        body = await reader.read(MAX_POLICY_SIZE + 1)
        while len(body) <= MAX_POLICY_SIZE:
            more = await reader.read(MAX_POLICY_SIZE + 1 - len(body))
            if not more:
                break
            body += more
        if len(body) > MAX_POLICY_SIZE:
            raise PolicyFetchError(f"the policy at {host} is larger than {MAX_POLICY_SIZE} octets")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyFetchError(f"the policy at {host} is not UTF-8 text") from None


async def _read_chunked(reader: asyncio.StreamReader, host: str) -> bytes:
    body = b""
    while True:
        size_line = (await reader.readuntil(b"\n")).split(b";")[0].strip()
        size = int(size_line, 16)  # ValueError: reported by the caller
        if size == 0:
            return body
        if len(body) + size > MAX_POLICY_SIZE:
            raise PolicyFetchError(f"the policy at {host} is larger than {MAX_POLICY_SIZE} octets")
        body += await reader.readexactly(size)
        await reader.readuntil(b"\n")


# -- the cache (RFC 8461 §5.1) ------------------------------------------------------------


class PolicyCache:
    """The last good policy of each domain, one JSON file per domain in ``directory``.

    A file is written to a temporary name and renamed, so another worker never reads half
    of one. Reads and writes are small and run in a thread (:meth:`load`, :meth:`store`).
    """

    def __init__(self, directory: Path | None, *, is_writable: bool = True) -> None:
        self.directory = directory
        self.is_writable = is_writable  # False: read what is cached, never write (gateway tls check)

    def _path(self, domain: str) -> Path | None:
        if self.directory is None or not is_domain(domain):
            return None
        return self.directory / f"{domain}.json"

    async def load(self, domain: str) -> StsPolicy | None:
        """The cached policy of ``domain`` (fresh or not), or ``None``."""
        path = self._path(domain)
        return None if path is None else await asyncio.to_thread(_load_sync, path)

    async def domains(self) -> list[str]:
        """The domains with a cache file (at most :data:`MAX_CACHED` of them)."""
        if self.directory is None:
            return []
        return await asyncio.to_thread(_domains_sync, self.directory)

    async def store(self, domain: str, text: str, policy: StsPolicy) -> None:
        """Keep ``policy`` (parsed from ``text``) for ``domain``."""
        path = self._path(domain)
        if path is not None and self.is_writable:
            record = {"id": policy.policy_id, "fetched": policy.fetched, "policy": text}
            await asyncio.to_thread(_store_sync, path, json.dumps(record).encode("utf-8"))


def _load_sync(path: Path) -> StsPolicy | None:
    try:
        record = json.loads(path.read_bytes())
        return parse_policy(record["policy"], str(record["id"]), float(record["fetched"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a damaged cache entry is no policy; the next fetch rewrites it


def _domains_sync(directory: Path) -> list[str]:
    try:
        names = [p.name[:-5] for p in directory.iterdir() if p.name.endswith(".json")]
    except OSError:
        return []
    return [n for n in names if is_domain(n)][:MAX_CACHED]


def _store_sync(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)
