"""The services a running gateway hands to its parts and plugins.

A :class:`Gateway` is immutable and tied to one policy generation: a reload builds a
new one (sharing the queue and the thread pool), and sessions that began under the
old policy finish under it.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, TypeVar

from gateway.threads import ThreadPool

if TYPE_CHECKING:
    from gateway.content import Content
    from gateway.hooks import HookRunner
    from gateway.model import Envelope
    from gateway.policy import Policy
    from gateway.queue import Claim, QueueStore

__all__ = ["AtOnce", "Gateway"]

T = TypeVar("T")


@dataclass(frozen=True)
class AtOnce:
    """Delivery at once: a message not yet queued that is plain deliveries (local
    Maildirs, one relay transaction) is delivered before the SMTP reply
    (:class:`gateway.delivery.scheduler.Scheduler`)."""

    eligible: Callable[[Envelope], bool]
    """A cheap first look (no hook, no I/O): could this envelope be delivered at once?"""
    deliver: Callable[[str, Envelope, Content, Callable[[], None]], Awaitable[bool]]
    """``(qid, envelope, message, announce)``: True when delivered (``announce`` was
    called just before the delivery was recorded) and the message need not be queued.
    False: queue it; what an attempt at once did (a relay the host answered, Maildirs
    written) is left to the first queued attempt, which records it instead of trying
    again."""
    forget: Callable[[str], None]
    """``(qid)``: the message was not queued after all (its commit failed): drop what
    its attempt left for the queued one."""


@dataclass(frozen=True)
class Gateway:
    """Policy, hook runner, queue and bounded thread pool of one policy generation."""

    policy: Policy
    runner: HookRunner
    queue: QueueStore
    executor: Executor
    hostname: str
    started: float = field(default_factory=time.time)
    resolver: Any = field(default=None, repr=False)
    """The shared asynchronous DNS resolver (``dns.asyncresolver.Resolver``, see :mod:`gateway.dns`)."""
    notify_queued: Callable[[str], None] = field(default=lambda qid: None, repr=False)
    """Called with the queue id of each message committed to the queue (wakes the scheduler)."""
    take_claim: Callable[[Claim], None] | None = field(default=None, repr=False)
    """When set, a message the SMTP front end commits to ``msg/`` is claimed
    (:meth:`QueueStore.commit` with ``claim=True``) and handed here instead of to
    :attr:`notify_queued`: this process's scheduler delivers it from memory."""
    at_once: AtOnce | None = field(default=None, repr=False)
    """Delivery at once (``[delivery] at_once``, docs/queue.md), when on."""
    counters: Any = field(default=None, repr=False)
    """Event counters for the metrics endpoint (:class:`gateway.metrics.Counters`)."""
    is_worker: bool = False
    """This process is one of the master's workers (``[server] workers`` above 1). A
    periodic job that one process of a node does for all (sending reports) is left to
    the master and single processes."""

    async def run_in_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking call (pyspf, dkimpy, clamd, password hashing) in the bounded pool.

        The pool is shared by all sessions, so one slow library call never stalls the
        event loop, and many never grow threads without bound. The call runs in a copy of
        the caller's context, as with :func:`asyncio.to_thread`: the session's log ids and
        capture (:data:`gateway.dns.DNS_TAP`, so SPF's lookups are recorded) go along,
        and what the call sets stays in its copy.
        """
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        if isinstance(self.executor, ThreadPool):
            return await self.executor.run(call)
        return await asyncio.get_running_loop().run_in_executor(self.executor, call)
