"""TLS reports (RFC 8460): counting outcomes as deliveries happen, and sending what is owed.

:class:`TlsReporting` belongs to the remote agent of each process: :meth:`TlsReporting.note`
takes each :class:`~gateway.delivery.remote.policy.TlsOutcome` (never waiting; the counts
are batched in memory and added to the state store by a flusher task every
:data:`FLUSH` seconds and at shutdown, so a delivery never waits on the store), and in
the master (or the single process) it runs the timer that sends each period's reports
once the period ended.

:class:`TlsReporter` builds and sends them: for each policy domain counted in a period it
looks up ``_smtp._tls.<domain>`` (:mod:`gateway.delivery.remote.tlsrpt_mail`), queues one
mail to its ``mailto:`` destinations (DKIM-signed when ``queue_dkim_sign`` has a key for
the reporting address's domain) and POSTs to its ``https:`` ones. Exactly once across
processes, nodes and restarts, as DMARC reports (:class:`gateway.reports.PeriodReporter`):
the domain's report is claimed in the store first (``tlsrpt:sent:<begin>:<domain>``, set
only if absent), the claim becomes the "sent" mark, a temporary failure gives it back, a
dead process's claim lapses after :data:`~gateway.reports.CLAIM_TTL`.
``gateway tls report --preview/--send`` uses the same class.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dns.asyncresolver

from gateway.delivery.remote.tlsrpt import (
    DomainReport,
    FailureDetail,
    ReportPolicy,
    period_begin,
    read_period,
    record_sessions,
    report_document,
    report_json,
    row_field,
)
from gateway.delivery.remote.tlsrpt_mail import (
    ReportPostError,
    compress,
    https_context,
    parse_record,
    post_report,
    report_filename,
    report_mail,
)
from gateway.dns import DnsNotFound, lookup
from gateway.reports import (
    CLAIM_TTL,
    Inject,
    PeriodReporter,
    Sign,
    command_context,
    make_signer,
    queue_injector,
    report_forever,
    timer_interval,
)
from gateway.state import StateStore, StateUnavailable
from gateway.tasks import cancel_and_wait

if TYPE_CHECKING:
    from gateway.delivery.remote.policy import TlsOutcome

__all__ = ["CLAIM_TTL", "FLUSH", "TlsReporter", "TlsReporting", "command_reporter", "describe"]

log = logging.getLogger("gateway.delivery.remote.tlsrpt")

#: how often counted outcomes are added to the store
FLUSH = 1.0
_MAX_PENDING = 10_000  # distinct rows waiting for a flush; more are dropped (and logged)


def describe(outcome: TlsOutcome) -> tuple[ReportPolicy, FailureDetail | None]:
    """The report's view of one outcome: the policy that applied, and the failure if any."""
    policy = outcome.policy
    if policy.is_dane:
        strings = tuple(f"{r.usage} {r.selector} {r.mtype} {r.data.hex()}" for r in policy.tlsa)
        described = ReportPolicy("tlsa", policy.domain, strings, (outcome.host,))
    elif policy.is_sts:
        lines = ("version: STSv1", f"mode: {policy.mode[4:]}", *(f"mx: {m}" for m in policy.mx), f"max_age: {policy.max_age}")
        described = ReportPolicy("sts", policy.domain, lines, policy.mx)
    elif policy.problem.startswith("sts-"):  # announced, but not fetched or not valid
        described = ReportPolicy("sts", policy.domain)
    else:
        described = ReportPolicy("no-policy-found", policy.domain)
    if not outcome.is_failure:
        return described, None
    return described, FailureDetail(outcome.result, outcome.source, outcome.host, outcome.address, outcome.detail)


def _source_for(address: str) -> str:
    """Our address towards ``address``: the one the kernel would choose (a UDP connect
    sends nothing); "" when there is no route."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((address, 9))
            return str(sock.getsockname()[0])
    except (OSError, ValueError):
        return ""


def _sources_in_thread(addresses: list[str]) -> dict[str, str]:
    return {a: _source_for(a) for a in addresses}


class TlsReporter(PeriodReporter[DomainReport]):
    """Builds and sends the TLS reports of one gateway.

    :param store: where the outcomes are counted
    :param resolver: the gateway's resolver (``_smtp._tls`` records, ``https:`` hosts)
    :param settings: ``[tls_reporting]``
    :param hostname: our host name (report ids, Message-ID, the submitter in file names)
    :param inject: queues a report mail
    :param sign: DKIM-signs a report mail, or ``None``
    """

    prefix = "tlsrpt"
    noun = "tls report"
    # Outcomes reach the store up to FLUSH seconds after the session: a period's report
    # waits for them (with a short test period, a tenth of it would not).
    min_grace = 3 * FLUSH
    log = log

    def __init__(
        self, store: StateStore, resolver: dns.asyncresolver.Resolver, settings: Any, *, hostname: str,
        inject: Inject, sign: Sign | None = None,
    ) -> None:
        super().__init__(store, float(settings.period))
        self.resolver = resolver
        self.settings = settings
        self.hostname = hostname
        self.report_from = settings.report_from or f"tlsrpt-noreply@{hostname}"
        self.org_name = settings.org_name or hostname
        self.contact = settings.contact_info or self.report_from
        self.inject = inject
        self.sign = sign
        self._context: ssl.SSLContext | None = None

    def end_of(self, begin: int) -> int:
        """The end of the period starting at ``begin`` (its first second after)."""
        return int(begin + self.period)

    def report_id(self, begin: int, domain: str) -> str:
        return f"{begin}.{domain}@{self.hostname}"

    def document(self, report: DomainReport, begin: int) -> dict[str, Any]:
        return report_document(
            report, org_name=self.org_name, contact=self.contact, report_id=self.report_id(begin, report.domain),
            begin=begin, end=self.end_of(begin),
        )

    async def preview(self, begin: int, domain: str | None = None) -> list[dict[str, Any]]:
        """The reports of the period at ``begin`` so far (one domain's, or every one)."""
        reports = await read_period(self.store, begin, None if domain is None else [domain])
        return [self.document(report, begin) for report in reports]

    async def _reports(self, begin: int, domains: list[str] | None) -> list[DomainReport]:
        return await read_period(self.store, begin, domains)

    def _domain(self, report: DomainReport) -> str:
        return report.domain

    async def _destinations(self, domain: str) -> list[Any]:
        try:
            answer = await lookup(self.resolver, f"_smtp._tls.{domain}", "TXT")
        except DnsNotFound:
            return []
        if answer is None:
            return []
        texts = [b"".join(r.strings).decode("utf-8", "replace") for r in answer]
        try:
            return list(parse_record(texts))
        except ValueError as exc:
            log.info("tls report domain=%s: no report destination: %s", domain, exc)
            return []

    async def _send(self, report: DomainReport, begin: int) -> str:
        """Send one domain's report; what took it ("" when nobody asked for it).

        :raises gateway.dns.DnsTemporaryError: the ``_smtp._tls`` lookup failed for now
        """
        domain, end = report.domain, self.end_of(begin)
        uris = await self._destinations(domain)
        if not uris:
            log.debug("tls report domain=%s begin=%d: the domain publishes no rua", domain, begin)
            return ""
        report_id = self.report_id(begin, domain)
        data = compress(report_json(self.document(report, begin)))
        done: list[str] = []
        mailto = [u.target for u in uris if u.scheme == "mailto"]
        if mailto:
            message = report_mail(
                data, domain=domain, org_name=self.org_name, report_id=report_id,
                filename=report_filename(self.hostname, domain, begin, end, str(begin)), sender=self.report_from,
                recipients=mailto, hostname=self.hostname, begin=begin, end=end, now=time.time(),
            )
            if self.sign is not None:
                message = await self.sign(message)
            done.append(f"qid={await self.inject(self.report_from, mailto, message)}")
        for uri in (u for u in uris if u.scheme == "https"):
            try:
                if self._context is None:
                    self._context = await https_context(self.settings.https_ca_file)
                status = await post_report(
                    uri.target, data, self.resolver, self._context, timeout=float(self.settings.https_timeout)
                )
            except ReportPostError as exc:
                log.warning("tls report domain=%s begin=%d: %s did not take it: %s", domain, begin, uri, exc)
                continue
            done.append(f"{uri} {status}")
        log.info(
            "tls report domain=%s begin=%d end=%d sessions=%d octets=%d sent: %s",
            domain, begin, end, report.sessions, len(data), "; ".join(done) or "none",
        )
        return "; ".join(done)


class TlsReporting:
    """One process's TLS reporting: outcomes counted, and (master) the sending timer.

    :param policy: the policy (``[tls_reporting]``, ``server.var_dir``, ``server.queue_dir``)
    :param resolver: the gateway's resolver
    :param hostname: our host name
    :param primary: this process sends the reports (the master, or a single process)
    """

    def __init__(
        self, policy: Any, resolver: dns.asyncresolver.Resolver, *, hostname: str, primary: bool
    ) -> None:
        self.policy = policy
        self.settings = policy.tls_reporting
        self.resolver = resolver
        self.hostname = hostname
        self.primary = primary
        self._pending: dict[tuple[int, str, tuple[str, str]], tuple[ReportPolicy, FailureDetail | None, int]] = {}
        self._store: StateStore | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._sources: dict[str, str] = {}

    def note(self, outcome: TlsOutcome) -> None:
        """Count ``outcome`` in the period it happened in (added to the store soon)."""
        policy, failure = describe(outcome)
        begin = period_begin(outcome.when, float(self.settings.period))
        # The address stays in the key until the flush looks up our own address towards it.
        key = (begin, policy.domain, (row_field(policy, failure), outcome.address if failure else ""))
        found = self._pending.get(key)
        if found is None and len(self._pending) >= _MAX_PENDING:
            log.warning("tls report counts: too many waiting; outcome for %s not counted", policy.domain)
            return
        self._pending[key] = (policy, failure, (found[2] if found else 0) + 1)
        if not self._tasks:
            self.start()

    def start(self) -> None:
        """Start the flusher (and, in the master, the timer); needs a running loop."""
        if self._tasks:
            return
        self._tasks.append(asyncio.get_running_loop().create_task(self._flush_forever(), name="tlsrpt-flush"))
        if self.primary:
            self._tasks.append(asyncio.get_running_loop().create_task(self._send_forever(), name="tlsrpt-send"))

    async def _open(self) -> StateStore:
        if self._store is None:
            from gateway.state import acquire, canonical_url

            var_dir = Path(self.policy.server.var_dir)
            self._store = await acquire(canonical_url(self.settings.state, var_dir), var_dir)
        return self._store

    async def flush(self) -> None:
        """Add what was counted to the store; if the store fails, those counts are lost
        (logged): adding them again later could count twice what was added before it failed."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        unknown = [a for (_, _, (_, a)) in pending if a and a not in self._sources]
        if unknown:
            self._sources.update(await asyncio.to_thread(_sources_in_thread, list(dict.fromkeys(unknown))[:100]))
        by_period: dict[int, dict[tuple[str, str], int]] = {}
        for (begin, domain, (name, address)), (policy, failure, count) in pending.items():
            if failure is not None and not failure.sending_ip:
                source = self._sources.get(address, "")
                failure = FailureDetail(failure.result, source, failure.mx_host, failure.receiving_ip, failure.reason)
                name = row_field(policy, failure)
            rows = by_period.setdefault(begin, {})
            rows[(domain, name)] = rows.get((domain, name), 0) + count
        try:
            store = await self._open()
            for begin, rows in by_period.items():
                await record_sessions(store, begin, float(self.settings.period), time.time(), rows)
        except StateUnavailable as exc:
            log.warning("tls report counts not recorded (%d rows): %s", len(pending), exc)

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH)
            try:
                await self.flush()
            except Exception:  # boundary: the flusher outlives any one failure
                log.exception("tls report counts: flush failed")

    async def _send_forever(self) -> None:
        reporter: TlsReporter | None = None

        async def send_due() -> None:
            nonlocal reporter
            if reporter is None:
                reporter = running_reporter(self, await self._open())
            await reporter.send_due()

        interval = timer_interval(float(self.settings.period))
        await report_forever(send_due, interval, what="tls reports", log=log, is_waiting_first=True)

    async def close(self) -> None:
        """Stop the tasks, add what is still counted to the store, release the store."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            await cancel_and_wait(task, "TLS report")
        try:
            await self.flush()
        finally:
            if self._store is not None:
                from gateway.state import release

                store, self._store = self._store, None
                await release(store)


def running_reporter(reporting: TlsReporting, store: StateStore) -> TlsReporter:
    policy = reporting.policy
    report_from = reporting.settings.report_from or f"tlsrpt-noreply@{reporting.hostname}"
    return TlsReporter(
        store, reporting.resolver, reporting.settings, hostname=reporting.hostname,
        inject=queue_injector(policy.server.queue_dir), sign=make_signer(policy, report_from),
    )


@contextlib.asynccontextmanager
async def command_reporter(policy: Any) -> AsyncIterator[TlsReporter]:
    """A :class:`TlsReporter` outside the running gateway (``gateway tls report``): the
    policy's state store and resolver, reports committed to its queue directory."""
    settings = policy.tls_reporting
    hostname = policy.server.hostname
    async with command_context(policy, settings.state) as outside:
        yield TlsReporter(
            outside.store, outside.resolver, settings, hostname=hostname, inject=outside.inject,
            sign=make_signer(policy, settings.report_from or f"tlsrpt-noreply@{hostname}"),
        )
