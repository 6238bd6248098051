"""What the gateway decides at each SMTP stage, apart from the wire protocol.

The protocol class parses commands and calls this handler with typed objects; the
handler asks the plugin chain (through the hook runner), applies the core rules
(default-deny recipients, final scoring) and commits accepted mail to the queue.
Every decision is logged as one line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import ipaddress
import itertools
import logging
from dataclasses import dataclass
from typing import Any, Callable

from gateway import capture
from gateway.content import Content
from gateway.context import Gateway
from gateway.logs import QUEUE_ID, short
from gateway.model import Envelope, Message, QueuedRecipient, Recipient, Session, StashKey, Transaction
from gateway.queue.spool import Spool
from gateway.verdicts import Action, Reply, TemporaryFailure, Verdict

__all__ = ["Answer", "SmtpHandler"]

log = logging.getLogger(__name__)

REPLY_RCPT_DENIED = Reply(550, "5.7.1", "Recipient not accepted")
REPLY_AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
REPLY_AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
REPLY_AUTH_TEMP = Reply(454, "4.7.0", "Temporary authentication failure")
REPLY_AUTH_CLOSING = Reply(421, "4.7.0", "Temporary authentication failure, closing connection")
REPLY_QUEUE_FAILED = Reply(451, "4.3.0", "Temporary local problem, please try again later")
# RFC 1870 §6.2: a recipient whose limit is below the declared SIZE.
REPLY_RCPT_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size for this recipient")

QUARANTINE_REASON = StashKey[str]("core.quarantine_reason")


@dataclass(frozen=True, slots=True)
class Answer:
    """The reply for one command, and whether the session ends after it."""

    reply: Reply
    close: bool = False


ANSWER_SENDER_OK = Answer(Reply(250, "2.1.0", "Sender OK"))
ANSWER_RCPT_OK = Answer(Reply(250, "2.1.5", "Recipient OK"))
ANSWER_RCPT_DENIED = Answer(REPLY_RCPT_DENIED)


def _answer(verdict: Verdict, default: Reply) -> Answer:
    if verdict.action is Action.DISCONNECT:
        return Answer(verdict.reply, close=True)
    if verdict.action in (Action.REJECT, Action.TEMPFAIL):
        return Answer(verdict.reply)
    return Answer(default)


@functools.lru_cache(maxsize=16)
def _helo_answer(hostname: str) -> Answer:
    return Answer(Reply(250, "", hostname))


@functools.lru_cache(maxsize=4096)  # clients come back; parsing is a tenth of open_session
def _client_ip(peer_ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(peer_ip.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class SmtpHandler:
    """The decisions of one listener under one policy generation."""

    def __init__(self, gateway: Gateway, listener: Any) -> None:
        self.gateway = gateway
        self.listener = listener
        self.runner = gateway.runner
        self.policy = gateway.policy
        self._relay_clients: dict[str, bool] = {}  # client address -> in [relay] clients

    # -- session -----------------------------------------------------------

    def open_session(self, peer: tuple[Any, ...], local: tuple[Any, ...] | None) -> tuple[Session, Any]:
        """A new :class:`Session` and its policy scope (listener and client network)."""
        peer_ip = str(_client_ip(str(peer[0])))
        session = Session(
            peer_ip=peer_ip,
            peer_port=int(peer[1]),
            listener=self.listener.name,
            local_ip=str(local[0]) if local else "",
            local_port=int(local[1]) if local else 0,
        )
        session.is_relay_client = self._is_relay_client(peer_ip)
        scope = self.policy.scope(listener=self.listener.name, client_ip=peer_ip)
        return session, scope

    def _is_relay_client(self, peer_ip: str) -> bool:
        # Remembered per address for this policy's life (a handler's): a network test
        # costs microseconds a session, and clients come back.
        known = self._relay_clients.get(peer_ip)
        if known is None:
            ip = _client_ip(peer_ip)
            known = any(ip in net for net in self.policy.relay.clients)
            if len(self._relay_clients) >= 4096:
                self._relay_clients.clear()
            self._relay_clients[peer_ip] = known
        return known

    async def connect(self, session: Session, scope: Any) -> Answer | None:
        """Run the connect hooks; ``None`` means greet the client."""
        log.info(
            "connect client=%s port=%d listener=%s relay_client=%s",
            session.peer_ip, session.peer_port, session.listener, session.is_relay_client,
        )
        verdict = await self.runner.first_verdict(
            "gateway_connect", scope.plugins, session=session, gateway=self.gateway
        )
        if verdict is None or not verdict.is_refusal:
            return None
        self._log_verdict("connect", verdict)
        return Answer(verdict.reply, close=True)

    async def disconnect(self, session: Session, scope: Any) -> None:
        await self.runner.call_all(
            "gateway_disconnect", scope.plugins, session=session, gateway=self.gateway
        )
        log.info("disconnect client=%s transactions=%d", session.peer_ip, session.transactions)

    async def helo(self, session: Session, scope: Any, name: str) -> Answer:
        verdict = await self.runner.first_verdict(
            "gateway_helo", scope.plugins, session=session, helo=name, gateway=self.gateway
        )
        if verdict is not None and verdict.is_refusal:
            self._log_verdict("helo", verdict)
            return _answer(verdict, verdict.reply)
        session.helo = name
        log.info("helo name=%s esmtp=%s", short(name), session.is_esmtp)
        return _helo_answer(self.gateway.hostname)

    async def auth(
        self, session: Session, scope: Any, mechanism: str, login: str, password: str
    ) -> Answer:
        verdict = await self.runner.first_verdict(
            "gateway_auth",
            scope.plugins,
            session=session,
            mechanism=mechanism,
            login=login,
            password=password,
            gateway=self.gateway,
        )
        if verdict is not None and verdict.action is Action.ACCEPT:
            # The backend's own name for the user when it gave one (Dovecot's user=):
            # what sender checks, Received and Authentication-Results then use.
            session.auth_login = verdict.login or login
            log.info(
                "auth ok mechanism=%s login=%s%s by=%s", mechanism, short(login, 64),
                f" as={short(session.auth_login, 64)}" if session.auth_login != login else "", verdict.plugin,
            )
            answer, outcome = Answer(REPLY_AUTH_OK), "success"
        elif verdict is not None and verdict.action in (Action.TEMPFAIL, Action.DISCONNECT):
            log.warning(
                "auth tempfail mechanism=%s login=%s client=%s by=%s",
                mechanism, short(login, 64), session.peer_ip, verdict.plugin,
            )
            if verdict.action is Action.DISCONNECT:  # RFC 5321 §3.8: 421, then close
                answer = Answer(verdict.reply if verdict.reply.code == 421 else REPLY_AUTH_CLOSING, close=True)
            else:
                answer = Answer(REPLY_AUTH_TEMP)
            outcome = "tempfail"
        else:
            log.info(
                "auth failed mechanism=%s login=%s client=%s by=%s",
                mechanism, short(login, 64), session.peer_ip,
                verdict.plugin if verdict else "default-deny",
            )
            answer, outcome = Answer(REPLY_AUTH_FAILED), "failure"
        await self.runner.call_all(
            "gateway_auth_result",
            scope.plugins,
            session=session,
            mechanism=mechanism,
            login=login,
            outcome=outcome,
            gateway=self.gateway,
        )
        return answer

    # -- transaction -------------------------------------------------------

    async def mail(self, session: Session, scope: Any, txn: Transaction) -> Answer:
        verdict = await self.runner.first_verdict(
            "gateway_mail", scope.plugins, session=session, txn=txn, sender=txn.sender, gateway=self.gateway
        )
        if verdict is not None:
            self._note_quarantine(txn, verdict)
            if verdict.is_refusal:
                self._log_verdict("mail", verdict, sender=txn.sender)
                return _answer(verdict, verdict.reply)
        log.info("mail from=<%s> size=%s", short(txn.sender), txn.params.size)
        return ANSWER_SENDER_OK

    async def rcpt(self, session: Session, scope: Any, txn: Transaction, rcpt: Recipient) -> Answer:
        rscope = scope.for_recipient_domain(rcpt.address.domain_key) if rcpt.address.domain else scope
        size = txn.params.size
        if size is not None and size > rscope.limits.max_message_size:
            log.info("rcpt to=<%s> refused: declared size %d over its limit %d",
                     short(rcpt.address), size, rscope.limits.max_message_size)
            return Answer(REPLY_RCPT_TOO_BIG)
        verdict = await self.runner.first_verdict(
            "gateway_rcpt", rscope.plugins, session=session, txn=txn, rcpt=rcpt, gateway=self.gateway
        )
        if verdict is not None:
            self._note_quarantine(txn, verdict)
        if verdict is None or verdict.action is Action.QUARANTINE:
            # Default deny: nobody vouched for this recipient.
            log.info("rcpt to=<%s> refused by=default-deny", short(rcpt.address))
            return ANSWER_RCPT_DENIED
        if verdict.action is Action.ACCEPT:
            rcpt.accepted_by = verdict.plugin
            txn.recipients.append(rcpt)
            log.info("rcpt to=<%s> accepted by=%s", short(rcpt.address), verdict.plugin)
            return ANSWER_RCPT_OK
        self._log_verdict("rcpt", verdict, rcpt=rcpt.address)
        return _answer(verdict, verdict.reply)

    @staticmethod
    def message_size_limit(scope: Any, txn: Transaction) -> int:
        """DATA's limit: the smallest ``max_message_size`` of the accepted recipients
        (each under its domain's overrides), since one message goes to all of them."""
        limit: int = scope.limits.max_message_size
        if not scope.domain_overrides or not txn.recipients:
            return limit
        return min(
            scope.for_recipient_domain(r.address.domain_key).limits.max_message_size if r.address.domain else limit
            for r in txn.recipients
        )

    def _data_scope(self, scope: Any, txn: Transaction) -> Any:
        domains = {r.address.domain_key for r in txn.recipients if r.address.domain}
        if len(domains) == 1:
            return scope.for_recipient_domain(domains.pop())
        return scope

    @property
    def new_spool(self) -> Callable[[], Spool] | None:
        """Makes the spool file DATA writes a large message to (the queue's), if any."""
        queue = self.gateway.queue
        return None if queue is None else queue.spool

    async def data(self, session: Session, scope: Any, txn: Transaction, raw: bytes | Spool) -> Answer:
        """Run data hooks, scoring and queue hooks; commit; answer 250 only once durable.

        :param raw: the message as received, or the spool it was received into (closed
            here, and removed unless the message was queued from it)
        """
        spool: Spool | None = None
        if isinstance(raw, Spool):
            spool, message, txn.queue_id = raw, Message(raw.content()), raw.qid
        else:
            message, txn.queue_id = Message(raw), self.gateway.queue.new_id()
        token = QUEUE_ID.set(txn.queue_id)
        try:
            answer = await self._data(session, scope, txn, message, spool)
            capture.note_data(session, txn, message)
            return answer
        finally:
            QUEUE_ID.reset(token)
            if spool is not None:
                spool.close()

    async def _data(
        self, session: Session, scope: Any, txn: Transaction, message: Message, spool: Spool | None = None
    ) -> Answer:
        # The message's arrival (sender, recipient count, size) is said by the line that
        # ends its story here: 'queued ...' for mail accepted, else 'data from=...' just
        # before the refusal or failure line (or on the way out, cancelled).
        is_told = False
        try:
            dscope = self._data_scope(scope, txn)
            kwargs = dict(session=session, txn=txn, message=message, gateway=self.gateway)
            verdict = await self.runner.first_verdict("gateway_data", dscope.plugins, **kwargs)
            if verdict is None:
                verdict = self._score(session, txn)
            if verdict is not None:
                self._note_quarantine(txn, verdict)
                if verdict.is_refusal:
                    is_told = self._log_arrival(txn, message)
                    self._log_verdict("data", verdict)
                    return _answer(verdict, verdict.reply)
            verdict = await self.runner.first_verdict("gateway_queue", dscope.plugins, **kwargs)
            if verdict is not None:
                self._note_quarantine(txn, verdict)
                if verdict.is_refusal:
                    is_told = self._log_arrival(txn, message)
                    self._log_verdict("queue", verdict)
                    return _answer(verdict, verdict.reply)
            answer = await self._commit(session, txn, message, spool)
            is_told = True
            return answer
        finally:
            if not is_told:
                self._log_arrival(txn, message)

    @staticmethod
    def _log_arrival(txn: Transaction, message: Message) -> bool:
        log.info("data from=<%s> rcpts=%d size=%d", short(txn.sender), len(txn.recipients), message.size)
        return True

    async def _commit(self, session: Session, txn: Transaction, message: Message, spool: Spool | None) -> Answer:
        """Queue the message (and its copies); the 250 only once it is durable."""
        envelope = Envelope.from_transaction(session, txn)
        reason = txn.stash.get(QUARANTINE_REASON)
        area = "msg"
        if reason is not None:
            envelope.quarantine_reason = reason
            area = "quarantine"
        assert txn.queue_id is not None
        copies = self._copies(txn, envelope) if area == "msg" else []
        score = txn.results.total + session.results.total
        at_once = self.gateway.at_once
        if (
            at_once is not None and area == "msg" and not copies and not message.is_spooled
            and at_once.eligible(envelope)
        ):
            content = Content.of_bytes(b"".join(message.chunks()))

            def announce() -> None:
                self._count(message, "direct")
                self._log_queued(txn, message, "direct", score)

            try:
                # Shielded: a client that goes away now does not stop a delivery under
                # way from being recorded (and gets no reply: it sends again).
                if await asyncio.shield(at_once.deliver(txn.queue_id, envelope, content, announce)):
                    return Answer(Reply(250, "2.0.0", f"OK delivered as {txn.queue_id}"))
            except Exception:  # boundary: the queue takes it as if nothing was tried
                log.exception("delivery at once failed; queuing")
        queue = self.gateway.queue
        take_claim = self.gateway.take_claim if area == "msg" else None
        commit = queue.commit(txn.queue_id, envelope, message, area=area, take_claim=take_claim, spool=spool)
        results: list[Any]
        if copies:
            # The copies share the message's group commit; the 250 depends on the message alone.
            results = await asyncio.gather(
                commit, *(queue.commit(qid, copy, message, spool=spool) for qid, copy in copies),
                return_exceptions=True,
            )
        else:  # the common case, without gather's task and future
            try:
                await commit
                results = [None]
            except Exception as exc:  # noqa: BLE001 - as gather(return_exceptions=True) gives it
                results = [exc]
        failure = results[0]
        if isinstance(failure, BaseException):
            if at_once is not None:
                at_once.forget(txn.queue_id)
            await self._drop_copies(copies, results[1:])
            self._log_arrival(txn, message)
            if isinstance(failure, TemporaryFailure):
                log.error("queue commit failed: %s", failure)
                return Answer(failure.reply)
            # boundary: never answer 250 unless the commit finished
            log.error("queue commit failed", exc_info=failure)
            return Answer(REPLY_QUEUE_FAILED)
        self._note_copies(copies, results[1:])
        if area == "msg" and take_claim is None:
            self.gateway.notify_queued(txn.queue_id)
        self._count(message, area)
        self._log_queued(txn, message, area, score)
        return Answer(Reply(250, "2.0.0", f"OK queued as {txn.queue_id}"))

    def _count(self, message: Message, area: str) -> None:
        counters = self.gateway.counters
        if counters is not None:
            counters.queued += 1
            counters.queued_bytes += message.size
            counters.quarantined += area == "quarantine"
            counters.at_once += area == "direct"

    @staticmethod
    def _log_queued(txn: Transaction, message: Message, area: str, score: float) -> None:
        """The arrival line; ``area`` is ``direct`` for a message delivered at once."""
        log.info(
            "queued from=<%s> to=%s rcpts=%d size=%d area=%s score=%.1f",
            short(txn.sender),
            ",".join(f"<{short(r.address, 80)}>" for r in txn.recipients[:10]),
            len(txn.recipients),
            message.size,
            area,
            score,
        )

    def _copies(self, txn: Transaction, envelope: Envelope) -> list[tuple[str, Envelope]]:
        """A queue id and an envelope for each :class:`~gateway.model.QueueCopy` asked for."""
        out = []
        for copy in txn.copies:
            if not copy.recipients:
                continue
            note = {"plugin": "copy", "score": 0.0, "reason": f"{copy.reason} of {txn.queue_id}".strip()}
            out.append((
                self.gateway.queue.new_id(),
                dataclasses.replace(
                    envelope,
                    sender=copy.sender,
                    recipients=[QueuedRecipient(address=a) for a in copy.recipients],
                    ret=None, envid=None, verp=None, notes=[*envelope.notes, note],
                ),
            ))
        return out

    def _note_copies(self, copies: list[tuple[str, Envelope]], results: list[Any]) -> None:
        for (qid, copy), result in zip(copies, results):
            if isinstance(result, BaseException):
                # The message itself is safe; only this copy is missing. Say so loudly.
                log.error("copy NOT queued to=%s: %s", ",".join(r.address for r in copy.recipients), result)
                continue
            self.gateway.notify_queued(qid)
            log.info("copy queued qid=%s to=%s", qid, ",".join(f"<{short(r.address, 80)}>" for r in copy.recipients))

    async def _drop_copies(self, copies: list[tuple[str, Envelope]], results: list[Any]) -> None:
        """The message was refused (4xx): take back the copies of it that were queued."""
        for (qid, _), result in zip(copies, results):
            if isinstance(result, BaseException):
                continue
            try:
                await self.gateway.run_in_thread(self.gateway.queue.remove, qid)
            except OSError as exc:
                log.error("copy qid=%s of a refused message could not be removed: %s", qid, exc)

    def _score(self, session: Session, txn: Transaction) -> Verdict | None:
        """The policy's final scoring step: the session's and the message's summed
        scores (connect and HELO findings count for every message of the session)
        against the thresholds."""
        scoring = self.policy.scoring
        total = txn.results.total + session.results.total
        reasons = ", ".join(
            f"{r.plugin}={r.score:g}" for r in itertools.chain(session.results, txn.results) if r.score
        )
        if scoring.reject is not None and total >= scoring.reject:
            return Verdict(
                Action.REJECT,
                Reply(550, "5.7.1", "Message rejected as spam"),
                "scoring",
                f"score {total:.1f} >= {scoring.reject:g} ({reasons})",
            )
        if scoring.quarantine is not None and total >= scoring.quarantine:
            return Verdict(Action.QUARANTINE, Reply(250, "2.0.0", "OK"), "scoring", f"score {total:.1f}")
        if scoring.tempfail is not None and total >= scoring.tempfail:
            return Verdict(
                Action.TEMPFAIL,
                Reply(451, "4.7.1", "Message deferred, please try again later"),
                "scoring",
                f"score {total:.1f} >= {scoring.tempfail:g}",
            )
        return None

    @staticmethod
    def _note_quarantine(txn: Transaction, verdict: Verdict) -> None:
        if verdict.action is Action.QUARANTINE and QUARANTINE_REASON not in txn.stash:
            txn.stash[QUARANTINE_REASON] = f"{verdict.plugin}: {verdict.reason}"
            capture.note_verdict("quarantine", verdict)
            log.info("quarantine by=%s reason=%s", verdict.plugin, short(verdict.reason))

    def _log_verdict(self, stage: str, verdict: Verdict, **extra: object) -> None:
        capture.note_verdict(stage, verdict)
        counters = self.gateway.counters
        if counters is not None:
            counters.bump(counters.refused, (stage, verdict.action.value))
        details = " ".join(f"{k}=<{short(v)}>" for k, v in extra.items())
        log.info(
            "%s %s by=%s reply=%r reason=%s %s",
            stage, verdict.action.value, verdict.plugin, " ".join(verdict.reply.lines()),
            short(verdict.reason), details,
        )
