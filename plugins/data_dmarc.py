"""DMARC (RFC 7489): does the author domain vouch for this message, and what does it ask?

Hooks: ``gateway_data``; ``gateway_startup`` and ``gateway_shutdown`` start and stop the
reporting (only with reports on), ``gateway_probe`` tries a Redis ``state`` for
``gateway check --probe``. Put it after ``data_dkim_verify`` (and after ``mail_spf``, which
runs at MAIL FROM): it reads their results from :mod:`gateway.authres`.

1. The author domain is the domain of the single RFC 5322.From address. A message with
   no From, several From fields or several addresses gets ``dmarc=permerror``
   (RFC 7489 §6.6.1) and ``bad_from_action``.
2. The policy record is ``_dmarc.<author domain>`` TXT, else that of the organisational
   domain (the last two labels, or three under a known multi-label suffix such as
   ``co.uk``; ``public_suffixes`` adds more). A record found at the organisational
   domain applies its ``sp=`` policy to subdomains, when it has one.
3. The message passes if an SPF ``pass`` for the MAIL FROM domain (``smtp.mailfrom``,
   or ``smtp.helo`` for the null sender) or a DKIM ``pass`` (``header.d``) is aligned
   with the author domain: equal in strict mode (``aspf=s``, ``adkim=s``), the same
   organisational domain in relaxed mode (the default).
4. A failing message is subject to the policy: ``reject`` and ``quarantine`` are
   enacted for ``pct`` percent of failing messages (RFC 7489 §6.6.4), the rest are only
   annotated; ``pct=0`` never enacts. What "enacting" means is the site's choice:
   ``reject_action`` and ``quarantine_action`` (reject with 550 5.7.1, quarantine,
   add ``score`` to the transaction's results, or only annotate).

5. A failing message passes after all when ``data_arc_verify`` (before this plugin)
   found ``arc=pass`` and a sealer listed in ``trusted_arc_sealers`` vouches for it
   (RFC 7489 §6.7 local policy, RFC 8617 §7.2.1): walking the chain from its newest set
   down through trusted sealers only, one of them reported in its
   ARC-Authentication-Results a ``dmarc=pass`` for this author domain or an aligned
   ``dkim=pass`` / ``spf=pass``. A forwarder or mailing list that added a footer breaks
   the author's signature; the sealer it trusts saw it intact. The result is
   ``dmarc=pass`` with a ``reason=`` naming the sealer, logged as an ARC override and
   counted in ``gateway_auth_results_total{method="dmarc",result="arc_override"}``.

Records ``dmarc=<result>`` (pass, fail, none, temperror, permerror) with ``header.from``
and ``policy.dmarc`` (the policy in force: ``p`` or ``sp``), and stashes a
:class:`DmarcResult` under :data:`DMARC_RESULT`. A DNS failure looking up the record, or
a temporary SPF/DKIM error on an aligned identifier when nothing passed, gives
``temperror`` and ``on_dns_error`` (default ``tempfail``: 451 4.4.3).

6. With ``aggregate_reports = true`` every ``pass`` or ``fail`` evaluation of a domain
   whose record asks for aggregate reports (``rua=``) is counted in the state store
   (``state``), and the plugin's timer sends each such domain its report once per
   ``report_period`` (RFC 7489 §7.2): see :mod:`plugins._dmarc_report`,
   :mod:`plugins._dmarc_report_send`, :mod:`gateway.reports` and ``gateway dmarc report``. Recording never
   changes what happens to the message: a store that fails is logged and skipped.

7. With ``failure_reports = true`` a message the record's ``fo=`` asks about gets a
   redacted failure report to the record's ``ruf=`` addresses (RFC 7489 §7.3; at most
   ``failure_report_limit`` per domain and hour): see :mod:`plugins._dmarc_failure`.

Settings: ``reject_action`` (default ``reject``), ``quarantine_action`` (default
``quarantine``), ``score`` (default 5.0), ``bad_from_action`` (default ``reject``),
``on_dns_error`` (default ``tempfail``), ``public_suffixes`` (default none),
``trusted_arc_sealers`` (default none: ARC never overrides), ``check_outbound`` (default false: mail from relay clients and authenticated users is
not checked; it is signed later, at the queue stage), ``aggregate_reports`` (default
false), ``state`` (default ``sqlite``), ``report_period`` (default 1d), ``report_from``
(default ``dmarc-noreply@<hostname>``), ``report_org_name`` (default the hostname), ``failure_reports`` (default false),
``failure_report_limit`` (default 10).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gateway.authres import AuthResult, add_result, count, results
from gateway.context import Gateway
from gateway.dns import DnsTemporaryError
from gateway.hooks import hookimpl
from gateway.model import Envelope, Message, QueuedRecipient, Session, StashKey, Transaction
from gateway.policy import Duration, Policy
from gateway.probe import Probes
from gateway.policy.schema import setting
from gateway.reports import make_signer, report_forever, timer_interval
from gateway.state import PluginStores, StateUnavailable, canonical_url, check_url
from gateway.state.registry import create_store
from gateway.verdicts import Action, Reply, Verdict
from plugins._dmarc_failure import Failure, redact, wants_report
from plugins._dmarc_record import DmarcRecord, discover_record
from plugins._dmarc_report import Evaluation, Published, record_evaluation
from plugins._dmarc_report_send import Reporter, command_reporter
from plugins._mailauth import author_domain, is_aligned
from plugins.data_arc_verify import ARC_RESULT

__all__ = ["DMARC_RESULT", "DmarcResult", "Plugin", "Settings", "command_reporter", "reporter"]

log = logging.getLogger("plugins.data_dmarc")

REPLY_REJECT = Reply(550, "5.7.1", "Message rejected: it fails the DMARC policy of its author domain")
REPLY_BAD_FROM = Reply(550, "5.7.1", "Message rejected: it must have exactly one From address")
# RFC 3463 X.4.3: directory (DNS) server failure.
REPLY_DNS = Reply(451, "4.4.3", "Temporary DNS failure checking DMARC, try again later")

_Action = Literal["reject", "quarantine", "score", "annotate"]


@dataclass(frozen=True)
class Settings:
    """Settings of ``data_dmarc``."""

    reject_action: _Action = field(
        default="reject", metadata={"doc": "what p=reject does: reject (550 5.7.1), quarantine, score or annotate"}
    )
    quarantine_action: Literal["quarantine", "score", "annotate"] = field(
        default="quarantine", metadata={"doc": "what p=quarantine does: quarantine, score or annotate"}
    )
    score: float = field(default=5.0, metadata={"doc": "score added when an action is 'score'"})
    bad_from_action: Literal["reject", "score", "annotate"] = field(
        default="reject", metadata={"doc": "for a message without exactly one From address"}
    )
    on_dns_error: Literal["tempfail", "continue"] = field(
        default="tempfail", metadata={"doc": "DMARC temperror: answer 451 4.4.3, or go on with the header only"}
    )
    public_suffixes: tuple[str, ...] = field(
        default=(), metadata={"doc": "extra multi-label public suffixes for organisational domains"}
    )
    check_outbound: bool = field(
        default=False, metadata={"doc": "also check mail from relay clients and authenticated users"}
    )
    trusted_arc_sealers: tuple[str, ...] = field(
        default=(), metadata={"doc": "ARC sealing domains whose arc=pass can override a DMARC failure"}
    )
    aggregate_reports: bool = setting(
        False, "count evaluations and mail each rua= domain its aggregate report once per period"
    )
    state: str = setting("sqlite", 'store of the report counts: "sqlite" (embedded) or "redis://host:port/db"')
    report_period: Duration = setting(
        86400.0, "reporting period (aligned to UTC midnight when it divides a day)", min=1
    )
    report_from: str = setting("", "reporting address: From, envelope sender (default dmarc-noreply@<hostname>)")
    report_org_name: str = setting("", "org_name of the reports and Submitter of their subject (default the hostname)")
    failure_reports: bool = setting(
        False, "send redacted failure reports (ruf=) on failing messages, as the record's fo= asks"
    )
    failure_report_limit: int = setting(10, "failure reports per policy domain and hour, at most", min=0)

    def __post_init__(self) -> None:
        check_url(self.state)


@dataclass(frozen=True, slots=True)
class DmarcResult:
    """The DMARC outcome of one message.

    :param result: pass, fail, none, temperror or permerror
    :param domain: the author domain ("" when there is not exactly one)
    :param policy: the policy in force (``p`` or ``sp``), "" without a record
    :param enacted: what was asked of us after ``pct``: none, quarantine or reject
    :param reason: why, for the header and the logs
    :param arc_sealer: the trusted ARC sealer whose chain turned a failure into a pass
    :param record: the policy record applied (``None`` without one)
    :param policy_domain: the domain that published it (the author or its organisational domain)
    """

    result: str
    domain: str = ""
    policy: str = ""
    enacted: str = "none"
    reason: str = ""
    arc_sealer: str = ""
    record: DmarcRecord | None = None
    policy_domain: str = ""


DMARC_RESULT = StashKey[DmarcResult]("data_dmarc.result")


def _identifier_domain(result: AuthResult) -> str | None:
    # RFC 7489 §4.1: the SPF identity is MAIL FROM, or HELO for the null sender.
    value = result.prop("smtp.mailfrom") or result.prop("smtp.helo") or result.prop("header.d")
    if not value:
        return None
    return value.rpartition("@")[2].lower().rstrip(".") or None


def evaluate(
    txn: Transaction, author: str, record: DmarcRecord, suffixes: tuple[str, ...]
) -> tuple[str, str]:
    """Whether an aligned SPF or DKIM pass exists (RFC 7489 §4.2).

    :param txn: the transaction whose SPF and DKIM results are read
    :param author: the author domain
    :param record: the policy record (its alignment modes)
    :param suffixes: site-specific public suffixes
    :returns: (pass / fail / temperror, reason)
    """
    checks = [(r, record.aspf) for r in results(txn, "spf")] + [(r, record.adkim) for r in results(txn, "dkim")]
    aligned_temp = False
    for found, mode in checks:
        domain = _identifier_domain(found)
        if domain is None or not is_aligned(domain, author, mode, suffixes):
            continue
        if found.result == "pass":
            return "pass", f"aligned {found.method} pass ({domain})"
        if found.result == "temperror":
            aligned_temp = True
    if aligned_temp:
        return "temperror", "aligned identifier could not be checked"
    return "fail", "no aligned SPF or DKIM pass"


def _attests(found: tuple[AuthResult, ...], author: str, record: DmarcRecord, suffixes: tuple[str, ...]) -> str:
    """What, in one sealer's ARC-Authentication-Results, authenticates ``author``."""
    # The sealer's own DMARC verdict first: it names what it saw most directly.
    for result in sorted(found, key=lambda r: r.method != "dmarc"):
        if result.result != "pass":
            continue
        if result.method == "dmarc" and (result.prop("header.from") or "").lower().rstrip(".") == author:
            return f"dmarc=pass header.from={author}"
        mode = record.aspf if result.method == "spf" else record.adkim if result.method == "dkim" else None
        domain = _identifier_domain(result) if mode else None
        if mode and domain and is_aligned(domain, author, mode, suffixes):
            return f"{result.method}=pass ({domain})"
    return ""


def arc_override(txn: Transaction, author: str, record: DmarcRecord, settings: Settings) -> tuple[str, str]:
    """The trusted sealer that vouches for a message failing DMARC, and what it saw.

    RFC 8617 §7.2.1: a receiver may use a valid chain to override DMARC by local
    policy. Only sets of trusted sealers count, and only from the newest set down to the
    first untrusted one: a set below an untrusted sealer vouches for a message that
    sealer may have changed since.

    :returns: (sealer, reason), or ("", "") when nothing overrides the failure
    """
    verdict = txn.stash.get(ARC_RESULT)
    if not settings.trusted_arc_sealers or verdict is None or verdict.result != "pass":
        return "", ""
    trusted = {name.lower().rstrip(".") for name in settings.trusted_arc_sealers}
    for arc_set in reversed(verdict.sets):
        if arc_set.sealer not in trusted:
            break
        seen = _attests(arc_set.results, author, record, settings.public_suffixes)
        if seen:
            return arc_set.sealer, f"ARC override: trusted sealer {arc_set.sealer} (i={arc_set.instance}) saw {seen}"
    return "", ""


def _act(action: str, txn: Transaction, settings: Settings, reason: str, reply: Reply) -> Verdict | None:
    if action == "reject":
        return Verdict.reject(reply, reason=reason)
    if action == "quarantine":
        return Verdict.quarantine(reason)
    if action == "score":
        txn.results.add("data_dmarc", settings.score, reason)
    return None


def _record(txn: Transaction, outcome: DmarcResult) -> None:
    props: list[tuple[str, str]] = []
    if outcome.domain:
        props.append(("header.from", outcome.domain))
    if outcome.policy:
        props.append(("policy.dmarc", outcome.policy))
    # A pass needs no explanation in the header (the log line names the aligned
    # identifier), except when a trusted ARC sealer made it one.
    reason = "" if outcome.result == "pass" and not outcome.arc_sealer else outcome.reason
    add_result(txn, AuthResult("dmarc", outcome.result, reason, tuple(props)))
    txn.stash[DMARC_RESULT] = outcome


async def check(
    session: Session, txn: Transaction, message: Message, gateway: Gateway, settings: Settings
) -> Verdict | None:
    """Evaluate the message's DMARC (the steps in the module docstring); the verdict, if any."""
    if not settings.check_outbound and (session.is_relay_client or session.is_authenticated):
        return None
    author, problem = author_domain(message)
    if author is None:
        _record(txn, DmarcResult("permerror", reason=problem))
        log.info("txn=%s dmarc=permerror %s", txn.id, problem)
        return _act(settings.bad_from_action, txn, settings, f"DMARC: {problem}", REPLY_BAD_FROM)

    timeout = float(gateway.policy.dns.timeout) + 1.0
    try:
        record, found_at = await discover_record(gateway.resolver, author, timeout, settings.public_suffixes)
    except DnsTemporaryError as exc:
        _record(txn, DmarcResult("temperror", author, reason="policy lookup failed"))
        log.info("txn=%s dmarc=temperror from=%s: %s", txn.id, author, exc)
        return Verdict.tempfail(REPLY_DNS, reason=str(exc)) if settings.on_dns_error == "tempfail" else None
    if record is None:
        _record(txn, DmarcResult("none", author, reason="no DMARC record"))
        return None

    # RFC 7489 §6.3: sp= is the policy for subdomains of the domain that published it.
    is_subdomain = found_at != author
    policy = record.subdomain_policy if is_subdomain and record.subdomain_policy else record.policy
    result, reason = evaluate(txn, author, record, settings.public_suffixes)
    if result != "fail":
        _record(txn, DmarcResult(result, author, policy, reason=reason, record=record, policy_domain=found_at))
        log.info("txn=%s dmarc=%s from=%s: %s", txn.id, result, author, reason)
        if result == "temperror" and settings.on_dns_error == "tempfail":
            return Verdict.tempfail(REPLY_DNS, reason=f"DMARC {author}: {reason}")
        return None

    sealer, why = arc_override(txn, author, record, settings)
    if sealer:
        _record(
            txn, DmarcResult("pass", author, policy, reason=why, arc_sealer=sealer, record=record, policy_domain=found_at)
        )
        count(gateway.counters, "dmarc", "arc_override")
        log.info("txn=%s dmarc=pass from=%s policy=%s: %s (DMARC failed: %s)", txn.id, author, policy, why, reason)
        return None

    # RFC 7489 §6.6.4: enact the policy on no more than pct percent of failing mail.
    enacted = policy if random.randrange(100) < record.pct else "none"
    if enacted != policy:
        reason += f"; p={policy} not applied (pct={record.pct})"
    _record(txn, DmarcResult("fail", author, policy, enacted, reason, record=record, policy_domain=found_at))
    log.info("txn=%s dmarc=fail from=%s policy=%s enacted=%s", txn.id, author, policy, enacted)
    why = f"DMARC {author} p={policy}: {reason}"
    if enacted == "reject":
        return _act(settings.reject_action, txn, settings, why, REPLY_REJECT)
    if enacted == "quarantine":
        return _act(settings.quarantine_action, txn, settings, why, REPLY_REJECT)
    return None


# -- aggregate reports (RFC 7489 §7.2) ---------------------------------------------------

_DKIM_RESULTS = frozenset({"none", "pass", "fail", "policy", "neutral", "temperror", "permerror"})
_SPF_RESULTS = frozenset({"none", "neutral", "pass", "fail", "softfail", "temperror", "permerror"})


def _aligned_pass(txn: Transaction, method: str, author: str, mode: Literal["r", "s"], suffixes: tuple[str, ...]) -> str:
    for found in results(txn, method):
        domain = _identifier_domain(found)
        if found.result == "pass" and domain and is_aligned(domain, author, mode, suffixes):
            return "pass"
    return "fail"


def _disposition(outcome: DmarcResult, verdict: Verdict | None) -> tuple[str, tuple[tuple[str, str], ...]]:
    """What was done with the message, and why it differs from what the policy asked."""
    action = verdict.action if verdict is not None else None
    disposition = (
        "reject" if action is Action.REJECT else "quarantine" if action is Action.QUARANTINE else "none"
    )
    if outcome.arc_sealer:
        return disposition, (("local_policy", f"arc=pass as sealer {outcome.arc_sealer}"),)
    if outcome.result == "fail" and outcome.enacted == "none" and outcome.policy != "none":
        return disposition, (("sampled_out", ""),)
    if outcome.result == "fail" and disposition != outcome.enacted:
        return disposition, (("local_policy", ""),)
    return disposition, ()


def evaluation(session: Session, txn: Transaction, outcome: DmarcResult, verdict: Verdict | None,
               suffixes: tuple[str, ...]) -> tuple[Published, Evaluation] | None:
    """The report row of a ``pass`` or ``fail`` evaluation of a domain asking for reports."""
    record = outcome.record
    if record is None or not record.rua or outcome.result not in ("pass", "fail"):
        return None
    published = Published(
        outcome.policy_domain, record.policy, record.subdomain_policy or record.policy, record.pct,
        record.adkim, record.aspf, record.fo, record.rua,
    )
    dkim_results = tuple(
        ((r.prop("header.d") or "").lower(), r.prop("header.s") or "", r.result if r.result in _DKIM_RESULTS else "permerror")
        for r in results(txn, "dkim") if r.prop("header.d")
    )
    spf_results = []
    for r in results(txn, "spf"):
        scope = "mfrom" if r.prop("smtp.mailfrom") else "helo"
        domain = (r.prop("smtp.mailfrom") or r.prop("smtp.helo") or "").rpartition("@")[2].lower()
        spf_results.append((domain, scope, r.result if r.result in _SPF_RESULTS else "permerror"))
    disposition, reasons = _disposition(outcome, verdict)
    row = Evaluation(
        session.peer_ip, outcome.domain, txn.sender.domain_key, disposition,
        _aligned_pass(txn, "dkim", outcome.domain, record.adkim, suffixes),
        _aligned_pass(txn, "spf", outcome.domain, record.aspf, suffixes),
        reasons, dkim_results, tuple(spf_results),
    )
    return published, row


def reporter(gateway: Gateway, settings: Settings, store: Any) -> Reporter:
    """The :class:`Reporter` of this gateway: it queues report mail through ``gateway.queue``."""

    async def inject(sender: str, recipients: list[str], message: bytes) -> str:
        qid = gateway.queue.new_id()
        envelope = Envelope(sender=sender, recipients=[QueuedRecipient(address=a) for a in recipients])
        await gateway.queue.commit(qid, envelope, Message(message))
        gateway.notify_queued(qid)
        return qid

    report_from = settings.report_from or f"dmarc-noreply@{gateway.hostname}"
    return Reporter(
        store, gateway.resolver, period=float(settings.report_period),
        org_name=settings.report_org_name or gateway.hostname, report_from=report_from,
        hostname=gateway.hostname, inject=inject,
        sign=make_signer(gateway.policy, report_from, gateway.run_in_thread),
        counters=gateway.counters, dns_timeout=float(gateway.policy.dns.timeout) + 1.0,
        suffixes=settings.public_suffixes,
    )


class Plugin:
    """``data_dmarc``: the checks above, plus the counts, the timer and the failure
    reports of the reporting (each generation of the policy its own)."""

    def __init__(self) -> None:
        self._stores = PluginStores()
        self._tasks: list[asyncio.Task[None]] = []
        self._reporter: Reporter | None = None
        # Failure reports wait here for the sending task: never on the SMTP session.
        self._failures: asyncio.Queue[tuple[Failure, str, tuple[str, ...], int]] = asyncio.Queue(100)

    @hookimpl
    async def gateway_startup(self, gateway: Gateway, settings: Settings) -> None:
        if not (settings.aggregate_reports or settings.failure_reports) or self._reporter is not None:
            return
        store = await self._stores.open(settings.state, Path(gateway.policy.server.var_dir))
        self._reporter = job = reporter(gateway, settings, store)
        if settings.aggregate_reports and not gateway.is_worker:  # the master sends for the node
            timer = report_forever(
                job.send_due, timer_interval(float(settings.report_period)), what="dmarc reports", log=log
            )
            self._tasks.append(asyncio.create_task(timer, name="dmarc-reports"))
        if settings.failure_reports:
            self._tasks.append(asyncio.create_task(_send_failures(job, self._failures), name="dmarc-failures"))

    @hookimpl
    async def gateway_probe(self, policy: Policy, settings: Settings, probes: Probes) -> None:
        url = settings.state
        if not (settings.aggregate_reports or settings.failure_reports) or url == "sqlite" or url.startswith("sqlite:"):
            return
        store = create_store(canonical_url(url, Path(policy.server.var_dir)))
        try:
            await probes.add("data_dmarc", "Redis", store.url, store.ping)
        finally:
            await store.close()

    @hookimpl
    async def gateway_shutdown(self, settings: Settings) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        if self._reporter is not None:
            self._reporter = None
            await self._stores.close(settings.state)

    @hookimpl
    async def gateway_data(
        self, session: Session, txn: Transaction, message: Message, gateway: Gateway, settings: Settings
    ) -> Verdict | None:
        verdict = await check(session, txn, message, gateway, settings)
        outcome = txn.stash.get(DMARC_RESULT)
        if outcome is None or self._reporter is None:
            return verdict
        found = evaluation(session, txn, outcome, verdict, settings.public_suffixes)
        if settings.aggregate_reports and found is not None:
            try:
                await record_evaluation(self._reporter.store, time.time(), float(settings.report_period), *found)
            except StateUnavailable as exc:
                log.warning("txn=%s dmarc report counts not recorded: %s", txn.id, exc)
        if settings.failure_reports:
            self._note_failure(session, txn, message, outcome, verdict, settings)
        return verdict

    def _note_failure(
        self, session: Session, txn: Transaction, message: Message, outcome: DmarcResult,
        verdict: Verdict | None, settings: Settings,
    ) -> None:
        record = outcome.record
        if record is None or not record.ruf or outcome.result not in ("pass", "fail"):
            return
        suffixes = settings.public_suffixes
        dkim = _aligned_pass(txn, "dkim", outcome.domain, record.adkim, suffixes)
        spf = _aligned_pass(txn, "spf", outcome.domain, record.aspf, suffixes)
        dkim_failed = any(r.result == "fail" for r in results(txn, "dkim"))
        spf_failed = any(r.result == "fail" for r in results(txn, "spf"))
        if not wants_report(record.fo, dkim, spf, dkim_failed, spf_failed):
            return
        action = verdict.action if verdict is not None else None
        delivery = "reject" if action is Action.REJECT else "spam" if action is Action.QUARANTINE else "delivered"
        found = [f"{r.method}={r.result}" for r in (*results(txn, "dmarc"), *results(txn, "spf"), *results(txn, "dkim"))]
        failure = Failure(
            outcome.domain, session.peer_ip, txn.sender.domain_key, dkim, spf,
            redact("; ".join(found).encode("ascii", "replace")).decode("ascii"), delivery,
            redact(message.head), time.time(),
        )
        try:
            self._failures.put_nowait((failure, outcome.policy_domain, record.ruf, settings.failure_report_limit))
        except asyncio.QueueFull:
            log.warning("txn=%s dmarc failure report dropped: too many waiting", txn.id)


async def _send_failures(job: Reporter, waiting: asyncio.Queue[tuple[Failure, str, tuple[str, ...], int]]) -> None:
    while True:
        failure, policy_domain, ruf, limit = await waiting.get()
        try:
            await job.send_failure(failure, policy_domain, ruf, limit)
        except (StateUnavailable, DnsTemporaryError) as exc:
            log.warning("dmarc failure report for %s not sent: %s", failure.domain, exc)
        except Exception:  # boundary: one report's failure must not stop the others
            log.exception("dmarc failure report for %s failed", failure.domain)
