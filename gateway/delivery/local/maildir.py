"""Maildir delivery (https://cr.yp.to/proto/maildir.html), and safe directory opening.

A message is written to ``tmp/<unique>``, synced, hard-linked into ``new/<unique>``
and the ``new/`` directory synced, so a reader never sees a partial message and a
crash leaves at worst a stray file in ``tmp/``. A message on disk (a
:class:`~gateway.content.Content` of the queue file) is copied into ``tmp/`` by the
kernel (``copy_file_range``), never through this process's memory.

This module also holds :func:`open_directory`, which :mod:`mbox` shares: when the
gateway runs as root and delivers on behalf of another user (a path named in that
user's ``.qmail``), every directory below the user's home is opened with
``O_NOFOLLOW`` relative to its parent, so a symlink placed by the user can never make
root write outside the home; files and directories created there are given to the
user.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

from gateway.content import Content
from gateway.verdicts import Reply, TemporaryFailure

__all__ = ["Confinement", "Octets", "deliver_maildir", "mailbox_error", "octets_size", "open_directory", "unique_name"]

#: A message as delivery writes it: buffers in order, or a :class:`Content`.
Octets = Union[Content, Sequence[bytes]]

_counter = itertools.count(1)
_counter_lock = threading.Lock()
_DIR_MODE = 0o700
_FILE_MODE = 0o600
# Names too long for a directory entry would fail late, at open; hostnames are short.
_MAX_HOST = 200
#: link() errors of a filesystem without hard links (some FUSE and network ones): rename
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK})


@dataclass(frozen=True, slots=True)
class Confinement:
    """Deliver below ``base`` for ``uid``/``gid`` while the gateway runs as root.

    Nothing below ``base`` is reached through a symlink, and what we create there is
    owned by ``uid``/``gid``. ``base`` itself (the home from the policy) is trusted.
    """

    base: Path
    uid: int
    gid: int


def mailbox_error(exc: OSError, what: str) -> TemporaryFailure:
    """The temporary failure for an I/O error during a mailbox delivery.

    :param exc: the error
    :param what: ``maildir`` or ``mbox``, for the reply text
    :returns: 452 4.2.2 when over quota, 452 4.3.1 when the disk is full, else 451 4.2.0
        (mailbox problem); the path is not in the text because the text may reach the
        sender in a bounce.
    """
    reason = exc.strerror or type(exc).__name__
    if exc.errno == errno.EDQUOT:
        reply = Reply(452, "4.2.2", f"{what} delivery failed: mailbox over quota")
    elif exc.errno == errno.ENOSPC:
        reply = Reply(452, "4.3.1", f"{what} delivery failed: insufficient system storage")
    elif exc.errno in (errno.EIO, errno.EROFS):
        reply = Reply(451, "4.3.0", f"{what} delivery failed: {reason}")
    else:
        reply = Reply(451, "4.2.0", f"{what} delivery failed: {reason}")
    return TemporaryFailure(reply, f"{what} delivery failed: {exc}")


def unique_name(hostname: str, now: float | None = None) -> str:
    """A Maildir file name: ``<seconds>.M<usec>P<pid>Q<counter>.<host>``.

    The counter is process-wide and locked, so threads of one process never collide;
    the pid separates processes and the hostname separates machines sharing a Maildir.

    :param hostname: this host's name; ``/`` and ``:`` are escaped as the spec says
        (``\\057``, ``\\072``) because ``/`` separates paths and ``:`` starts the info part
    :param now: the time to use (tests)
    """
    when = time.time() if now is None else now
    seconds = int(when)
    usec = int((when - seconds) * 1_000_000)
    with _counter_lock:
        count = next(_counter)
    host = hostname.replace("/", "\\057").replace(":", "\\072")[:_MAX_HOST] or "localhost"
    return f"{seconds}.M{usec}P{os.getpid()}Q{count}.{host}"


def _nofollow(confine: Confinement | None) -> int:
    return os.O_NOFOLLOW if confine is not None else 0


def open_directory(path: Path, *, confine: Confinement | None = None, create: bool = False) -> int:
    """Open ``path`` as a directory and return its descriptor.

    :param path: the directory; with ``confine`` it must be ``confine.base`` or below it
    :param confine: when given, walk from ``confine.base`` one component at a time with
        ``O_NOFOLLOW`` (a symlink fails with ``ELOOP``) and chown what we create
    :param create: create the last component (0o700) when missing; its parent must exist,
        so a typo in a ``.qmail`` line cannot make a tree of directories
    :raises TemporaryFailure: when the path leaves ``confine.base``
    :raises OSError: on any other failure (the caller maps it with :func:`mailbox_error`)
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    if confine is None:
        if create:
            try:  # one system call when the directory is there, as it mostly is
                return os.open(path, flags)
            except FileNotFoundError:
                pass
            try:
                os.mkdir(path, _DIR_MODE)
            except FileExistsError:
                pass
        return os.open(path, flags)
    try:
        parts = path.relative_to(confine.base).parts
    except ValueError:
        parts = ("..",)
    if ".." in parts:
        raise TemporaryFailure(
            Reply(451, "4.7.0", "mailbox path outside the home directory refused"),
            f"{path} is outside {confine.base}",
        )
    fd = os.open(confine.base, flags)
    try:
        for i, part in enumerate(parts):
            try:
                next_fd = os.open(part, flags | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                if not (create and i == len(parts) - 1):
                    raise
                _mkdir_owned(part, fd, confine)
                next_fd = os.open(part, flags | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _mkdir_owned(name: str, dir_fd: int, confine: Confinement | None) -> bool:
    """Create ``name`` in ``dir_fd`` (0o700), owned by the confined user. True if created."""
    try:
        os.mkdir(name, _DIR_MODE, dir_fd=dir_fd)
    except FileExistsError:
        return False
    if confine is not None:
        os.chown(name, confine.uid, confine.gid, dir_fd=dir_fd, follow_symlinks=False)
    return True


def octets_size(chunks: Octets) -> int:
    """How many octets ``chunks`` holds."""
    if isinstance(chunks, Content):
        return chunks.size
    return sum(len(c) for c in chunks)


def _write_all(fd: int, chunks: Octets) -> None:
    """Write every chunk, looping over short writes; a :class:`Content`'s file parts are
    copied in the kernel."""
    if isinstance(chunks, Content):
        if not chunks.is_in_memory:
            chunks.write_to(fd)
            return
        chunks = [bytes(c) for c in chunks.chunks()]
    if len(chunks) > 1:
        # One system call for the lines we add and a message in memory.
        data = memoryview(b"".join(chunks))
        while data:
            data = data[os.write(fd, data):]
        return
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            written = os.write(fd, view)
            view = view[written:]


def deliver_maildir(
    directory: Path,
    chunks: Octets,
    *,
    hostname: str,
    confine: Confinement | None = None,
    name: str | None = None,
    first: bool = False,
) -> str:
    """Deliver one message into the Maildir ``directory``. Synchronous: run it in a thread.

    :param directory: the Maildir; it is created (0o700) when missing, but not its
        parent, and when its ``tmp`` or ``new`` is missing, its ``tmp``, ``new`` and
        ``cur`` are created too
    :param chunks: the message, already with Return-Path and Delivered-To, in any line
        ending (Maildir stores what it is given): buffers, or a :class:`Content` whose
        file parts are copied in the kernel
    :param hostname: this host's name, for the unique file name
    :param confine: deliver for another user while root (see :class:`Confinement`)
    :param name: a caller-chosen unique name that makes the delivery idempotent: when a
        file of that name is already in ``new/`` or ``cur/``, nothing is written again
    :param first: no attempt at this delivery can have been made before (the message
        was just queued by this process), so ``name`` is not looked for in ``new/``,
        ``cur/`` and ``tmp/``
    :returns: the file name under ``new/``
    :raises TemporaryFailure: on any failure; the file in ``tmp/`` is removed first
    """
    if confine is None and (name is None or first):
        try:
            return _deliver_by_path(os.fspath(directory), chunks, name or unique_name(hostname))
        except FileNotFoundError:
            pass  # a new Maildir, or a part missing: the way below makes what is missing
        except OSError as exc:
            raise mailbox_error(exc, "maildir") from exc
    try:
        maildir_fd = open_directory(directory, confine=confine, create=True)
    except OSError as exc:
        raise mailbox_error(exc, "maildir") from exc
    fds: list[int] = [maildir_fd]
    try:
        return _deliver_in(maildir_fd, fds, chunks, hostname, confine, name, first)
    finally:
        for fd in fds:
            os.close(fd)


def _deliver_in(
    maildir_fd: int,
    fds: list[int],
    chunks: Octets,
    hostname: str,
    confine: Confinement | None,
    chosen: str | None = None,
    first: bool = False,
) -> str:
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | _nofollow(confine)
    name = ""
    tmp_fd = new_fd = -1
    in_tmp = in_new = False
    try:
        try:  # a Maildir in use has them: two system calls, no mkdir that fails
            tmp_fd = os.open("tmp", flags, dir_fd=maildir_fd)
            fds.append(tmp_fd)
            new_fd = os.open("new", flags, dir_fd=maildir_fd)
            fds.append(new_fd)
        except FileNotFoundError:
            created = [_mkdir_owned(sub, maildir_fd, confine) for sub in ("tmp", "new", "cur")]
            if any(created):
                # Make the new subdirectories themselves durable before a message relies on them.
                os.fsync(maildir_fd)
            if tmp_fd < 0:
                tmp_fd = os.open("tmp", flags, dir_fd=maildir_fd)
                fds.append(tmp_fd)
            new_fd = os.open("new", flags, dir_fd=maildir_fd)
            fds.append(new_fd)
        if chosen is not None and not first and _already_delivered(maildir_fd, chosen, flags):
            return chosen
        name = chosen or unique_name(hostname)
        if chosen is not None and not first:
            # A fixed name left in tmp/ is a crashed attempt of this very delivery.
            _unlink_quietly(name, tmp_fd)
        # O_EXCL: never overwrite (and never follow a symlink at) the name we picked.
        fd = os.open(
            name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
            _FILE_MODE,
            dir_fd=tmp_fd,
        )
        in_tmp = True
        try:
            if confine is not None:
                os.fchown(fd, confine.uid, confine.gid)
            _write_all(fd, chunks)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            # The spec's link(): fails instead of replacing if the name exists in new/.
            os.link(name, name, src_dir_fd=tmp_fd, dst_dir_fd=new_fd, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            # Filesystems without hard links (some FUSE and network ones): rename instead;
            # the name is unique, so there is nothing to replace.
            os.rename(name, name, src_dir_fd=tmp_fd, dst_dir_fd=new_fd)
            in_tmp = False
        in_new = True
        os.fsync(new_fd)
    except OSError as exc:
        # Undo: we report a temporary failure, so a later retry must not find a copy
        # (a message in new/ whose directory entry may not be durable is a duplicate
        # waiting to happen).
        if in_new:
            _unlink_quietly(name, new_fd)
        if in_tmp:
            _unlink_quietly(name, tmp_fd)
        raise mailbox_error(exc, "maildir") from exc
    if in_tmp:
        _unlink_quietly(name, tmp_fd)  # delivered; a stray tmp file is harmless anyway
    return name


def _deliver_by_path(directory: str, chunks: Octets, name: str) -> str:
    """The common case in fewer system calls (each one lets other threads take the
    interpreter, and a loaded gateway pays for the hand-over): nobody to confine, a name
    no earlier attempt can have used, and a Maildir whose ``tmp/`` and ``new/`` exist.
    The steps and their order are :func:`_deliver_in`'s.

    :raises FileNotFoundError: before anything is written, when ``tmp/`` is missing,
        and after undoing what was written, when ``new/`` is
    :raises OSError: on any other failure, after undoing what was written
    """
    in_tmp, in_new = f"{directory}/tmp/{name}", f"{directory}/new/{name}"
    fd = os.open(in_tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
    is_in_tmp, is_in_new = True, False
    try:
        try:
            _write_all(fd, chunks)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            # The spec's link(): fails instead of replacing if the name exists in new/.
            os.link(in_tmp, in_new, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            os.rename(in_tmp, in_new)  # no hard links here (as in _deliver_in)
            is_in_tmp = False
        is_in_new = True
        new_fd = os.open(f"{directory}/new", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(new_fd)
        finally:
            os.close(new_fd)
    except BaseException:
        if is_in_new:  # not durable, and we report a failure: no copy for a retry to find
            with contextlib.suppress(OSError):
                os.unlink(in_new)
        if is_in_tmp:
            with contextlib.suppress(OSError):
                os.unlink(in_tmp)
        raise
    if is_in_tmp:
        _unlink_quietly(in_tmp, None)  # delivered; a stray tmp file is harmless anyway
    return name


def _already_delivered(maildir_fd: int, name: str, flags: int) -> bool:
    """A message called ``name`` is in new/, or in cur/ (where readers add ``:2,flags``)."""
    new_fd = os.open("new", flags, dir_fd=maildir_fd)
    try:
        os.stat(name, dir_fd=new_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        pass
    finally:
        os.close(new_fd)
    cur_fd = os.open("cur", flags, dir_fd=maildir_fd)
    try:
        return any(entry == name or entry.startswith(name + ":") for entry in os.listdir(cur_fd))
    finally:
        os.close(cur_fd)


def _unlink_quietly(name: str, dir_fd: int | None) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass
