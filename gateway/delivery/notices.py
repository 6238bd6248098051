"""Delivery status notifications owed by a queued message: which, and queueing them.

The scheduler records every recipient's state; this part decides what that state owes
its sender (RFC 3464 failure, delay and success notices, as RFC 3461's NOTIFY asks),
builds them with :mod:`gateway.delivery.bounce` and queues them as new messages. A
notice to a null sender goes to the postmaster once (a double bounce) and then stops;
with VERP each recipient's notice goes to its own return address.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal

from gateway.content import Content
from gateway.delivery.bounce import build_dsn, wants_notice
from gateway.delivery.types import Outcome
from gateway.delivery.verp import for_recipient
from gateway.logs import short
from gateway.model import Envelope, QueuedRecipient, RecipientState
from gateway.verdicts import Reply

if TYPE_CHECKING:
    from gateway.context import Gateway
    from gateway.queue import QueueStore

__all__ = [
    "DOUBLE_BOUNCE_NOTE", "EXPIRED", "Notifier", "Original", "expire_pending", "owes_nothing", "recorded_outcome",
    "reply_from_line", "unreported",
]

# The notices are part of the scheduler's story of a message: its logger, its lines.
log = logging.getLogger("gateway.delivery.scheduler")

DOUBLE_BOUNCE_NOTE = {"plugin": "bounce", "score": 0.0, "reason": "double bounce"}
#: ends the ``last_reply`` of a recipient the queue lifetime failed: what comes before it
#: is the last real error (as recorded, with ``remote`` saying who said it)
EXPIRED = " / queue lifetime expired"
_REPLY_LINE = re.compile(r"^(\d{3})(?: ([245]\.\d{1,3}\.\d{1,3}))?(?: (.*))?$")

#: Queues a generated message: ``inject(sender, recipients, message, *, body, smtputf8, notes)``.
Inject = Callable[..., Awaitable[str]]
#: The message a notice returns, or how to get it when one is owed.
Original = Content | Callable[[], Awaitable[Content]]


def unreported(envelope: Envelope) -> tuple[list[QueuedRecipient], list[QueuedRecipient]]:
    """The failed and the delivered recipients nobody has been told about yet (a next
    hop that took our DSN parameters reports its deliveries itself)."""
    failed = [r for r in envelope.recipients if r.state is RecipientState.FAILED and not r.notified]
    done = [
        r for r in envelope.recipients
        if r.state is RecipientState.DELIVERED and not r.notified and not r.dsn_relayed
    ]
    return failed, done


def owes_nothing(envelope: Envelope) -> bool:
    """Every recipient is done and no notice is owed (:meth:`Notifier.queue_owed` with
    ``final=True`` would queue nothing): the message can go without a state write, its
    removal is the record."""
    if any(r.state is RecipientState.PENDING for r in envelope.recipients):
        return False
    failed, done = unreported(envelope)
    return not (failed or any(wants_notice(r, "success") for r in done))


def expire_pending(envelope: Envelope, is_held: Callable[[str], bool]) -> None:
    """The queue lifetime is over: every pending recipient fails, keeping its last real
    error (the DSN reports it, with status 4.4.7: :func:`recorded_outcome`).

    :param is_held: whether a route holds this address for a flush
    """
    for rcpt in envelope.recipients:
        if rcpt.state is not RecipientState.PENDING:
            continue
        rcpt.state = RecipientState.FAILED
        previous = rcpt.last_reply
        if not previous:  # never tried: say why, in our own words
            why = "held for a flush (ETRN) that never came" if is_held(rcpt.address) else "no attempt was made"
            previous, rcpt.remote = f"451 4.4.7 {why}", ""
        rcpt.last_reply = previous + EXPIRED
        log.info("expired to=<%s>", short(rcpt.address))  # gateway report counts this line


def recorded_outcome(rcpt: QueuedRecipient) -> Outcome:
    """What ``rcpt``'s recorded state says happened: its status, the reply (for an
    expired recipient the last real error, with ``expired`` set) and who gave it."""
    status: Literal["delivered", "deferred", "failed"] = (
        "delivered" if rcpt.state is RecipientState.DELIVERED
        else "failed" if rcpt.state is RecipientState.FAILED else "deferred"
    )
    line = rcpt.last_reply
    if not line:
        return Outcome(status, Reply(451, "4.0.0", "not yet delivered"), rcpt.remote)
    is_expired = line.endswith(EXPIRED)
    if is_expired:
        line = line[: -len(EXPIRED)]
    return Outcome(status, reply_from_line(line, whole=is_expired), rcpt.remote, expired=is_expired)


def reply_from_line(line: str, *, whole: bool = False) -> Reply:
    """The reply a recorded ``last_reply`` line stands for: its first part, before
    " / " (an expiry recorded before :data:`EXPIRED`), or, with ``whole``, all of it."""
    match = _REPLY_LINE.match(line if whole else line.split(" / ")[0])
    if not match:
        return Reply(451, "4.0.0", line[:200])
    code = int(match.group(1))
    status = match.group(2) or ""
    if status and status[0] != match.group(1)[0]:
        status = ""
    return Reply(code, status, match.group(3) or "")


class Notifier:
    """Queues the notices a message's recorded state owes.

    :param queue: the queue
    :param inject: queues a generated message and schedules it (the scheduler's)
    """

    def __init__(self, queue: QueueStore, inject: Inject) -> None:
        self.queue = queue
        self.inject = inject

    @staticmethod
    def _postmaster(gateway: Gateway) -> str:
        policy = gateway.policy
        if policy.delivery.postmaster:
            return str(policy.delivery.postmaster)
        domain = policy.local.domains[0] if policy.local.domains else gateway.hostname
        return f"postmaster@{domain}"

    async def queue_owed(
        self, gateway: Gateway, qid: str, envelope: Envelope, message: Original, now: float,
        *, final: bool = False,
    ) -> bool:
        """Queue the DSNs this state owes; returns True if a flag changed.

        :param message: the queued message (a large one on disk: a notice reads only
            what it returns, at most its header block), or a coroutine function that
            gets it, called only when a notice is owed
        :param final: the message is removed next: flags set without a notice queued
            need no record, and False is returned for them
        """
        policy = gateway.policy
        failed, done = unreported(envelope)
        warning = policy.delivery.delay_warning
        delayed = [
            r for r in envelope.recipients
            if warning is not None and r.state is RecipientState.PENDING and not r.warned
            and now - envelope.arrived >= warning
        ]
        if not (failed or delayed or any(wants_notice(r, "success") for r in done)):
            for r in done:
                r.notified = True
            return bool(done) and not final
        owed: list[tuple[str, list[QueuedRecipient]]] = [("failure", failed), ("delay", delayed), ("success", done)]
        for kind, rcpts in owed:
            wanted = [r for r in rcpts if wants_notice(r, kind)]  # type: ignore[arg-type]
            if wanted:
                if not isinstance(message, Content):
                    message = await message()
                await self._send(gateway, qid, kind, envelope, wanted, message, now)
            for r in rcpts:
                if kind == "delay":
                    r.warned = True
                else:
                    r.notified = True
        return True

    async def _send(
        self, gateway: Gateway, qid: str, kind: str, envelope: Envelope,
        rcpts: list[QueuedRecipient], message: Content, now: float,
    ) -> None:
        if envelope.verp and envelope.sender and len(rcpts) > 1:
            # VERP: each recipient's notice goes to its own return address.
            for rcpt in rcpts:
                await self._send(gateway, qid, kind, envelope, [rcpt], message, now)
            return
        envelope = for_recipient(envelope, rcpts[0])
        to: str | None = None
        notes: list[dict[str, Any]] = []
        if not envelope.sender:
            # Never notify a null sender. A failed bounce goes to the postmaster once
            # (a double bounce); a failed double bounce stops here.
            if kind != "failure":
                return
            if any(n.get("reason") == DOUBLE_BOUNCE_NOTE["reason"] for n in envelope.notes):
                log.error("double bounce failed, dropped: to=%s", ",".join(r.address for r in rcpts))
                return
            to = self._postmaster(gateway)
            notes = [dict(DOUBLE_BOUNCE_NOTE)]
        items = [(r, recorded_outcome(r)) for r in rcpts]
        make = functools.partial(
            build_dsn, kind,  # type: ignore[arg-type]
            envelope, items, message,
            reporting_mta=gateway.hostname, queue_id=qid, now=now,
            retry_until=envelope.arrived + gateway.policy.delivery.queue_lifetime, to=to,
        )
        # A message on disk: the part returned (its header block) is read on a thread.
        notice = make() if message.is_in_memory else await gateway.run_in_thread(make)
        new = await self.inject(
            notice.sender, [notice.recipient], notice.message,
            body=notice.body, smtputf8=notice.smtputf8, notes=notes,
        )
        log.info("dsn kind=%s to=<%s> qid=%s recipients=%d", kind, short(notice.recipient), new, len(rcpts))
