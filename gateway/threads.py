"""The gateway's bounded thread pool, built for handing work over from event loops.

Blocking calls (pyspf, dkimpy, clamd, password hashing, file I/O for deliveries) run on
these threads so that no event loop ever waits on them. :class:`ThreadPool` is a
:class:`concurrent.futures.Executor` (``loop.run_in_executor`` and ``submit`` work as
with the standard pool), and :meth:`ThreadPool.run` is the cheaper way in from a
coroutine:

- the caller's result comes back on an asyncio future of its own loop, without a
  concurrent future in between and the callbacks that chain the two;
- results finished while a loop is busy reach it together, in one wake-up
  (``call_soon_threadsafe``) instead of one each;
- whether an idle thread is waiting is a counter under a plain lock, not a semaphore
  made of a condition variable.

On a loaded gateway each of those was a measurable share of a local delivery's cost
(``bench/README.md``).
"""

from __future__ import annotations

import asyncio
import functools
import queue
import threading
from concurrent.futures import Executor, Future
from typing import Any, Callable, TypeVar

__all__ = ["ThreadPool"]

T = TypeVar("T")

# A unit of work: the call, and where its outcome goes (an asyncio future and its loop,
# or a concurrent future and None).
_Item = tuple[Callable[[], Any], "asyncio.Future[Any] | Future[Any]", "asyncio.AbstractEventLoop | None"]


class ThreadPool(Executor):
    """At most ``max_workers`` threads, started as work needs them and kept until
    :meth:`shutdown`.

    :param max_workers: the bound on threads
    :param thread_name_prefix: the threads are called ``<prefix>_<n>``
    """

    def __init__(self, max_workers: int, thread_name_prefix: str = "pool") -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self._max_workers = max_workers
        self._prefix = thread_name_prefix
        self._work: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards everything below
        self._threads: list[threading.Thread] = []
        self._idle = 0  # threads waiting for work that no submitted item has claimed
        self._finished: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
        self._is_shut = False

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on a pool thread and return its result (or raise its error).

        Cancelling the caller before a thread has taken the call means it never runs;
        once running, it runs to its end and its result is dropped.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._put((functools.partial(fn, *args) if args else fn, future, loop))
        return await future

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """:meth:`concurrent.futures.Executor.submit` (what ``run_in_executor`` calls)."""
        future: Future[T] = Future()
        self._put((functools.partial(fn, *args, **kwargs), future, None))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the threads once the work already queued is done (with
        ``cancel_futures``: once what they are running is done; the rest is cancelled)."""
        with self._lock:
            self._is_shut = True
            threads = list(self._threads)
        if cancel_futures:
            while True:
                try:
                    item = self._work.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    _cancel(item)
        for _ in threads:
            self._work.put(None)
        if wait:
            for thread in threads:
                thread.join()

    def _put(self, item: _Item) -> None:
        with self._lock:
            if self._is_shut:
                raise RuntimeError("cannot schedule new work after shutdown")
            if self._idle:
                self._idle -= 1  # that thread will take this item
                thread = None
            elif len(self._threads) < self._max_workers:
                thread = threading.Thread(
                    target=self._serve, name=f"{self._prefix}_{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
            else:
                thread = None  # every thread is busy: the item waits for the first free one
            self._work.put(item)
        if thread is not None:
            thread.start()

    def _serve(self) -> None:
        """A pool thread: run items until told to stop."""
        work = self._work
        while True:
            item = work.get()
            if item is None:
                return
            call, future, loop = item
            if loop is None:
                assert isinstance(future, Future)
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(call())
                    except BaseException as exc:  # boundary: the caller gets it
                        future.set_exception(exc)
            elif not future.cancelled():  # a cancelled caller's call is not started
                assert isinstance(future, asyncio.Future)
                try:
                    outcome = (future, True, call())
                except BaseException as exc:  # boundary: the caller gets it
                    outcome = (future, False, exc)
                self._finish(loop, outcome)
            with self._lock:
                self._idle += 1

    def _finish(self, loop: asyncio.AbstractEventLoop, outcome: tuple[asyncio.Future[Any], bool, Any]) -> None:
        """Hand an outcome to its loop: the first one waiting there wakes the loop, the
        others ride along."""
        with self._lock:
            waiting = self._finished.setdefault(loop, [])
            waiting.append(outcome)
            is_first = len(waiting) == 1
        if is_first:
            try:
                loop.call_soon_threadsafe(self._report, loop)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                with self._lock:
                    self._finished.pop(loop, None)

    def _report(self, loop: asyncio.AbstractEventLoop) -> None:
        """On ``loop``: settle every future finished for it since the last report."""
        with self._lock:
            outcomes = self._finished.pop(loop, ())
        for future, is_ok, value in outcomes:
            if future.cancelled():
                continue
            if is_ok:
                future.set_result(value)
            elif isinstance(value, StopIteration):  # a future refuses it
                future.set_exception(RuntimeError(f"StopIteration in a pool thread: {value!r}"))
            else:
                future.set_exception(value)


def _cancel(item: _Item) -> None:
    """Cancel a queued item's future, on its loop when it has one."""
    _, future, loop = item
    if loop is None:
        future.cancel()
        return
    try:
        loop.call_soon_threadsafe(future.cancel)
    except RuntimeError:
        pass
