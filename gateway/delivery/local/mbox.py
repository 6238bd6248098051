"""mbox delivery: append one message to a locked mailbox file (mboxrd format).

Locking takes every kind a reader may use: a dotlock (``<mbox>.lock``, created with
``O_EXCL``), a ``flock`` and an ``fcntl`` record lock. The dotlock is what keeps two
threads of this process apart too, because ``fcntl`` locks belong to the process.

Each message starts with ``From <sender> <asctime UTC>``; lines that would read as a
separator are quoted mboxrd-style (``>`` before any ``>*From ``) so quoting is
reversible; the message ends with a blank line. On any failure the file is truncated
back to its size before the append (as qmail-local does), so a half-written message
never corrupts the mailbox.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import time
from pathlib import Path

from gateway.delivery.local.maildir import Confinement, mailbox_error, open_directory
from gateway.verdicts import Reply, TemporaryFailure

__all__ = ["deliver_mbox", "from_line", "mboxrd_quote"]

# A dotlock older than this is left over from a crash (the traditional 5 minutes).
STALE_LOCK_AGE = 300.0
LOCK_TIMEOUT = 30.0
_POLL = 0.05
_FROM_RE = re.compile(rb"^(>*From )", re.MULTILINE)
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


def mboxrd_quote(message: bytes) -> bytes:
    """The message with LF line ends and mboxrd ``>From`` quoting, ending in a blank line.

    :param message: the message in CRLF (or LF) form
    """
    text = message.replace(b"\r\n", b"\n")
    text = _FROM_RE.sub(rb">\1", text)
    if not text.endswith(b"\n"):
        text += b"\n"
    return text + b"\n"


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
    message: bytes,
    *,
    sender: str,
    when: float,
    confine: Confinement | None = None,
    lock_timeout: float = LOCK_TIMEOUT,
) -> None:
    """Append ``message`` to the mbox file ``path``. Synchronous: run it in a thread.

    :param path: the mailbox file; created (0o600) when missing, its directory must exist
    :param message: the message (CRLF or LF line ends), with Return-Path and Delivered-To
    :param sender: envelope sender for the ``From`` line (empty: MAILER-DAEMON)
    :param when: delivery time for the ``From`` line
    :param confine: deliver for another user while root (see
        :class:`~gateway.delivery.local.maildir.Confinement`)
    :param lock_timeout: how long to wait for the locks, in seconds
    :raises TemporaryFailure: when locked too long or on any I/O failure; the file is
        back at its former size
    """
    data = from_line(sender, when).encode("utf-8", "surrogateescape") + mboxrd_quote(message)
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
            _append_locked(path.name, dir_fd, data, confine, deadline)
        finally:
            try:
                os.unlink(lock_name, dir_fd=dir_fd)
            except OSError:
                pass
    finally:
        os.close(dir_fd)


def _append_locked(
    name: str, dir_fd: int, data: bytes, confine: Confinement | None, deadline: float
) -> None:
    try:
        fd = _open_mailbox(name, dir_fd, confine)
    except OSError as exc:
        raise mailbox_error(exc, "mbox") from exc
    try:
        _take_kernel_locks(fd, deadline)
        size = os.fstat(fd).st_size
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except OSError as exc:
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
