"""How long one Dovecot password check and one userdb lookup take from the gateway.

    .venv/bin/python bench/dovecot_auth.py [-n 500] [-c 20]

Starts a private Dovecot (the test suite's configuration, in a temporary directory,
Unix sockets only) and times ``plugins._dovecot.authenticate`` and ``lookup_user``:
each call opens its own connection, does the handshake, asks and closes, which is what
the plugins do. Prints the median and 90th percentile of one request done alone, and
the requests per second with ``-c`` of them in flight at once.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Awaitable, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plugins._dovecot import authenticate, lookup_user  # noqa: E402
from tests.integration.dovecot.conftest import USERS, start_dovecot  # noqa: E402


async def _time(call: Callable[[], Awaitable[object]], count: int, concurrency: int) -> tuple[list[float], float]:
    alone = []
    for _ in range(count):
        started = time.perf_counter()
        await call()
        alone.append(time.perf_counter() - started)
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with gate:
            await call()

    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(count):
            group.create_task(one())
    return alone, count / (time.perf_counter() - started)


def _report(name: str, alone: list[float], rate: float, concurrency: int) -> None:
    alone.sort()
    p90 = alone[int(len(alone) * 0.9)]
    print(f"{name:8} alone: median {statistics.median(alone) * 1000:.2f} ms, p90 {p90 * 1000:.2f} ms;"
          f" {concurrency} at once: {rate:.0f} requests/s")


async def main(count: int, concurrency: int, root: Path) -> None:
    dovecot = start_dovecot(root)
    try:
        password = USERS["alice@local.example"]

        async def auth() -> None:
            answer = await authenticate(dovecot.auth_socket, "alice@local.example", password, remote_ip="127.0.0.1")
            assert answer.ok

        async def lookup() -> None:
            assert await lookup_user(dovecot.userdb_socket, "alice@local.example") is not None

        for name, call in (("AUTH", auth), ("USER", lookup)):
            alone, rate = await _time(call, count, concurrency)
            _report(name, alone, rate, concurrency)
    finally:
        dovecot.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=500, help="requests per measurement")
    parser.add_argument("-c", type=int, default=20, help="requests in flight at once")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-dovecot-") as tmp:
        asyncio.run(main(args.n, args.c, Path(tmp)))
