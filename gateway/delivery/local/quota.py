"""Maildir++ quotas: the ``maildirsize`` file, read and kept the way Courier and Dovecot do.

``<Maildir>/maildirsize`` starts with the quota, ``NNNS,NNNC`` (bytes, messages; either
part may be missing), then one line ``bytes count`` per change: a delivery appends
``size 1`` with a single ``O_APPEND`` write, a deletion appends negative numbers. The
usage is the sum of those lines. The file is recalculated (every message in ``cur/`` and
``new/`` of the Maildir and of its ``.Folder`` sub-Maildirs counted, then the file
replaced by rename) when it is missing, does not parse, carries another quota than the
policy's, has grown to 5120 bytes or more, or says "over quota" and is older than 15
minutes (a mail reader may have deleted mail without writing a line).

Synchronous: the delivery agent and the ``rcpt_quota`` plugin call it in a thread.
"""

from __future__ import annotations

import errno
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from gateway.delivery.local.maildir import (
    Confinement,
    Octets,
    _already_delivered,
    deliver_maildir,
    mailbox_error,
    octets_size,
    open_directory,
    unique_name,
)
from gateway.verdicts import PermanentFailure, Reply, TemporaryFailure

__all__ = [
    "REPLY_FULL_BOUNCE", "REPLY_FULL_DEFER", "Quota", "Usage", "add_usage", "deliver_with_quota",
    "quota_root", "read_usage", "usage",
]

FILE = "maildirsize"
RECALCULATE_SIZE = 5120  # Maildir++: a file this large is rewritten
RECALCULATE_AGE = 15 * 60  # Maildir++: "over quota" older than this is checked again
REPLY_FULL_DEFER = Reply(452, "4.2.2", "Mailbox full: over quota")
REPLY_FULL_BOUNCE = Reply(552, "5.2.2", "Mailbox full: over quota")
_SIZE_IN_NAME = re.compile(r",S=(\d+)")
_SPEC = re.compile(r"(\d+)([SC])")


@dataclass(frozen=True, slots=True)
class Quota:
    """A quota: at most ``storage`` bytes and ``messages`` messages (None: no limit)."""

    storage: int | None = None
    messages: int | None = None

    @property
    def spec(self) -> str:
        """The first line of ``maildirsize``: ``10000000S,1000C``."""
        parts = [f"{self.storage}S"] if self.storage is not None else []
        if self.messages is not None:
            parts.append(f"{self.messages}C")
        return ",".join(parts)

    def is_full(self, used: Usage, size: int = 0, count: int = 0) -> bool:
        """Whether adding ``size`` bytes in ``count`` messages goes over the quota; with
        nothing to add, whether the Maildir is already at or over it."""
        if size == 0 and count == 0:
            return (self.storage is not None and used.bytes >= self.storage) or (
                self.messages is not None and used.count >= self.messages
            )
        return (self.storage is not None and used.bytes + size > self.storage) or (
            self.messages is not None and used.count + count > self.messages
        )


@dataclass(frozen=True, slots=True)
class Usage:
    """What a Maildir holds: ``bytes`` and ``count`` messages."""

    bytes: int
    count: int


def quota_root(maildir: Path) -> Path:
    """The Maildir whose ``maildirsize`` counts deliveries to ``maildir``: a Maildir++
    folder (``Maildir/.Lists/``) counts toward its parent."""
    maildir = Path(os.path.normpath(maildir))
    if maildir.name.startswith(".") and (maildir.parent / "cur").is_dir():
        return maildir.parent
    return maildir


def _parse(text: str) -> tuple[str, Usage] | None:
    lines = text.split("\n")
    if len(lines) < 2 or lines[-1] != "":
        return None  # a torn last line: recount
    used_bytes = used_count = 0
    for line in lines[1:-1]:
        fields = line.split()
        if len(fields) != 2:
            return None
        try:
            used_bytes += int(fields[0])
            used_count += int(fields[1])
        except ValueError:
            return None
    return lines[0].strip(), Usage(max(0, used_bytes), max(0, used_count))


def _read_at(dir_fd: int, nofollow: int) -> tuple[str, Usage, int, float] | None:
    """(quota line, usage, file size, mtime) from ``maildirsize`` in ``dir_fd``, or None."""
    try:
        fd = os.open(FILE, os.O_RDONLY | os.O_CLOEXEC | nofollow, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    try:
        info = os.fstat(fd)
        data = os.read(fd, RECALCULATE_SIZE * 4)
    finally:
        os.close(fd)
    parsed = _parse(data.decode("ascii", "replace"))
    if parsed is None:
        return None
    return parsed[0], parsed[1], info.st_size, info.st_mtime


def read_usage(maildir: Path) -> Usage | None:
    """The usage ``maildirsize`` records, without recounting; None when there is no
    usable file (the ``rcpt_quota`` plugin then has no opinion)."""
    try:
        fd = os.open(quota_root(maildir), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        found = _read_at(fd, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    return None if found is None else found[1]


def _message_size(dir_fd: int, name: str) -> int:
    match = _SIZE_IN_NAME.search(name)
    if match:
        return int(match.group(1))
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_size
    except FileNotFoundError:
        return -1  # gone meanwhile (read, moved, expunged)


def _count_maildir(dir_fd: int, nofollow: int) -> tuple[int, int]:
    total = count = 0
    for sub in ("cur", "new"):
        try:
            sub_fd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | nofollow, dir_fd=dir_fd)
        except FileNotFoundError:
            continue
        try:
            for name in os.listdir(sub_fd):
                if name.startswith("."):
                    continue
                size = _message_size(sub_fd, name)
                if size >= 0:
                    total, count = total + size, count + 1
        finally:
            os.close(sub_fd)
    return total, count


def recalculate(root_fd: int, quota: Quota, confine: Confinement | None = None) -> Usage:
    """Count the Maildir in ``root_fd`` and its ``.Folder`` sub-Maildirs, and replace
    ``maildirsize`` with the quota line and one usage line."""
    nofollow = os.O_NOFOLLOW if confine is not None else 0
    total, count = _count_maildir(root_fd, nofollow)
    for name in os.listdir(root_fd):
        if not name.startswith(".") or name in (".", ".."):
            continue
        try:
            folder_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=root_fd)
        except OSError:
            continue  # a dot file, or a symlink
        try:
            more, number = _count_maildir(folder_fd, nofollow)
        finally:
            os.close(folder_fd)
        total, count = total + more, count + number
    used = Usage(total, count)
    _replace(root_fd, f"{quota.spec}\n{used.bytes} {used.count}\n".encode("ascii"), confine)
    return used


def _replace(root_fd: int, data: bytes, confine: Confinement | None) -> None:
    try:
        os.mkdir("tmp", 0o700, dir_fd=root_fd)
    except FileExistsError:
        pass
    tmp = f"tmp/{unique_name('maildirsize')}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600, dir_fd=root_fd)
    try:
        try:
            if confine is not None:
                os.fchown(fd, confine.uid, confine.gid)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, FILE, src_dir_fd=root_fd, dst_dir_fd=root_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=root_fd)
        except OSError:
            pass
        raise


def usage(root_fd: int, quota: Quota, confine: Confinement | None = None) -> Usage:
    """The usage of the Maildir in ``root_fd``, recalculated when Maildir++ says so."""
    nofollow = os.O_NOFOLLOW if confine is not None else 0
    found = _read_at(root_fd, nofollow)
    if found is not None:
        line, used, size, mtime = found
        is_stale = quota.is_full(used) and time.time() - mtime > RECALCULATE_AGE
        if line == quota.spec and size < RECALCULATE_SIZE and not is_stale:
            return used
    return recalculate(root_fd, quota, confine)


def add_usage(root_fd: int, size: int, count: int, confine: Confinement | None = None) -> None:
    """Append ``size count`` to ``maildirsize`` in one write (negative for deletions);
    nothing when there is no file (the next reader recounts)."""
    nofollow = os.O_NOFOLLOW if confine is not None else 0
    try:
        fd = os.open(FILE, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | nofollow, dir_fd=root_fd)
    except FileNotFoundError:
        return
    try:
        os.write(fd, f"{size} {count}\n".encode("ascii"))
    finally:
        os.close(fd)


def deliver_with_quota(
    directory: Path,
    chunks: Octets,
    *,
    quota: Quota,
    bounce: bool,
    hostname: str,
    confine: Confinement | None = None,
    name: str | None = None,
) -> str:
    """:func:`~gateway.delivery.local.maildir.deliver_maildir` under a Maildir++ quota.

    :param quota: the limit of the Maildir (or of the Maildir++ folder's parent)
    :param bounce: over quota is permanent (552 5.2.2) instead of temporary (452 4.2.2)
    :raises TemporaryFailure: over quota (unless ``bounce``), or any delivery failure
    :raises PermanentFailure: over quota with ``bounce``
    """
    size = octets_size(chunks)
    root = quota_root(directory)
    try:
        root_fd = open_directory(root, confine=confine, create=True)
    except OSError as exc:
        raise mailbox_error(exc, "maildir") from exc
    try:
        if name is not None and _is_there(directory, name, confine):
            return name  # a retry of a delivery that happened: already counted
        try:
            used = usage(root_fd, quota, confine)
        except OSError as exc:
            raise mailbox_error(exc, "maildir") from exc
        if quota.is_full(used, size, 1):
            if bounce:
                raise PermanentFailure(REPLY_FULL_BOUNCE, f"{root}: {used} + {size} over {quota.spec}")
            raise TemporaryFailure(REPLY_FULL_DEFER, f"{root}: {used} + {size} over {quota.spec}")
        delivered = deliver_maildir(directory, chunks, hostname=hostname, confine=confine, name=name)
        try:
            add_usage(root_fd, size, 1, confine)
        except OSError:
            pass  # delivered; the count is only off until the next recalculation
        return delivered
    finally:
        os.close(root_fd)


def _is_there(directory: Path, name: str, confine: Confinement | None) -> bool:
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (os.O_NOFOLLOW if confine is not None else 0)
    try:
        fd = open_directory(directory, confine=confine)
    except OSError:
        return False
    try:
        return _already_delivered(fd, name, flags)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    finally:
        os.close(fd)
