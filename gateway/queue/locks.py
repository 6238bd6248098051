"""The queue's delivery lock: an exclusive lock on a message file.

Every process of the gateway delivers (``[server] workers``), so this lock is what keeps
two attempts on one message apart: whoever holds it reads the recorded state and writes
the outcome before anyone else may look. ``gateway queue export --hold/--move`` waits
for it too (:meth:`QueueStore.lock_exclusive`), so nothing it exports has a delivery in
flight whose outcome it would not see.

It is an open-file-description lock (Linux ``F_OFD_SETLK``): it belongs to a descriptor
like ``flock``, and is independent of the ``flock`` the state updates take and of any
byte-range locks. A write lock needs a descriptor open for writing; nothing is ever
written through it. Closing the descriptor releases it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from pathlib import Path

__all__ = ["is_locked", "ofd_lock", "open_locked"]

_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_F_OFD_SETLKW = getattr(fcntl, "F_OFD_SETLKW", 38)
_FLOCK = "hhqqi4x"  # struct flock: l_type, l_whence, l_start, l_len (0: to the end), l_pid


def ofd_lock(fd: int, kind: int, *, wait: bool) -> None:
    """Lock the whole file behind ``fd`` (``fcntl.F_RDLCK`` or ``F_WRLCK``).

    :raises OSError: EAGAIN/EACCES when ``wait`` is false and another holder conflicts
    """
    fcntl.fcntl(fd, _F_OFD_SETLKW if wait else _F_OFD_SETLK, struct.pack(_FLOCK, kind, os.SEEK_SET, 0, 0, 0))


def is_locked(fd: int) -> bool:
    """Whether any open file description holds a lock on the file behind ``fd`` that
    would keep out a write lock (this descriptor's own excepted); takes nothing."""
    got = fcntl.fcntl(fd, _F_OFD_GETLK, struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
    return bool(struct.unpack(_FLOCK, got)[0] != fcntl.F_UNLCK)


def open_locked(path: str | Path, qid: str, *, wait: bool) -> int:
    """Open the message file at ``path`` and take its write lock.

    A process can open the file just before the holder removes the message and get the
    lock just after the holder lets go; its descriptor still reads the whole message,
    and with no state file left every recipient would read as pending and be delivered
    a second time. So a file that lost its name meanwhile counts as gone.

    :returns: the locked descriptor; the caller closes it
    :raises OSError: EAGAIN/EACCES when ``wait`` is false and another holder has it
    :raises FileNotFoundError: when the message is gone, or went while we waited
    """
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        ofd_lock(fd, fcntl.F_WRLCK, wait=wait)
        if os.fstat(fd).st_nlink == 0:
            raise FileNotFoundError(errno.ENOENT, f"qid={qid} was removed")
    except BaseException:
        os.close(fd)
        raise
    return fd
