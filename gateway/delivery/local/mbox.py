"""mbox delivery: append one message to a locked mailbox file (mboxrd format).

Locking takes every kind a reader may use: a dotlock (``<mbox>.lock``, created with
``O_EXCL``), a ``flock`` and an ``fcntl`` record lock. The dotlock is what keeps two
threads of this process apart too, because ``fcntl`` locks belong to the process.

Each message starts with ``From <sender> <asctime UTC>``; lines that would read as a
separator are quoted mboxrd-style (``>`` before any ``>*From ``) so quoting is
reversible; the message ends with a blank line. On any failure the file is truncated
back to its size before the append (as qmail-local does), so a half-written message
never corrupts the mailbox.

A message on disk (a :class:`~gateway.content.Content`) is quoted and written chunk by
chunk as it is read (:class:`MboxrdQuoter` carries the start of a line that a chunk cut
off), so memory does not grow with the message.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from gateway.content import CHUNK, Content
from gateway.delivery.local.maildir import Confinement, mailbox_error, open_directory
from gateway.verdicts import Reply, TemporaryFailure

__all__ = ["MboxrdQuoter", "deliver_mbox", "from_line", "mboxrd_quote"]

# A dotlock older than this is left over from a crash (the traditional 5 minutes).
STALE_LOCK_AGE = 300.0
LOCK_TIMEOUT = 30.0
_POLL = 0.05
_FROM_RE = re.compile(rb"^(>*From )", re.MULTILINE)
_FROM = b"From "
_QUOTES = re.compile(rb">*")
# The From_ line is space-separated: no whitespace or control characters in the sender.
_UNSAFE_SENDER = re.compile(r"[\x00-\x20\x7f]")
_BUSY = Reply(451, "4.2.0", "mbox delivery failed: mailbox is locked, try again later")


def from_line(sender: str, when: float) -> str:
    """The mbox separator line ``From sender Mon Jan  2 15:04:05 2006\\n`` (UTC).

    :param sender: the envelope sender; empty (the null sender) becomes MAILER-DAEMON
    :param when: the delivery time, seconds since the epoch
    """
    name = _UNSAFE_SENDER.sub("_", sender) or "MAILER-DAEMON"
    return f"From {name} {time.asctime(time.gmtime(when))}\n"


class MboxrdQuoter:
    """mboxrd quoting and LF line ends for a message handed over in chunks.

    :meth:`feed` hands out what it can decide; it holds back only the start of a line
    that may yet read as ``>*From `` (its ``>`` counted, not kept, so a hostile line
    of ``>`` costs no memory) and a CR that may be the first half of a CRLF. Fed
    whole or in any pieces, the output is the same.
    """

    __slots__ = ("_in_line", "_quotes", "_word", "_cr", "_ends_in_lf")

    def __init__(self) -> None:
        self._in_line = False  # the current line's start is written
        self._quotes = 0  # else: how many '>' start it, held back,
        self._word = b""  # then a proper prefix of "From ", held back
        self._cr = False  # in a line: a CR held back
        self._ends_in_lf = False

    def _out(self, data: bytes) -> Iterator[bytes]:
        if data:
            self._ends_in_lf = data.endswith(b"\n")
            yield data

    def feed(self, chunk: bytes | memoryview) -> Iterator[bytes]:
        """The quoted form of what ``chunk`` completes, in one or more pieces."""
        data = bytes(chunk)
        if self._cr:
            data, self._cr = b"\r" + data, False
        while data:
            if self._in_line:
                nl = data.find(b"\n")
                if nl < 0:
                    if data.endswith(b"\r"):
                        data, self._cr = data[:-1], True
                    yield from self._out(data)
                    return
                yield from self._out(data[: nl + 1].replace(b"\r\n", b"\n"))
                data, self._in_line = data[nl + 1 :], False
                continue
            if not (self._quotes or self._word):
                # At a line start with nothing held: every whole line at once.
                last = data.rfind(b"\n")
                if last >= 0:
                    yield from self._out(_FROM_RE.sub(rb">\1", data[: last + 1].replace(b"\r\n", b"\n")))
                    data = data[last + 1 :]
                    if not data:
                        return
            if not self._word:
                quotes = _QUOTES.match(data)
                assert quotes is not None
                self._quotes += quotes.end()
                data = data[quotes.end() :]
                if not data:
                    return
            start = self._word + data[: len(_FROM) - len(self._word)]
            if len(start) < len(_FROM) and _FROM.startswith(start):
                self._word = start  # "Fro": wait for the next chunk
                return
            # Decided: the line reads as a separator or it does not.
            if start == _FROM:
                yield from self._out(b">")
            yield from self._held()
            self._in_line = True

    def _held(self) -> Iterator[bytes]:
        """The held-back start of a line, its '>' in bounded pieces."""
        for i in range(0, self._quotes, CHUNK):
            yield from self._out(b">" * min(CHUNK, self._quotes - i))
        yield from self._out(self._word)
        self._quotes, self._word = 0, b""

    def end(self) -> Iterator[bytes]:
        """What is held back (a line start that never became a separator: no space
        came), then the line end and blank line that close the message."""
        if self._cr:
            self._cr = False
            yield from self._out(b"\r")
        yield from self._held()
        yield b"\n" if self._ends_in_lf else b"\n\n"


def mboxrd_quote(message: bytes) -> bytes:
    """The message with LF line ends and mboxrd ``>From`` quoting, ending in a blank line.

    :param message: the message in CRLF (or LF) form
    """
    quoter = MboxrdQuoter()
    return b"".join([*quoter.feed(message), *quoter.end()])


def _write_all(fd: int, data: bytes) -> None:
    """Write ``data`` completely (the mailbox is opened with ``O_APPEND``)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _take_dotlock(dir_fd: int, name: str, deadline: float) -> None:
    """Create ``name`` exclusively in ``dir_fd``, breaking a stale one, until ``deadline``."""
    while True:
        try:
            fd = os.open(
                name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=dir_fd
            )
        except FileExistsError:
            pass
        else:
            try:
                os.write(fd, f"{os.getpid()}\n".encode())
            finally:
                os.close(fd)
            return
        try:
            age = time.time() - os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mtime
        except FileNotFoundError:
            continue  # released meanwhile: try again at once
        if age > STALE_LOCK_AGE:
            try:
                os.unlink(name, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
            continue
        if time.monotonic() >= deadline:
            raise TemporaryFailure(_BUSY, f"dotlock {name} held")
        time.sleep(_POLL)


def _take_kernel_locks(fd: int, deadline: float) -> None:
    """``flock`` and ``fcntl`` locks, polled without blocking so the wait stays bounded."""
    for take in (
        lambda: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB),
        lambda: fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB),
    ):
        while True:
            try:
                take()
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
            if time.monotonic() >= deadline:
                raise TemporaryFailure(_BUSY, "mailbox file lock held")
            time.sleep(_POLL)


def _open_mailbox(name: str, dir_fd: int, confine: Confinement | None) -> int:
    """Open (creating 0o600) the mailbox for appending and check it is a safe target."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NONBLOCK
    if confine is not None:
        flags |= os.O_NOFOLLOW
    try:
        # Create exclusively first, so we know for sure whether the file is ours to chown.
        fd = os.open(name, flags | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dir_fd)
        created = True
    except FileExistsError:
        fd = os.open(name, flags, dir_fd=dir_fd)
        created = False
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            # A FIFO or device would block us or write somewhere surprising.
            raise TemporaryFailure(Reply(451, "4.2.0", "mbox delivery failed: not a regular file"))
        if confine is not None:
            if created:
                os.fchown(fd, confine.uid, confine.gid)
            elif info.st_uid != confine.uid or info.st_nlink != 1:
                # Another owner or a hard link: someone may be pointing us at a file
                # they must not be able to append to.
                raise TemporaryFailure(
                    Reply(451, "4.7.0", "mbox delivery failed: unsafe mailbox file refused")
                )
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def deliver_mbox(
    path: Path,
    message: bytes | Content,
    *,
    sender: str,
    when: float,
    confine: Confinement | None = None,
    lock_timeout: float = LOCK_TIMEOUT,
) -> None:
    """Append ``message`` to the mbox file ``path``. Synchronous: run it in a thread.

    :param path: the mailbox file; created (0o600) when missing, its directory must exist
    :param message: the message (CRLF or LF line ends), with Return-Path and Delivered-To;
        a message on disk is quoted and appended chunk by chunk as it is read
    :param sender: envelope sender for the ``From`` line (empty: MAILER-DAEMON)
    :param when: delivery time for the ``From`` line
    :param confine: deliver for another user while root (see
        :class:`~gateway.delivery.local.maildir.Confinement`)
    :param lock_timeout: how long to wait for the locks, in seconds
    :raises TemporaryFailure: when locked too long or on any I/O failure; the file is
        back at its former size
    """
    content = message if isinstance(message, Content) else Content.of_bytes(message)
    separator = from_line(sender, when).encode("utf-8", "surrogateescape")
    deadline = time.monotonic() + lock_timeout
    lock_name = f"{path.name}.lock"
    try:
        dir_fd = open_directory(path.parent, confine=confine)
    except OSError as exc:
        raise mailbox_error(exc, "mbox") from exc
    try:
        try:
            _take_dotlock(dir_fd, lock_name, deadline)
        except OSError as exc:
            raise mailbox_error(exc, "mbox") from exc
        try:
            _append_locked(path.name, dir_fd, separator, content, confine, deadline)
        finally:
            try:
                os.unlink(lock_name, dir_fd=dir_fd)
            except OSError:
                pass
    finally:
        os.close(dir_fd)


def _write_quoted(fd: int, separator: bytes, content: Content) -> None:
    """The From_ line, then the message quoted as it is read, a chunk at a time."""
    quoter = MboxrdQuoter()
    if content.is_in_memory:  # one write, as small messages always had
        pieces = [separator, *(p for c in content.chunks(CHUNK) for p in quoter.feed(c)), *quoter.end()]
        _write_all(fd, b"".join(pieces))
        return
    _write_all(fd, separator)
    for chunk in content.chunks(CHUNK):
        for piece in quoter.feed(chunk):
            _write_all(fd, piece)
    for piece in quoter.end():
        _write_all(fd, piece)


def _append_locked(
    name: str, dir_fd: int, separator: bytes, content: Content, confine: Confinement | None, deadline: float
) -> None:
    try:
        fd = _open_mailbox(name, dir_fd, confine)
    except OSError as exc:
        raise mailbox_error(exc, "mbox") from exc
    try:
        _take_kernel_locks(fd, deadline)
        size = os.fstat(fd).st_size
        try:
            _write_quoted(fd, separator, content)
            os.fsync(fd)
        except OSError as exc:
            # A failed write, or a failed read of the queued message: take back what
            # was appended, so the mailbox never holds half a message.
            try:
                os.ftruncate(fd, size)
                os.fsync(fd)
            except OSError:
                pass  # nothing better to do; the original error is what we report
            raise mailbox_error(exc, "mbox") from exc
    except OSError as exc:
        raise mailbox_error(exc, "mbox") from exc
    finally:
        # Closing releases the flock and fcntl locks.
        os.close(fd)
