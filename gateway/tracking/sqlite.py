"""The index in one SQLite file per host (``var_dir/console/index.sqlite``).

Every gateway process writes to it from its own writer thread, one connection each, in
WAL mode: readers (the console) never wait for a writer, and writers take the write lock
at the start of each batch (``BEGIN IMMEDIATE``), so two processes never deadlock by
both upgrading a read; a writer that finds the lock taken waits up to ``busy_timeout``.
The console reads with connections of its own, in the thread pool.

Tables (gateway/tracking/rows.py): ``messages`` (one row a transaction, its story in
it), ``stories`` (the steps of a message or session written after its row: one row a
key and batch), ``counters`` (per-minute and per-hour buckets, written together, so the
hourly roll-up is always up to date and the minutes can be pruned early). A file made
by an older layout (``PRAGMA user_version``) is emptied and made anew: the index is a
record of the log, which stays.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any, ClassVar

from gateway.tracking.base import MINUTE_KEEP, SqlIndex
from gateway.tracking.rows import is_maximum, summary_state

__all__ = ["MINUTE_KEEP", "SqliteIndex", "is_maximum", "summary_state"]

VERSION = 2
"""The layout (``PRAGMA user_version``); 1 had a row a step in ``events``."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    key TEXT PRIMARY KEY, qid TEXT NOT NULL DEFAULT '', session TEXT NOT NULL DEFAULT '',
    time REAL NOT NULL, arrived REAL, client TEXT, helo TEXT, tls TEXT, auth TEXT, sender TEXT,
    recipients TEXT, refused TEXT, size INTEGER, message_id TEXT, area TEXT, score REAL,
    outcome TEXT, decided_by TEXT, reply TEXT, story TEXT NOT NULL DEFAULT '[]', node TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS messages_time ON messages (time);
CREATE INDEX IF NOT EXISTS messages_session ON messages (session);
CREATE TABLE IF NOT EXISTS stories (
    id INTEGER PRIMARY KEY, time REAL NOT NULL, key TEXT NOT NULL, session TEXT NOT NULL DEFAULT '',
    story TEXT NOT NULL, node TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS stories_key ON stories (key);
CREATE INDEX IF NOT EXISTS stories_time ON stories (time);
CREATE TABLE IF NOT EXISTS counters (
    period INTEGER NOT NULL, t INTEGER NOT NULL, name TEXT NOT NULL, key TEXT NOT NULL,
    value REAL NOT NULL, PRIMARY KEY (period, t, name, key)
) WITHOUT ROWID;
"""


class SqliteIndex(SqlIndex):
    """One index file; a writer (:meth:`write`, :meth:`prune`) per thread, readers anywhere.

    :param busy_timeout: how long a write waits for another process's transaction
    """

    errors: ClassVar[tuple[type[BaseException], ...]] = (sqlite3.Error, OSError)
    begin: ClassVar[str] = "BEGIN IMMEDIATE"

    def __init__(self, path: str | Path, *, busy_timeout: float = 30.0) -> None:
        super().__init__()
        self.path = Path(path)
        self.busy_timeout = busy_timeout

    def describe(self) -> str:
        return str(self.path)

    def exists(self) -> bool:
        return self.path.exists()

    def connect(self) -> sqlite3.Connection:
        """A new connection (autocommit; transactions are explicit)."""
        db = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA synchronous = NORMAL")  # WAL: durable at checkpoints, never corrupt
        return db

    def create(self) -> None:
        """Make the directory, the file and its tables if missing (any process may); a
        file of another layout is emptied first.

        Workers start together and each creates the index: switching a new file to WAL
        takes a lock SQLite's busy timeout does not wait for ("database is locked" at
        once), so a locked attempt is tried again, for up to the busy timeout."""
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                self._create()
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def _create(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        db = self.connect()
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.execute("PRAGMA journal_mode = WAL")
            db.execute("BEGIN IMMEDIATE")
            if db.execute("PRAGMA user_version").fetchone()[0] != VERSION:
                for table in ("events", "stories", "messages", "counters"):
                    db.execute(f"DROP TABLE IF EXISTS {table}")
                db.execute(f"PRAGMA user_version = {VERSION}")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("COMMIT")
        finally:
            db.close()

    def _fetch(self, db: Any, sql: str, args: Any = ()) -> list[dict[str, Any]]:
        return [dict(row) for row in db.execute(sql, list(args))]
