"""Run one message through a policy's plugin chain and tell who decided what, and why.

:func:`explain` plays an SMTP session (connect, HELO, MAIL, each RCPT, DATA) for a
given client address against the real :class:`~gateway.smtp.handler.SmtpHandler`, the
real plugins and the real hook runner, so every core rule (default-deny recipients,
scoring, quarantine) applies exactly as in ``gateway run``. Nothing listens and nothing
is queued: the :class:`~gateway.context.Gateway` it builds has a dry-run queue that
takes the final commit and writes nothing.

To see each plugin's answer, not only the chain's, the runner is wrapped: the wrapper
runs a chain one entry at a time through the real :meth:`HookRunner.first_verdict`
(same semantics: the first verdict ends the chain) and records each entry's verdict,
the results it added and what it logged. Observe-mode plugins have their verdict
logged by the runner, not returned; the wrapper reads it from that log record.

Plugins that keep state (greylisting, rate limits) see this trial as a real attempt.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from gateway.address import Address, parse_path
from gateway.context import Gateway
from gateway.dns import make_resolver
from gateway.hooks import HookRunner, PluginSpec
from gateway.model import Envelope, MailParams, Message, Recipient, Session, Transaction
from gateway.sendmail import to_crlf
from gateway.smtp.data import REPLY_TOO_BIG
from gateway.smtp.handler import QUARANTINE_REASON, REPLY_RCPT_DENIED, Answer, SmtpHandler
from gateway.verdicts import Reply, Verdict

__all__ = ["Explanation", "Stage", "Step", "explain"]

_STAGES = {
    "gateway_connect": "connect", "gateway_helo": "helo", "gateway_mail": "mail",
    "gateway_rcpt": "rcpt", "gateway_data": "data", "gateway_queue": "queue",
}
# Same replies as gateway.smtp.protocol's session rules.
_REPLY_NEED_AUTH = Reply(530, "5.7.0", "Authentication required")
_REPLY_NEED_TLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
_REPLY_NO_RCPT = Reply(554, "5.5.1", "No valid recipients")
_DEFAULT_DENY_ANSWER = " ".join(REPLY_RCPT_DENIED.lines())


@dataclass
class Step:
    """What one plugin said at one stage."""

    plugin: str
    outcome: str  # "no opinion", or an Action value: accept, reject, tempfail, ...
    reply: str = ""
    reason: str = ""
    observe: bool = False  # the plugin is in observe mode: it would have done this
    results: list[dict[str, Any]] = field(default_factory=list)
    log: list[str] = field(default_factory=list)


@dataclass
class Stage:
    """One SMTP stage (or the scoring step): the plugins asked and the client's answer."""

    name: str
    subject: str = ""
    steps: list[Step] = field(default_factory=list)
    answer: str = ""
    decided_by: str = ""


@dataclass
class Explanation:
    """The whole trial: the stages in order and what would have been queued."""

    policy: str
    listener: str
    client_ip: str
    is_relay_client: bool
    stages: list[Stage] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    queued: bool = False
    area: str = ""
    score: float = 0.0
    added_headers: list[str] = field(default_factory=list)
    removed_headers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _header_fields(data: bytes) -> list[str]:
    """The header fields of ``data``, each with its continuation lines."""
    end = data.find(b"\r\n\r\n")
    block = data[: end + 2] if end >= 0 else data
    fields: list[str] = []
    for line in block.split(b"\r\n"):
        text = line.decode("utf-8", "replace")
        if text[:1] in (" ", "\t") and fields:
            fields[-1] += "\n" + text
        elif ":" in text:
            fields.append(text)
    return fields


class _DryRunQueue:
    """Stands in for the queue: gives an id, takes the commit, writes nothing (whole
    messages only: nothing is spooled, so ``spool`` is always None)."""

    def __init__(self) -> None:
        self.committed: tuple[str, Envelope, Message, str] | None = None

    def new_id(self) -> str:
        # The queue's own format (13 hex digits of microseconds, 6 of the pid, 4 of a
        # counter), so headers that quote it look as they will.
        return f"{time.time_ns() // 1000:013X}{os.getpid() & 0xFFFFFF:06X}0000"

    async def commit(
        self, qid: str, envelope: Envelope, message: Message, *, area: str = "msg", take_claim: None = None,
        spool: object = None,
    ) -> None:
        if self.committed is None:  # the message; copies (queue_archive) are committed after it
            self.committed = (qid, envelope, message, area)


class _Capture(logging.Handler):
    """Collects the log records emitted while one plugin runs."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class _Tracer:
    """A :class:`HookRunner` look-alike that records every entry's answer."""

    runner: HookRunner
    policy: Any
    stages: list[Stage] = field(default_factory=list)
    message: Message | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)

    def begin(self, name: str, subject: str = "") -> Stage:
        stage = Stage(name, subject)
        self.stages.append(stage)
        return stage

    async def first_verdict(self, hook: str, entries: Sequence[Any], **kwargs: Any) -> Verdict | None:
        name = _STAGES.get(hook, hook)
        stage = self.stages[-1] if self.stages and self.stages[-1].name == name else self.begin(name)
        self.message = kwargs.get("message", self.message)
        verdict = None
        for entry in entries:
            if not self.runner.implements(entry.name, hook):
                continue
            verdict = await self._step(stage, hook, entry, kwargs)
            if verdict is not None:
                stage.decided_by = verdict.plugin
                break
        if hook == "gateway_data" and verdict is None:
            self._scoring(kwargs["session"], kwargs["txn"])
        return verdict

    async def _step(self, stage: Stage, hook: str, entry: Any, kwargs: Mapping[str, Any]) -> Verdict | None:
        holders = [kwargs[k].results for k in ("session", "txn") if k in kwargs]
        before = [len(h) for h in holders]
        capture = _Capture()
        root = logging.getLogger()
        level = root.level
        root.addHandler(capture)
        root.setLevel(min(level, logging.INFO) if level else logging.INFO)
        try:
            verdict = await self.runner.first_verdict(hook, [entry], **kwargs)
        finally:
            root.removeHandler(capture)
            root.setLevel(level)
        step = Step(entry.id, "no opinion")
        for record in capture.records:
            if record.name == "gateway.hooks" and str(record.msg).startswith("observe ") and record.args:
                _, _, action, reply, reason = record.args
                step.outcome, step.reason, step.observe = str(action), str(reason), True
                step.reply = " ".join(str(reply).splitlines())
            elif record.name.startswith("plugins") or record.levelno >= logging.WARNING:
                step.log.append(f"{record.levelname.lower()}: {record.getMessage()}")
        if verdict is not None:
            step.outcome, step.reason = verdict.action.value, verdict.reason
            step.reply = " ".join(verdict.reply.lines())
        for holder, count in zip(holders, before):
            step.results += [dataclasses.asdict(r) for r in list(holder)[count:]]
        stage.steps.append(step)
        return verdict

    def _scoring(self, session: Session, txn: Transaction) -> None:
        """Open the stage of the handler's own scoring step, which follows the data hooks.

        Its outcome shows in what happens next (see :func:`_scored`): the handler asks
        the queue hooks only when scoring did not refuse.
        """
        total = session.results.total + txn.results.total
        scoring = self.policy.scoring
        limits = ", ".join(
            f"{name} at {value:g}" for name in ("reject", "quarantine", "tempfail")
            if (value := getattr(scoring, name)) is not None
        )
        self.begin("scoring", f"total {total:g} ({limits or 'no thresholds set'})")

    async def call_all(self, hook: str, entries: Sequence[Any], **kwargs: Any) -> None:
        await self.runner.call_all(hook, entries, **kwargs)


def _answer(stage: Stage, answer: Answer | None, default: str) -> bool:
    """Record the client's reply; True if the stage refused."""
    if answer is None:
        stage.answer = default
        return False
    stage.answer = " ".join(answer.reply.lines())
    return not answer.reply.is_positive


def _parse(address: str, *, sender: bool) -> Address:
    text = address.strip()
    if not text.startswith("<"):
        text = f"<{text}>"
    parsed, rest = parse_path(text, allow_null=sender, allow_postmaster=not sender, utf8=True)
    if rest:
        raise ValueError(f"unexpected text after the address: {rest!r}")
    return parsed


async def explain(
    policy: Any,
    specs: Mapping[str, PluginSpec],
    *,
    message: bytes,
    client_ip: str,
    sender: str,
    recipients: list[str],
    helo: str | None = None,
    listener: str | None = None,
    auth_user: str | None = None,
    tls: bool = False,
) -> Explanation:
    """Play one SMTP session through ``policy``'s chain; nothing is queued or bound.

    :param policy: a loaded :class:`~gateway.policy.Policy`
    :param specs: the plugins known to this installation (``discover_plugins()``)
    :param message: the message, any line ends (converted to CRLF)
    :param client_ip: the client's address, as if it connected from there
    :param sender: the MAIL FROM address (``""`` or ``"<>"`` for the null sender)
    :param recipients: the RCPT TO addresses, tried in order
    :param helo: the EHLO name (default: the client's address literal)
    :param listener: the listener name (default: the policy's first)
    :param auth_user: treat the session as authenticated with this login
    :param tls: treat the session as encrypted (STARTTLS done)
    :raises ValueError: an unknown listener or a malformed address
    :raises Exception: whatever a plugin's ``gateway_startup`` raises
    """
    settings = policy.listener(listener) if listener else policy.listeners[0]
    if settings is None:
        raise ValueError(f"no listener named {listener!r} in {policy.source}")
    mail_from = _parse(sender, sender=True) if sender not in ("", "<>") else Address.null()
    rcpts = [_parse(r, sender=False) for r in recipients]
    raw = to_crlf(message)
    queue = _DryRunQueue()
    tracer = _Tracer(HookRunner(specs, [entry.name for entry in policy.plugins]), policy)
    executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="explain")
    gateway = Gateway(
        policy=policy, runner=tracer, queue=queue, executor=executor,  # type: ignore[arg-type]
        hostname=policy.server.hostname, resolver=make_resolver(policy.dns),
    )
    handler = SmtpHandler(gateway, settings)
    await tracer.runner.startup(policy.plugins, gateway=gateway)
    try:
        session, scope = handler.open_session((client_ip, 0), (settings.address, settings.port))
        result = Explanation(policy.source, settings.name, session.peer_ip, session.is_relay_client)
        result.stages = tracer.stages
        try:
            await _session(handler, tracer, session, scope, result, mail_from, rcpts, raw, helo, auth_user, tls)
        finally:
            await handler.disconnect(session, scope)
    finally:
        await tracer.runner.call_all("gateway_shutdown", policy.plugins, gateway=gateway)
        executor.shutdown(wait=False, cancel_futures=True)
    if queue.committed is not None:
        result.queued, result.area = True, queue.committed[3]
    if tracer.message is not None:
        before = Counter(_header_fields(raw))
        after = Counter(_header_fields(tracer.message.as_bytes()))
        result.added_headers = list((after - before).elements())
        result.removed_headers = list((before - after).elements())
    return result


async def _session(
    handler: SmtpHandler, tracer: _Tracer, session: Session, scope: Any, result: Explanation,
    mail_from: Address, rcpts: list[Address], raw: bytes, helo: str | None, auth_user: str | None, tls: bool,
) -> None:
    stage = tracer.begin("connect", session.peer_ip)
    if _answer(stage, await handler.connect(session, scope), "220 (greeting)"):
        return
    if tls:
        session.tls_version, session.tls_cipher = "TLSv1.3", "TLS_AES_256_GCM_SHA384"
    name = helo or (f"[{session.peer_ip}]" if ":" not in session.peer_ip else f"[IPv6:{session.peer_ip}]")
    session.is_esmtp = True
    stage = tracer.begin("helo", name)
    if _answer(stage, await handler.helo(session, scope, name), ""):
        return
    if auth_user:
        session.auth_login = auth_user
    txn = Transaction(
        sender=mail_from,
        params=MailParams(
            size=len(raw),
            body="8BITMIME" if any(b > 127 for b in raw) else "7BIT",
            smtputf8=not (mail_from.is_ascii and all(r.is_ascii for r in rcpts)),
        ),
    )
    stage = tracer.begin("mail", f"<{mail_from}>")
    if handler.listener.require_tls and not session.has_tls:
        return _core(stage, _REPLY_NEED_TLS)
    if handler.listener.require_auth and not session.is_authenticated:
        return _core(stage, _REPLY_NEED_AUTH)
    if _answer(stage, await handler.mail(session, scope, txn), ""):
        return
    for address in rcpts:
        rcpt = Recipient(address)
        stage = tracer.begin("rcpt", f"<{address}>")
        _answer(stage, await handler.rcpt(session, scope, txn, rcpt), "")
        if rcpt in txn.recipients:
            stage.decided_by = rcpt.accepted_by
            result.accepted.append(str(address))
        elif not stage.decided_by or stage.answer == _DEFAULT_DENY_ANSWER:
            # No plugin vouched for the recipient (a quarantine verdict does not either).
            stage.decided_by = "default-deny"
    stage = tracer.begin("data", f"{len(raw)} bytes")
    if not txn.recipients:
        return _core(stage, _REPLY_NO_RCPT)
    if len(raw) > handler.message_size_limit(scope, txn):
        return _core(stage, REPLY_TOO_BIG)
    answer = await handler.data(session, scope, txn, raw)
    result.score = txn.results.total + session.results.total
    _scored(tracer.stages, txn, answer)
    _answer(tracer.stages[-1], answer, "")


def _scored(stages: list[Stage], txn: Transaction, answer: Answer) -> None:
    """Fill in the scoring stage from what the handler did after it."""
    scoring = next((s for s in stages if s.name == "scoring"), None)
    if scoring is None:
        return
    if stages[-1] is scoring:  # the queue hooks never ran: scoring refused
        action = "reject" if answer.reply.is_permanent else "tempfail"
        scoring.steps.append(Step("scoring", action, " ".join(answer.reply.lines())))
        scoring.decided_by = "scoring"
    elif (txn.stash.get(QUARANTINE_REASON) or "").startswith("scoring:"):
        scoring.steps.append(Step("scoring", "quarantine"))
        scoring.decided_by = "scoring"


def _core(stage: Stage, reply: Reply) -> None:
    stage.answer = " ".join(reply.lines())
    stage.decided_by = "core"

