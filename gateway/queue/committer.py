"""The group-commit writer behind :meth:`gateway.queue.QueueStore.commit`.

One :class:`Committer` per store owns one thread. :meth:`Committer.commit` hands a
message's buffers to it and waits; the thread takes every commit waiting (up to
``max_batch``) as one batch, writes each message to its own new file in ``tmp/``,
fdatasyncs them, renames them into their areas and fsyncs each area directory once,
and only then resolves the callers' futures, so the 250 follows stable storage. See
``docs/queue.md`` for why that order leaves nothing or a whole message after a crash.

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
    future: asyncio.Future[None]
    fd: int = -1
    owned: Path | None = None  # the file this job created: in tmp/, then in its area
    error: TemporaryFailure | None = None


def _settle(jobs: list[_Job]) -> None:
    """On the jobs' event loop: report each outcome unless its waiter was cancelled."""
    for job in jobs:
        if not job.future.done():
            if job.error is None:
                job.future.set_result(None)
            else:
                job.future.set_exception(job.error)


class Committer:
    """Writes messages durably on its own thread, many per directory fsync.

    The thread starts with the first :meth:`commit` and runs until :meth:`close`.

    :param tmp_dir: where files are written before they are published
    :param area_dir: maps an area name (already validated) to its directory
    :param max_batch: the most messages one group commit (one directory fsync) covers
    :param sync_threads: how many files of a batch are written and fdatasynced at once
    """

    def __init__(self, tmp_dir: Path, area_dir: Callable[[str], Path], *, max_batch: int,
                 sync_threads: int = SYNC_THREADS) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._sync_threads = max(1, min(sync_threads, max_batch))
        self._sync_pool: ThreadPoolExecutor | None = None  # only the committer thread uses it
        self._tmp_dir = tmp_dir
        self._area_dir = area_dir
        self._max_batch = max_batch
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards _thread and _is_closing
        self._is_closing = False

    async def commit(self, qid: str, area: str, data: list[Buffer]) -> None:
        """Write ``data`` to ``<area>/<qid>`` durably; return once it is on stable storage.

        :param qid: the queue id, already validated; also the temporary file's name
        :param area: the area, already validated
        :param data: the file's whole content, written without copying
        :raises TemporaryFailure: 452 4.3.1 when the disk is full, 451 4.3.0 on any
            other failure or after :meth:`close`; no file is left behind
        """
        loop = asyncio.get_running_loop()
        job = _Job(qid, area, data, loop, loop.create_future())
        with self._lock:
            if self._is_closing:
                raise TemporaryFailure(REPLY_QUEUE_CLOSED, f"qid={qid}: store closed")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="queue-committer", daemon=True
                )
                self._thread.start()
            self._jobs.put(job)
        await job.future

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
            batch = [first]
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
            self._resolve(batch)
        pool, self._sync_pool = self._sync_pool, None
        if pool is not None:
            pool.shutdown()

    def _commit_batch(self, batch: list[_Job]) -> None:
        # 1-2. Each message into its own new temporary file, written and fdatasynced, so
        # its data is on disk before any name in an area points at it. The files of a
        # batch are written and synced side by side on the sync threads: the filesystem
        # then folds their flushes into a few journal commits instead of one per file.
        if len(batch) == 1 or self._sync_threads <= 1:
            for job in batch:
                self._write_and_sync(job)
        else:
            pool = self._pool()
            for _ in pool.map(self._write_and_sync, batch):
                pass
        written = [job for job in batch if job.error is None]
        for job in written:  # 3. publish: an atomic rename into the area
            try:
                os.rename(self._tmp_dir / job.qid, self._area_dir(job.area) / job.qid)
                job.owned = self._area_dir(job.area) / job.qid
            except Exception as exc:
                self._fail(job, exc)
        # 4. One directory fsync per area makes all of the batch's renames durable.
        for area in {job.area for job in written if job.error is None}:
            try:
                fsync_dir(self._area_dir(area))
            except Exception as exc:
                for job in written:
                    if job.area == area and job.error is None:
                        self._fail(job, exc)
        for job in batch:
            if job.error is None:
                log.info("queued qid=%s area=%s batch=%d", job.qid, job.area, len(batch))

    def _write_and_sync(self, job: _Job) -> None:
        """Create ``tmp/<qid>``, write the job's data and fdatasync it (any thread)."""
        try:
            job.fd = os.open(self._tmp_dir / job.qid, NEW_FILE, 0o600)
            job.owned = self._tmp_dir / job.qid
            write_all(job.fd, job.data)
            fd, job.fd = job.fd, -1
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
        except Exception as exc:
            self._fail(job, exc)

    def _pool(self) -> ThreadPoolExecutor:
        if self._sync_pool is None:
            self._sync_pool = ThreadPoolExecutor(self._sync_threads, thread_name_prefix="queue-sync")
        return self._sync_pool

    def _fail(self, job: _Job, exc: BaseException) -> None:
        """Mark one job failed (disk full: 452 4.3.1, else 451 4.3.0) and clean up."""
        log.error("queue commit failed qid=%s: %s", job.qid, exc)
        is_full = isinstance(exc, OSError) and exc.errno in _NO_SPACE
        reply = REPLY_DISK_FULL if is_full else REPLY_QUEUE_ERROR
        job.error = TemporaryFailure(reply, f"qid={job.qid}: {exc}")
        job.error.__cause__ = exc
        if job.fd >= 0:
            fd, job.fd = job.fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)
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
    def _resolve(batch: list[_Job]) -> None:
        """Hand the outcomes back: one wake-up of each event loop per batch, not per job."""
        by_loop: dict[asyncio.AbstractEventLoop, list[_Job]] = {}
        for job in batch:
            by_loop.setdefault(job.loop, []).append(job)
        for loop, jobs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, jobs)
            except RuntimeError:
                log.warning(
                    "event loop closed before commits were reported: %s", ",".join(j.qid for j in jobs)
                )
