"""Recovery at start-up: what a crash or a damaged disk can leave in a queue, and
what :meth:`gateway.queue.store.QueueStore.open` does with it.

- ``tmp/`` holds only unfinished writes: emptied.
- A message file that does not check out (header, lengths, envelope; see
  :mod:`gateway.queue.damage`) goes to ``corrupt/`` with its state file.
- A state file whose message is gone is garbage (``remove()`` unlinks the message
  first): deleted. A state file that does not parse goes to ``corrupt/`` with its
  message, since without it a recipient could be delivered twice.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from gateway.queue.committer import fsync_dir
from gateway.queue.damage import QID_RE, CorruptQueueFile, check_fd, read_envelope

__all__ = ["clear_tmp", "verify_area", "verify_states"]

log = logging.getLogger("gateway.queue.store")

#: ``move_aside(qid, files, reason)``: the store's way to set damaged files aside.
MoveAside = Callable[[str, list[Path], str], None]


def clear_tmp(tmp: Path) -> None:
    """Remove every unfinished temporary file (and directory) in ``tmp``."""
    for entry in os.scandir(tmp):
        log.debug("removing unfinished temporary file %s", entry.name)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


def verify_area(root: Path, area: str, move_aside: MoveAside) -> set[str]:
    """The queue ids of ``root/area`` whose files check out; the others are set aside."""
    good: set[str] = set()
    for entry in os.scandir(root / area):
        try:
            if not (QID_RE.fullmatch(entry.name) and entry.is_file(follow_symlinks=False)):
                raise CorruptQueueFile(f"{entry.name!r} is not a queue file")
            fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                read_envelope(fd, entry.name, check_fd(fd, entry.name))
            finally:
                os.close(fd)
        except (CorruptQueueFile, OSError) as exc:
            files = [Path(entry.path)]
            if QID_RE.fullmatch(entry.name) and (root / "state" / entry.name).exists():
                files.append(root / "state" / entry.name)  # they stay together
            move_aside(entry.name, files, str(exc))
        else:
            good.add(entry.name)
    return good


def verify_states(
    root: Path, found: dict[str, set[str]],
    read_state: Callable[[str], Any], move_aside: MoveAside,
) -> None:
    """Delete state files without a message; set aside those that do not parse, with
    their message (removed from ``found``)."""
    is_changed = False
    for entry in os.scandir(root / "state"):
        qid = entry.name
        area = next((a for a, qids in found.items() if qid in qids), None)
        if area is None:  # remove() unlinks the message first: this is garbage
            log.warning("removing state file without a message qid=%s", qid)
            os.unlink(entry.path)
            is_changed = True
            continue
        try:
            read_state(qid)
        except (CorruptQueueFile, OSError) as exc:
            # Without its state we could deliver twice: leave both to a human.
            move_aside(qid, [root / area / qid, Path(entry.path)], str(exc))
            found[area].discard(qid)
    if is_changed:
        fsync_dir(root / "state")
