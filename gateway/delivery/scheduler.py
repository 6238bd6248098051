"""The scheduler (qmail-send): from the queue to delivery, retry, bounce or done.

For each due message it has the pending recipients delivered (by route, each group
with the local or remote agent under separate concurrency limits: :mod:`dispatch`), records every
recipient's new state atomically in the queue (so a restart never delivers again to a
recipient whose success was recorded, and loses none), queues the delivery status
notifications owed, and removes the message once every recipient is delivered or
bounced. Temporary failures are retried with a quadratic back-off until the queue
lifetime runs out.
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Callable

from gateway.delivery.bounce import wants_notice
from gateway.delivery.dispatch import Dispatcher
from gateway.delivery.flush import FlushTarget, matching_messages, parse_target
from gateway.delivery.notices import Notifier, Original, expire_pending
from gateway.delivery.records import StateRecorder
from gateway.delivery.router import is_held
from gateway.delivery.types import Outcome
from gateway.logs import QUEUE_ID, short
from gateway.content import Content
from gateway.model import Envelope, Message, QueuedRecipient, RecipientState
from gateway.queue.damage import CorruptQueueFile
from gateway.verdicts import TemporaryFailure

if TYPE_CHECKING:
    from gateway.context import Gateway
    from gateway.queue import Claim, QueueStore
    from gateway.queue.store import QueuedMessage

__all__ = ["Scheduler", "backoff"]

log = logging.getLogger(__name__)



def backoff(attempts: int, base: float, ceiling: float) -> float:
    """Seconds to wait after ``attempts`` failed attempts: base * n², at most ``ceiling``.

    Quadratic like qmail-send's schedule: retries are frequent at first and thin out
    as the message ages.
    """
    return float(min(ceiling, base * max(1, attempts) ** 2))


class Scheduler:
    """Delivers what the queue holds, for one gateway process.

    With ``[server] workers = N`` every process has one. A worker's scheduler
    (``retries=False``) makes the first attempt at the messages that process queued
    (and at the notices it generates) and leaves the rest to the master's, which scans
    the queue for everything else: retries, other processes' leftovers, ``gateway
    inject``. The queue's delivery lock keeps two attempts on one message apart. Each
    process gets 1/N of the concurrency limits (the master also the remainder, each at
    least one), so the totals stay what the policy says.
    """

    def __init__(self, app: Any, *, retries: bool = True, share: int = 1) -> None:
        self.app = app
        self.queue: QueueStore = app.queue
        #: False in a worker: no queue scans, and no retries (the master's scan finds them)
        self.retries = retries
        #: how many processes split the concurrency limits
        self.share = max(1, share)
        delivery = app.policy.delivery
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}
        self._active: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._stopping = False
        self._last_scan = 0.0
        # qid -> flush targets released for its next attempt (one delivery run).
        self._released: dict[str, list[FlushTarget]] = {}
        # qid -> the descriptor holding its delivery lock, while an attempt runs
        self._locks: dict[str, int] = {}
        # qid -> a message this process just queued, lock held, for its first attempt
        self._claims: dict[str, Claim] = {}
        #: what an attempt at once got for a message it then queued (a relay the host
        #: did not take whole, Maildirs written for some recipients), by address: the
        #: first attempt's outcomes, recorded by the attempt that starts from its claim
        self._tried: dict[str, dict[str, Outcome]] = {}
        self._notifier = Notifier(self.queue, self.inject)
        self._records = StateRecorder(
            self.queue, lambda *a, **k: self.app.gateway.run_in_thread(*a, **k), keep=retries
        )
        self._dispatch = Dispatcher(
            delivery, self._records, self._remove, self._forward, share=self.share, primary=retries
        )

    # -- life cycle --------------------------------------------------------

    async def start(self, ids: list[str]) -> None:
        for qid in ids:
            self.notify(qid, 0.0)
        self._last_scan = time.monotonic()
        self._dispatch.start_background(self.app.gateway)
        self._runner = asyncio.create_task(self._run(), name="scheduler")

    async def stop(self, grace: float = 10.0) -> None:
        """Start nothing new; give running deliveries ``grace`` seconds, then cancel.

        A cancelled delivery recorded nothing, so it is simply tried again later.
        """
        self._stopping = True
        self._wake.set()
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self._dispatch.close()
        claims, self._claims = self._claims, {}
        self._tried.clear()
        for claim in claims.values():  # never started: unlocked, the file stays queued
            os.close(claim.fd)

    def notify(self, qid: str, when: float | None = None) -> None:
        """Schedule ``qid`` at ``when`` (epoch seconds; now by default)."""
        when = time.time() if when is None else when
        if self._due.get(qid, float("inf")) <= when:
            return
        self._due[qid] = when
        heapq.heappush(self._heap, (when, qid))
        self._wake.set()

    def take(self, claim: Claim) -> None:
        """Schedule a message this process just queued (:meth:`QueueStore.commit` with
        ``take_claim``) now; its first attempt starts from the claim, not the disk."""
        qid = claim.item.qid
        if self._stopping:
            os.close(claim.fd)  # the file stays queued for the next start
            return
        self._claims[qid] = claim  # one claim per commit, and queue ids are unique
        if qid in self._active or qid in self._due:
            # A queue scan found the file already (it is published before the claim is
            # handed over): the attempt scheduled there takes the claim.
            self.notify(qid)
        else:  # due now: start it here rather than wake the scheduling loop for it
            # The claim's lock was taken before the file was published: nobody has tried it.
            self._spawn(qid, first=True)

    def may_deliver_at_once(self, envelope: Envelope) -> bool:
        """The first look for :meth:`deliver_at_once`, without hooks or I/O: pending
        recipients, none asking for a success notice; all in local or virtual domains
        (or bare ``<postmaster>``, which the policy's own routing,
        :func:`~gateway.delivery.router.route_for`, sends to a local mailbox and never
        holds) with Maildir mailboxes, or all elsewhere (one envelope sender for all: no
        VERP with several) on routes not held, when relaying at once is on
        (``at_once_wait`` above 0). Whether relayed ones share a route, a
        ``gateway_route`` plugin's answer and the addresses' parse are the
        dispatcher's to find out."""
        recipients = envelope.recipients
        if self._stopping or not recipients:
            return False
        if any(r.state is not RecipientState.PENDING or wants_notice(r, "success") for r in recipients):
            return False
        policy = self.app.gateway.policy
        local = policy.local
        domains = [r.address.rpartition("@")[2].lower().rstrip(".") for r in recipients]
        relayed = [bool(d) and d not in local.domains and d not in local.virtual for d in domains]
        if all(relayed):
            if len(recipients) > 1 and envelope.verp and envelope.sender:
                return False  # a transaction per recipient: the queue's work
            return float(policy.delivery.at_once_wait) > 0 and not any(is_held(r.address, policy) for r in recipients)
        if any(relayed):
            return False  # local and relayed: the queue's attempt delivers each
        return bool(local.mailbox != "mbox")

    async def deliver_at_once(
        self, qid: str, envelope: Envelope, message: Content, announce: Callable[[], None]
    ) -> bool:
        """Deliver a message its SMTP session has not queued yet, when that is plain
        Maildir deliveries or one relay transaction (:meth:`Dispatcher.deliver_at_once`).

        A relay the next hop did not take whole (a deferral or refusal of some or all
        recipients) was a delivery attempt like any other, and Maildirs written for
        some recipients are deliveries made: the message's first queued attempt (from
        its claim) records those outcomes (logged, delivered ones done, the rest
        retried after the back-off or bounced) rather than try them again.

        :returns: True when it is delivered: nothing is queued, the reply may be sent
        """
        gateway: Gateway = self.app.gateway
        if not self.may_deliver_at_once(envelope):
            return False
        outcomes = await self._dispatch.deliver_at_once(gateway, qid, envelope, message, announce)
        if outcomes is None:
            return False
        is_done = all(
            (o := outcomes.get(r.address)) is not None and o.status == "delivered" for r in envelope.recipients
        )
        if not is_done:
            self._tried[qid] = outcomes
            return False
        log.info("done: delivered at once, never queued")
        return True

    def forget_at_once(self, qid: str) -> None:
        """``qid`` was not queued after all: forget its attempt at once."""
        self._tried.pop(qid, None)

    def forget(self, qid: str) -> None:
        self._due.pop(qid, None)

    async def _run(self) -> None:
        while not self._stopping:
            now = time.time()
            while self._heap and self._heap[0][0] <= now:
                when, qid = heapq.heappop(self._heap)
                if self._due.get(qid) != when:
                    continue  # superseded by a later notify()
                del self._due[qid]
                if qid in self._active:
                    self.notify(qid, now + 1.0)
                    continue
                self._spawn(qid)
            interval = self.app.gateway.policy.delivery.poll_interval
            if time.monotonic() - self._last_scan >= interval:
                self._last_scan = time.monotonic()
                if self._records.unsaved:  # states the disk refused: does it take them now?
                    await self._records.retry(self._active)
                if self.retries:
                    await self._rescan()
            wait = interval
            if self._heap:
                wait = max(0.0, min(wait, self._heap[0][0] - time.time()))
            self._wake.clear()
            try:
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _rescan(self) -> None:
        """Pick up messages another process (inject, a second worker) queued."""
        known = set(self._due) | self._active
        try:
            ids = await asyncio.to_thread(self._unclaimed, known)
        except OSError:
            log.exception("queue scan failed")
            return
        for qid in ids:
            if qid not in self._due and qid not in self._active:
                self.notify(qid)

    def _unclaimed(self, known: set[str]) -> list[str]:
        """In a pool thread: the queued messages not ``known`` here that nobody holds.

        A message whose delivery lock is held is in another process's hands (a worker's
        first attempt, often still waiting for a concurrency slot there) or an
        export's: an attempt would only find it locked, at the cost of a hand-over to
        a pool thread each. The next scan looks again.
        """
        found: list[str] = []
        for qid in self.queue.ids():
            if qid in known:
                continue
            try:
                if self.queue.is_delivery_locked(qid):
                    continue
            except FileNotFoundError:
                continue
            except OSError:
                pass  # the attempt will say what is wrong
            found.append(qid)
        return found

    def _spawn(self, qid: str, *, first: bool = False) -> None:
        self._active.add(qid)
        task = asyncio.create_task(self._attempt_guarded(qid, first), name=f"deliver-{qid}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _attempt_guarded(self, qid: str, first: bool) -> None:
        token = QUEUE_ID.set(qid)
        try:
            await self.attempt(qid, first=first)
        except asyncio.CancelledError:
            raise
        except TemporaryFailure as exc:  # our queue refused a notice (a full disk): no traceback
            log.warning("delivery attempt not finished, next try in 60s: %s", exc.reply)
            self._later(qid, time.time() + 60)
        except Exception:  # boundary: one bad message must not stop the scheduler
            log.exception("delivery attempt failed")
            self._later(qid, time.time() + 60)
        finally:
            self._active.discard(qid)
            QUEUE_ID.reset(token)

    # -- flush (held routes, ETRN) -------------------------------------------

    def request_flush(self, text: str) -> None:
        """Start a flush of ``domain`` or ``@domain`` (a trigger FIFO line)."""
        try:
            target = parse_target(text)
        except ValueError as exc:
            log.warning("flush refused: %s", exc)
            return
        task = asyncio.create_task(self._flush_guarded(target), name=f"flush-{target}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush_guarded(self, target: FlushTarget) -> None:
        try:
            await self.flush(target)
        except OSError:  # the queue directory could not be read: the operator asks again
            log.exception("flush %s failed", target)

    async def flush(self, target: FlushTarget) -> int:
        """Release what is queued now for ``target`` for one delivery run.

        :returns: how many messages have a pending recipient there
        """
        qids = await asyncio.to_thread(matching_messages, self.queue, target)
        for qid in qids:
            self._released.setdefault(qid, []).append(target)
            self.notify(qid)
        log.info("flush %s: %d messages", target, len(qids))
        return len(qids)

    # -- generated mail ------------------------------------------------------

    async def _forward(self, sender: str, recipients: list[str], message: Content) -> None:
        # Queued as a new message: one on disk is copied in the kernel, never read whole.
        await self.inject(sender, recipients, message)

    async def inject(
        self, sender: str, recipients: list[str], message: bytes | Content, *,
        body: str = "7BIT", smtputf8: bool = False, notes: list[dict[str, Any]] | None = None,
    ) -> str:
        """Queue a locally generated message (forward, bounce) and schedule it."""
        qid = self.queue.new_id()
        envelope = Envelope(
            sender=sender,
            recipients=[QueuedRecipient(address=a) for a in recipients],
            body=body,
            smtputf8=smtputf8,
            notes=notes or [],
        )
        await self.queue.commit(qid, envelope, Message(message))
        log.info("queued qid=%s from=<%s> to=%s (generated)", qid, short(sender), ",".join(f"<{short(a)}>" for a in recipients))
        self.notify(qid)
        return qid

    # -- one attempt -------------------------------------------------------

    def _open_attempt(self, qid: str) -> tuple[int, QueuedMessage, Content | None] | None:
        """In a pool thread: lock ``qid``, load it and, when it is due and not held, read
        its message, all in one hand-over from the event loop.

        :returns: (the lock's descriptor, the message, its content or None), or None while
            another process or an export holds the message
        :raises FileNotFoundError: when the message is gone, or was damaged and is now
            in ``corrupt/``
        """
        fd = self.queue.lock_delivery(qid)
        if fd is None:
            return None
        try:
            try:
                item = self._records.overlay(self.queue.load(qid, fd=fd))
            except CorruptQueueFile as exc:  # retrying cannot mend it: out of the queue
                self.queue.set_aside(qid, "msg", str(exc))
                raise FileNotFoundError(errno.ENOENT, f"qid={qid} is damaged") from exc
            is_due = item.next_try <= time.time() + 1 or self._stopping
            message = self.queue.content(fd, item) if is_due and not item.held else None
        except BaseException:
            os.close(fd)
            raise
        return fd, item, message

    async def attempt(self, qid: str, *, first: bool = False) -> None:
        """Try every pending recipient of ``qid`` once and record what happened.

        The attempt holds the queue's delivery lock on the message, so another process
        of the gateway, or an export with ``--hold``/``--move``, waits for it and sees
        its outcome. ``first``: started from the claim of a message this process just
        queued (:meth:`take`), so no attempt can have been made before; it holds only
        while that claim is still here to be taken.
        """
        gateway: Gateway = self.app.gateway
        claim = self._claims.pop(qid, None)
        first = first and claim is not None
        tried = self._tried.pop(qid, None) if claim is not None else None
        try:
            if claim is not None:
                opened: tuple[int, QueuedMessage, Content | None] | None = claim.fd, claim.item, claim.message
            else:
                opened = await gateway.run_in_thread(self._open_attempt, qid)
        except FileNotFoundError:
            self.forget(qid)
            self._records.forget(qid)
            self._released.pop(qid, None)
            return
        if opened is None:  # another process or an export has it: look again shortly
            self._later(qid, time.time() + 2.0)
            return
        lock, item, message = opened
        self._locks[qid] = lock
        try:
            await self._attempt_locked(gateway, item, message, first=first, tried=tried)
        finally:
            # Usually :meth:`_remove` has closed it already. Closing the file's last
            # descriptor may free its inode and blocks, a filesystem write that must not
            # run on the event loop; the shield lets it finish if this attempt is cancelled.
            left = self._locks.pop(qid, None)
            if left is not None:
                try:
                    await asyncio.shield(gateway.run_in_thread(os.close, left))
                except RuntimeError:  # the thread pool is shut down: close it here
                    os.close(left)

    async def _remove(self, qid: str) -> None:
        """Remove ``qid`` from the queue and release its delivery lock with it (the lock
        guards nothing once the file is gone; the committer thread closes it, so freeing
        the file's blocks does not hold up the event loop)."""
        await self.queue.delete(qid, lock=self._locks.pop(qid, -1))
        self._records.forget(qid)

    def _later(self, qid: str, when: float) -> None:
        """Come back to ``qid`` at ``when``; a worker leaves that to the master's scan."""
        if self.retries:
            self.notify(qid, when)
        else:
            self.forget(qid)

    async def _attempt_locked(
        self, gateway: Gateway, item: QueuedMessage, content: Content | None, *, first: bool = False,
        tried: dict[str, Outcome] | None = None,
    ) -> None:
        policy = gateway.policy
        qid = item.qid
        released = self._released.pop(qid, [])
        if item.held:
            return
        envelope = item.envelope
        now = time.time()
        pending = [r for r in envelope.recipients if r.state is RecipientState.PENDING]
        # A flush delivers its recipients now, held or not yet due; a held route's
        # other recipients wait for the next flush, and no attempt is counted for them.
        flushed: list[QueuedRecipient] = []
        waiting: list[QueuedRecipient] = []
        for rcpt in pending:
            (flushed if any(t.covers(rcpt.address) for t in released) else waiting).append(rcpt)
        is_due = item.next_try <= now + 1 or self._stopping
        ready = [r for r in waiting if not is_held(r.address, policy)] if is_due else []
        attempts = item.attempts
        if pending and not (ready or flushed) and not is_due:
            self._later(qid, item.next_try)
            return
        if ready or flushed:
            if content is None:  # a flush of a message not yet due
                content = await gateway.run_in_thread(self.queue.content, self._locks[qid], item)
            # Delivery streams the content (a large one stays in the locked file).
            if await self._dispatch.deliver(
                gateway, qid, envelope, ready + flushed, content, first=first, tried=tried
            ):
                self.forget(qid)
                log.info("done: removed from the queue")
                return
            attempts += 1

        async def load() -> Content:  # what a notice returns, when nothing was delivered
            return await gateway.run_in_thread(self.queue.content, self._locks[qid], item)

        original: Original = content if content is not None else load
        if now - envelope.arrived >= policy.delivery.queue_lifetime:
            # Held recipients expire too: a held route is not a licence to keep mail
            # forever (docs/queue.md, "Hold and flush").
            expire_pending(envelope, lambda address: is_held(address, policy))
        if ready or flushed:
            next_try = now + backoff(attempts, policy.delivery.retry_base, policy.delivery.retry_max)
        else:
            # Only held recipients: nothing was tried. Look again at the queue lifetime
            # (to expire them) or after retry_max (a reload may have lifted the hold).
            expires = envelope.arrived + policy.delivery.queue_lifetime
            next_try = max(now + 1.0, min(now + policy.delivery.retry_max, expires))
        if all(r.state is not RecipientState.PENDING for r in envelope.recipients):
            # Nothing left to try: the removal is the record that counts, so the next
            # try, the attempts and the flags of recipients nobody is told about are not
            # written (each write is two flushes). A notice queued is recorded before the
            # message goes: a crash in between must not send it twice.
            if await self._notifier.queue_owed(gateway, qid, envelope, original, now, final=True):
                await self._records.save(qid, envelope)
            await self._remove(qid)
            self.forget(qid)
            log.info("done: removed from the queue")
            return
        # A disk that refuses this write does not stop the back-off (records.py).
        await self._records.save(qid, envelope, next_try=next_try, attempts=attempts)
        if await self._notifier.queue_owed(gateway, qid, envelope, original, now):
            await self._records.save(qid, envelope)
        self._later(qid, next_try)
