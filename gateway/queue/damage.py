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
from dataclasses import dataclass
from pathlib import Path

from gateway.model import Envelope
from gateway.queue.committer import fsync_dir

__all__ = [
    "CorruptQueueFile", "Layout", "MAGIC", "MAGIC_SPOOLED", "QID_RE", "SPOOL_LINE",
    "check_fd", "move_aside", "read_envelope", "spool_line",
]

log = logging.getLogger("gateway.queue.store")

MAGIC = b"GWQ1"
#: A spooled message's file: the octets as received first, the final header block and
#: the envelope after them, and a first line of fixed length saying where each is.
MAGIC_SPOOLED = b"GWQ2"
SPOOL_LINE = 128  # the first line of a GWQ2 file, newline included
QID_RE = re.compile(r"[0-9A-Z]{1,64}")
_HEADER_MAX = 64  # b"GWQ1 " + two 20-digit lengths + spaces + newline fit in 47
_ENVELOPE_MAX = 16 * 1024 * 1024  # bound what a reader reads and parses


class CorruptQueueFile(Exception):
    """A queue or state file whose header, lengths or JSON do not check out."""


@dataclass(frozen=True, slots=True)
class Layout:
    """Where a queue file keeps its envelope and its message (read by :func:`check_fd`)."""

    env_offset: int
    env_length: int
    #: the message, in order: one (offset, length) in a GWQ1 file, two in a GWQ2 file
    #: (the final header block, then the body inside the octets as received)
    extents: tuple[tuple[int, int], ...]

    @property
    def message_size(self) -> int:
        return sum(length for _, length in self.extents)


def spool_line(env_offset: int, env_length: int, extents: tuple[tuple[int, int], ...]) -> bytes:
    """The first line of a GWQ2 file, exactly :data:`SPOOL_LINE` octets."""
    fields = [env_offset, env_length, *(n for extent in extents for n in extent)]
    line = b" ".join([MAGIC_SPOOLED, *(b"%d" % n for n in fields)])
    if len(extents) != 2 or len(line) >= SPOOL_LINE:
        raise ValueError("a GWQ2 line names an envelope and two extents")
    return line.ljust(SPOOL_LINE - 1) + b"\n"


def check_fd(fd: int, qid: str) -> Layout:
    """Verify a queue file's header, size and separator without reading its body.

    :raises CorruptQueueFile: when any of them is wrong
    """
    head = os.pread(fd, SPOOL_LINE, 0)
    if head[:4] == MAGIC_SPOOLED:
        return _check_spooled(fd, qid, head)
    nl = head.find(b"\n", 0, _HEADER_MAX)
    parts = head[:nl].split(b" ") if nl > 0 else []
    if len(parts) != 3 or parts[0] != MAGIC or not (parts[1].isdigit() and parts[2].isdigit()):
        raise CorruptQueueFile(f"qid={qid}: bad header")
    header_len, env_len, msg_len = nl + 1, int(parts[1]), int(parts[2])
    expected, actual = header_len + env_len + 1 + msg_len, os.fstat(fd).st_size
    if actual != expected:
        raise CorruptQueueFile(f"qid={qid}: size {actual}, header says {expected}")
    if os.pread(fd, 1, header_len + env_len) != b"\n":
        raise CorruptQueueFile(f"qid={qid}: no separator after the envelope")
    return Layout(header_len, env_len, ((header_len + env_len + 1, msg_len),))


def _check_spooled(fd: int, qid: str, head: bytes) -> Layout:
    parts = head[: SPOOL_LINE - 1].split()
    if len(head) != SPOOL_LINE or head[-1:] != b"\n" or len(parts) != 7 or not all(p.isdigit() for p in parts[1:]):
        raise CorruptQueueFile(f"qid={qid}: bad header")
    env_off, env_len, head_off, head_len, body_off, body_len = (int(p) for p in parts[1:])
    expected, actual = env_off + env_len + 1, os.fstat(fd).st_size
    if actual != expected:
        raise CorruptQueueFile(f"qid={qid}: size {actual}, header says {expected}")
    for offset, length in ((head_off, head_len), (body_off, body_len)):
        if offset < SPOOL_LINE or offset + length > env_off:
            raise CorruptQueueFile(f"qid={qid}: message extent {offset}+{length} outside the file")
    if os.pread(fd, 1, env_off + env_len) != b"\n":
        raise CorruptQueueFile(f"qid={qid}: no newline after the envelope")
    return Layout(env_off, env_len, ((head_off, head_len), (body_off, body_len)))


def read_envelope(fd: int, qid: str, layout: Layout) -> Envelope:
    """The envelope of the queue file ``fd`` (where :func:`check_fd` found it).

    :raises CorruptQueueFile: when it is too long, is not JSON, or does not fit the schema
    """
    if layout.env_length > _ENVELOPE_MAX:
        raise CorruptQueueFile(f"qid={qid}: envelope of {layout.env_length} octets")
    raw = os.pread(fd, layout.env_length, layout.env_offset)
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
