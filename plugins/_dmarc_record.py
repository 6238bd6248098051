"""DMARC policy records (RFC 7489 §6.3) and their discovery (§6.6.3), for ``data_dmarc``."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from plugins._mailauth import fetch_txt, organizational_domain

__all__ = ["DmarcRecord", "discover_record", "parse_record"]

_POLICIES = ("none", "quarantine", "reject")


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    """The tags of a DMARC record that a receiver acts on.

    :param policy: ``p=``: none, quarantine or reject
    :param subdomain_policy: ``sp=``, or ``None`` when absent (then ``p`` covers subdomains)
    :param adkim: DKIM alignment mode, ``r`` (relaxed, the default) or ``s`` (strict)
    :param aspf: SPF alignment mode, ``r`` or ``s``
    :param pct: the percentage of failing messages the policy is to be applied to
    :param rua: the aggregate report URIs (``mailto:a@b!10m``), as published
    :param fo: the failure reporting options (``0`` by default), as published
    :param ruf: the failure report URIs, as published
    """

    policy: str
    subdomain_policy: str | None = None
    adkim: Literal["r", "s"] = "r"
    aspf: Literal["r", "s"] = "r"
    pct: int = 100
    rua: tuple[str, ...] = ()
    fo: str = "0"
    ruf: tuple[str, ...] = ()


def _mode(value: str | None) -> Literal["r", "s"]:
    return "s" if (value or "").strip().lower() == "s" else "r"


def _pct(value: str | None) -> int:
    if value is None or not value.strip().isdigit():
        return 100
    return min(int(value.strip()), 100)


def parse_record(text: bytes) -> DmarcRecord | None:
    """Parse one TXT record; ``None`` if it is not a usable DMARC record.

    RFC 7489 §6.6.3 step 6: a record with an invalid or missing ``p=`` (or an invalid
    ``sp=``) counts as ``p=none`` when it names a report address (``rua=``), and as no
    record at all otherwise.

    :param text: the record, its strings joined
    """
    try:
        decoded = text.decode("ascii")
    except UnicodeDecodeError:
        return None
    tags: dict[str, str] = {}
    first = True
    for part in decoded.split(";"):
        name, eq, value = part.strip().partition("=")
        if not name and not eq:
            continue
        name = name.strip().lower()
        if first:
            # §6.4: v=DMARC1 must be the first tag, the value compared exactly.
            if name != "v" or value.strip() != "DMARC1":
                return None
            first = False
        tags.setdefault(name, value.strip())
    if first:
        return None
    policy = tags.get("p", "").lower()
    sub = tags.get("sp")
    sub = sub.lower() if sub is not None else None
    if policy not in _POLICIES or (sub is not None and sub not in _POLICIES):
        if ":" not in tags.get("rua", ""):
            return None
        policy, sub = "none", None
    # §6.4: rua is a comma-separated list of URIs; a URI may not contain a bare comma.
    rua = tuple(uri.strip() for uri in tags.get("rua", "").split(",") if uri.strip())
    ruf = tuple(uri.strip() for uri in tags.get("ruf", "").split(",") if uri.strip())
    fo = tags.get("fo", "").strip() or "0"
    return DmarcRecord(
        policy, sub, _mode(tags.get("adkim")), _mode(tags.get("aspf")), _pct(tags.get("pct")), rua[:8], fo[:20],
        ruf[:8],
    )


async def _record_at(resolver: Any, domain: str, timeout: float) -> DmarcRecord | None:
    records = await fetch_txt(resolver, f"_dmarc.{domain}", timeout)
    # §6.6.3 step 3: records not starting with v=DMARC1 are discarded; more than one
    # left means no DMARC processing at all.
    candidates = [r for r in records if r.lstrip().startswith(b"v=DMARC1")]
    if len(candidates) != 1:
        return None
    return parse_record(candidates[0])


async def discover_record(
    resolver: Any, domain: str, timeout: float, extra_suffixes: Iterable[str] = ()
) -> tuple[DmarcRecord | None, str]:
    """The policy for an author domain: its own record, else its organisational domain's.

    :param resolver: the gateway's asynchronous resolver
    :param domain: the RFC 5322.From domain (normalised)
    :param timeout: the bound of each lookup
    :param extra_suffixes: site-specific multi-label public suffixes
    :returns: the record and the domain it was found at (``None`` and ``""`` if none)
    :raises gateway.dns.DnsTemporaryError: a lookup failed temporarily
    """
    record = await _record_at(resolver, domain, timeout)
    if record is not None:
        return record, domain
    org = organizational_domain(domain, extra_suffixes)
    if org != domain:
        record = await _record_at(resolver, org, timeout)
        if record is not None:
            return record, org
    return None, ""
