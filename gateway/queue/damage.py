"""Damaged queue files: how they are recognised, and where they go.

A queue file checks out when its header, lengths and separator agree with its size
(:func:`check_fd`, cheap: the body is not read) and its envelope parses and fits the
envelope schema (:func:`read_envelope`). A file that fails either is never retried or
deleted: :func:`move_aside` renames it, with its state file, into ``corrupt/`` for a
human, with one ERROR line. See ``docs/queue.md``.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
from pathlib import Path

from gateway.model import Envelope
from gateway.queue.committer import fsync_dir

__all__ = ["CorruptQueueFile", "MAGIC", "QID_RE", "check_fd", "move_aside", "read_envelope"]

log = logging.getLogger("gateway.queue.store")

MAGIC = b"GWQ1"
QID_RE = re.compile(r"[0-9A-Z]{1,64}")
_HEADER_MAX = 64  # b"GWQ1 " + two 20-digit lengths + spaces + newline fit in 47
_ENVELOPE_MAX = 16 * 1024 * 1024  # bound what a reader reads and parses


class CorruptQueueFile(Exception):
    """A queue or state file whose header, lengths or JSON do not check out."""


def check_fd(fd: int, qid: str) -> tuple[int, int, int]:
    """Verify a queue file's header, size and separator without reading its body.

    :returns: (header length, envelope length, message length)
    :raises CorruptQueueFile: when any of them is wrong
    """
    head = os.pread(fd, _HEADER_MAX, 0)
    nl = head.find(b"\n")
    parts = head[:nl].split(b" ") if nl > 0 else []
    if len(parts) != 3 or parts[0] != MAGIC or not (parts[1].isdigit() and parts[2].isdigit()):
        raise CorruptQueueFile(f"qid={qid}: bad header")
    header_len, env_len, msg_len = nl + 1, int(parts[1]), int(parts[2])
    expected, actual = header_len + env_len + 1 + msg_len, os.fstat(fd).st_size
    if actual != expected:
        raise CorruptQueueFile(f"qid={qid}: size {actual}, header says {expected}")
    if os.pread(fd, 1, header_len + env_len) != b"\n":
        raise CorruptQueueFile(f"qid={qid}: no separator after the envelope")
    return header_len, env_len, msg_len


def read_envelope(fd: int, qid: str, header_len: int, env_len: int) -> Envelope:
    """The envelope of the queue file ``fd`` (lengths from :func:`check_fd`).

    :raises CorruptQueueFile: when it is too long, is not JSON, or does not fit the schema
    """
    if env_len > _ENVELOPE_MAX:
        raise CorruptQueueFile(f"qid={qid}: envelope of {env_len} octets")
    raw = os.pread(fd, env_len, header_len)
    try:
        return Envelope.from_dict(json.loads(raw))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptQueueFile(f"qid={qid}: bad envelope: {exc}") from exc


def move_aside(root: Path, qid: str, files: list[Path], reason: str) -> bool:
    """Rename ``files`` (a message file and its state file, or one stray file) into
    ``root/corrupt/`` durably, never overwriting (a name taken gets ``.1``, ``.2``, ...;
    a state file is named ``<qid>.state``), and log it in one ERROR line.

    :param qid: the queue id (or the stray file's name) for the log
    :returns: False when a file could not be moved (logged too; it stays where it is)
    """
    corrupt = root / "corrupt"
    moved: list[str] = []
    try:
        for src in files:
            name = f"{qid}.state" if src.parent.name == "state" else src.name
            dst = corrupt / name
            for n in itertools.count(1):
                if not dst.exists():
                    break
                dst = corrupt / f"{name}.{n}"
            os.rename(src, dst)
            moved.append(dst.name)
        fsync_dir(corrupt)
        for parent in {src.parent for src in files}:
            fsync_dir(parent)
    except OSError as exc:
        log.error("cannot move damaged queue file qid=%s to %s/: %s (%s)", qid, corrupt, exc, reason)
        return False
    log.error("damaged queue file qid=%s moved to %s/%s: %s", qid, corrupt, ",".join(moved), reason)
    return True
