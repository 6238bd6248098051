"""Which store a plugin's ``state`` setting names, shared by every plugin of one gateway.

Plugins name their store with a URL-like setting:

- ``"sqlite"``: the embedded default, ``<server.var_dir>/state.sqlite3``;
- ``"sqlite:relative/file.db"`` (under ``var_dir``) or ``"sqlite:///absolute/file.db"``;
- ``"redis://host:port/db"``, ``"rediss://..."``, ``"unix:///path/redis.sock?db=0"``,
  each optionally with ``timeout=<seconds>`` in the query.

Sharing: greylisting and rate limits on one node should use one SQLite connection (one
writer thread, no lock contention between them) and one Redis connection pool. So stores
are reference-counted per (event loop, canonical URL): each plugin ``acquire``\\ s in
``gateway_startup`` and ``release``\\ s in ``gateway_shutdown``, and the last release
closes the store. Keying by the running event loop keeps two gateways in one process
(tests do this) apart, since a ``redis.asyncio`` client belongs to one loop; it also
lets a policy reload hand the open store to the new generation, because the new
plugins acquire before the old ones release.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from gateway.state.store import StateStore, StateUnavailable

__all__ = ["PluginStores", "acquire", "canonical_url", "check_url", "create_store", "release"]

log = logging.getLogger(__name__)

_SQLITE_DEFAULT_FILE = "state.sqlite3"
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def check_url(url: str) -> None:
    """Refuse a ``state`` value no backend understands (called when the policy loads).

    :param url: the setting's value
    :raises ValueError: naming the accepted forms
    """
    if url == "sqlite" or url.startswith("sqlite:"):
        if url.startswith("sqlite:") and not url[len("sqlite:") :].strip("/"):
            raise ValueError(f"state {url!r}: no file name after 'sqlite:'")
        return
    if url.startswith(_REDIS_SCHEMES):
        from gateway.state.redis import split_timeout

        split_timeout(url)
        return
    raise ValueError(
        f"state {url!r}: expected 'sqlite', 'sqlite:<file>', 'redis://host:port/db',"
        " 'rediss://...' or 'unix:///path'"
    )


def canonical_url(url: str, var_dir: Path) -> str:
    """``url`` with SQLite paths made absolute, so equal files compare equal.

    :param url: the setting's value
    :param var_dir: the policy's ``server.var_dir``
    """
    check_url(url)
    if url == "sqlite":
        return f"sqlite://{(Path(var_dir) / _SQLITE_DEFAULT_FILE).resolve()}"
    if url.startswith("sqlite:"):
        rest = url[len("sqlite:") :]
        path = Path(rest[2:] if rest.startswith("//") else rest)
        if not path.is_absolute():
            path = Path(var_dir) / path
        return f"sqlite://{path.resolve()}"
    return url


def create_store(canonical: str) -> StateStore:
    """A new, unopened store for a canonical URL (see :func:`canonical_url`)."""
    if canonical.startswith("sqlite://"):
        from gateway.state.sqlite import SqliteStore

        return SqliteStore(Path(canonical[len("sqlite://") :]))
    from gateway.state.redis import RedisStore

    try:
        return RedisStore(canonical)
    except ImportError as exc:
        raise RuntimeError(f"state {canonical!r} needs redis-py: pip install redis") from exc


@dataclass
class _Entry:
    store: StateStore
    refs: int


_entries: dict[tuple[asyncio.AbstractEventLoop, str], _Entry] = {}


async def acquire(url: str, var_dir: Path) -> StateStore:
    """The store ``url`` names on this event loop, opened on first use.

    :param url: the ``state`` setting
    :param var_dir: the policy's ``server.var_dir``, for SQLite files
    :raises ValueError: malformed URL
    :raises StateUnavailable: an SQLite file cannot be opened (a Redis server that is
        down is not an error: it may come up later, and each call then reports it)
    """
    key = (asyncio.get_running_loop(), canonical_url(url, var_dir))
    entry = _entries.get(key)
    if entry is not None:
        entry.refs += 1
        return entry.store
    store = create_store(key[1])
    # Registered before the first await, so a concurrent acquire shares this store.
    _entries[key] = entry = _Entry(store, 1)
    try:
        await store.open()
    except BaseException:
        entry.refs -= 1
        if entry.refs == 0:
            _entries.pop(key, None)
            await store.close()
        raise
    log.info("state store %s opened", store.url)
    return store


async def release(store: StateStore) -> None:
    """Give back one :func:`acquire`; the last one closes the store.

    :param store: a store :func:`acquire` returned
    """
    for key, entry in list(_entries.items()):
        if entry.store is store:
            entry.refs -= 1
            if entry.refs > 0:
                return
            del _entries[key]
            break
    await store.close()
    log.info("state store %s closed", store.url)


class PluginStores:
    """The stores one plugin instance holds, by its ``state`` setting.

    ``gateway_startup`` calls :meth:`open` and ``gateway_shutdown`` :meth:`close` with the
    entry's setting (once per chain entry, so possibly twice for one URL); the other hooks
    look the store up with :meth:`get`, which is ``None`` after shutdown or for a URL only
    an override names (overrides are not meant to move a plugin's state).
    """

    def __init__(self) -> None:
        self._held: dict[str, list[StateStore]] = {}

    async def open(self, url: str, var_dir: Path) -> StateStore:
        """Acquire the store ``url`` names and remember it under ``url``."""
        store = await acquire(url, var_dir)
        self._held.setdefault(url, []).append(store)
        return store

    def get(self, url: str) -> StateStore | None:
        """The store held under ``url``, if any."""
        held = self._held.get(url)
        return held[-1] if held else None

    def require(self, url: str) -> StateStore:
        """The store held under ``url``, for a hook that needs it.

        :raises StateUnavailable: none is held (after shutdown, or a URL only an
            override names): the plugin's ``on_state_error`` answer applies
        """
        store = self.get(url)
        if store is None:
            raise StateUnavailable(f"state store {url!r} is not open")
        return store

    async def close(self, url: str) -> None:
        """Release one :meth:`open` of ``url``; nothing if none is held."""
        held = self._held.get(url)
        if not held:
            return
        store = held.pop()
        if not held:
            del self._held[url]
        await release(store)
