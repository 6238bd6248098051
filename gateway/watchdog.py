"""A cheap, re-armable time limit for the waits of one session or connection.

``asyncio.timeout()`` builds a context object and a timer (a heap push, then a cancel)
for every wait, and an SMTP session waits once per command and once per chunk of DATA
(the delivery client once per reply). A :class:`Watchdog` keeps at most one timer per
session or connection: each wait only moves a deadline (one clock read). The timer,
when it fires before the deadline (the deadline moved on since it was set), sets itself
again for the new one; when it fires after the deadline while the task waits, it
cancels the task, and :meth:`Watchdog.wait` turns that cancellation into
:class:`TimeoutError`, as ``asyncio.timeout()`` does. A cancellation
from anywhere else (shutdown) stays a cancellation. Waits may come from different tasks
(a pooled connection serves one delivery after another), one at a time.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, TypeVar

__all__ = ["Watchdog"]

T = TypeVar("T")

#: The loop may run a timer this much before its time (its clock resolution).
_SLACK = 0.001


class Watchdog:
    """Time limits for waits, one at a time, on the event loop that creates it."""

    __slots__ = ("_loop", "_task", "_deadline", "_handle", "_is_expired")

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[Any] | None = None  # the task of the wait running
        self._deadline: float | None = None  # set only while a wait runs
        self._handle: asyncio.TimerHandle | None = None
        self._is_expired = False

    async def wait(self, awaitable: Awaitable[T], seconds: float) -> T:
        """Await ``awaitable`` for at most ``seconds``.

        :raises TimeoutError: when it took longer (the awaitable is cancelled)
        """
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("Watchdog.wait() needs a task")
        self.start(task, seconds)
        try:
            return await awaitable
        except asyncio.CancelledError:
            if self.is_timeout(task):
                raise TimeoutError from None
            raise
        finally:
            self._task, self._deadline = None, None

    def start(self, task: asyncio.Task[Any], seconds: float) -> None:
        """Begin a wait of ``task`` for at most ``seconds``, for a caller that awaits
        itself, without :meth:`wait`'s coroutine (a session's command reads): it must
        turn a cancellation for which :meth:`is_timeout` is true into
        :class:`TimeoutError`, and call :meth:`stop` however the wait ends."""
        deadline = self._loop.time() + seconds
        self._task, self._deadline = task, deadline
        handle = self._handle
        if handle is None or handle.when() > deadline:
            if handle is not None:
                handle.cancel()
            self._handle = self._loop.call_at(deadline, self._fire)

    def stop(self) -> None:
        """The wait begun by :meth:`start` is over."""
        self._task, self._deadline = None, None

    def is_timeout(self, task: asyncio.Task[Any]) -> bool:
        """Whether ``task``'s cancellation, caught during a wait, is this watchdog's
        (and no other cancellation is pending): the wait took too long."""
        if self._is_expired:
            self._is_expired = False
            return task.uncancel() == 0
        return False

    def close(self) -> None:
        """Drop the timer (the session is over)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        deadline, task = self._deadline, self._task
        if deadline is None or task is None:  # not waiting now: the next wait sets a timer
            return
        if self._loop.time() < deadline - _SLACK:  # set for an earlier wait; this one has longer
            self._handle = self._loop.call_at(deadline, self._fire)
            return
        self._is_expired = True
        task.cancel()
