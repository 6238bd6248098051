"""Sending DMARC aggregate reports: which are owed, and each one's way to the queue.

A :class:`Reporter` reads a period's counts (:mod:`plugins._dmarc_report`), builds each
policy domain's report, keeps the ``rua`` addresses that pass the external destination
check and whose size limit the report fits (:mod:`plugins._dmarc_report_mail`), signs
the mail when ``queue_dkim_sign`` has a key for the reporting address's domain, and
queues it like any locally generated mail.

Exactly once, across processes, nodes and restarts: before building a domain's report
the reporter claims it in the state store (``dmarc:sent:<begin>:<domain>``, set only if
absent). The claim becomes the "sent" mark once the mail is queued; a temporary failure
(DNS, the queue) gives it back, so a later run tries again; a process that dies holding
a claim loses it after :data:`CLAIM_TTL`. In a node the master (or the single process)
runs the timer, not its workers; nodes sharing one store each run it: whichever claims
first sends, the others find the mark.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from gateway.dns import DnsTemporaryError
from gateway.state import StateStore, StateUnavailable
from gateway.verdicts import TemporaryFailure
from plugins._dkim_sync import load_key_in_thread, sign_in_thread
from plugins._dmarc_failure import Failure, failure_mail
from plugins._dmarc_report import KEEP, DomainReport, aggregate_xml, period_begin, read_period
from plugins._dmarc_report_mail import ReportUri, is_authorized, parse_uri, report_mail

__all__ = ["CLAIM_TTL", "Reporter", "command_reporter", "make_signer"]

log = logging.getLogger("plugins.data_dmarc")

#: a claim not turned into a "sent" mark within this is given up (its process died)
CLAIM_TTL = 600.0
#: periods looked back at for reports still owed, at most
MAX_LOOKBACK = 200

#: queues a message: ``inject(sender, recipients, message) -> queue id``
Inject = Callable[[str, list[str], bytes], Awaitable[str]]
#: returns the message with a DKIM-Signature field on top
Sign = Callable[[bytes], Awaitable[bytes]]


def _sent_key(begin: int, domain: str) -> str:
    return f"dmarc:sent:{begin}:{domain}"


def _count(counters: Any, result: str, amount: int = 1) -> None:
    table = getattr(counters, "dmarc_reports", None)
    if table is not None:
        table[result] = table.get(result, 0) + amount


class Reporter:
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

    def __init__(
        self, store: StateStore, resolver: Any, *, period: float, org_name: str, report_from: str,
        hostname: str, inject: Inject, sign: Sign | None = None, counters: Any = None,
        dns_timeout: float = 5.0, suffixes: tuple[str, ...] = (),
    ) -> None:
        self.store = store
        self.resolver = resolver
        self.period = period
        self.org_name = org_name
        self.report_from = report_from
        self.hostname = hostname
        self.inject = inject
        self.sign = sign
        self.counters = counters
        self.dns_timeout = dns_timeout
        self.suffixes = suffixes
        self._done: set[int] = set()  # periods with nothing left to send (this process)

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

    async def send_due(self, now: float | None = None) -> int:
        """Send every report owed for ended periods; returns how many were queued.

        A period is owed once it ended a grace time ago (a tenth of the period, at most
        a minute: mail evaluated on a node whose clock is a little behind still counts).
        """
        now = time.time() if now is None else now
        grace = min(60.0, self.period / 10)
        current = period_begin(now, self.period)
        lookback = min(int(KEEP // self.period) + 1, MAX_LOOKBACK)
        sent = 0
        for i in range(1, lookback + 1):
            begin = int(current - i * self.period)
            if begin in self._done or begin + self.period + grace > now:
                continue
            count, is_complete = await self.send_period(begin)
            sent += count
            if is_complete:
                self._done.add(begin)
        return sent

    async def send_period(self, begin: int, domains: list[str] | None = None) -> tuple[int, bool]:
        """Send the reports of the period at ``begin`` that nobody sent yet.

        :param domains: only these policy domains (all when ``None``)
        :returns: how many were queued, and whether none is left to try again
        """
        reports = await read_period(self.store, begin, domains)
        sent, is_complete = 0, True
        for report in reports:
            domain = report.published.domain
            key = _sent_key(begin, domain)
            if not await self.store.set(key, f"claimed {os.getpid()}", CLAIM_TTL, only_if_absent=True):
                continue  # sent, or being sent by another process
            try:
                qid = await self._send(report, begin)
            except (DnsTemporaryError, TemporaryFailure, OSError) as exc:
                is_complete = False
                _count(self.counters, "deferred")
                log.warning("dmarc report domain=%s begin=%d deferred: %s", domain, begin, exc)
                try:
                    await self.store.delete(key)
                except StateUnavailable:
                    pass  # the claim expires by itself
                continue
            keep = begin + self.period + KEEP * 2 - time.time()
            await self.store.set(key, f"sent {qid or '-'}", max(keep, CLAIM_TTL))
            sent += bool(qid)
        return sent, is_complete

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


def _key_for(domain: str, domains: dict[str, Any]) -> tuple[str, Any] | None:
    labels = domain.split(".")
    for start in range(len(labels) - 1):
        candidate = ".".join(labels[start:])
        if candidate in domains:
            return candidate, domains[candidate]
    return None


def make_signer(policy: Any, address: str, run_in_thread: Callable[..., Awaitable[Any]]) -> Sign | None:
    """A signer for report mail from ``address``, with the key the policy's
    ``queue_dkim_sign`` entry has for its domain (or a parent); ``None`` if none has one.

    :param run_in_thread: runs a blocking call off the event loop (key loading, signing)
    """
    domain = address.rpartition("@")[2].lower()
    for entry in policy.plugins:
        if entry.name != "queue_dkim_sign":
            continue
        settings = entry.settings
        found = _key_for(domain, dict(getattr(settings, "domains", {})))
        if found is None:
            continue
        signing_domain, key_entry = found
        headers = tuple(h.lower() for h in settings.headers)
        oversign = tuple(h.lower() for h in settings.oversign)
        loaded: list[bytes] = []

        async def sign(message: bytes) -> bytes:
            if not loaded:
                loaded.append(await run_in_thread(load_key_in_thread, Path(key_entry.key_file), key_entry.algorithm))
            value = await run_in_thread(
                sign_in_thread, message, signing_domain, key_entry.selector, loaded[0],
                key_entry.algorithm, headers, oversign,
            )
            return f"DKIM-Signature: {value}".replace("\n", "\r\n").encode("ascii") + b"\r\n" + message

        return sign
    return None


@contextlib.asynccontextmanager
async def command_reporter(policy: Any, settings: Any) -> AsyncIterator[Reporter]:
    """A :class:`Reporter` outside the running gateway (``gateway dmarc report``): the
    policy's state store, its resolver, and reports committed to its queue directory,
    where the running gateway is told of them through the queue's trigger (else it finds
    them at its next rescan).

    :param settings: the ``data_dmarc`` entry's settings
    """
    from gateway.dns import make_resolver
    from gateway.queue import QueueStore
    from gateway.sendmail import Injection, queue_message
    from gateway.state.registry import canonical_url, create_store

    store = create_store(canonical_url(settings.state, Path(policy.server.var_dir)))
    await store.open()
    hostname = policy.server.hostname

    async def inject(sender: str, recipients: list[str], message: bytes) -> str:
        qid = await queue_message(policy.server.queue_dir, Injection(sender, recipients, message))
        await asyncio.to_thread(QueueStore(policy.server.queue_dir).trigger, qid)
        return qid

    async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    report_from = settings.report_from or f"dmarc-noreply@{hostname}"
    try:
        yield Reporter(
            store, make_resolver(policy.dns), period=float(settings.report_period),
            org_name=settings.report_org_name or hostname, report_from=report_from, hostname=hostname,
            inject=inject, sign=make_signer(policy, report_from, in_thread),
            dns_timeout=float(policy.dns.timeout) + 1.0, suffixes=tuple(settings.public_suffixes),
        )
    finally:
        await store.close()
