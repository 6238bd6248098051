"""Stopping a background task without waiting forever: :func:`cancel_and_wait`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

__all__ = ["cancel_and_wait"]

log = logging.getLogger(__name__)


async def cancel_and_wait(task: asyncio.Task[Any], what: str) -> None:
    """Cancel ``task`` and wait for it, asking again if a cancellation is lost (Python
    3.11's ``asyncio.timeout`` turns a cancellation that meets its own deadline into a
    TimeoutError, which the task then handles like any timeout and goes on); never wait
    forever: after ten tries a second apart the task is left, with a WARNING."""
    for _ in range(10):
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=1.0)
        if done:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                task.result()
            return
    log.warning("%s task did not stop; left behind", what)
