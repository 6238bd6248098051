"""The durable queue store: one immutable file per message, atomic per-recipient state.

A message is written to ``tmp/``, fdatasynced, renamed into its area (``msg/`` or
``quarantine/``), and the area directory fsynced before :meth:`QueueStore.commit`
returns, so the 250 follows stable storage. The writing itself, many messages per
directory fsync (group commit), is :class:`~gateway.queue.committer.Committer`'s. Delivery
state lives in ``state/<qid>``, replaced atomically. See ``docs/queue.md``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from gateway.content import Content
from gateway.model import Envelope, Message, QueuedRecipient
from gateway.queue.committer import (
    NEW_FILE,
    REPLY_DISK_FULL,
    REPLY_QUEUE_CLOSED,
    REPLY_QUEUE_ERROR,
    Committer,
    fsync_dir,
    write_all,
)
from gateway.queue.damage import MAGIC as _MAGIC
from gateway.queue.damage import QID_RE as _QID_RE
from gateway.queue.damage import CorruptQueueFile, move_aside, read_envelope
from gateway.queue.damage import check_fd as _check_fd
from gateway.queue.dirsync import DirSync
from gateway.queue.locks import is_locked, ofd_lock, open_locked
from gateway.queue.spool import Spool, spooled_layout
from gateway.queue.recovery import clear_tmp, verify_area, verify_states

__all__ = [
    "AREAS", "Claim", "CorruptQueueFile", "QueueStore", "QueuedMessage",
    "REPLY_DISK_FULL", "REPLY_QUEUE_CLOSED", "REPLY_QUEUE_ERROR",
]

log = logging.getLogger(__name__)

AREAS = ("msg", "quarantine")  # the directories that hold whole messages
_READ_AT_ONCE = 256 * 1024  # a queued message up to this size is read whole for delivery


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """One queued message, its state overlay applied (``envelope.recipients`` come
    from ``state/<qid>`` when that exists). The message is the ``extents`` (offset,
    length) of ``path``, in order: one in a GWQ1 file, two in a spooled (GWQ2) one."""

    qid: str
    area: str
    envelope: Envelope
    path: Path
    extents: tuple[tuple[int, int], ...]
    held: bool
    next_try: float
    attempts: int

    @property
    def message_size(self) -> int:
        """The message's size in octets."""
        return sum(length for _, length in self.extents)


@dataclass(frozen=True, slots=True)
class Claim:
    """A message this process just committed, still in hand: its file's descriptor,
    holding the delivery lock (:meth:`QueueStore.lock_delivery`) since before the file
    was published, the message as :meth:`QueueStore.load` would give it, and its octets
    (in memory, or for a spooled message the extents of ``fd``). The first delivery
    attempt starts from it without going back to the disk."""

    fd: int
    item: QueuedMessage
    message: Content


# Queue ids are process-wide (two stores on one directory in one process never collide).
_id_lock = threading.Lock()
_id_last = [0, 0]  # microseconds, counter
_tmp_seq = itertools.count()


def _next_id() -> str:
    with _id_lock:
        now = time.time_ns() // 1000
        if now > _id_last[0]:
            _id_last[:] = [now, 0]
        elif _id_last[1] < 0xFFFF:  # same microsecond, or the clock stepped back
            _id_last[1] += 1
        else:
            _id_last[:] = [_id_last[0] + 1, 0]
        return f"{_id_last[0]:013X}{os.getpid() & 0xFFFFFF:06X}{_id_last[1]:04X}"


class QueueStore:
    """The on-disk queue under one root directory.

    :meth:`commit` is for the event loop; the other methods block on the disk and may be
    called from any thread (the CLI, or the scheduler via ``asyncio.to_thread``).

    :param root: the queue directory; :meth:`open` creates it and its subdirectories
    :param max_batch: the most messages one group commit (one directory fsync) covers
    """

    def __init__(self, root: str | os.PathLike[str], *, max_batch: int = 64) -> None:
        self.root = Path(root)
        self._committer = Committer(
            self.root / "tmp", self._dir, max_batch=max_batch,
            lock=lambda fd: ofd_lock(fd, fcntl.F_WRLCK, wait=False),
            unlink=self._unlink_message, forget=lambda qid: self._drop_state(qid, is_logged=False),
        )
        # Built once: a path operation costs microseconds, and a delivered message
        # takes several (lock, unlink, state) on the hot path.
        self._area_paths = {area: self.root / area for area in AREAS}
        self._area_strs = {area: str(path) for area, path in self._area_paths.items()}
        self._state_str = str(self.root / "state")
        self._state_locks = [threading.Lock() for _ in range(64)]  # striped by qid
        #: messages (or stray files) this process moved to ``corrupt/``
        self.moved_aside = 0
        self._count_lock = threading.Lock()
        # Concurrent state updates and removals share their directory fsyncs.
        self._syncs = {
            sub: DirSync(self.root / sub, lambda path: fsync_dir(path))
            for sub in (*AREAS, "state")
        }

    def _dir(self, area: str) -> Path:
        try:
            return self._area_paths[area]
        except KeyError:
            raise ValueError(f"unknown queue area {area!r}") from None

    def _path(self, area: str, qid: str) -> Path:
        if not _QID_RE.fullmatch(qid):
            raise ValueError(f"malformed queue id {qid!r}")
        return self._dir(area) / qid

    def _fspath(self, area: str, qid: str) -> str:
        """:meth:`_path` as a string, for the hot path (no path object made)."""
        if not _QID_RE.fullmatch(qid):
            raise ValueError(f"malformed queue id {qid!r}")
        try:
            return f"{self._area_strs[area]}/{qid}"
        except KeyError:
            raise ValueError(f"unknown queue area {area!r}") from None

    def _state_lock(self, qid: str) -> threading.Lock:
        return self._state_locks[hash(qid) % len(self._state_locks)]

    @contextlib.contextmanager
    def _locked(self, qid: str) -> Iterator[None]:
        """Serialise state changes of ``qid`` across threads and processes.

        The gateway's scheduler and ``gateway queue hold/release/retry`` both
        read-modify-write the state file: a thread lock covers this process, an
        advisory ``flock`` on the (immutable) message file covers the others.
        """
        with self._state_lock(qid):
            fd = -1
            for area in AREAS:
                try:
                    fd = os.open(self._path(area, qid), os.O_RDONLY | os.O_CLOEXEC)
                    break
                except FileNotFoundError:
                    continue
            if fd < 0:
                raise FileNotFoundError(errno.ENOENT, f"no queued message qid={qid}")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def lock_delivery(self, qid: str) -> int | None:
        """Take the delivery lock on ``msg/<qid>`` (:mod:`gateway.queue.locks`) for the
        length of one attempt; close the returned descriptor to release it.

        :returns: the locked descriptor, or None while another holder has it
        :raises FileNotFoundError: when the message is gone
        """
        try:
            return open_locked(self._fspath("msg", qid), qid, wait=False)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return None
            raise

    def is_delivery_locked(self, qid: str) -> bool:
        """Whether someone holds the delivery lock on ``msg/<qid>`` now (an attempt in
        another process, a claim, an export); a test only, nothing is taken.

        :raises FileNotFoundError: when the message is gone
        """
        fd = os.open(self._fspath("msg", qid), os.O_RDONLY | os.O_CLOEXEC)
        try:
            return is_locked(fd)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def lock_exclusive(self, qid: str, area: str = "msg") -> Iterator[int]:
        """Wait until no delivery attempt has ``qid`` (see :meth:`lock_delivery`), keep
        new ones out while the block runs, and give the message file's descriptor.

        :raises FileNotFoundError: when the message is gone
        """
        fd = open_locked(self._path(area, qid), qid, wait=True)
        try:
            yield fd
        finally:
            os.close(fd)

    def read_state(self, qid: str) -> dict[str, Any] | None:
        """The state file of ``qid`` as recorded (JSON types), read under the state lock,
        or None when the message has none yet.

        :raises FileNotFoundError: when the message is not queued
        :raises CorruptQueueFile: when the state file is damaged
        """
        with self._locked(qid):
            state = self._read_state(qid)
        if state is None:
            return None
        return {**state, "recipients": [r.to_dict() for r in state["recipients"]]}

    # Recovery -------------------------------------------------------------------------

    def open(self) -> list[str]:
        """Create the directories and recover after a crash; call once at startup.

        Empties ``tmp/`` (unfinished writes), moves bad message files and unparsable
        state files to ``corrupt/`` (never deleting them), and deletes state files
        whose message is gone (a crash inside :meth:`remove`). Only the process that
        owns the queue may call it: it discards anyone's in-flight temporary files.

        :returns: the sorted queue ids found in ``msg/``
        """
        is_new = False
        for sub in ("", "tmp", "msg", "state", "quarantine", "corrupt"):
            if not (self.root / sub).is_dir():
                (self.root / sub).mkdir(parents=True)
                is_new = True
        if is_new:
            fsync_dir(self.root)
            fsync_dir(self.root.parent)
        clear_tmp(self.root / "tmp")
        found = {area: verify_area(self.root, area, self._move_aside) for area in AREAS}
        verify_states(self.root, found, self._read_state, self._move_aside)
        self._committer.reopen()
        log.info("queue opened root=%s messages=%d quarantined=%d",
                 self.root, len(found["msg"]), len(found["quarantine"]))
        return sorted(found["msg"])

    def attach(self) -> None:
        """Use a queue another process of this gateway opened (a worker after fork).

        No recovery here: only :meth:`open`, in the process that owns the queue, may
        clear ``tmp/``, where the other processes' commits are in flight.
        """
        for sub in ("tmp", "msg", "state", "quarantine", "corrupt"):
            if not (self.root / sub).is_dir():
                raise FileNotFoundError(f"queue {self.root} is not open: {sub}/ is missing")
        self._committer.reopen()

    @property
    def trigger_path(self) -> Path:
        """A FIFO the running gateway reads: a queue id, or ``*``, per line means
        "look at this message (all messages) now" (qmail's lock/trigger)."""
        return self.root / "trigger"

    def trigger(self, *qids: str) -> bool:
        """Wake the running gateway's scheduler; False if no gateway is listening."""
        try:
            fd = os.open(self.trigger_path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except (FileNotFoundError, OSError):
            return False  # ENXIO: no reader, the gateway is not running
        try:
            os.write(fd, "".join(f"{q}\n" for q in qids).encode("ascii"))
        except BlockingIOError:
            pass  # the gateway has a backlog; its periodic rescan will do
        finally:
            os.close(fd)
        return True

    def _move_aside(self, qid: str, files: list[Path], reason: str) -> None:
        if move_aside(self.root, qid, files, reason):
            with self._count_lock:
                self.moved_aside += 1

    def set_aside(self, qid: str, area: str, reason: str) -> None:
        """Move a message found damaged after :meth:`open` (its envelope or state does
        not parse: :meth:`load` raised :class:`CorruptQueueFile`) to ``corrupt/``, with
        its state file, so nothing retries it. The caller holds its delivery lock.

        :raises FileNotFoundError: when the message is gone
        """
        with self._locked(qid):  # no state update from another process in between
            files = [self._path(area, qid)]
            if (self.root / "state" / qid).exists():
                files.append(self.root / "state" / qid)
            self._move_aside(qid, files, reason)

    # Commit ---------------------------------------------------------------------------

    def new_id(self) -> str:
        """A new queue id of 23 characters [0-9A-F], sortable by time and unique across
        processes sharing the directory: 13 hex digits of microseconds, 6 of the pid,
        4 of a counter."""
        return _next_id()

    def spool(self) -> Spool:
        """A new spool file in ``tmp/`` for a message too large to hold in memory, with
        the queue id it will have (:meth:`commit` it with ``spool=``)."""
        return Spool(os.fspath(self.root / "tmp"), self.new_id())

    async def commit(
        self, qid: str, envelope: Envelope, message: Message, *, area: str = "msg",
        take_claim: Callable[[Claim], None] | None = None, spool: Spool | None = None,
    ) -> None:
        """Store a message durably: when this returns it survives a crash or power loss.

        :param qid: a queue id from :meth:`new_id`, or the spool's
        :param envelope: the envelope; in quarantine its ``quarantine_reason`` is set.
            With ``take_claim`` it becomes the claim's and the caller must not change it
        :param message: the message, written as :meth:`Message.chunks` gives it, or for
            a spooled message as :meth:`Message.final_content` gives it
        :param area: ``"msg"`` or ``"quarantine"``
        :param take_claim: hold the delivery lock from before the file is published and
            hand this function a :class:`Claim` for this process's first attempt
            (``"msg"`` only), before returning; it closes the claim's descriptor
        :param spool: where ``message`` was received (:meth:`spool`): with the spool's
            queue id its file becomes the queue file (handed over: the spool only closes
            it); with another (a copy) a new file starts as an in-kernel copy of it
        :raises TemporaryFailure: 452 4.3.1 when the disk is full, 451 4.3.0 on any
            other failure or after :meth:`close`; no file is left behind
        """
        path = self._path(area, qid)  # validates both
        if area == "quarantine" and not envelope.quarantine_reason:
            raise ValueError("a quarantined envelope needs a quarantine_reason")
        if take_claim is not None and area != "msg":
            raise ValueError("only a message in msg/ can be claimed for delivery")
        env = json.dumps(envelope.to_dict(), separators=(",", ":")).encode("utf-8")
        keep = take_claim is not None
        if message.is_spooled:
            layout = spooled_layout(message, spool, qid, env)
            fd = await self._committer.commit(
                qid, area, layout.data, keep=keep, first_line=layout.first_line, base=layout.base,
                source=layout.source,
            )
            extents = layout.extents
        else:
            chunks = message.chunks()
            size = sum(memoryview(c).nbytes for c in chunks)
            head = b"%s %d %d\n" % (_MAGIC, len(env), size) + env + b"\n"
            fd = await self._committer.commit(qid, area, [head, *chunks], keep=keep)
            extents = ((len(head), size),)
        if fd is None or take_claim is None:
            return
        # Handed over with no await in between: a cancelled caller cannot drop the lock.
        item = QueuedMessage(
            qid=qid, area=area, envelope=envelope, path=path, extents=extents,
            held=False, next_try=envelope.arrived, attempts=0,
        )
        content = Content.of_file(fd, extents) if message.is_spooled else Content.of_bytes(b"".join(chunks))
        take_claim(Claim(fd, item, content))

    async def close(self) -> None:
        """Let the commits already handed over finish, then stop the committer thread.
        Later :meth:`commit` calls fail with 451 until :meth:`open` is called again."""
        await self._committer.close()

    # Readers --------------------------------------------------------------------------

    def ids(self, area: str = "msg") -> list[str]:
        """The queue ids in ``area``, sorted (which is arrival order).

        :param area: ``"msg"`` or ``"quarantine"``
        """
        return sorted(n for n in os.listdir(self._dir(area)) if _QID_RE.fullmatch(n))

    def load(self, qid: str, area: str = "msg", *, fd: int | None = None) -> QueuedMessage:
        """Read a message's envelope and apply its state file.

        :param qid: the queue id
        :param area: ``"msg"`` or ``"quarantine"``
        :param fd: the message file, already open (the delivery lock's descriptor)
        :raises FileNotFoundError: when there is no such message
        :raises CorruptQueueFile: when the message or state file is damaged
        """
        path = self._path(area, qid)
        if fd is None:
            with open(path, "rb") as f:
                return self.load(qid, area, fd=f.fileno())
        layout = _check_fd(fd, qid)
        envelope = read_envelope(fd, qid, layout)
        state = self._read_state(qid)
        next_try, attempts, is_held = envelope.arrived, 0, False
        if state is not None:
            envelope.recipients = state["recipients"]
            next_try, attempts, is_held = state["next_try"], state["attempts"], state["held"]
        return QueuedMessage(
            qid=qid, area=area, envelope=envelope, path=path,
            extents=layout.extents, held=is_held, next_try=next_try, attempts=attempts,
        )

    def read_message(self, qid: str, area: str = "msg") -> bytes:
        """The message bytes as committed (added headers included).

        :param qid: the queue id
        :param area: ``"msg"`` or ``"quarantine"``
        :raises FileNotFoundError: when there is no such message
        :raises CorruptQueueFile: when the file is damaged
        """
        with open(self._path(area, qid), "rb") as f:
            layout = _check_fd(f.fileno(), qid)
            try:
                return Content.of_file(f.fileno(), layout.extents).read()
            except OSError as exc:
                raise CorruptQueueFile(f"qid={qid}: {exc}") from exc

    @staticmethod
    def content(fd: int, item: QueuedMessage) -> Content:
        """The message of ``item`` (from :meth:`load`) in its open file ``fd``, unread:
        valid while ``fd`` is open. Messages up to 256 KiB are read into memory at once
        (one ``pread``), larger ones stay extents of the file.

        :raises CorruptQueueFile: when the file is shorter than its header says
        """
        content = Content.of_file(fd, item.extents)
        if content.size > _READ_AT_ONCE:
            return content
        try:
            return Content.of_bytes(content.read())
        except OSError as exc:
            raise CorruptQueueFile(f"qid={item.qid}: {exc}") from exc

    def _read_state(self, qid: str) -> dict[str, Any] | None:
        """The parsed ``state/<qid>`` (recipients as objects), or None if absent."""
        try:
            raw = (self.root / "state" / qid).read_bytes()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw)
            return {
                "recipients": [QueuedRecipient.from_dict(r) for r in data["recipients"]],
                "next_try": float(data["next_try"]),
                "attempts": int(data["attempts"]),
                "held": bool(data["held"]),
            }
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CorruptQueueFile(f"qid={qid}: bad state file: {exc}") from exc

    # Writers --------------------------------------------------------------------------

    def update_state(
        self, qid: str, envelope: Envelope, *,
        next_try: float | None = None, attempts: int | None = None, held: bool | None = None,
    ) -> None:
        """Atomically replace a message's recipients and delivery bookkeeping.

        Written to ``tmp/``, fdatasynced, renamed over ``state/<qid>``, then the state
        directory fsynced (one fsync shared with the updates and removals running at the
        same time): after a crash either the old or the new state is in force.

        :param qid: the queue id; the message must be in some area
        :param envelope: its ``recipients`` (with their states) are recorded
        :param next_try: when to try next (epoch seconds); None keeps the recorded value
        :param attempts: delivery attempts so far; None keeps the recorded value
        :param held: whether the message is on hold; None keeps the recorded value
        :raises FileNotFoundError: when the message is not queued
        :raises OSError: when the state cannot be written; the old one still holds
        """
        with self._locked(qid):
            old = self._read_state(qid) or {}
            state = {
                "recipients": [r.to_dict() for r in envelope.recipients],
                "next_try": old.get("next_try", envelope.arrived) if next_try is None else next_try,
                "attempts": old.get("attempts", 0) if attempts is None else attempts,
                "held": old.get("held", False) if held is None else held,
            }
            self.write_state(qid, state)
        log.debug("state updated qid=%s attempts=%s held=%s", qid, state["attempts"], state["held"])

    def write_state(self, qid: str, state: dict[str, Any]) -> None:
        """Replace ``state/<qid>`` with ``state`` (JSON types), durably: written to
        ``tmp/``, fdatasynced, renamed into place, then the state directory fsynced.

        The caller keeps others out: :meth:`update_state` holds the message's lock, and
        ``gateway queue import`` writes a state before its message is published.

        :raises OSError: when the state cannot be written; the old one still holds
        """
        data = json.dumps(state, separators=(",", ":")).encode("utf-8")
        tmp = self.root / "tmp" / f"{qid}.{os.getpid():x}.{next(_tmp_seq)}.state"
        fd = os.open(tmp, NEW_FILE, 0o600)
        try:
            try:
                write_all(fd, [data])
                os.fdatasync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.root / "state" / qid)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._syncs["state"].sync()

    def remove(self, qid: str, area: str = "msg") -> None:
        """Delete a message for good, then its state.

        The message goes (durably) first: a crash in between leaves a state file with
        no message, which :meth:`open` deletes; the reverse order could resurrect the
        message with its delivered recipients pending again. Removals and state updates
        running at the same time share their directory fsyncs; each call returns once
        its own unlinks are durable.

        :param qid: the queue id
        :param area: ``"msg"`` or ``"quarantine"``
        :raises FileNotFoundError: when there is no such message
        """
        self._unlink_message(qid, area)
        self._syncs[area].sync()
        self._drop_state(qid)

    async def delete(self, qid: str, area: str = "msg", *, lock: int = -1) -> None:
        """:meth:`remove` for the event loop: the unlink goes with the committer's next
        batch and shares its directory fsync; returns once the removal is durable. It
        logs nothing: the caller's own line records the removal and why (the
        scheduler's ``done: removed from the queue``, with the queue id).

        :param lock: the message's delivery lock (:meth:`lock_delivery`, or a
            :class:`Claim`'s descriptor), closed once the file is gone, whatever happens
        :raises FileNotFoundError: when there is no such message
        """
        try:
            self._path(area, qid)
        except ValueError:
            if lock >= 0:
                os.close(lock)
            raise
        await self._committer.remove(qid, area, close=lock)

    def _unlink_message(self, qid: str, area: str) -> None:
        with self._state_lock(qid):
            os.unlink(self._fspath(area, qid))

    def _drop_state(self, qid: str, *, is_logged: bool = True) -> None:
        """Once the message's removal is durable: its state file goes too.

        :param is_logged: log ``removed qid=``; :meth:`delete` leaves that to its
            caller, which says why (the scheduler's ``done: removed from the queue``)
        """
        with self._state_lock(qid):
            try:
                os.unlink(f"{self._state_str}/{qid}")
            except FileNotFoundError:
                pass
            else:
                self._syncs["state"].sync()
        if is_logged:
            log.info("removed qid=%s", qid)

    def move(self, qid: str, src: str, dst: str) -> None:
        """Move a message between areas with one atomic rename, the destination made
        durable first. Release from quarantine is ``move(qid, "quarantine", "msg")``;
        the file is immutable, so the envelope keeps its ``quarantine_reason``.

        :param qid: the queue id
        :param src: the area it is in
        :param dst: the area it goes to
        :raises FileNotFoundError: when there is no such message in ``src``
        :raises FileExistsError: when ``dst`` already holds that queue id
        """
        src_path, dst_path = self._path(src, qid), self._path(dst, qid)
        if src == dst:
            raise ValueError("source and destination areas are the same")
        with self._state_lock(qid):
            if not src_path.exists():
                raise FileNotFoundError(errno.ENOENT, f"no qid={qid} in {src}")
            if dst_path.exists():
                raise FileExistsError(errno.EEXIST, f"qid={qid} already in {dst}")
            os.rename(src_path, dst_path)
            self._syncs[dst].sync()
            self._syncs[src].sync()
        log.info("moved qid=%s from %s to %s", qid, src, dst)
