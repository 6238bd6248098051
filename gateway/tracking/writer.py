"""The writer thread: one per gateway process, it drains the events the log handler
collected, assembles them into rows and writes them in one transaction a batch.

The event loop only appends to a deque (gateway/tracking/events.py); everything that
touches a disk (the index, a queue file read for a Message-ID) happens here, every
``tick`` seconds or sooner when a batch's worth is waiting. The index is best effort,
like capture: when a write fails (the disk full, another process holding the lock past
the busy timeout) the batch is dropped and the log says so, at most once a minute; mail
never waits for it. The master (or the single process) also samples the queue's size
and the age of its oldest message once a minute, and prunes what is older than the
retention once an hour.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from typing import Any

from gateway.tracking.events import HEAD_BYTES, SOURCE_LOGGERS, Event, IndexHandler, close_head, read_head
from gateway.tracking.base import SqlIndex
from gateway.tracking.steps import DELIVERY_DELAY
from gateway.tracking.rows import Story, split
from gateway.tracking.story import Assembler, Batch, MessageRow, result_steps

__all__ = ["IndexWriter", "message_id_of"]

log = logging.getLogger(__name__)

_FOLD = re.compile(rb"\r?\n[ \t]")
_SAMPLE_SECONDS = 60.0
HOLD_SECONDS = 2.0
"""How long a queued message's row may wait for its delivery and removal (one row, not
two: the second is an insert, two index entries and a story's encoding more)."""
MAX_HELD = 5000
_HELD = ("queued", "copy", "generated")
_PRUNE_SECONDS = 3600.0
_WARN_SECONDS = 60.0
# Loggers whose level the running writers raised to INFO, with the level they had.
_raised: dict[str, int] = {}
_active: set[IndexWriter] = set()
_active_lock = threading.Lock()


def message_id_of(head: bytes) -> str:
    """The Message-ID field of a message's head (its header section), unfolded; '' if none."""
    end = head.find(b"\r\n\r\n", 0, HEAD_BYTES)
    section = head[:HEAD_BYTES] if end < 0 else head[: end + 2]
    # The field name at a line's start, any case (a regex with IGNORECASE and MULTILINE
    # costs twice this, a message at a time).
    at = (b"\n" + section.lower()).find(b"\nmessage-id:")
    if at < 0:
        return ""
    start = at + len(b"message-id:")
    stop = section.find(b"\n", start)
    while 0 <= stop < len(section) - 1 and section[stop + 1] in b" \t":  # folded: RFC 5322 §2.2.3
        stop = section.find(b"\n", stop + 1)
    raw = section[start:] if stop < 0 else section[start:stop]
    value = _FOLD.sub(b" ", raw).strip() if b"\n" in raw else raw.strip()
    return value.decode("utf-8", "replace")[:250]


class IndexWriter:
    """Collects this process's events (construct it on the event loop's thread) and
    writes them to ``index`` from its own thread.

    :param store: the queue, to read the head of a message queued without a claim
        (quarantined, or delivery off) and to sample its size
    :param retention: seconds of tracking and hourly counters to keep
    :param sample_queue: sample the queue and prune (the master or single process)
    :param session_suffix: added to session ids in the index (``@node`` when several
        nodes share it: each names its sessions from its process ids)
    """

    def __init__(self, index: SqlIndex, store: Any, retention: float, *, sample_queue: bool,
                 tick: float = 1.0, session_suffix: str = "") -> None:
        self.index = index
        self.store = store
        self.retention = retention
        self.sample_queue = sample_queue
        self.tick = tick
        self._wake = threading.Event()
        self._stopping = False
        self.handler = IndexHandler(self._wake.set)
        self.assembler = Assembler(session_suffix)
        self._thread = threading.Thread(target=self._run, name="gateway-index", daemon=True)
        self._last_warning = 0.0
        self._next_sample = 0.0
        self._next_prune = 0.0
        self._held: list[Story] = []  # messages whose row waits for their delivery
        self._release = False  # write the held ones in the next pass (flush)
        self.written = 0  # batches written (tests wait on it)
        self.events = 0  # events drained
        self.cpu_seconds = 0.0  # CPU time of this thread's passes

    # -- life cycle (the event loop's thread) --------------------------------

    def start(self) -> None:
        """Listen to the log and start the thread (which creates the index file)."""
        with _active_lock:
            _active.add(self)
            for name in SOURCE_LOGGERS:
                logger = logging.getLogger(name)
                if not logger.isEnabledFor(logging.INFO) and name not in _raised:
                    _raised[name] = logger.level
                    logger.setLevel(logging.INFO)
        logging.getLogger().addHandler(self.handler)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop listening, write what is pending (open sessions as they stand), close.
        Blocks: call it off the event loop."""
        logging.getLogger().removeHandler(self.handler)
        with _active_lock:
            _active.discard(self)
            if not _active:
                for name, level in _raised.items():
                    logging.getLogger(name).setLevel(level)
                _raised.clear()
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until what was logged before this call is written (tests, shutdown)."""
        target = self.written + 2  # a pass under way may have drained before this call
        self._release = True
        self._wake.set()
        deadline = time.monotonic() + timeout
        while self.written < target and time.monotonic() < deadline and self._thread.is_alive():
            self._wake.set()
            time.sleep(0.02)
        return self.written >= target

    # -- the thread ------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.index.create()
        except self.index.errors as exc:
            log.error("index %s cannot be opened, nothing is recorded: %s", self.index.describe(), exc)
            logging.getLogger().removeHandler(self.handler)
            return
        try:
            while True:
                stopping = self._stopping
                self._wake.wait(self.tick)
                self._wake.clear()
                self._once(final=stopping)
                if stopping:
                    break
            log.info("index writer: %d events in %d passes, %.3f s CPU", self.events, self.written, self.cpu_seconds)
        finally:
            for event in self.handler.pending:
                if event.kind == "claim":
                    close_head(event.args[1])
            self.index.close()

    def _drain(self) -> list[Event]:
        pending = self.handler.pending
        out = []
        for _ in range(len(pending)):
            out.append(pending.popleft())
        self.events += len(out)
        return out

    def _once(self, *, final: bool = False) -> None:
        started = time.thread_time()
        try:
            self._pass(final=final)
        finally:
            self.cpu_seconds += time.thread_time() - started

    def _pass(self, *, final: bool) -> None:
        now = time.time()
        release, self._release = self._release, False
        batch = self.assembler.feed(self._drain())
        if final:
            self.assembler.close_all(batch)
        if self.sample_queue and now >= self._next_sample:
            self._next_sample = now + _SAMPLE_SECONDS
            self._sample(batch, now)
        try:
            self._complete(batch)
            messages, loose = split(batch, self._held)
            self._held = [] if final or release else self._hold(messages, now)
            if batch or messages:
                self.index.write(batch, (messages, loose))
            if self.sample_queue and now >= self._next_prune:
                self._next_prune = now + _PRUNE_SECONDS
                self.index.prune(now - self.retention, now)
        except self.index.errors as exc:
            if now - self._last_warning >= _WARN_SECONDS:
                self._last_warning = now
                log.warning("index %s: a batch of %d events is lost: %s", self.index.describe(), len(batch.events), exc)
        finally:
            for message in batch.messages:
                close_head(message.head)
        if self.handler.dropped and now - self._last_warning >= _WARN_SECONDS:
            self._last_warning = now
            log.warning("index: the writer fell behind, %d events dropped", self.handler.dropped)
            self.handler.dropped = 0
        self.written += 1

    def _hold(self, messages: list[Story], now: float) -> list[Story]:
        """Take out of ``messages`` those queued here in the last :data:`HOLD_SECONDS`
        and not yet removed: their delivery comes in a pass or two, and then goes in
        their row instead of a row of its own."""
        held = []
        for position in range(len(messages) - 1, -1, -1):
            message, steps = messages[position]
            if message.outcome in _HELD and now - message.time < HOLD_SECONDS and \
                    all(step[3] != "removed" for step in steps):
                held.append(messages.pop(position))
                if len(held) >= MAX_HELD:
                    break
        held.reverse()
        return held

    def _complete(self, batch: Batch) -> None:
        """What the events did not say: Message-IDs and results, delivery latencies."""
        for message in batch.messages:
            if message.head is not None:
                message.message_id = message_id_of(read_head(message.head))
                message.head = None
            elif message.qid and message.outcome in ("queued", "quarantined", "copy"):
                self._from_queue(batch, message)
        if batch.unknown_arrivals:
            arrivals = self.index.arrivals(qid for qid, _, _ in batch.unknown_arrivals)
            for qid, when, position in batch.unknown_arrivals:
                arrived = arrivals.get(qid)
                if arrived is not None:
                    step = batch.events[position]
                    batch.events[position] = (*step[:DELIVERY_DELAY], when - arrived)
                    batch.latency(when, when - arrived)

    def _from_queue(self, batch: Batch, message: MessageRow) -> None:
        """The Message-ID and each plugin's result of a message still in the queue."""
        from gateway.content import Content

        area = "quarantine" if message.outcome == "quarantined" else "msg"
        try:
            item = self.store.load(message.qid, area)
            fd = os.open(item.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                head = Content.of_file(fd, item.extents).head(16 * 1024)
            finally:
                os.close(fd)
        except Exception:  # delivered and gone meanwhile, or damaged: without them
            return
        message.message_id = message_id_of(head)
        if message.outcome != "copy":
            batch.events.extend(result_steps(message.time, message.key, message.session, item.envelope.notes))

    def _sample(self, batch: Batch, now: float) -> None:
        try:
            ids = self.store.ids("msg")
            quarantined = len(self.store.ids("quarantine"))
        except OSError:
            return
        batch.peak("queue_size", "", now, float(len(ids)))
        batch.peak("queue_quarantine", "", now, float(quarantined))
        oldest = 0.0
        if ids:
            try:
                oldest = max(0.0, now - int(ids[0][:13], 16) / 1e6)
            except ValueError:
                pass
        batch.peak("queue_age", "", now, oldest)
