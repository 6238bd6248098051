"""Recording delivery state in the queue, and what to do when the disk refuses.

Every attempt ends with a state write (:meth:`QueueStore.update_state`): recipients'
states and replies, the attempt count, the next try. When that write fails (the queue's
filesystem is full, over quota, read-only, or failing), the attempt still happened: a
recipient the peer took must not be sent again, and the back-off must still grow. So
:class:`StateRecorder` keeps the state it could not write in memory, the scheduler's
next attempt starts from it (:meth:`StateRecorder.overlay`) instead of the older state
on disk, and :meth:`StateRecorder.retry` writes it as soon as the disk takes writes
again. One WARNING line says the disk refused, one INFO line that it is back; nothing in
between but DEBUG. A restart meanwhile loses only what the disk never had.

A worker (``[server] workers``) keeps nothing: it leaves retries to the master, whose
queue scan finds the message with the state on disk, and a state the worker wrote later
could overwrite a newer one of the master's.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.model import Envelope

if TYPE_CHECKING:
    from gateway.queue import QueueStore
    from gateway.queue.store import QueuedMessage

__all__ = ["StateRecorder", "Unsaved"]

# The scheduler's story: its logger, its lines.
log = logging.getLogger("gateway.delivery.scheduler")

RunInThread = Callable[..., Awaitable[Any]]


@dataclass(slots=True)
class Unsaved:
    """The state of one message the disk refused: its envelope (the recipients as the
    attempt left them) and, when the write carried them, the next try and attempts."""

    envelope: Envelope
    next_try: float | None = None
    attempts: int | None = None


class StateRecorder:
    """Writes delivery state to the queue, or keeps it while the disk refuses.

    :param queue: the queue store
    :param run_in_thread: runs a blocking call off the event loop (the gateway's)
    :param keep: keep refused states (the master); False in a worker, which only logs
    """

    def __init__(self, queue: QueueStore, run_in_thread: RunInThread, *, keep: bool = True) -> None:
        self.queue = queue
        self.run_in_thread = run_in_thread
        self.keep = keep
        #: qid -> the state not yet on disk
        self.unsaved: dict[str, Unsaved] = {}
        self._is_refused = False

    async def save(
        self, qid: str, envelope: Envelope, *, next_try: float | None = None, attempts: int | None = None
    ) -> bool:
        """:meth:`QueueStore.update_state`, or keep the state in memory if the disk refuses.

        :returns: False when the state is only in memory
        :raises FileNotFoundError: when the message is no longer queued
        """
        try:
            await self.run_in_thread(self.queue.update_state, qid, envelope, next_try=next_try, attempts=attempts)
        except FileNotFoundError:
            self.unsaved.pop(qid, None)
            raise
        except OSError as exc:
            self._refused(qid, exc)
            if not self.keep:
                return False
            old = self.unsaved.get(qid)
            self.unsaved[qid] = Unsaved(
                envelope,
                next_try if next_try is not None else (old.next_try if old else None),
                attempts if attempts is not None else (old.attempts if old else None),
            )
            return False
        if self.unsaved.pop(qid, None) is not None or self._is_refused:
            self._accepted()
        return True

    def forget(self, qid: str) -> None:
        """The message left the queue: nothing of it is owed to the disk."""
        self.unsaved.pop(qid, None)

    def overlay(self, item: QueuedMessage) -> QueuedMessage:
        """``item`` as loaded from the disk, with the state the disk has not taken yet."""
        unsaved = self.unsaved.get(item.qid)
        if unsaved is None:
            return item
        item.envelope.recipients = unsaved.envelope.recipients
        return dataclasses.replace(
            item,
            next_try=item.next_try if unsaved.next_try is None else unsaved.next_try,
            attempts=item.attempts if unsaved.attempts is None else unsaved.attempts,
        )

    async def retry(self, busy: set[str]) -> None:
        """Write the states kept in memory, if the disk takes them now: one write as a
        probe (while the disk is full, one failing write per call, no more), then the
        rest. Messages in ``busy`` (an attempt running) are left to that attempt, and
        each write holds the message's delivery lock, so no attempt runs meanwhile."""
        for qid in [q for q in self.unsaved if q not in busy]:
            unsaved = self.unsaved.get(qid)
            if unsaved is None:
                continue
            try:
                is_written = await self.run_in_thread(self._write_locked, qid, unsaved)
            except FileNotFoundError:
                self.unsaved.pop(qid, None)
                continue
            except OSError as exc:
                log.debug("state of qid=%s still not recorded: %s", qid, exc)
                return
            if is_written and self.unsaved.get(qid) is unsaved:
                del self.unsaved[qid]
                self._accepted()

    def _write_locked(self, qid: str, unsaved: Unsaved) -> bool:
        """In a pool thread: the state, under the delivery lock; False if it is taken."""
        fd = self.queue.lock_delivery(qid)
        if fd is None:
            return False
        try:
            self.queue.update_state(qid, unsaved.envelope, next_try=unsaved.next_try, attempts=unsaved.attempts)
        finally:
            os.close(fd)
        return True

    def _refused(self, qid: str, exc: OSError) -> None:
        if self._is_refused:
            log.debug("state of qid=%s kept in memory: %s", qid, exc)
            return
        self._is_refused = True
        if not self.keep:
            log.warning("cannot record delivery state in the queue (qid=%s: %s): the master retries", qid, exc)
            return
        log.warning(
            "cannot record delivery state in the queue (qid=%s: %s): keeping it in memory, "
            "retries follow the back-off; it is written once the disk takes writes again", qid, exc,
        )

    def _accepted(self) -> None:
        if self._is_refused and not self.unsaved:
            self._is_refused = False
            log.info("queue takes state writes again: every delivery state is recorded")
