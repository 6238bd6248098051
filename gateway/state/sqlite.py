"""Embedded state store: one SQLite file, driven from one dedicated thread.

The default backend (``state = "sqlite"``): no server to run, state survives restarts,
and every process on the host that names the same file shares it. It is not shared
between hosts; use :mod:`gateway.state.redis` for several nodes.

Threading: ``sqlite3`` calls block (disk I/O, lock waits), so none runs on the event
loop. Each store owns a single-thread executor that also owns the connection, which
serialises the calls of all plugins on this node without any further locking and keeps
the connection in the thread that created it (``check_same_thread``).

Durability: WAL mode (readers never wait for the writer; several processes may share
the file) with ``synchronous=NORMAL``, which survives a process crash and may lose the
last transactions on power loss: counters and greylist entries are cheap to re-learn.

Expiry: each row has an absolute ``expires`` time. Reads treat an expired row as absent
(lazy expiry); at most every ``purge_interval`` seconds a call first deletes all expired
rows, so the file does not grow with triplets nobody retries.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, TypeVar

from gateway.state.store import StateStore, StateUnavailable

__all__ = ["SqliteStore"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS state ("
    " key TEXT PRIMARY KEY, value TEXT NOT NULL, expires REAL) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS state_expires ON state (expires)",
    # Counter maps: one row per (map, counter); the map's expiry is on every row.
    "CREATE TABLE IF NOT EXISTS counter_map ("
    " key TEXT NOT NULL, name TEXT NOT NULL, value INTEGER NOT NULL, expires REAL,"
    " PRIMARY KEY (key, name)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS counter_map_expires ON counter_map (expires)",
)
_LIVE = "(expires IS NULL OR expires > ?)"


class SqliteStore(StateStore):
    """A :class:`StateStore` in a SQLite file.

    :param path: the database file; its directory is created if missing
    :param timeout: longest wait for one call, lock waits included (seconds)
    :param purge_interval: seconds between sweeps of expired rows
    :param clock: the time source (seconds since the epoch); tests pass a fake one
    """

    def __init__(
        self,
        path: Path,
        *,
        timeout: float = 2.0,
        purge_interval: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.url = f"sqlite://{self.path}"
        self.timeout = timeout
        self.purge_interval = purge_interval
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state-sqlite")
        self._closed = False
        # Touched only inside the executor's thread.
        self._conn: sqlite3.Connection | None = None
        self._next_purge = 0.0

    # -- plumbing: everything below _run executes in the store's thread ----------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise StateUnavailable(f"{self.url}: store is closed")
        loop = asyncio.get_running_loop()
        call = functools.partial(self._call_in_thread, fn, *args)
        try:
            async with asyncio.timeout(self.timeout):
                return await loop.run_in_executor(self._executor, call)
        except TimeoutError as exc:
            raise StateUnavailable(f"{self.url}: no answer within {self.timeout:g}s") from exc
        except RuntimeError as exc:  # executor shut down by a concurrent close()
            raise StateUnavailable(f"{self.url}: {exc}") from exc

    def _call_in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            conn = self._connect_in_thread()
            now = self._clock()
            if now >= self._next_purge:
                self._next_purge = now + self.purge_interval
                self._purge_in_thread(conn, now)
            return fn(conn, now, *args)
        except (sqlite3.Error, OSError) as exc:
            raise StateUnavailable(f"{self.url}: {exc}") from exc

    def _purge_in_thread(self, conn: sqlite3.Connection, now: float) -> None:
        """Delete expired rows; housekeeping, so a busy file only postpones it."""
        try:
            purged = conn.execute(
                "DELETE FROM state WHERE expires IS NOT NULL AND expires <= ?", (now,)
            ).rowcount
            purged += conn.execute(
                "DELETE FROM counter_map WHERE expires IS NOT NULL AND expires <= ?", (now,)
            ).rowcount
        except sqlite3.OperationalError as exc:  # locked by another process: next time
            log.debug("purge of %s postponed: %s", self.path, exc)
            return
        if purged:
            log.debug("purged %d expired keys from %s", purged, self.path)

    def _connect_in_thread(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a
            # read-modify-write takes the write lock first and cannot interleave with
            # another process's (no lost counter updates).
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
            try:
                self._set_up(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _set_up(self, conn: sqlite3.Connection) -> None:
        """WAL mode and the schema. Processes starting together (workers, several
        gateways on one file) can make SQLite refuse the journal-mode switch at once with
        "database is locked", without waiting (it would deadlock otherwise); the set-up
        is idempotent, so it is tried again until ``timeout``. Runs in the store's own
        thread, like every call on the connection: the pauses never hold the event loop."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                for statement in _SCHEMA:
                    conn.execute(statement)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)

    @staticmethod
    def _transaction(conn: sqlite3.Connection, fn: Callable[[], T]) -> T:
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn()
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    # -- the operations (run in the thread) ------------------------------------

    def _incr_sync(self, conn: sqlite3.Connection, now: float, key: str, amount: int, ttl: float) -> int:
        def body() -> int:
            row = conn.execute(
                f"SELECT value FROM state WHERE key = ? AND {_LIVE}", (key, now)
            ).fetchone()
            if row is None:
                value = amount
                conn.execute(
                    "INSERT OR REPLACE INTO state (key, value, expires) VALUES (?, ?, ?)",
                    (key, str(value), now + ttl),
                )
            else:
                value = int(row[0]) + amount
                conn.execute("UPDATE state SET value = ? WHERE key = ?", (str(value), key))
            return value

        return self._transaction(conn, body)

    def _get_sync(self, conn: sqlite3.Connection, now: float, key: str) -> str | None:
        row = conn.execute(f"SELECT value FROM state WHERE key = ? AND {_LIVE}", (key, now)).fetchone()
        return None if row is None else str(row[0])

    def _set_sync(
        self, conn: sqlite3.Connection, now: float, key: str, value: str, ttl: float | None, only_if_absent: bool
    ) -> bool:
        expires = None if ttl is None else now + ttl

        def body() -> bool:
            if only_if_absent:
                live = conn.execute(f"SELECT 1 FROM state WHERE key = ? AND {_LIVE}", (key, now)).fetchone()
                if live is not None:
                    return False
            conn.execute(
                "INSERT OR REPLACE INTO state (key, value, expires) VALUES (?, ?, ?)",
                (key, value, expires),
            )
            return True

        return self._transaction(conn, body)

    def _delete_sync(self, conn: sqlite3.Connection, now: float, key: str) -> None:
        conn.execute("DELETE FROM state WHERE key = ?", (key,))
        conn.execute("DELETE FROM counter_map WHERE key = ?", (key,))

    def _incr_field_sync(
        self, conn: sqlite3.Connection, now: float, key: str, name: str, amount: int, ttl: float
    ) -> int:
        def body() -> int:
            # The map's expiry: that of its live rows, or a new one when it has none.
            row = conn.execute(
                f"SELECT expires FROM counter_map WHERE key = ? AND {_LIVE} LIMIT 1", (key, now)
            ).fetchone()
            if row is None:
                conn.execute("DELETE FROM counter_map WHERE key = ?", (key,))  # expired rows
                expires = now + ttl
            else:
                expires = row[0]
            conn.execute(
                "INSERT INTO counter_map (key, name, value, expires) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (key, name) DO UPDATE SET value = value + excluded.value",
                (key, name, amount, expires),
            )
            found = conn.execute(
                "SELECT value FROM counter_map WHERE key = ? AND name = ?", (key, name)
            ).fetchone()
            return int(found[0])

        return self._transaction(conn, body)

    def _fields_sync(self, conn: sqlite3.Connection, now: float, key: str) -> dict[str, int]:
        rows = conn.execute(
            f"SELECT name, value FROM counter_map WHERE key = ? AND {_LIVE}", (key, now)
        ).fetchall()
        return {str(name): int(value) for name, value in rows}

    def _close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- the StateStore interface ----------------------------------------------

    async def open(self) -> None:
        """Create or open the file now, so a bad path stops start-up rather than mail.

        :raises StateUnavailable: the file cannot be created or opened
        """
        await self._run(lambda conn, now: None)

    async def incr(self, key: str, amount: int = 1, ttl: float = 60.0) -> int:
        return await self._run(self._incr_sync, key, amount, ttl)

    async def get(self, key: str) -> str | None:
        return await self._run(self._get_sync, key)

    async def set(
        self, key: str, value: str, ttl: float | None = None, only_if_absent: bool = False
    ) -> bool:
        return await self._run(self._set_sync, key, value, ttl, only_if_absent)

    async def delete(self, key: str) -> None:
        await self._run(self._delete_sync, key)

    async def incr_field(self, key: str, name: str, amount: int = 1, ttl: float = 60.0) -> int:
        return await self._run(self._incr_field_sync, key, name, amount, ttl)

    async def fields(self, key: str) -> dict[str, int]:
        return await self._run(self._fields_sync, key)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._close_sync)
        except sqlite3.Error as exc:
            log.warning("closing %s: %s", self.path, exc)
        finally:
            # The close ran in the thread already: nothing is left to wait for.
            self._executor.shutdown(wait=False)
