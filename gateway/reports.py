"""Periodic reports the gateway mails about what it saw: the machinery DMARC aggregate
reports (RFC 7489 §7.2, ``plugins.data_dmarc``) and TLS reports (RFC 8460,
:mod:`gateway.delivery.remote.tlsrpt_send`) share. Each keeps what is its own: what is
counted, the report document, the mail's media type and subject, where it goes.

- Periods: counts fall in the period ``floor(now / period)`` (so a one-day period starts
  at UTC midnight on every node alike, :func:`period_begin`) and are kept :data:`KEEP`
  after it ends. A period is owed its reports once it ended a grace time ago (a tenth of
  the period, at most a minute: mail counted on a node whose clock is a little behind
  still counts; at least what a reporter's counts may take to reach the store), looking
  back at most :data:`MAX_LOOKBACK` periods.
- Exactly once, across processes, nodes and restarts (:class:`PeriodReporter`): before
  sending a policy domain's report the reporter claims it in the state store
  (``<prefix>:sent:<begin>:<domain>``, set only if absent). The claim becomes the "sent"
  mark once the report is sent; a temporary failure (DNS, the queue) gives it back, so a
  later run tries again; a process that dies holding a claim loses it after
  :data:`CLAIM_TTL`.
- The timer (:func:`report_forever`): the master (or the single process) sends what is
  owed every :func:`timer_interval`; nodes sharing one store each run it, whichever
  claims first sends and the others find the mark.
- :func:`report_message`: the head both report mails have (RFC 7489 §7.2.1.1 and
  RFC 8460 §5.3 ask for the same subject).
- :func:`make_signer`: report mail is DKIM-signed with the key the policy's
  ``queue_dkim_sign`` entry has for the reporting address's domain.
- Outside a running gateway (``gateway dmarc report``, ``gateway tls report``):
  :func:`command_context` opens the policy's state store and resolver and commits report
  mail to its queue directory; :func:`report_command` is the ``--preview``/``--send``
  command both share.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.policy
import email.utils
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from gateway.dns import DnsTemporaryError
from gateway.state import StateStore, StateUnavailable
from gateway.verdicts import TemporaryFailure

__all__ = [
    "CLAIM_TTL",
    "KEEP",
    "MAX_LOOKBACK",
    "CommandContext",
    "Inject",
    "PeriodReporter",
    "Sign",
    "command_context",
    "make_signer",
    "period_begin",
    "period_start",
    "queue_injector",
    "report_command",
    "report_forever",
    "report_message",
    "timer_interval",
]

#: how long a period's counts are kept after it ends (a gateway down for days still reports)
KEEP = 7 * 86400.0
#: a claim not turned into a "sent" mark within this is given up (its process died)
CLAIM_TTL = 600.0
#: periods looked back at for reports still owed, at most
MAX_LOOKBACK = 200

#: queues a message: ``inject(sender, recipients, message) -> queue id``
Inject = Callable[[str, list[str], bytes], Awaitable[str]]
#: returns the message with a DKIM-Signature field on top
Sign = Callable[[bytes], Awaitable[bytes]]

ReportT = TypeVar("ReportT")
ReporterT = TypeVar("ReporterT", bound="PeriodReporter[Any]")


def period_begin(now: float, period: float) -> int:
    """The start (seconds since the epoch) of the reporting period ``now`` falls in.

    The epoch is a UTC midnight, so periods that divide a day start at UTC midnight.
    """
    return int(now // period * period)


def period_start(which: str, period: float, now: float) -> int | None:
    """The period a command's ``--period`` names: ``current``, ``previous`` or the one
    holding a time in seconds since the epoch; ``None`` for anything else."""
    current = period_begin(now, period)
    if which == "current":
        return current
    if which == "previous":
        return int(current - period)
    if which.isdigit():
        return period_begin(int(which), period)
    return None


class PeriodReporter(Generic[ReportT]):
    """Sends the reports of ended periods, each policy domain's once (module docstring).

    A subclass says what a period's reports are (:meth:`_reports`), whose they are
    (:meth:`_domain`) and how one is sent (:meth:`_send`).

    :param store: the state store the counts and the "sent" marks are kept in
    :param period: the reporting period in seconds
    """

    #: the "sent" marks' key prefix: ``<prefix>:sent:<begin>:<domain>``
    prefix: ClassVar[str] = "report"
    #: what the log lines call one report
    noun: ClassVar[str] = "report"
    #: the least grace time (seconds), for counts that reach the store a little late
    min_grace: ClassVar[float] = 0.0
    log: ClassVar[logging.Logger] = logging.getLogger(__name__)

    def __init__(self, store: StateStore, period: float) -> None:
        self.store = store
        self.period = period
        self._done: set[int] = set()  # periods with nothing left to send (this process)

    async def _reports(self, begin: int, domains: list[str] | None) -> Sequence[ReportT]:
        """The reports of the period at ``begin`` (only of ``domains`` unless ``None``)."""
        raise NotImplementedError

    def _domain(self, report: ReportT) -> str:
        """The policy domain ``report`` is for."""
        raise NotImplementedError

    async def _send(self, report: ReportT, begin: int) -> str:
        """Send one report; what took it ("" when nobody may have it).

        :raises gateway.dns.DnsTemporaryError, TemporaryFailure, OSError: try again later
        """
        raise NotImplementedError

    def _deferred(self, domain: str, begin: int, exc: Exception) -> None:
        """A report could not be sent now (its claim is given back)."""
        self.log.warning("%s domain=%s begin=%d deferred: %s", self.noun, domain, begin, exc)

    async def send_due(self, now: float | None = None) -> int:
        """Send every report owed for ended periods (after the grace time); how many were sent."""
        now = time.time() if now is None else now
        grace = max(self.min_grace, min(60.0, self.period / 10))
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
        :returns: how many were sent, and whether none is left to try again
        """
        sent, is_complete = 0, True
        for report in await self._reports(begin, domains):
            domain = self._domain(report)
            key = f"{self.prefix}:sent:{begin}:{domain}"
            if not await self.store.set(key, f"claimed {os.getpid()}", CLAIM_TTL, only_if_absent=True):
                continue  # sent, or being sent by another process
            try:
                done = await self._send(report, begin)
            except (DnsTemporaryError, TemporaryFailure, OSError) as exc:
                is_complete = False
                self._deferred(domain, begin, exc)
                with contextlib.suppress(StateUnavailable):
                    await self.store.delete(key)  # else the claim lapses by itself
                continue
            keep = begin + self.period + KEEP * 2 - time.time()
            await self.store.set(key, f"sent {done or '-'}", max(keep, CLAIM_TTL))
            sent += bool(done)
        return sent, is_complete


def timer_interval(period: float) -> float:
    """How often the timer looks for owed reports: often enough that a report leaves
    soon after its period ends."""
    return max(0.5, min(60.0, period / 4))


async def report_forever(
    send_due: Callable[[], Awaitable[object]], interval: float, *, what: str, log: logging.Logger,
    is_waiting_first: bool = False,
) -> None:
    """The master's timer: ``send_due()`` every ``interval`` seconds until cancelled.

    :param what: what the log lines call the reports ("dmarc reports")
    :param is_waiting_first: wait an interval before the first round
    """
    if is_waiting_first:
        await asyncio.sleep(interval)
    while True:
        try:
            await send_due()
        except StateUnavailable as exc:
            log.warning("%s: state store unavailable: %s", what, exc)
        except Exception:  # boundary: the timer outlives any one failure, logged with its traceback
            log.exception("%s: sending failed", what)
        await asyncio.sleep(interval)


def report_message(
    *, sender: str, recipients: list[str], domain: str, org_name: str, report_id: str, kind: str, hostname: str,
    now: float,
) -> EmailMessage:
    """A report mail's head: From, To, the subject ``Report Domain: <domain> Submitter:
    <org> Report-ID: <id>``, Date and Message-ID; the caller adds its fields and parts.

    :param sender: the reporting address
    :param recipients: the ``To:`` addresses
    :param kind: the Message-ID's left part ("dmarc", "tlsrpt")
    """
    message = EmailMessage(policy=email.policy.SMTP)
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Subject"] = f"Report Domain: {domain} Submitter: {org_name} Report-ID: <{report_id}>"
    message["Date"] = email.utils.formatdate(now, usegmt=True)
    message["Message-ID"] = email.utils.make_msgid(kind, domain=hostname)
    return message


def _key_for(domain: str, domains: dict[str, Any]) -> tuple[str, Any] | None:
    labels = domain.split(".")
    for start in range(len(labels) - 1):
        candidate = ".".join(labels[start:])
        if candidate in domains:
            return candidate, domains[candidate]
    return None


def make_signer(
    policy: Any, address: str, run_in_thread: Callable[..., Awaitable[Any]] = asyncio.to_thread
) -> Sign | None:
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
            from gateway.dkim_sync import load_key_in_thread, sign_in_thread

            if not loaded:
                loaded.append(await run_in_thread(load_key_in_thread, Path(key_entry.key_file), key_entry.algorithm))
            value = await run_in_thread(
                sign_in_thread, message, signing_domain, key_entry.selector, loaded[0],
                key_entry.algorithm, headers, oversign,
            )
            return f"DKIM-Signature: {value}".replace("\n", "\r\n").encode("ascii") + b"\r\n" + message

        return sign
    return None


def queue_injector(queue_dir: str | os.PathLike[str]) -> Inject:
    """Commits report mail to the queue directory and wakes the running gateway's
    scheduler through the queue's trigger (as ``gateway inject`` does; else it finds the
    mail at its next rescan)."""

    async def inject(sender: str, recipients: list[str], message: bytes) -> str:
        from gateway.queue import QueueStore
        from gateway.sendmail import Injection, queue_message

        qid = await queue_message(queue_dir, Injection(sender, recipients, message))
        await asyncio.to_thread(QueueStore(queue_dir).trigger, qid)
        return qid

    return inject


@dataclass(frozen=True, slots=True)
class CommandContext:
    """What a reporter needs outside the running gateway.

    :param store: the policy's state store (open)
    :param resolver: a resolver for the policy's ``[dns]``
    :param inject: commits report mail to the policy's queue directory
    """

    store: StateStore
    resolver: Any
    inject: Inject


@contextlib.asynccontextmanager
async def command_context(policy: Any, state: str) -> AsyncIterator[CommandContext]:
    """The state store ``state`` (``sqlite`` or a URL, under the policy's ``var_dir``),
    open while the context lasts, the policy's resolver and queue.

    :raises gateway.state.StateUnavailable: the store cannot be opened
    """
    from gateway.dns import make_resolver
    from gateway.state.registry import canonical_url, create_store

    store = create_store(canonical_url(state, Path(policy.server.var_dir)))
    await store.open()
    try:
        yield CommandContext(store, make_resolver(policy.dns), queue_injector(policy.server.queue_dir))
    finally:
        await store.close()


def report_command(
    args: argparse.Namespace, *, name: str, period: float,
    reporter: Callable[[], AbstractAsyncContextManager[ReporterT]],
    preview: Callable[[ReporterT, str, int], Awaitable[int]], verb: str,
) -> int:
    """``--preview DOMAIN`` or ``--send`` with ``--period`` and ``--domain``: the part
    ``gateway dmarc report`` and ``gateway tls report`` share once the policy is loaded.

    Exit status: 0, 1 nothing to show, 2 a bad ``--period``, 75 the state store or the
    queue unavailable.

    :param name: the messages' prefix ("gateway", "gateway tls")
    :param period: the reporting period in seconds
    :param reporter: opens the reporter (outside the running gateway)
    :param preview: prints the report(s) of the domain (``--preview``'s value) for the
        period at the given start; the exit status
    :param verb: what ``--send`` did to the reports ("queued", "sent")
    """
    begin = None
    if args.period is not None or args.preview:
        begin = period_start(args.period or "current", period, time.time())
        if begin is None:
            print(f"{name}: --period {args.period!r}: current, previous or seconds since the epoch", file=sys.stderr)
            return 2
    return asyncio.run(_report_command(args, name, begin, reporter, preview, verb))


async def _report_command(
    args: argparse.Namespace, name: str, begin: int | None,
    reporter: Callable[[], AbstractAsyncContextManager[ReporterT]],
    preview: Callable[[ReporterT, str, int], Awaitable[int]], verb: str,
) -> int:
    try:
        async with reporter() as job:
            if args.preview:
                assert begin is not None
                return await preview(job, args.preview, begin)
            if begin is None:
                sent = await job.send_due()
            else:
                sent, _ = await job.send_period(begin, args.domain)
            print(f"{name}: {sent} report(s) {verb}")
            return 0
    except (StateUnavailable, TemporaryFailure, OSError) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 75
