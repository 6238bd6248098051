"""What the index hears: the gateway's own log records, taken as they are made.

:class:`IndexHandler` is a :class:`logging.Handler` on the root logger. For each record
it looks up the record's format string (``record.msg``, the literal the code logged with)
in :data:`FORMATS`; a line it knows becomes an :data:`Event`, the record's arguments
untouched (nothing is formatted, parsed or written here), appended to a deque that the
index's writer thread drains. Every other record costs one dictionary lookup. Records
from any other thread than the event loop's are ignored: every line the index wants is
logged by a coroutine, and a process (a test) may run several gateways, each on its own
loop.

:meth:`IndexHandler.note_claim` takes what no log line says: the results (each plugin's
score) and the head of a message just queued for delivery here, from the queue's
:class:`~gateway.queue.store.Claim`.

The lines are the ones ``gateway report`` reads (gateway/logreport.py); a unit test
checks that each format string below is still logged by the code.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from typing import Any, Callable, NamedTuple

from gateway.logs import QUEUE_ID, SESSION_ID

__all__ = ["FORMATS", "Event", "IndexHandler", "SOURCE_LOGGERS"]

# format string -> event kind. The arguments are described in gateway/tracking/story.py.
FORMATS: dict[str, str] = {
    # gateway/smtp/handler.py
    "connect client=%s port=%d listener=%s relay_client=%s": "connect",
    "disconnect client=%s transactions=%d": "disconnect",
    "helo name=%s esmtp=%s": "helo",
    "auth ok mechanism=%s login=%s%s by=%s": "auth_ok",
    "auth failed mechanism=%s login=%s client=%s by=%s": "auth_failed",
    "mail from=<%s> size=%s": "mail",
    "rcpt to=<%s> accepted by=%s": "rcpt_ok",
    "rcpt to=<%s> refused by=default-deny": "rcpt_denied",
    "rcpt to=<%s> refused: declared size %d over its limit %d": "rcpt_size",
    "data from=<%s> rcpts=%d size=%d": "data",
    "queued from=<%s> to=%s rcpts=%d size=%d area=%s score=%.1f": "queued",
    "quarantine by=%s reason=%s": "quarantine",
    "%s %s by=%s reply=%r reason=%s %s": "verdict",
    "copy queued qid=%s to=%s": "copy",
    # gateway/smtp/protocol.py
    "tls version=%s cipher=%s": "tls",
    "data refused: %s": "data_refused",
    "connection refused client=%s: too many connections": "too_many",
    # gateway/hooks.py
    "observe plugin=%s hook=%s would=%s reply=%r reason=%s": "observe",
    "plugin %s %s timed out after %.1fs": "plugin_timeout",
    "plugin %s %s failed: %s": "plugin_failed",
    # gateway/delivery/
    "delivery to=<%s> status=%s relay=%s reply=%r": "delivery",
    "queued qid=%s from=<%s> to=%s (generated)": "generated",
    "done: removed from the queue": "removed",
    "done: delivered at once, never queued": "at_once",
    "not delivered at once to=%s: no final dot within %gs; queuing it": "not_at_once",
    "dsn kind=%s to=<%s> qid=%s recipients=%d": "dsn",
    "expired to=<%s>": "expired",
    "discarded by route to=%s": "discarded",
}

SOURCE_LOGGERS = (
    "gateway.smtp.handler", "gateway.smtp.protocol", "gateway.hooks",
    "gateway.delivery.scheduler", "gateway.delivery.dispatch", "gateway.delivery.notices",
)
"""The loggers of those lines: the index needs them at INFO whatever the log level."""

MAX_PENDING = 200_000
"""Events waiting for the writer; past this, new ones are dropped (and counted)."""
_new_tuple = tuple.__new__
_kind_of = FORMATS.get
_get_ident = threading.get_ident
_session_id = SESSION_ID.get
_queue_id = QUEUE_ID.get
HEAD_BYTES = 16 * 1024
"""How much of a claimed message's head is kept for its Message-ID."""


class Event(NamedTuple):
    """One thing that happened, as logged: ``args`` are the log call's arguments."""

    kind: str
    time: float
    session: str
    queue: str
    args: tuple[Any, ...]


class IndexHandler(logging.Handler):
    """Turns known log records of one event loop's thread into :class:`Event` s.

    :param wake: called when the pending events pass a batch's worth (the writer's
        event's ``set``), so a burst is written without waiting for the next tick
    """

    def __init__(self, wake: Callable[[], None], batch: int = 2000) -> None:
        super().__init__(logging.INFO)
        self.pending: collections.deque[Event] = collections.deque()
        self.dropped = 0
        self._wake = wake
        self._batch = batch
        self._thread = threading.get_ident()

    def handle(self, record: logging.LogRecord) -> bool:  # no lock: deque.append is atomic
        try:
            kind = _kind_of(record.msg)
        except TypeError:  # an unhashable msg object
            return False
        if kind is None or _get_ident() != self._thread:
            return False
        args = record.args
        # The ids from the logging call's own context (records carry them only when
        # gateway.logs.configure set its record factory). tuple.__new__: the named
        # tuple's own __new__ is a Python function, twice the cost of the rest here.
        pending = self.pending
        if len(pending) >= MAX_PENDING:
            self.dropped += 1
            return True
        pending.append(_new_tuple(Event, (kind, record.created, _session_id(), _queue_id(),
                                          args if type(args) is tuple else ())))
        if len(pending) == self._batch:
            self._wake()
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self.handle(record)

    def _put(self, event: Event) -> None:
        pending = self.pending
        if len(pending) >= MAX_PENDING:
            self.dropped += 1
            _close_claim(event)
            return
        pending.append(event)
        if len(pending) == self._batch:
            self._wake()

    def note_claim(self, claim: Any) -> None:
        """A message this process just queued for delivery: keep its results and head.

        In memory, the content itself is kept (immutable; the writer thread reads its
        first :data:`HEAD_BYTES`); a spooled one is read by the writer thread from a
        duplicate of the claim's descriptor.
        """
        item = claim.item
        content = claim.message
        head: Any = content if content.is_in_memory else (os.dup(claim.fd), tuple(item.extents))
        self.note_message(item.qid, item.envelope, head)

    def note_message(self, qid: str, envelope: Any, head: Any) -> None:
        """:meth:`note_claim` without a claim (a message delivered at once, never queued):
        ``head`` is the content in memory, or a descriptor and extents to read it from."""
        self._put(_new_tuple(Event, ("claim", time.time(), "-", qid, (list(envelope.notes), head))))


def _close_claim(event: Event) -> None:
    """A dropped or unused claim event: close the descriptor it may hold."""
    if event.kind == "claim":
        close_head(event.args[1])


def close_head(head: Any) -> None:
    if isinstance(head, tuple):
        try:
            os.close(head[0])
        except OSError:
            pass


def read_head(head: Any) -> bytes:
    """The head bytes of a claim's ``head`` (reading a spooled file: writer thread only)."""
    from gateway.content import Content

    if isinstance(head, Content):  # in memory: read() of a small one is its bytes, not a copy
        return head.read() if head.size <= 4 * HEAD_BYTES else head.head(HEAD_BYTES)
    if isinstance(head, (bytes, bytearray, memoryview)):
        return bytes(head[:HEAD_BYTES])

    fd, extents = head
    try:
        return Content.of_file(fd, extents).head(HEAD_BYTES)
    except OSError:
        return b""
    finally:
        close_head(head)
