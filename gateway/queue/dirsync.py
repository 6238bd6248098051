"""Grouped directory fsyncs for the queue store's own writers (state updates, removals).

Every :meth:`QueueStore.update_state` and :meth:`QueueStore.remove` ends with an fsync of
the directory it changed, and the scheduler calls them from many executor threads at
once. :class:`DirSync` lets those callers share the fsyncs: a caller that has made its
change (rename, unlink) calls :meth:`DirSync.sync`; if no fsync of the directory is
running it starts one at once, otherwise it joins the next one, which starts as soon as
the running one ends and covers every caller that joined meanwhile. An fsync that starts
after a caller's change makes that change durable, so each caller still returns only
once its own change is on stable storage, or raises if the fsync that covered it failed.
A lone caller waits for nothing: no timer, no extra thread.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

__all__ = ["DirSync"]


class _Round:
    """One fsync of the directory and the callers it covers."""

    __slots__ = ("error", "is_done")

    def __init__(self) -> None:
        self.is_done = False
        self.error: BaseException | None = None


class DirSync:
    """Shares the fsyncs of one directory among the threads that changed it.

    :param path: the directory
    :param fsync_dir: does one fsync of a directory (looked up per call by the caller's
        wrapper, so fault injection on the store's ``fsync_dir`` reaches it)
    """

    def __init__(self, path: Path, fsync_dir: Callable[[Path], None]) -> None:
        self.path = path
        self._fsync_dir = fsync_dir
        self._cond = threading.Condition()
        self._next: _Round | None = None  # the round not started yet, which new callers join
        self._is_running = False

    def sync(self) -> None:
        """Return once an fsync of the directory that started after this call succeeded.

        :raises OSError: the error of the fsync that covered this call (a copy per caller)
        """
        with self._cond:
            mine = self._next
            if mine is None:
                mine = self._next = _Round()
            while not mine.is_done and self._is_running:
                self._cond.wait()
            if not mine.is_done:
                # Nothing running and our round not started (a started round is running
                # until it is done): this thread does it for everyone who joined.
                self._next = None
                self._is_running = True
                is_leader = True
            else:
                is_leader = False
        if is_leader:
            try:
                self._fsync_dir(self.path)
            except BaseException as exc:  # recorded for every caller of the round
                mine.error = exc
            finally:
                with self._cond:
                    mine.is_done = True
                    self._is_running = False
                    self._cond.notify_all()
        error = mine.error
        if error is None:
            return
        if isinstance(error, OSError):
            raise OSError(error.errno, f"fsync of {self.path} failed: {error.strerror or error}") from error
        raise RuntimeError(f"fsync of {self.path} failed: {error!r}") from error
