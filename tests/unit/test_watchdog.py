"""Unit tests for gateway.watchdog: the time limit of SMTP reads, per session or connection."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.watchdog import Watchdog


async def _later(value: str, seconds: float) -> str:
    await asyncio.sleep(seconds)
    return value


def test_a_wait_in_time_returns_its_value_and_the_task_goes_on() -> None:
    async def run() -> list[str]:
        dog = Watchdog()
        got = [await dog.wait(_later(f"line {i}", 0.001), 0.5) for i in range(50)]
        await asyncio.sleep(0.6)  # past every deadline set above: no stray cancellation
        dog.close()
        return got

    assert asyncio.run(run()) == [f"line {i}" for i in range(50)]


def test_a_wait_past_its_time_raises_timeout_and_the_next_wait_works() -> None:
    async def run() -> tuple[float, str]:
        dog = Watchdog()
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await dog.wait(_later("never", 5), 0.2)
        took = time.monotonic() - started
        value = await dog.wait(_later("after", 0.01), 0.5)
        dog.close()
        return took, value

    took, value = asyncio.run(run())
    assert 0.15 <= took < 1.0
    assert value == "after"


def test_a_shorter_wait_after_a_longer_one_times_out_on_its_own_deadline() -> None:
    async def run() -> float:
        dog = Watchdog()
        await dog.wait(_later("quick", 0.001), 30)  # leaves a timer set 30 s ahead
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await dog.wait(_later("never", 5), 0.2)
        dog.close()
        return time.monotonic() - started

    assert 0.15 <= asyncio.run(run()) < 1.0


def test_a_deadline_moved_on_by_later_waits_is_honoured_not_the_first_timer() -> None:
    # Ten waits of 0.05 s each under a 0.3 s limit: the timer first set for the first
    # wait fires while a later one runs, and must not end it.
    async def run() -> list[str]:
        dog = Watchdog()
        got = [await dog.wait(_later(str(i), 0.05), 0.3) for i in range(10)]
        dog.close()
        return got

    assert asyncio.run(run()) == [str(i) for i in range(10)]


def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    async def run() -> None:
        async def session() -> None:
            dog = Watchdog()
            try:
                await dog.wait(_later("never", 5), 10)
            finally:
                dog.close()

        task = asyncio.create_task(session())
        await asyncio.sleep(0.05)
        task.cancel()  # shutdown
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())


def test_one_watchdog_serves_waits_from_one_task_after_another() -> None:
    # A pooled delivery connection: each delivery is its own task.
    async def run() -> tuple[list[str], bool]:
        dog = Watchdog()
        values = [await asyncio.create_task(dog.wait(_later(str(i), 0.01), 0.3)) for i in range(3)]
        try:
            await asyncio.create_task(dog.wait(_later("never", 5), 0.2))
        except TimeoutError:
            timed_out = True
        else:
            timed_out = False
        dog.close()
        return values, timed_out

    assert asyncio.run(run()) == (["0", "1", "2"], True)
