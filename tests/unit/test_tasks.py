"""gateway.tasks.cancel_and_wait: a background task whose loop lost one cancellation (as
Python 3.11's asyncio.timeout can lose one that meets its own deadline) still stops."""

from __future__ import annotations

import asyncio

from gateway.tasks import cancel_and_wait


def test_a_task_that_swallows_one_cancellation_still_stops() -> None:
    passes: list[int] = []

    async def loop_forever() -> None:  # a refresh loop whose work ate the first cancel
        swallowed = False
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed = True
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
            passes.append(1)

    async def main() -> bool:
        task = asyncio.create_task(loop_forever())
        await asyncio.sleep(0.05)
        await asyncio.wait_for(cancel_and_wait(task, "test"), 10)
        return task.done()

    assert asyncio.run(main())

