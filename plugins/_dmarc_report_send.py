"""Sending DMARC aggregate reports: which are owed, and each one's way to the queue.

A :class:`Reporter` reads a period's counts (:mod:`plugins._dmarc_report`), builds each
policy domain's report, keeps the ``rua`` addresses that pass the external destination
check and whose size limit the report fits (:mod:`plugins._dmarc_report_mail`), signs
the mail when ``queue_dkim_sign`` has a key for the reporting address's domain, and
queues it like any locally generated mail.

Exactly once, across processes, nodes and restarts, as TLS reports
(:class:`gateway.reports.PeriodReporter`): before building a domain's report the
reporter claims it in the state store (``dmarc:sent:<begin>:<domain>``, set only if
absent). The claim becomes the "sent" mark once the mail is queued; a temporary failure
(DNS, the queue) gives it back, so a later run tries again; a process that dies holding
a claim loses it after :data:`~gateway.reports.CLAIM_TTL`. In a node the master (or the
single process) runs the timer, not its workers; nodes sharing one store each run it:
whichever claims first sends, the others find the mark.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from gateway.reports import CLAIM_TTL, Inject, PeriodReporter, Sign, command_context, make_signer
from gateway.state import StateStore
from plugins._dmarc_failure import Failure, failure_mail
from plugins._dmarc_report import DomainReport, aggregate_xml, read_period
from plugins._dmarc_report_mail import ReportUri, is_authorized, parse_uri, report_mail

__all__ = ["CLAIM_TTL", "Reporter", "command_reporter"]

log = logging.getLogger("plugins.data_dmarc")


def _count(counters: Any, result: str, amount: int = 1) -> None:
    table = getattr(counters, "dmarc_reports", None)
    if table is not None:
        table[result] = table.get(result, 0) + amount


class Reporter(PeriodReporter[DomainReport]):
    """Builds and sends the aggregate reports of one gateway.

    :param store: the state store the evaluations are counted in
    :param resolver: the gateway's asynchronous resolver (external destination checks)
    :param period: the reporting period in seconds
    :param org_name: ``org_name`` of the reports and ``Submitter`` of their subject
    :param report_from: the reporting address (``From:``, envelope sender, ``email``)
    :param hostname: our host name (report ids, Message-ID, the receiver in file names)
    :param inject: queues a report mail
    :param sign: signs a report mail, or ``None``
    :param counters: the gateway's :class:`gateway.metrics.Counters`, or ``None``
    """

    prefix = "dmarc"
    noun = "dmarc report"
    log = log

    def __init__(
        self, store: StateStore, resolver: Any, *, period: float, org_name: str, report_from: str,
        hostname: str, inject: Inject, sign: Sign | None = None, counters: Any = None,
        dns_timeout: float = 5.0, suffixes: tuple[str, ...] = (),
    ) -> None:
        super().__init__(store, period)
        self.resolver = resolver
        self.org_name = org_name
        self.report_from = report_from
        self.hostname = hostname
        self.inject = inject
        self.sign = sign
        self.counters = counters
        self.dns_timeout = dns_timeout
        self.suffixes = suffixes

    def end_of(self, begin: int) -> int:
        """The last second of the period starting at ``begin``."""
        return int(begin + self.period) - 1

    def report_id(self, begin: int, domain: str) -> str:
        return f"{domain}.{begin}.{self.hostname}"

    def xml(self, report: DomainReport, begin: int) -> bytes:
        """The report document of ``report``."""
        return aggregate_xml(
            report, org_name=self.org_name, email=self.report_from,
            report_id=self.report_id(begin, report.published.domain), begin=begin, end=self.end_of(begin),
        )

    async def preview(self, domain: str, begin: int) -> bytes | None:
        """The XML report ``domain`` would get for the period at ``begin`` (so far)."""
        reports = await read_period(self.store, begin, [domain])
        return self.xml(reports[0], begin) if reports else None

    async def _reports(self, begin: int, domains: list[str] | None) -> list[DomainReport]:
        return await read_period(self.store, begin, domains)

    def _domain(self, report: DomainReport) -> str:
        return report.published.domain

    def _deferred(self, domain: str, begin: int, exc: Exception) -> None:
        _count(self.counters, "deferred")
        super()._deferred(domain, begin, exc)

    async def _destinations(self, domain: str, texts: tuple[str, ...], kind: str) -> list[ReportUri]:
        """The URIs of ``texts`` that may have ``domain``'s reports (RFC 7489 §7.1).

        :raises gateway.dns.DnsTemporaryError: an authorisation could not be looked up
        """
        uris: list[ReportUri] = []
        for text in texts:
            uri = parse_uri(text)
            if uri is None:
                _count(self.counters, "unsupported_uri")
                log.info("dmarc %s domain=%s: %r not supported (mailto: only)", kind, domain, text[:100])
            elif not await is_authorized(self.resolver, domain, uri, self.dns_timeout, self.suffixes):
                _count(self.counters, "unauthorized")
                log.warning(
                    "dmarc %s domain=%s: not sent to <%s>: %s._report._dmarc.%s has no DMARC1 record"
                    " (RFC 7489 §7.1)", kind, domain, uri.address, domain, uri.domain,
                )
            else:
                uris.append(uri)
        return uris

    async def _deliver(
        self, domain: str, uris: list[ReportUri], message: bytes, kind: str
    ) -> tuple[str, list[str], int]:
        """Sign and queue ``message`` to the URIs whose size limit it fits.

        :returns: the queue id ("" if none fits), the addresses and the size
        """
        if self.sign is not None:
            message = await self.sign(message)
        size = len(message)
        fitting = [u for u in uris if u.limit is None or size <= u.limit]
        for uri in uris:
            if uri not in fitting:
                _count(self.counters, "too_big")
                log.warning(
                    "dmarc %s domain=%s: not sent to <%s>: %d octets, over its limit of %d",
                    kind, domain, uri.address, size, uri.limit,
                )
        to = list(dict.fromkeys(u.address for u in fitting))
        if not to:
            return "", [], size
        return await self.inject(self.report_from, to, message), to, size

    async def _send(self, report: DomainReport, begin: int) -> str:
        """Queue one domain's report; the queue id, or "" when no address may have it."""
        domain = report.published.domain
        uris = await self._destinations(domain, report.published.rua, "report")
        if not uris:
            return ""
        end = self.end_of(begin)
        message = report_mail(
            self.xml(report, begin), receiver=self.hostname, org_name=self.org_name, domain=domain,
            report_id=self.report_id(begin, domain), begin=begin, end=end, sender=self.report_from,
            recipients=list(dict.fromkeys(u.address for u in uris)), hostname=self.hostname, now=time.time(),
        )
        qid, to, size = await self._deliver(domain, uris, message, "report")
        if qid:
            _count(self.counters, "sent")
            log.info(
                "dmarc report domain=%s begin=%d end=%d rows=%d messages=%d octets=%d qid=%s to=%s",
                domain, begin, end, len(report.rows), report.messages, size, qid, ",".join(f"<{a}>" for a in to),
            )
        return qid

    async def send_failure(self, failure: Failure, policy_domain: str, ruf: tuple[str, ...], limit: int) -> str:
        """Queue a failure report (RFC 7489 §7.3) for one message; "" when none was sent.

        At most ``limit`` per policy domain and hour, counted in the state store (so a
        flood of forgeries does not become a flood of reports), the same destination
        checks and size limits as aggregate reports.
        """
        hour = int(time.time() // 3600)
        if await self.store.incr(f"dmarc:ruf:{policy_domain}:{hour}", 1, 3600) > limit:
            _count(self.counters, "failure_limited")
            return ""
        uris = await self._destinations(policy_domain, ruf, "failure report")
        if not uris:
            return ""
        message = failure_mail(
            failure, sender=self.report_from, recipients=list(dict.fromkeys(u.address for u in uris)),
            org_name=self.org_name, hostname=self.hostname, now=time.time(),
        )
        qid, to, size = await self._deliver(policy_domain, uris, message, "failure report")
        if qid:
            _count(self.counters, "failure_sent")
            log.info(
                "dmarc failure report domain=%s ip=%s octets=%d qid=%s to=%s",
                failure.domain, failure.source_ip, size, qid, ",".join(f"<{a}>" for a in to),
            )
        return qid


@contextlib.asynccontextmanager
async def command_reporter(policy: Any, settings: Any) -> AsyncIterator[Reporter]:
    """A :class:`Reporter` outside the running gateway (``gateway dmarc report``): the
    policy's state store, its resolver, and reports committed to its queue directory,
    where the running gateway is told of them through the queue's trigger (else it finds
    them at its next rescan).

    :param settings: the ``data_dmarc`` entry's settings
    """
    hostname = policy.server.hostname
    report_from = settings.report_from or f"dmarc-noreply@{hostname}"
    async with command_context(policy, settings.state) as outside:
        yield Reporter(
            outside.store, outside.resolver, period=float(settings.report_period),
            org_name=settings.report_org_name or hostname, report_from=report_from, hostname=hostname,
            inject=outside.inject, sign=make_signer(policy, report_from),
            dns_timeout=float(policy.dns.timeout) + 1.0, suffixes=tuple(settings.public_suffixes),
        )
