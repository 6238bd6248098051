"""The group-commit writer behind :meth:`gateway.queue.QueueStore.commit`.

One :class:`Committer` per store owns one thread. :meth:`Committer.commit` hands a
message's buffers to it and waits; the thread takes every commit waiting (up to
``max_batch``) as one batch, writes each message to its own new file in ``tmp/``,
fdatasyncs them, renames them into their areas and fsyncs each area directory once,
and only then resolves the callers' futures, so the 250 follows stable storage. See
``docs/queue.md`` for why that order leaves nothing or a whole message after a crash.

The same thread removes delivered messages (:meth:`Committer.remove`): their unlinks
join the batch, and one fsync of an area directory covers that batch's renames and
unlinks alike.

A caller may ask to *keep* its file: the committer then locks the new file with the
function it was given before publishing it, and hands back the open, locked
descriptor, so the process that accepted a message can deliver it without opening or
reading it again (and no other process can start on it in between).

It also holds the two durable-write primitives the store's own writers share:
:func:`write_all` and :func:`fsync_dir`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from gateway.content import Content
from gateway.verdicts import Reply, TemporaryFailure

__all__ = [
    "Buffer", "Committer", "NEW_FILE",
    "REPLY_DISK_FULL", "REPLY_QUEUE_CLOSED", "REPLY_QUEUE_ERROR",
    "fsync_dir", "write_all",
]

log = logging.getLogger(__name__)

REPLY_DISK_FULL = Reply(452, "4.3.1", "insufficient system storage, try again later")
REPLY_QUEUE_ERROR = Reply(451, "4.3.0", "queue write failed, try again later")
REPLY_QUEUE_CLOSED = Reply(451, "4.3.0", "queue is shutting down, try again later")

#: Flags for a file the caller must be the one to create.
NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
#: The same, for a file whose descriptor is kept (a write lock needs it open for writing).
_KEPT_FILE = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
_IOV_MAX = 1024  # Linux UIO_MAXIOV: writev refuses more buffers than this

Buffer = bytes | memoryview

#: Files of one batch written and fdatasynced side by side (see Committer._commit_batch).
SYNC_THREADS = 8


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (creations, renames, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, chunks: Sequence[Buffer]) -> None:
    """Write every buffer with ``writev``, coping with short writes and IOV_MAX."""
    views = [memoryview(c).cast("B") for c in chunks if len(c)]
    i = 0
    while i < len(views):
        written = os.writev(fd, views[i : i + _IOV_MAX])
        if written <= 0:
            raise OSError(errno.EIO, "writev wrote nothing")
        while written and i < len(views):
            if written >= len(views[i]):
                written -= len(views[i])
                i += 1
            else:
                views[i], written = views[i][written:], 0


@dataclass(slots=True)
class _Job:
    """One commit handed to the committer thread."""

    qid: str
    area: str
    data: list[Buffer]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[int | None]
    is_kept: bool = False  # hand the open, locked descriptor to the caller
    # A GWQ2 file: ``data`` goes at ``base`` and ``first_line`` at 0 of tmp/<qid>, which
    # is the spool itself, or, with ``source``, a new file whose octets from the end of
    # the first line are an in-kernel copy of that content (a copy of the message).
    first_line: bytes | None = None
    base: int = 0
    source: Content | None = None
    fd: int = -1
    owned: str | None = None  # the file this job created: in tmp/, then in its area
    error: TemporaryFailure | None = None


@dataclass(slots=True)
class _Removal:
    """One removal handed to the committer thread."""

    qid: str
    area: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[int | None]
    fd: int = -1  # closed once the file is gone (the delivery lock)
    error: BaseException | None = None


def _close_fd(job: _Job | _Removal) -> None:
    """Close the job's descriptor if it still holds one (never twice)."""
    fd, job.fd = job.fd, -1
    if fd >= 0:
        os.close(fd)


def _settle(jobs: list[_Job | _Removal]) -> None:
    """On the jobs' event loop: report each outcome unless its waiter was cancelled."""
    for job in jobs:
        fd, job.fd = job.fd, -1
        if job.future.done():
            if fd >= 0:  # nobody takes it: the file stays queued, unlocked
                os.close(fd)
        elif job.error is None:
            job.future.set_result(fd if fd >= 0 else None)
        else:
            job.future.set_exception(job.error)


class Committer:
    """Writes messages durably on its own thread, many per directory fsync.

    The thread starts with the first :meth:`commit` and runs until :meth:`close`.

    :param tmp_dir: where files are written before they are published
    :param area_dir: maps an area name (already validated) to its directory
    :param max_batch: the most messages one group commit (one directory fsync) covers
    :param lock: locks a kept file's descriptor (see :meth:`commit`); it must not wait
    :param unlink: for :meth:`remove`: deletes ``<area>/<qid>`` (its name), given
        ``(qid, area)``
    :param forget: for :meth:`remove`: called with the queue id once the file's
        removal is durable, for what goes after it (the state file)
    :param sync_threads: how many files of a batch are written and fdatasynced at once
    """

    def __init__(self, tmp_dir: Path, area_dir: Callable[[str], Path], *, max_batch: int,
                 lock: Callable[[int], None], unlink: Callable[[str, str], None],
                 forget: Callable[[str], None], sync_threads: int = SYNC_THREADS) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._sync_threads = max(1, min(sync_threads, max_batch))
        self._sync_pool: ThreadPoolExecutor | None = None  # only the committer thread uses it
        self._tmp_dir = tmp_dir
        self._area_dir = area_dir
        # Paths as strings, built once: path objects cost microseconds per message.
        self._tmp = os.fspath(tmp_dir)
        self._area_strs: dict[str, str] = {}
        self._max_batch = max_batch
        self._lock_kept = lock
        self._unlink = unlink
        self._forget = forget
        self._jobs: queue.SimpleQueue[_Job | _Removal | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards _thread and _is_closing
        self._is_closing = False

    async def commit(
        self, qid: str, area: str, data: list[Buffer], *, keep: bool = False,
        first_line: bytes | None = None, base: int = 0, source: Content | None = None,
    ) -> int | None:
        """Write ``data`` to ``<area>/<qid>`` durably; return once it is on stable storage.

        :param qid: the queue id, already validated; also the temporary file's name
        :param area: the area, already validated
        :param data: the file's whole content, written without copying
        :param keep: lock the file (with the ``lock`` function given to the committer)
            before it is published and return its descriptor, open for reading and
            writing; the caller closes it
        :param first_line: for a spooled message: ``tmp/<qid>`` exists already (the
            spool, ``base`` octets long); ``data`` is written after them and
            ``first_line`` over its start. With ``source``, ``tmp/<qid>`` is new and
            ``source`` is copied (in the kernel, for file extents) after the first line
        :returns: the kept descriptor, or None when ``keep`` is false
        :raises TemporaryFailure: 452 4.3.1 when the disk is full, 451 4.3.0 on any
            other failure or after :meth:`close`; no file is left behind
        """
        loop = asyncio.get_running_loop()
        job = _Job(qid, area, data, loop, loop.create_future(), keep, first_line, base, source)
        try:
            self._hand_over(job)
        except TemporaryFailure:
            if first_line is not None and source is None:  # the spool was ours to remove
                with contextlib.suppress(OSError):
                    os.unlink(f"{self._tmp}/{qid}")
            raise
        try:
            return await job.future
        except asyncio.CancelledError:
            # The waiter was cancelled after the thread reported (or _settle closed it):
            # a kept descriptor nobody takes is closed, and the file stays queued.
            if job.future.done() and not job.future.cancelled() and job.future.exception() is None:
                fd = job.future.result()
                if fd is not None:
                    os.close(fd)
            raise

    async def remove(self, qid: str, area: str, *, close: int = -1) -> None:
        """Delete ``<area>/<qid>`` with the next batch; return once that is durable and
        the ``forget`` function has run for it.

        :param close: a descriptor of the file to close once its name is gone (the
            delivery lock); it is closed whatever happens, on the committer thread, where
            freeing the file's blocks does not hold up an event loop
        :raises FileNotFoundError: when there is no such file
        :raises OSError: when the unlink or the fsync after it failed
        :raises TemporaryFailure: after :meth:`close`
        """
        loop = asyncio.get_running_loop()
        removal = _Removal(qid, area, loop, loop.create_future(), close)
        try:
            self._hand_over(removal)
        except BaseException:
            if close >= 0:
                os.close(close)
            raise
        await removal.future

    def _hand_over(self, job: _Job | _Removal) -> None:
        with self._lock:
            if self._is_closing:
                raise TemporaryFailure(REPLY_QUEUE_CLOSED, f"qid={job.qid}: store closed")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="queue-committer", daemon=True
                )
                self._thread.start()
            self._jobs.put(job)

    def reopen(self) -> None:
        """Accept commits again after :meth:`close`."""
        with self._lock:
            self._is_closing = False

    async def close(self) -> None:
        """Let the commits already handed over finish, then stop the thread.
        Later :meth:`commit` calls fail with 451 until :meth:`reopen`."""
        with self._lock:
            self._is_closing = True
            thread, self._thread = self._thread, None
            if thread is not None:
                self._jobs.put(None)  # behind every job already queued
        if thread is not None:
            await asyncio.to_thread(thread.join)

    def _run(self) -> None:
        """The committer thread: take everything waiting as one batch, commit, repeat."""
        is_stopping = False
        while not is_stopping:
            first = self._jobs.get()
            if first is None:
                break
            batch: list[_Job | _Removal] = [first]
            while len(batch) < self._max_batch:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    is_stopping = True
                    break
                batch.append(job)
            try:
                self._commit_batch(batch)
            except Exception as exc:  # boundary: no caller may be left waiting
                log.exception("queue committer failed on a batch of %d", len(batch))
                for job in batch:
                    if job.error is None:
                        self._fail(job, exc)
            for job in batch:
                if isinstance(job, _Removal):  # its lock is closed whatever happened
                    _close_fd(job)
            self._resolve(batch)
        pool, self._sync_pool = self._sync_pool, None
        if pool is not None:
            pool.shutdown()

    def _commit_batch(self, batch: list[_Job | _Removal]) -> None:
        jobs = [job for job in batch if isinstance(job, _Job)]
        removals = [job for job in batch if isinstance(job, _Removal)]
        # 1-2. Each message into its own new temporary file, written and fdatasynced, so
        # its data is on disk before any name in an area points at it. The files of a
        # batch are written and synced side by side on the sync threads: the filesystem
        # then folds their flushes into a few journal commits instead of one per file.
        if len(jobs) <= 1 or self._sync_threads <= 1:
            for job in jobs:
                self._write_and_sync(job)
        else:
            pool = self._pool()
            for _ in pool.map(self._write_and_sync, jobs):
                pass
        written = [job for job in jobs if job.error is None]
        for job in written:  # 3. publish: an atomic rename into the area
            try:
                published = f"{self._area_str(job.area)}/{job.qid}"
                os.rename(f"{self._tmp}/{job.qid}", published)
                job.owned = published
            except Exception as exc:
                self._fail(job, exc)
        for removal in removals:  # the removals' unlinks join the same directory fsync
            try:
                self._unlink(removal.qid, removal.area)
            except Exception as exc:
                removal.error = exc
            finally:
                _close_fd(removal)
        unlinked = [r for r in removals if r.error is None]
        # 4. One directory fsync per area makes all of the batch's renames and unlinks
        # durable.
        for area in {job.area for job in written if job.error is None} | {r.area for r in unlinked}:
            try:
                fsync_dir(self._area_dir(area))
            except Exception as exc:
                for job in written:
                    if job.area == area and job.error is None:
                        self._fail(job, exc)
                for removal in unlinked:
                    if removal.area == area:
                        removal.error = exc
        for job in jobs:
            if job.error is None:
                log.info("queued qid=%s area=%s batch=%d", job.qid, job.area, len(batch))
        # 5. What must wait for a removal to be durable (the state file goes after it).
        for removal in unlinked:
            if removal.error is None:
                try:
                    self._forget(removal.qid)
                except Exception as exc:
                    removal.error = exc

    def _write_and_sync(self, job: _Job) -> None:
        """Create ``tmp/<qid>``, write the job's data and fdatasync it (any thread)."""
        try:
            path = f"{self._tmp}/{job.qid}"
            if job.first_line is not None and job.source is None:  # the spool, written already
                job.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            else:
                job.fd = os.open(path, _KEPT_FILE if job.is_kept else NEW_FILE, 0o600)
            job.owned = path
            if job.first_line is not None:
                if job.source is not None:
                    os.lseek(job.fd, len(job.first_line), os.SEEK_SET)
                    job.source.write_to(job.fd)
                os.lseek(job.fd, job.base, os.SEEK_SET)
                write_all(job.fd, job.data)
                os.pwrite(job.fd, job.first_line, 0)
            else:
                write_all(job.fd, job.data)
            if job.is_kept:
                os.fdatasync(job.fd)
                self._lock_kept(job.fd)  # before the rename: nobody else sees it unlocked
                return
            fd, job.fd = job.fd, -1
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
        except Exception as exc:
            self._fail(job, exc)

    def _area_str(self, area: str) -> str:
        path = self._area_strs.get(area)
        if path is None:
            path = self._area_strs[area] = os.fspath(self._area_dir(area))
        return path

    def _pool(self) -> ThreadPoolExecutor:
        if self._sync_pool is None:
            self._sync_pool = ThreadPoolExecutor(self._sync_threads, thread_name_prefix="queue-sync")
        return self._sync_pool

    def _fail(self, job: _Job | _Removal, exc: BaseException) -> None:
        """Mark one job failed (disk full: 452 4.3.1, else 451 4.3.0) and clean up."""
        if isinstance(job, _Removal):
            job.error = exc
            return
        log.error("queue commit failed qid=%s: %s", job.qid, exc)
        is_full = isinstance(exc, OSError) and exc.errno in _NO_SPACE
        reply = REPLY_DISK_FULL if is_full else REPLY_QUEUE_ERROR
        job.error = TemporaryFailure(reply, f"qid={job.qid}: {exc}")
        job.error.__cause__ = exc
        with contextlib.suppress(OSError):
            _close_fd(job)
        # Unacknowledged, so possibly not durable: take it back out of the area too.
        owned, job.owned = job.owned, None
        try:
            if owned is not None:
                os.unlink(owned)
        except FileNotFoundError:
            pass
        except OSError as cleanup:
            log.error("cannot remove failed commit qid=%s: %s", job.qid, cleanup)

    @staticmethod
    def _resolve(batch: list[_Job | _Removal]) -> None:
        """Hand the outcomes back: one wake-up of each event loop per batch, not per job."""
        by_loop: dict[asyncio.AbstractEventLoop, list[_Job | _Removal]] = {}
        for job in batch:
            by_loop.setdefault(job.loop, []).append(job)
        for loop, jobs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, jobs)
            except RuntimeError:
                log.warning(
                    "event loop closed before commits were reported: %s", ",".join(j.qid for j in jobs)
                )
                for job in jobs:
                    _close_fd(job)
