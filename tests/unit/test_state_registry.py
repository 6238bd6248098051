"""Store URLs, key helpers, and one shared store per (event loop, URL)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.state import PluginStores, StateUnavailable, acquire, canonical_url, check_url, release
from gateway.state.keys import client_network, digest, in_networks, window_bucket
from gateway.state.redis import split_timeout
from gateway.policy import parse_network


@pytest.mark.parametrize(
    "url", ["sqlite", "sqlite:state.db", "sqlite:///var/lib/g/state.db", "redis://127.0.0.1:6379/0",
            "rediss://h:6380/1?timeout=0.5", "unix:///run/redis.sock?db=2"]
)
def test_accepted_urls(url: str) -> None:
    check_url(url)


@pytest.mark.parametrize("url", ["", "sqlite:", "postgres://x", "redis://h/0?timeout=0", "memory"])
def test_refused_urls(url: str) -> None:
    with pytest.raises(ValueError):
        check_url(url)


def test_sqlite_urls_resolve_under_var_dir(tmp_path: Path) -> None:
    assert canonical_url("sqlite", tmp_path) == f"sqlite://{tmp_path.resolve()}/state.sqlite3"
    assert canonical_url("sqlite:x/s.db", tmp_path) == f"sqlite://{tmp_path.resolve()}/x/s.db"
    assert canonical_url("sqlite:///abs/s.db", tmp_path) == "sqlite:///abs/s.db"
    assert canonical_url("redis://h:1/0", tmp_path) == "redis://h:1/0"


def test_redis_timeout_parameter_is_ours() -> None:
    assert split_timeout("redis://h:1/0?timeout=2.5&client_name=gw") == ("redis://h:1/0?client_name=gw", 2.5)
    assert split_timeout("redis://h:1/0") == ("redis://h:1/0", 1.0)


def test_client_network_groups_by_prefix() -> None:
    assert client_network("192.0.2.77") == "192.0.2.0/24"
    assert client_network("192.0.2.77", ipv4_prefix=32) == "192.0.2.77/32"
    assert client_network("2001:db8:1:2:aa::1") == "2001:db8:1:2::/64"
    assert client_network("::ffff:198.51.100.9") == "198.51.100.0/24"


def test_in_networks() -> None:
    nets = (parse_network("10.0.0.0/8"), parse_network("2001:db8::/32"))
    assert in_networks("10.1.2.3", nets)
    assert in_networks("2001:db8::5", nets)
    assert not in_networks("192.0.2.1", nets)
    assert not in_networks("not-an-ip", nets)


def test_digest_is_bounded_and_unambiguous() -> None:
    assert len(digest("a" * 5000)) == 32
    assert digest("ab", "c") != digest("a", "bc")
    assert digest("x\r\ny").isalnum()


def test_window_bucket_is_floor_of_now_over_window() -> None:
    assert window_bucket(3599.9, 3600) == 0
    assert window_bucket(3600.0, 3600) == 1
    assert window_bucket(7199.0, 3600) == 1
    with pytest.raises(ValueError):
        window_bucket(1.0, 0)


def test_plugins_on_one_loop_share_one_store_until_the_last_release(tmp_path: Path) -> None:
    async def main() -> None:
        greylist, limits = PluginStores(), PluginStores()
        a = await greylist.open("sqlite", tmp_path)
        b = await limits.open("sqlite:state.sqlite3", tmp_path)  # the same file, spelt otherwise
        assert a is b
        await a.incr("c", 1, 60)
        await greylist.close("sqlite")
        assert greylist.get("sqlite") is None
        assert await b.incr("c", 1, 60) == 2  # still open for the other holder
        await limits.close("sqlite:state.sqlite3")
        with pytest.raises(StateUnavailable):
            await b.get("c")

    asyncio.run(main())


def test_each_event_loop_gets_its_own_store(tmp_path: Path) -> None:
    async def take() -> object:
        store = await acquire("sqlite", tmp_path)
        await release(store)
        return store

    assert asyncio.run(take()) is not asyncio.run(take())


def test_a_plugin_entry_listed_twice_holds_two_references(tmp_path: Path) -> None:
    async def main() -> None:
        stores = PluginStores()
        first = await stores.open("sqlite", tmp_path)
        await stores.open("sqlite", tmp_path)
        await stores.close("sqlite")
        assert stores.get("sqlite") is first
        assert await first.incr("c", 1, 60) == 1
        await stores.close("sqlite")
        assert stores.get("sqlite") is None
        await stores.close("sqlite")  # a surplus shutdown is harmless

    asyncio.run(main())
