"""DMARC aggregate report data (RFC 7489 §7.2): what ``data_dmarc`` records, and the XML.

Every DMARC evaluation of a domain that asks for aggregate reports (``rua=``) is counted
in the state store, in the reporting period it fell in (``floor(now / period)``, so a
one-day period starts at UTC midnight, on every node alike):

- ``dmarc:pub:<begin>`` is a counter map: the published policy (domain, p, sp, pct,
  adkim, aspf, fo, rua, as JSON) -> how many messages were evaluated under it;
- ``dmarc:rows:<begin>:<policy domain>`` is a counter map: one report row (source IP,
  header and envelope From domains, the aligned DKIM and SPF verdicts, the disposition
  and its reasons, every DKIM and SPF result, as JSON) -> its message count.

So a busy day costs one row per distinct row description, not one per message, and a
report is read back with two calls. Both maps expire :data:`~gateway.reports.KEEP` after
their period, sent or not (the periods, and sending each report once, are :mod:`gateway.reports`). :func:`aggregate_xml` writes the report as RFC 7489 Appendix C describes
(namespace ``http://dmarc.org/dmarc-xml/0.1``, version 1.0).
"""

from __future__ import annotations

import ipaddress
import json
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from gateway.reports import KEEP, period_begin
from gateway.state import StateStore

__all__ = [
    "KEEP",
    "NAMESPACE",
    "DomainReport",
    "Evaluation",
    "Published",
    "aggregate_xml",
    "period_begin",
    "read_period",
    "record_evaluation",
]

NAMESPACE = "http://dmarc.org/dmarc-xml/0.1"
_MAX_TEXT = 253  # a domain's length; every recorded text is bounded by it
_MAX_RESULTS = 8  # DKIM or SPF results kept per row


def _bounded(text: str) -> str:
    return text[:_MAX_TEXT]


@dataclass(frozen=True, slots=True)
class Published:
    """The policy record a report is about (``policy_published``).

    :param domain: the domain the record was found at (the report's policy domain)
    """

    domain: str
    p: str
    sp: str
    pct: int
    adkim: str
    aspf: str
    fo: str
    rua: tuple[str, ...]

    def as_field(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_field(cls, text: str) -> Published:
        data = json.loads(text)
        data["rua"] = tuple(data["rua"])
        return cls(**data)


@dataclass(frozen=True, slots=True)
class Evaluation:
    """One DMARC evaluation as a report row describes it (without the count).

    :param source_ip: the connecting client
    :param header_from: the RFC 5322.From domain
    :param envelope_from: the RFC 5321.MailFrom domain ("" for the null sender)
    :param disposition: what was done: none, quarantine or reject
    :param dkim: the DMARC-aligned DKIM verdict: pass or fail
    :param spf: the DMARC-aligned SPF verdict: pass or fail
    :param reasons: (type, comment) of each policy override (``sampled_out``, ``local_policy`` ...)
    :param dkim_results: (domain, selector, result) of each DKIM signature checked
    :param spf_results: (domain, scope, result) of each SPF check (scope ``mfrom`` or ``helo``)
    """

    source_ip: str
    header_from: str
    envelope_from: str
    disposition: str
    dkim: str
    spf: str
    reasons: tuple[tuple[str, str], ...] = ()
    dkim_results: tuple[tuple[str, str, str], ...] = ()
    spf_results: tuple[tuple[str, str, str], ...] = ()

    def as_field(self) -> str:
        data = [
            self.source_ip, _bounded(self.header_from), _bounded(self.envelope_from), self.disposition,
            self.dkim, self.spf,
            [[t, _bounded(c)] for t, c in self.reasons[:_MAX_RESULTS]],
            [[_bounded(d), _bounded(s), r] for d, s, r in self.dkim_results[:_MAX_RESULTS]],
            [[_bounded(d), s, r] for d, s, r in self.spf_results[:_MAX_RESULTS]],
        ]
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_field(cls, text: str) -> Evaluation:
        ip, header_from, envelope_from, disposition, dkim, spf, reasons, dkim_results, spf_results = json.loads(text)
        return cls(
            ip, header_from, envelope_from, disposition, dkim, spf,
            tuple((t, c) for t, c in reasons),
            tuple((d, s, r) for d, s, r in dkim_results),
            tuple((d, s, r) for d, s, r in spf_results),
        )


@dataclass(frozen=True, slots=True)
class DomainReport:
    """One policy domain's counts of one period.

    :param published: the policy record (the one most messages were evaluated under)
    :param rows: each row and its message count
    """

    published: Published
    rows: tuple[tuple[Evaluation, int], ...]

    @property
    def messages(self) -> int:
        return sum(count for _, count in self.rows)


def _pub_key(begin: int) -> str:
    return f"dmarc:pub:{begin}"


def _rows_key(begin: int, domain: str) -> str:
    return f"dmarc:rows:{begin}:{domain}"


async def record_evaluation(
    store: StateStore, now: float, period: float, published: Published, evaluation: Evaluation
) -> None:
    """Count one evaluation in the period ``now`` falls in.

    :raises gateway.state.StateUnavailable: the store failed
    """
    begin = period_begin(now, period)
    ttl = begin + period + KEEP - now
    await store.incr_field(_pub_key(begin), published.as_field(), 1, ttl)
    await store.incr_field(_rows_key(begin, published.domain), evaluation.as_field(), 1, ttl)


async def read_period(store: StateStore, begin: int, domains: Iterable[str] | None = None) -> list[DomainReport]:
    """The reports of the period starting at ``begin``, one per policy domain, by domain.

    :param domains: only these policy domains (all when ``None``)
    :raises gateway.state.StateUnavailable: the store failed
    """
    policies: dict[str, tuple[Published, int]] = {}
    for text, count in (await store.fields(_pub_key(begin))).items():
        try:
            published = Published.from_field(text)
        except (ValueError, TypeError, KeyError):
            continue
        seen = policies.get(published.domain)
        if seen is None or count > seen[1]:
            policies[published.domain] = (published, count)
    wanted = None if domains is None else set(domains)
    reports = []
    for domain in sorted(policies):
        if wanted is not None and domain not in wanted:
            continue
        rows: list[tuple[Evaluation, int]] = []
        for text, count in (await store.fields(_rows_key(begin, domain))).items():
            try:
                rows.append((Evaluation.from_field(text), count))
            except (ValueError, TypeError):
                continue
        if rows:
            rows.sort(key=lambda item: (-item[1], item[0].source_ip, item[0].as_field()))
            reports.append(DomainReport(policies[domain][0], tuple(rows)))
    return reports


def _report_ip(text: str) -> str:
    """The address as the schema's pattern takes it: dotted quad, or IPv6 written out in full."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return "0.0.0.0"
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        return str(mapped) if mapped is not None else address.exploded
    return str(address)


def _add(parent: ET.Element, tag: str, text: str | int | None = None) -> ET.Element:
    element = ET.SubElement(parent, tag)
    if text is not None:
        element.text = str(text)
    return element


def aggregate_xml(
    report: DomainReport, *, org_name: str, email: str, report_id: str, begin: int, end: int,
    extra_contact_info: str = "",
) -> bytes:
    """The aggregate report document (RFC 7489 §7.2.1, Appendix C), UTF-8 with a declaration.

    :param org_name: the reporting organisation
    :param email: its contact address
    :param report_id: unique for this report
    :param begin: first second of the period
    :param end: last second of the period
    """
    root = ET.Element("feedback", {"xmlns": NAMESPACE})
    _add(root, "version", "1.0")
    meta = _add(root, "report_metadata")
    _add(meta, "org_name", org_name)
    _add(meta, "email", email)
    if extra_contact_info:
        _add(meta, "extra_contact_info", extra_contact_info)
    _add(meta, "report_id", report_id)
    dates = _add(meta, "date_range")
    _add(dates, "begin", begin)
    _add(dates, "end", end)
    pub = report.published
    policy = _add(root, "policy_published")
    _add(policy, "domain", pub.domain)
    _add(policy, "adkim", pub.adkim)
    _add(policy, "aspf", pub.aspf)
    _add(policy, "p", pub.p)
    _add(policy, "sp", pub.sp)
    _add(policy, "pct", pub.pct)
    _add(policy, "fo", pub.fo)
    for evaluation, count in report.rows:
        record = _add(root, "record")
        row = _add(record, "row")
        _add(row, "source_ip", _report_ip(evaluation.source_ip))
        _add(row, "count", count)
        evaluated = _add(row, "policy_evaluated")
        _add(evaluated, "disposition", evaluation.disposition)
        _add(evaluated, "dkim", evaluation.dkim)
        _add(evaluated, "spf", evaluation.spf)
        for kind, comment in evaluation.reasons:
            reason = _add(evaluated, "reason")
            _add(reason, "type", kind)
            if comment:
                _add(reason, "comment", comment)
        identifiers = _add(record, "identifiers")
        _add(identifiers, "envelope_from", evaluation.envelope_from)
        _add(identifiers, "header_from", evaluation.header_from)
        results = _add(record, "auth_results")
        for domain, selector, result in evaluation.dkim_results:
            dkim = _add(results, "dkim")
            _add(dkim, "domain", domain)
            if selector:
                _add(dkim, "selector", selector)
            _add(dkim, "result", result)
        # The schema wants at least one SPF result: "none" for the envelope domain when
        # nothing checked SPF.
        spf_results = evaluation.spf_results or ((evaluation.envelope_from, "mfrom", "none"),)
        for domain, scope, result in spf_results:
            spf = _add(results, "spf")
            _add(spf, "domain", domain)
            _add(spf, "scope", scope)
            _add(spf, "result", result)
    ET.indent(root)
    document: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return document + b"\n"
