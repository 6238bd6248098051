"""The gateway's thread pool: blocking calls off the event loop, bounded, cancellable."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from gateway.threads import ThreadPool


@pytest.fixture
def pool():
    pool = ThreadPool(max_workers=2, thread_name_prefix="test-pool")
    yield pool
    pool.shutdown(wait=True, cancel_futures=True)


def test_a_call_runs_on_a_pool_thread_and_its_result_or_error_comes_back(pool):
    async def scenario():
        loop_thread = threading.get_ident()
        assert await pool.run(threading.get_ident) != loop_thread
        assert await pool.run(sum, [1, 2, 3]) == 6
        with pytest.raises(ZeroDivisionError):
            await pool.run(divmod, 1, 0)
        # StopIteration cannot travel through a future; it arrives as a RuntimeError.
        with pytest.raises(RuntimeError, match="StopIteration"):
            await pool.run(next, iter(()))

    asyncio.run(scenario())


def test_a_slow_call_does_not_stall_the_event_loop(pool):
    async def scenario():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        await pool.run(time.sleep, 0.3)
        task.cancel()
        assert ticks >= 10

    asyncio.run(scenario())


def test_no_more_calls_run_at_once_than_the_bound(pool):
    async def scenario():
        running = peak = 0
        lock = threading.Lock()

        def work(n):
            nonlocal running, peak
            with lock:
                running += 1
                peak = max(peak, running)
            time.sleep(0.05)
            with lock:
                running -= 1
            return n * n

        assert await asyncio.gather(*(pool.run(work, n) for n in range(8))) == [n * n for n in range(8)]
        assert peak == 2
        assert len({t.name for t in threading.enumerate() if t.name.startswith("test-pool")}) == 2

    asyncio.run(scenario())


def test_calls_finished_while_the_loop_is_busy_all_reach_it(pool):
    async def scenario():
        calls = [asyncio.ensure_future(pool.run(lambda n=n: n)) for n in range(50)]
        time.sleep(0.2)  # the loop is blocked while the threads finish every call
        assert await asyncio.wait_for(asyncio.gather(*calls), 10) == list(range(50))

    asyncio.run(scenario())


def test_a_caller_cancelled_before_its_call_started_never_runs_it():
    async def scenario():
        pool = ThreadPool(max_workers=1)
        release = threading.Event()
        ran = []
        try:
            first = asyncio.ensure_future(pool.run(release.wait, 5))
            await asyncio.sleep(0.05)  # the only thread is busy with the first call
            second = asyncio.ensure_future(pool.run(ran.append, "second"))
            await asyncio.sleep(0)
            second.cancel()
            release.set()
            assert await first is True
            assert await pool.run(ran.append, "third") is None
            assert ran == ["third"]
            with pytest.raises(asyncio.CancelledError):
                await second
        finally:
            pool.shutdown(wait=True)

    asyncio.run(scenario())


def test_it_serves_run_in_executor_and_shuts_down_cleanly():
    async def scenario():
        pool = ThreadPool(max_workers=1)
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(pool, pow, 2, 10) == 1024
        assert pool.submit(pow, 3, 2).result(timeout=5) == 9
        release = threading.Event()
        busy = pool.submit(release.wait, 5)
        queued = pool.submit(pow, 2, 2)
        deadline = time.monotonic() + 5
        while not busy.running() and time.monotonic() < deadline:
            time.sleep(0.01)
        threading.Timer(0.1, release.set).start()
        pool.shutdown(wait=True, cancel_futures=True)
        assert busy.result() is True  # what was running finished
        assert queued.cancelled()  # what was waiting was cancelled
        with pytest.raises(RuntimeError):
            pool.submit(pow, 2, 2)

    asyncio.run(scenario())
