"""The embedded SQLite state store: counters, expiry, only-if-absent, sharing one file."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

import pytest

from gateway.state import StateUnavailable
from gateway.state.sqlite import SqliteStore

T = TypeVar("T")


class Clock:
    """A settable clock for expiry tests."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def run(path: Path, body: Callable[[SqliteStore], Awaitable[T]], clock: Clock | None = None, **kw: Any) -> T:
    async def main() -> T:
        store = SqliteStore(path, clock=clock or Clock(), **kw)
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(main())


def test_incr_counts_from_zero_and_accepts_negative_amounts(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> list[int]:
        return [await store.incr("c", 1, 60), await store.incr("c", 1, 60), await store.incr("c", -3, 60)]

    assert run(tmp_path / "s.db", body) == [1, 2, -1]


def test_incr_expiry_is_set_at_creation_only(tmp_path: Path) -> None:
    clock = Clock()

    async def body(store: SqliteStore) -> list[int]:
        out = [await store.incr("c", 1, 10)]
        clock.now += 8
        out.append(await store.incr("c", 1, 10))  # does not push the expiry out
        clock.now += 3  # 11 s after creation: expired
        out.append(await store.incr("c", 1, 10))
        return out

    assert run(tmp_path / "s.db", body, clock) == [1, 2, 1]


def test_get_set_and_expiry(tmp_path: Path) -> None:
    clock = Clock()

    async def body(store: SqliteStore) -> list[object]:
        out: list[object] = [await store.get("k")]
        out.append(await store.set("k", "v", 5))
        out.append(await store.get("k"))
        clock.now += 5
        out.append(await store.get("k"))
        await store.set("forever", "x")
        clock.now += 10**6
        out.append(await store.get("forever"))
        return out

    assert run(tmp_path / "s.db", body, clock) == [None, True, "v", None, "x"]


def test_only_if_absent_respects_live_keys_but_not_expired_ones(tmp_path: Path) -> None:
    clock = Clock()

    async def body(store: SqliteStore) -> list[object]:
        out: list[object] = [await store.set("k", "first", 10, only_if_absent=True)]
        out.append(await store.set("k", "second", 10, only_if_absent=True))
        out.append(await store.get("k"))
        clock.now += 11
        out.append(await store.set("k", "third", 10, only_if_absent=True))
        out.append(await store.get("k"))
        return out

    assert run(tmp_path / "s.db", body, clock) == [True, False, "first", True, "third"]


def test_delete(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> list[object]:
        await store.set("k", "v")
        await store.delete("k")
        await store.delete("never-there")
        return [await store.get("k")]

    assert run(tmp_path / "s.db", body) == [None]


def test_expired_rows_are_purged_from_the_file(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "s.db"

    async def body(store: SqliteStore) -> None:
        await store.set("old", "v", 1)
        await store.set("keep", "v")
        clock.now += 61  # past the purge interval: the next call sweeps
        await store.get("anything")

    run(path, body, clock, purge_interval=60)
    with sqlite3.connect(path) as conn:
        keys = [row[0] for row in conn.execute("SELECT key FROM state")]
    assert keys == ["keep"]


def test_file_is_in_wal_mode_and_shared_between_stores(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "s.db"

    async def main() -> list[int]:
        a, b = SqliteStore(path), SqliteStore(path)
        try:
            return [await a.incr("c", 1, 60), await b.incr("c", 1, 60), await a.incr("c", 1, 60)]
        finally:
            await a.close()
            await b.close()

    assert asyncio.run(main()) == [1, 2, 3]
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_concurrent_increments_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "s.db"

    async def main() -> int:
        stores = [SqliteStore(path) for _ in range(3)]
        try:
            await asyncio.gather(*(s.incr("c", 1, 60) for s in stores for _ in range(20)))
            value = await stores[0].get("c")
            return int(value or 0)
        finally:
            for s in stores:
                await s.close()

    assert asyncio.run(main()) == 60


def test_stores_opening_a_new_file_together_all_start(tmp_path: Path) -> None:
    """Workers start together and open the same state file: SQLite may refuse the
    switch to WAL at once ("database is locked", about one start in forty with six
    at once here) to one of them; it must try again, not fail the plugin's start-up."""
    import threading

    errors: list[BaseException] = []
    for n in range(100):
        path = tmp_path / f"r{n}.db"
        stores = [SqliteStore(path) for _ in range(6)]
        barrier = threading.Barrier(len(stores))

        def start(store: SqliteStore) -> None:
            barrier.wait()
            try:
                store._connect_in_thread().close()
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(s,)) for s in stores]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert not errors, errors[:3]


def test_calls_do_not_run_on_the_event_loop_thread(tmp_path: Path) -> None:
    seen: list[str] = []

    class Spy(SqliteStore):
        def _get_sync(self, conn: sqlite3.Connection, now: float, key: str) -> str | None:
            seen.append(threading.current_thread().name)
            return super()._get_sync(conn, now, key)

    async def main() -> None:
        store = Spy(tmp_path / "s.db")
        try:
            await store.get("k")
        finally:
            await store.close()
        seen.append(threading.current_thread().name)

    asyncio.run(main())
    assert seen[0].startswith("state-sqlite") and seen[0] != seen[1]


def test_unusable_path_and_closed_store_raise_state_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")

    async def main() -> None:
        store = SqliteStore(blocker / "s.db")
        try:
            with pytest.raises(StateUnavailable):
                await store.open()
        finally:
            await store.close()
        with pytest.raises(StateUnavailable):
            await store.get("k")

    asyncio.run(main())


def test_counter_maps_count_by_name_and_expire_as_one(tmp_path: Path) -> None:
    clock = Clock()

    async def body(store: SqliteStore) -> list[object]:
        out: list[object] = [await store.incr_field("m", "a", 1, 10), await store.incr_field("m", "a", 2, 10)]
        out.append(await store.incr_field("m", "b", 1, 10))
        out.append(await store.fields("m"))
        out.append(await store.fields("other"))
        clock.now += 8
        await store.incr_field("m", "c", 1, 10)  # keeps the map's expiry
        clock.now += 3
        out.append(await store.fields("m"))
        out.append(await store.incr_field("m", "a", 1, 10))  # a new map
        await store.delete("m")
        out.append(await store.fields("m"))
        return out

    assert run(tmp_path / "s.db", body, clock) == [1, 3, 1, {"a": 3, "b": 1}, {}, {}, 1, {}]


def test_counter_maps_are_shared_by_two_stores_on_one_file(tmp_path: Path) -> None:
    async def main() -> dict[str, int]:
        one, two = SqliteStore(tmp_path / "s.db"), SqliteStore(tmp_path / "s.db")
        try:
            await asyncio.gather(*(s.incr_field("m", "x", 1, 60) for s in (one, two) for _ in range(20)))
            return await two.fields("m")
        finally:
            await one.close()
            await two.close()

    assert asyncio.run(main()) == {"x": 40}
