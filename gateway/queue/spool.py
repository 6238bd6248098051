"""A large message spooled into the queue while it arrives: :class:`Spool`.

Past ``[limits] spool_threshold`` the DATA phase stops holding the message in memory and
appends it, as it is read and checked, to ``tmp/<qid>`` in the queue, behind a first line
of fixed length (:data:`~gateway.queue.damage.SPOOL_LINE`) left blank for now. If the
message is accepted, :meth:`~gateway.queue.QueueStore.commit` appends the final header
block and the envelope to that same file, writes the first line (``GWQ2``, see
``docs/queue.md``), fdatasyncs it and renames it into ``msg/``: the body is never copied.
If not (refused, too big, the client gone, the disk full), :meth:`Spool.close` removes it.
A crash leaves it in ``tmp/``, which :meth:`~gateway.queue.QueueStore.open` empties: the
file is never taken for a message, since only a commit's rename publishes it.

Writes go straight to the page cache from the event loop, and to a thread for a while
once one of them was slow (:meth:`Spool.write`), so a slow disk does not hold it up.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from dataclasses import dataclass

from gateway.content import Content
from gateway.message import Message
from gateway.queue.committer import Buffer
from gateway.queue.damage import SPOOL_LINE, spool_line

__all__ = ["Spool", "SpooledLayout", "spooled_layout"]

log = logging.getLogger(__name__)

#: A spool write slower than this (seconds) sends this process's spool writes to a
#: thread for SLOW_FOR seconds.
SLOW_WRITE = 0.05
SLOW_FOR = 60.0
_slow_until = [0.0]  # monotonic time until which writes go to a thread

_PLACEHOLDER = b"GWQ2-SPOOLING".ljust(SPOOL_LINE - 1) + b"\n"  # never parses as a header
_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


class Spool:
    """One message being received into ``<tmp_dir>/<qid>``.

    :param tmp_dir: the queue's ``tmp/`` directory
    :param qid: the queue id the message will have if it is queued
    """

    def __init__(self, tmp_dir: str, qid: str) -> None:
        self.qid = qid
        self.path = f"{tmp_dir}/{qid}"
        self.fd = -1
        #: octets of the message written so far
        self.size = 0
        self._is_handed_over = False

    @property
    def data_offset(self) -> int:
        """Where the message starts in the file."""
        return SPOOL_LINE

    async def write(self, data: bytes) -> None:
        """Append ``data`` to the message.

        A write lands in the page cache and takes microseconds, far less than handing
        it to a thread and back (which also keeps the data alive while it waits), so it
        is made here, as nginx writes request bodies. If one ever takes longer than
        :data:`SLOW_WRITE` (a disk throttling its writers), this process's spool writes
        go to a thread for :data:`SLOW_FOR` seconds, so the event loop is not held
        while the disk is slow.

        :raises OSError: from the disk (``ENOSPC`` when it is full); nothing is kept
            that a later write could mistake for the message
        """
        if not data:
            return
        if time.monotonic() < _slow_until[0]:
            await asyncio.to_thread(self._write, data)
            return
        started = time.monotonic()
        self._write(data)
        took = time.monotonic() - started
        if took > SLOW_WRITE:
            _slow_until[0] = time.monotonic() + SLOW_FOR
            log.warning("spool write of %d octets took %.0f ms: spool writes go to a thread for %.0f s",
                        len(data), took * 1000, SLOW_FOR)

    def _write(self, data: bytes) -> None:
        if self.fd < 0:
            self.fd = os.open(self.path, _FLAGS, 0o600)
            _pwrite_all(self.fd, _PLACEHOLDER, 0)
        _pwrite_all(self.fd, data, SPOOL_LINE + self.size)
        self.size += len(data)

    def content(self) -> Content:
        """The octets received, as they are in the file (valid until :meth:`close`)."""
        return Content.of_file(self.fd, [(SPOOL_LINE, self.size)]) if self.fd >= 0 else Content()

    def hand_over(self) -> None:
        """The queue's committer owns the file from now on (it publishes it, or removes
        it if the commit fails): :meth:`close` only closes the descriptor."""
        self._is_handed_over = True

    def close(self) -> None:
        """Close the file and, unless it was handed to the queue, remove it. Freeing a
        large file's blocks is a filesystem write: it runs on a thread when an event
        loop is running."""
        fd, self.fd = self.fd, -1
        path = None if self._is_handed_over else self.path
        if fd < 0:  # never created
            return
        try:
            asyncio.get_running_loop().run_in_executor(None, _close_and_remove, fd, path)
        except RuntimeError:  # no loop: here and now
            _close_and_remove(fd, path)


def _close_and_remove(fd: int, path: str | None) -> None:
    if fd >= 0:
        os.close(fd)
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            try:
                os.unlink(path)
            except OSError as exc:
                log.error("cannot remove spool file %s: %s", path, exc)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, "pwrite wrote nothing")
        view, offset = view[n:], offset + n


@dataclass(frozen=True, slots=True)
class SpooledLayout:
    """How :meth:`~gateway.queue.QueueStore.commit` writes a spooled message (GWQ2):
    ``data`` at ``base`` and ``first_line`` at 0 of ``tmp/<qid>``, which is the spool
    itself, or with ``source`` a new file whose octets after the first line are an
    in-kernel copy of it; the message is ``extents`` of the result."""

    data: list[Buffer]
    first_line: bytes
    base: int
    source: Content | None
    extents: tuple[tuple[int, int], ...]


def spooled_layout(message: Message, spool: Spool | None, qid: str, env: bytes) -> SpooledLayout:
    """The GWQ2 file of ``message`` (spooled), queued as ``qid`` with the envelope JSON
    ``env``. From its own spool (``qid`` is the spool's), the octets as received stay
    where the spool wrote them and the final header block, a replaced body if any, and
    the envelope go after them; a copy (another ``qid``) starts as a copy of the spool.
    A message on disk that was not received here (``spool`` is None: a forward of a queued
    one) is copied after the first line and taken as one body extent."""
    if spool is None:
        final = message.final_content()
        base = SPOOL_LINE + final.size
        extents: tuple[tuple[int, int], ...] = ((SPOOL_LINE, 0), (SPOOL_LINE, final.size))
        return SpooledLayout([env, b"\n"], spool_line(base, len(env), extents), base, final, extents)
    head = message.final_head()
    base = spool.data_offset + spool.size
    body = message.body_content()
    if body.is_in_memory:  # replaced by a plugin: written after the header block
        new_body = body.read()
        body_extent = (base + len(head), len(new_body))
    else:
        new_body = b""
        body_extent = (spool.data_offset + message.body_offset, message.size - message.body_offset)
    extents = ((base, len(head)), body_extent)
    line = spool_line(base + len(head) + len(new_body), len(env), extents)
    is_in_place = qid == spool.qid
    if is_in_place:
        spool.hand_over()
    source = None if is_in_place else spool.content()
    return SpooledLayout([head, new_body, env, b"\n"], line, base, source, extents)
