"""Deleting stale mail from Maildir folders (``gateway maildir expire``), quota kept right.

A message is stale when its file in ``cur/`` or ``new/`` was last modified more than the
given age ago: that is its delivery time (Maildir files are never rewritten; mail readers
rename them to change flags, which keeps the time). Deleting is an ``unlink``, after which
the Maildir's ``maildirsize`` (when there is one) gets one line with the negative sum, as
Maildir++ asks of anything that removes mail.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from gateway.delivery.local.quota import FILE, _message_size, add_usage

__all__ = ["ExpireResult", "expire_folder", "folder_path"]


@dataclass
class ExpireResult:
    """What one folder lost (or would lose, in a dry run)."""

    folder: Path
    files: list[Path] = field(default_factory=list)
    bytes: int = 0


def folder_path(maildir: Path, folder: str) -> Path:
    """The directory of a Maildir++ folder: ``INBOX`` (or empty) is the Maildir itself,
    ``Trash`` is ``.Trash``, ``Lists/x`` or ``Lists.x`` is ``.Lists.x``.

    :raises ValueError: for a name that would leave the Maildir
    """
    name = folder.strip().strip("/")
    if name.upper() in ("", "INBOX"):
        return maildir
    if ".." in name or "\0" in name:
        raise ValueError(f"bad folder name {folder!r}")
    name = name.lstrip(".").replace("/", ".")
    if not name:
        raise ValueError(f"bad folder name {folder!r}")
    return maildir / f".{name}"


def expire_folder(maildir: Path, folder: str, *, days: float, dry_run: bool = False, now: float | None = None) -> ExpireResult:
    """Delete the messages of one folder older than ``days`` days.

    :param maildir: the Maildir (its ``maildirsize`` is kept right)
    :param folder: the folder name (see :func:`folder_path`)
    :param days: the age limit in days
    :param dry_run: only report what would be deleted
    :param now: the current time (tests)
    :raises FileNotFoundError: when the folder is not a Maildir (no ``cur/``)
    :raises ValueError: for a bad folder name
    """
    directory = folder_path(maildir, folder)
    if not (directory / "cur").is_dir():
        raise FileNotFoundError(f"{directory} is not a Maildir folder (no cur/)")
    cutoff = (time.time() if now is None else now) - days * 86400
    result = ExpireResult(directory)
    count = 0
    for sub in ("new", "cur"):
        path = directory / sub
        try:
            dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            for entry in sorted(os.listdir(dir_fd)):
                if entry.startswith("."):
                    continue
                try:
                    info = os.stat(entry, dir_fd=dir_fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue  # moved by a mail reader meanwhile
                if info.st_mtime >= cutoff or not os.path.isfile(os.path.join(path, entry)):
                    continue
                size = _message_size(dir_fd, entry)
                if not dry_run:
                    try:
                        os.unlink(entry, dir_fd=dir_fd)
                    except FileNotFoundError:
                        continue
                result.files.append(path / entry)
                result.bytes += max(size, 0)
                count += 1
            if count and not dry_run:
                os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    if count and not dry_run:
        root = maildir if (maildir / FILE).exists() else directory
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            add_usage(root_fd, -result.bytes, -count)
        finally:
            os.close(root_fd)
    return result
