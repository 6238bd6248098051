"""SMTP TLS reporting (RFC 8460): what each MX session's TLS came to, counted, and the report.

Every TLS outcome of remote delivery (:class:`~gateway.delivery.remote.policy.TlsOutcome`:
one per session with an MX host, or per host skipped for a policy reason) is counted in
the state store, in the reporting period it fell in (``floor(now / period)``, so a
one-day period starts at UTC midnight on every node alike), under the recipient domain
whose policy applied (the *policy domain*):

- ``tlsrpt:domains:<begin>`` is a counter map: policy domain -> sessions counted;
- ``tlsrpt:rows:<begin>:<policy domain>`` is a counter map: one row (the policy as the
  report describes it, and ``null`` for a successful session or the failure's details:
  result type, sending and receiving IP, MX host, reason) -> its session count.

So workers and nodes sharing a store add up, a busy day costs one counter per distinct
row, and a report is two reads. Both maps expire :data:`~gateway.reports.KEEP` after
their period (the periods, and sending each report once, are :mod:`gateway.reports`).
:func:`report_document` writes RFC 8460 §4.4's JSON: ``organization-name``,
``date-range``, ``contact-info``, ``report-id``, and per policy a ``policy`` (type
``sts``, ``tlsa`` or ``no-policy-found``, its string, domain and MX hosts), a
``summary`` and the ``failure-details``.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from gateway.reports import KEEP, period_begin
from gateway.state import StateStore

__all__ = [
    "KEEP",
    "DomainReport",
    "FailureDetail",
    "PolicyEntry",
    "ReportPolicy",
    "period_begin",
    "read_period",
    "record_sessions",
    "report_document",
    "report_json",
]

_MAX_TEXT = 253
_MAX_REASON = 200
_MAX_STRINGS = 32  # policy-string lines (mx lines, TLSA records) kept per policy

PolicyType = Literal["sts", "tlsa", "no-policy-found"]


def _bounded(text: str, limit: int = _MAX_TEXT) -> str:
    return "".join(c for c in text[:limit] if c.isprintable())


@dataclass(frozen=True, slots=True)
class ReportPolicy:
    """The ``policy`` object of one entry of a report (RFC 8460 §4.4).

    :param policy_type: ``sts``, ``tlsa`` or ``no-policy-found``
    :param domain: the policy domain (the recipient domain)
    :param strings: ``policy-string``: the MTA-STS policy's lines, or the TLSA records
    :param mx_hosts: ``mx-host``: the policy's MX patterns, or the TLSA records' MX host
    """

    policy_type: PolicyType
    domain: str
    strings: tuple[str, ...] = ()
    mx_hosts: tuple[str, ...] = ()

    def as_list(self) -> list[Any]:
        return [
            self.policy_type, _bounded(self.domain),
            [_bounded(s, 600) for s in self.strings[:_MAX_STRINGS]],
            [_bounded(h) for h in self.mx_hosts[:_MAX_STRINGS]],
        ]

    @classmethod
    def from_list(cls, data: list[Any]) -> ReportPolicy:
        policy_type, domain, strings, mx_hosts = data
        if policy_type not in ("sts", "tlsa", "no-policy-found"):
            raise ValueError(f"policy type {policy_type!r}")
        return cls(policy_type, str(domain), tuple(map(str, strings)), tuple(map(str, mx_hosts)))

    def as_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {"policy-type": self.policy_type}
        if self.policy_type != "no-policy-found":
            document["policy-string"] = list(self.strings)
        document["policy-domain"] = self.domain
        if self.mx_hosts:
            document["mx-host"] = list(self.mx_hosts)
        return document


@dataclass(frozen=True, slots=True)
class FailureDetail:
    """One ``failure-details`` entry without its count (RFC 8460 §4.4).

    :param result: ``result-type`` (§4.3)
    :param sending_ip: ``sending-mta-ip``: our address in the session ("" if none was made)
    :param mx_host: ``receiving-mx-hostname``
    :param receiving_ip: ``receiving-ip``
    :param reason: ``failure-reason-code``: what went wrong, in words
    """

    result: str
    sending_ip: str = ""
    mx_host: str = ""
    receiving_ip: str = ""
    reason: str = ""

    def as_list(self) -> list[str]:
        return [
            _bounded(self.result, 64), _bounded(self.sending_ip, 64), _bounded(self.mx_host),
            _bounded(self.receiving_ip, 64), _bounded(self.reason, _MAX_REASON),
        ]

    @classmethod
    def from_list(cls, data: list[Any]) -> FailureDetail:
        result, sending_ip, mx_host, receiving_ip, reason = (str(x) for x in data)
        return cls(result, sending_ip, mx_host, receiving_ip, reason)

    def as_json(self, count: int) -> dict[str, Any]:
        document: dict[str, Any] = {"result-type": self.result}
        if self.sending_ip:
            document["sending-mta-ip"] = self.sending_ip
        if self.mx_host:
            document["receiving-mx-hostname"] = self.mx_host
        if self.receiving_ip:
            document["receiving-ip"] = self.receiving_ip
        document["failed-session-count"] = count
        if self.reason:
            document["failure-reason-code"] = self.reason
        return document


def row_field(policy: ReportPolicy, failure: FailureDetail | None) -> str:
    """The counter name of one row: the policy, and the failure (``null``: success)."""
    data = [policy.as_list(), failure.as_list() if failure is not None else None]
    return json.dumps(data, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class PolicyEntry:
    """One entry of ``policies``: a policy, its sessions, its failures by detail."""

    policy: ReportPolicy
    successes: int
    failures: tuple[tuple[FailureDetail, int], ...]

    @property
    def failed(self) -> int:
        return sum(count for _, count in self.failures)

    def as_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "policy": self.policy.as_json(),
            "summary": {
                "total-successful-session-count": self.successes,
                "total-failure-session-count": self.failed,
            },
        }
        if self.failures:
            document["failure-details"] = [detail.as_json(count) for detail, count in self.failures]
        return document


@dataclass(frozen=True, slots=True)
class DomainReport:
    """One policy domain's report of one period."""

    domain: str
    entries: tuple[PolicyEntry, ...]

    @property
    def sessions(self) -> int:
        return sum(e.successes + e.failed for e in self.entries)


def _domains_key(begin: int) -> str:
    return f"tlsrpt:domains:{begin}"


def _rows_key(begin: int, domain: str) -> str:
    return f"tlsrpt:rows:{begin}:{domain}"


async def record_sessions(
    store: StateStore, begin: int, period: float, now: float, rows: dict[tuple[str, str], int]
) -> None:
    """Add counted rows to the period at ``begin``.

    :param rows: (policy domain, :func:`row_field`) -> sessions
    :raises gateway.state.StateUnavailable: the store failed
    """
    ttl = max(begin + period + KEEP - now, 60.0)
    for (domain, name), count in rows.items():
        await store.incr_field(_domains_key(begin), _bounded(domain), count, ttl)
        await store.incr_field(_rows_key(begin, _bounded(domain)), name, count, ttl)


async def read_period(store: StateStore, begin: int, domains: Iterable[str] | None = None) -> list[DomainReport]:
    """The reports of the period starting at ``begin``, one per policy domain, by domain.

    :param domains: only these policy domains (all when ``None``)
    :raises gateway.state.StateUnavailable: the store failed
    """
    wanted = None if domains is None else set(domains)
    reports = []
    for domain in sorted(await store.fields(_domains_key(begin))):
        if wanted is not None and domain not in wanted:
            continue
        successes: dict[ReportPolicy, int] = {}
        failures: dict[ReportPolicy, dict[FailureDetail, int]] = {}
        for text, count in (await store.fields(_rows_key(begin, domain))).items():
            try:
                policy_data, failure_data = json.loads(text)
                policy = ReportPolicy.from_list(policy_data)
                failure = None if failure_data is None else FailureDetail.from_list(failure_data)
            except (ValueError, TypeError):
                continue  # not a row this version wrote
            successes.setdefault(policy, 0)
            if failure is None:
                successes[policy] += count
            else:
                found = failures.setdefault(policy, {})
                found[failure] = found.get(failure, 0) + count
        entries = []
        for policy in sorted(successes, key=lambda p: (p.policy_type, p.mx_hosts, p.strings)):
            details = sorted(failures.get(policy, {}).items(), key=lambda item: (-item[1], item[0].as_list()))
            entries.append(PolicyEntry(policy, successes[policy], tuple(details)))
        if entries:
            reports.append(DomainReport(domain, tuple(entries)))
    return reports


def _datetime(seconds: int) -> str:
    """RFC 3339 in UTC, as RFC 8460 §4.4's examples write it."""
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def report_document(
    report: DomainReport, *, org_name: str, contact: str, report_id: str, begin: int, end: int
) -> dict[str, Any]:
    """The report of one policy domain (RFC 8460 §4.4).

    :param begin: first second of the period
    :param end: its end (the first second after it)
    """
    return {
        "organization-name": org_name,
        "date-range": {"start-datetime": _datetime(begin), "end-datetime": _datetime(end)},
        "contact-info": contact,
        "report-id": report_id,
        "policies": [entry.as_json() for entry in report.entries],
    }


def report_json(document: dict[str, Any]) -> bytes:
    """The report as UTF-8 JSON, the way it is mailed or posted."""
    return json.dumps(document, indent=2, ensure_ascii=False).encode("utf-8") + b"\n"
