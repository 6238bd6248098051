"""The Redis backend keeps the StateStore contract (the same one the SQLite unit tests check)."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, TypeVar

import pytest

from gateway.state import StateUnavailable
from gateway.state.redis import RedisStore

T = TypeVar("T")


def run(url: str, body: Callable[[RedisStore], Awaitable[T]]) -> T:
    async def main() -> T:
        store = RedisStore(url)
        try:
            await store.open()
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(main())


def test_incr_get_set_delete(redis_url: str, redis_server) -> None:
    async def body(store: RedisStore) -> list[object]:
        out: list[object] = [await store.incr("c", 2, 60), await store.incr("c", -5, 60)]
        out += [await store.get("c"), await store.get("missing")]
        out += [await store.set("k", "v", 60, only_if_absent=True), await store.set("k", "w", 60, only_if_absent=True)]
        out.append(await store.get("k"))
        await store.delete("k")
        out.append(await store.get("k"))
        return out

    assert run(redis_url, body) == [2, -3, "-3", None, True, False, "v", None]


def test_incr_sets_the_expiry_only_when_it_creates_the_key(redis_url: str, redis_server) -> None:
    async def body(store: RedisStore) -> None:
        await store.incr("c", 1, 100)
        await store.incr("c", 1, 5000)  # must not push the expiry out

    run(redis_url, body)
    ttl = int((redis_server.command(b"TTL c") or b":0")[1:])
    assert 0 < ttl <= 100


def test_expired_keys_are_absent(redis_url: str) -> None:
    async def body(store: RedisStore) -> list[object]:
        await store.set("k", "v", 0.05)
        await store.incr("c", 1, 0.05)
        await asyncio.sleep(0.2)
        return [await store.get("k"), await store.incr("c", 1, 60)]

    assert run(redis_url, body) == [None, 1]


def test_stopped_server_raises_state_unavailable_and_recovers_never_hangs(redis_factory) -> None:
    redis = redis_factory()
    url = redis.url

    async def main() -> None:
        store = RedisStore(url)
        try:
            assert await store.incr("c", 1, 60) == 1
            redis.stop()
            with pytest.raises(StateUnavailable):
                await store.get("c")
            with pytest.raises(StateUnavailable):
                await store.incr("c", 1, 60)
        finally:
            await store.close()
        with pytest.raises(StateUnavailable):
            await store.get("c")  # closed

    asyncio.run(main())


def test_password_is_not_in_the_logged_url() -> None:
    store = RedisStore("redis://user:secret@127.0.0.1:1/0")
    assert "secret" not in store.url
    asyncio.run(store.close())


def test_counter_maps(redis_url: str, redis_server) -> None:
    async def body(store: RedisStore) -> list[object]:
        out: list[object] = [await store.incr_field("m", "a", 1, 60), await store.incr_field("m", "a", 2, 60)]
        out.append(await store.incr_field("m", "b", 1, 60))
        out.append(await store.fields("m"))
        out.append(await store.fields("missing"))
        return out

    assert run(redis_url, body) == [1, 3, 1, {"a": 3, "b": 1}, {}]
    ttl = int((redis_server.command(b"PTTL m") or b":0")[1:])
    assert 0 < ttl <= 60_000
