"""The index in one SQLite file per host (``var_dir/console/index.sqlite``).

Every gateway process writes to it from its own writer thread, one connection each, in
WAL mode: readers (the console) never wait for a writer, and writers take the write lock
at the start of each batch (``BEGIN IMMEDIATE``), so two processes never deadlock by
both upgrading a read; a writer that finds the lock taken waits up to ``busy_timeout``.
The console reads with connections of its own, in the thread pool.

Tables: ``messages`` (one row a transaction), ``events`` (each step of a message's or a
session's story), ``counters`` (per-minute and per-hour buckets, written together, so
the hourly roll-up is always up to date and the minutes can be pruned early).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from gateway.tracking.story import Batch

__all__ = ["MINUTE_KEEP", "SqliteIndex"]

MINUTE_KEEP = 2 * 86400.0
"""Per-minute counters are kept this long; per-hour ones for the retention."""
PERIODS = (60, 3600)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    key TEXT PRIMARY KEY, qid TEXT NOT NULL DEFAULT '', session TEXT NOT NULL DEFAULT '',
    time REAL NOT NULL, client TEXT, helo TEXT, tls TEXT, auth TEXT, sender TEXT,
    recipients TEXT, refused TEXT, size INTEGER, message_id TEXT, area TEXT, score REAL,
    outcome TEXT, decided_by TEXT, reply TEXT
);
CREATE INDEX IF NOT EXISTS messages_time ON messages (time);
CREATE INDEX IF NOT EXISTS messages_session ON messages (session);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, time REAL NOT NULL, key TEXT NOT NULL, session TEXT,
    kind TEXT NOT NULL, plugin TEXT, recipient TEXT, status TEXT, relay TEXT, reply TEXT,
    detail TEXT, score REAL, delay REAL
);
CREATE INDEX IF NOT EXISTS events_key ON events (key, time);
CREATE INDEX IF NOT EXISTS events_time ON events (time);
CREATE TABLE IF NOT EXISTS counters (
    period INTEGER NOT NULL, t INTEGER NOT NULL, name TEXT NOT NULL, key TEXT NOT NULL,
    value REAL NOT NULL, PRIMARY KEY (period, t, name, key)
) WITHOUT ROWID;
"""
_MESSAGE_COLUMNS = (
    "key", "qid", "session", "time", "client", "helo", "tls", "auth", "sender", "recipients", "refused",
    "size", "message_id", "area", "score", "outcome", "decided_by", "reply",
)
_EVENT_COLUMNS = ("time", "key", "session", "kind", "plugin", "recipient", "status", "relay", "reply", "detail",
                  "score", "delay")
_ADD = ("INSERT INTO counters (period, t, name, key, value) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (period, t, name, key) DO UPDATE SET value = value + excluded.value")
_MAX = ("INSERT INTO counters (period, t, name, key, value) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (period, t, name, key) DO UPDATE SET value = max(value, excluded.value)")
_PRUNE_CHUNK = 5000


def _like(text: str) -> str:
    """A LIKE pattern matching ``text`` anywhere, its wildcards taken literally."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


class SqliteIndex:
    """One index file; a writer (:meth:`write`, :meth:`prune`) per thread, readers anywhere.

    :param busy_timeout: how long a write waits for another process's transaction
    """

    def __init__(self, path: str | Path, *, busy_timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self._writer: sqlite3.Connection | None = None

    def connect(self) -> sqlite3.Connection:
        """A new connection (autocommit; transactions are explicit)."""
        db = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA synchronous = NORMAL")  # WAL: durable at checkpoints, never corrupt
        return db

    def create(self) -> None:
        """Make the directory, the file and its tables if missing (any process may)."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        db = self.connect()
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.execute("PRAGMA journal_mode = WAL")
            db.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("COMMIT")
        finally:
            db.close()

    # -- writing (the writer thread) ---------------------------------------

    @property
    def writer(self) -> sqlite3.Connection:
        if self._writer is None:
            self._writer = self.connect()
        return self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def arrivals(self, qids: Iterable[str]) -> dict[str, float]:
        """When each of ``qids`` was queued (those the index knows)."""
        wanted = sorted(set(qids))
        found: dict[str, float] = {}
        for start in range(0, len(wanted), 500):
            part = wanted[start:start + 500]
            marks = ",".join("?" * len(part))
            for key, when in self.writer.execute(
                f"SELECT key, min(time) FROM events WHERE key IN ({marks}) AND kind IN ('queued', 'generated') "
                "GROUP BY key", part,
            ):
                found[key] = when
        return found

    def write(self, batch: Batch) -> None:
        """Store one batch in one transaction."""
        db = self.writer
        messages = [
            (m.key, m.qid, m.session, m.time, m.client, m.helo, m.tls, m.auth, m.sender, ", ".join(m.recipients),
             ", ".join(m.refused), m.size, m.message_id, m.area, m.score, m.outcome, m.decided_by, m.reply)
            for m in batch.messages
        ]
        adds = [(period, t // period * period, name, key, value)
                for (name, key, t), value in batch.counters.items() for period in PERIODS]
        maxima = [(period, t // period * period, name, key, value)
                  for (name, key, t), value in batch.maxima.items() for period in PERIODS]
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                f"INSERT OR REPLACE INTO messages ({', '.join(_MESSAGE_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(_MESSAGE_COLUMNS))})", messages,
            )
            db.executemany(
                f"INSERT INTO events ({', '.join(_EVENT_COLUMNS)}) VALUES ({', '.join('?' * len(_EVENT_COLUMNS))})",
                batch.events,
            )
            db.executemany(_ADD, adds)
            db.executemany(_MAX, maxima)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def prune(self, before: float, now: float | None = None) -> int:
        """Remove messages, events and hourly counters older than ``before``, minute
        counters older than :data:`MINUTE_KEEP`; a chunk per transaction (short locks)."""
        now = time.time() if now is None else now
        db = self.writer
        removed = 0
        for sql, args in (
            ("DELETE FROM events WHERE id IN (SELECT id FROM events WHERE time < ? LIMIT ?)", (before,)),
            ("DELETE FROM messages WHERE key IN (SELECT key FROM messages WHERE time < ? LIMIT ?)", (before,)),
        ):
            while True:
                db.execute("BEGIN IMMEDIATE")
                count = db.execute(sql, (*args, _PRUNE_CHUNK)).rowcount
                db.execute("COMMIT")
                removed += count
                if count < _PRUNE_CHUNK:
                    break
        db.execute("BEGIN IMMEDIATE")
        db.execute("DELETE FROM counters WHERE period = 60 AND t < ?", (now - MINUTE_KEEP,))
        db.execute("DELETE FROM counters WHERE period = 3600 AND t < ?", (before,))
        db.execute("COMMIT")
        return removed

    # -- reading (the console, in the thread pool) -------------------------

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        db = self.connect()
        try:
            return [dict(row) for row in db.execute(sql, args)]
        finally:
            db.close()

    def search(
        self, *, sender: str = "", recipient: str = "", message_id: str = "", qid: str = "", client: str = "",
        since: float | None = None, until: float | None = None, limit: int = 50, offset: int = 0,
    ) -> tuple[list[dict[str, Any]], int]:
        """Messages matching every filter given (substrings, case-insensitive; ``qid``
        exact or a prefix), newest first: ``(rows, how many match)``."""
        where: list[str] = ["1 = 1"]
        args: list[Any] = []
        for column, value in (("sender", sender), ("recipients || ' ' || refused", recipient),
                              ("message_id", message_id), ("client", client)):
            if value.strip():
                where.append(f"{column} LIKE ? ESCAPE '\\'")
                args.append(_like(value.strip()))
        if qid.strip():
            where.append("(qid LIKE ? ESCAPE '\\' OR key = ?)")
            args += [_like(qid.strip())[1:], qid.strip()]
        if since is not None:
            where.append("time >= ?")
            args.append(since)
        if until is not None:
            where.append("time < ?")
            args.append(until)
        condition = " AND ".join(where)
        db = self.connect()
        try:
            total = db.execute(f"SELECT count(*) FROM messages WHERE {condition}", args).fetchone()[0]
            rows = [dict(r) for r in db.execute(
                f"SELECT * FROM messages WHERE {condition} ORDER BY time DESC LIMIT ? OFFSET ?", [*args, limit, offset])]
            if rows:
                states = self._states(db, [r["key"] for r in rows])
                for row in rows:
                    row["state"] = summary_state(row["outcome"], states.get(row["key"], {}))
        finally:
            db.close()
        return rows, int(total)

    @staticmethod
    def _states(db: sqlite3.Connection, keys: list[str]) -> dict[str, dict[str, str]]:
        """key -> recipient -> its last delivery status (delivered, deferred, failed)."""
        marks = ",".join("?" * len(keys))
        found: dict[str, dict[str, str]] = {}
        for row in db.execute(
            f"SELECT key, recipient, status, max(time) FROM events "
            f"WHERE key IN ({marks}) AND kind IN ('delivery', 'expired') GROUP BY key, recipient", keys,
        ):
            found.setdefault(row[0], {})[row[1]] = row[2]
        for (key,) in db.execute(f"SELECT DISTINCT key FROM events WHERE key IN ({marks}) AND kind = 'removed'", keys):
            found.setdefault(key, {})[""] = "removed"
        return found

    def message(self, key: str) -> dict[str, Any] | None:
        """One message's row, its story (its session's steps and its own, in time order)
        and its recipients' last delivery states; ``None`` if the index has no such key."""
        db = self.connect()
        try:
            row = db.execute("SELECT * FROM messages WHERE key = ?", (key,)).fetchone()
            if row is None:
                return None
            message = dict(row)
            keys = [key] + ([message["session"]] if message["session"] and message["session"] != key else [])
            marks = ",".join("?" * len(keys))
            message["story"] = [dict(r) for r in db.execute(
                f"SELECT * FROM events WHERE key IN ({marks}) ORDER BY time, id", keys)]
            states = self._states(db, [key]).get(key, {})
            message["state"] = summary_state(message["outcome"], states)
            message["recipient_states"] = {r: s for r, s in states.items() if r}
            others = db.execute("SELECT key, outcome, time FROM messages WHERE session = ? AND key != ? ORDER BY time",
                                (message["session"], key)).fetchall() if message["session"] else []
            message["same_session"] = [dict(r) for r in others]
        finally:
            db.close()
        return message

    def series(self, names: Sequence[str], since: float, until: float, step: int) -> dict[str, dict[str, list[float]]]:
        """Counters ``names`` in buckets of ``step`` seconds from ``since`` to ``until``:
        name -> key -> one value a bucket (sums; ``*_max`` and ``queue_*`` the largest)."""
        period = 60 if step < 3600 else 3600
        start = int(since) // step * step
        buckets = max(1, -(-(int(until) - start) // step))
        marks = ",".join("?" * len(names))
        out: dict[str, dict[str, list[float]]] = {name: {} for name in names}
        for row in self._read(
            f"SELECT name, key, t, value FROM counters WHERE period = ? AND t >= ? AND t < ? AND name IN ({marks})",
            [period, start, until, *names],
        ):
            index = (int(row["t"]) - start) // step
            if not 0 <= index < buckets:
                continue
            values = out[row["name"]].setdefault(row["key"], [0.0] * buckets)
            if is_maximum(row["name"]):
                values[index] = max(values[index], row["value"])
            else:
                values[index] += row["value"]
        return out


def is_maximum(name: str) -> bool:
    """Whether a counter keeps a bucket's largest value rather than its sum."""
    return name.endswith("_max") or name.startswith("queue_")


def summary_state(outcome: str, states: dict[str, str]) -> str:
    """What became of a message, in a word or two, from its SMTP outcome and its
    recipients' last delivery states."""
    if outcome not in ("queued", "generated", "copy"):
        return outcome
    last = [s for r, s in states.items() if r]
    if not last:
        return "removed" if "" in states else "queued"
    kinds = set(last)
    if kinds == {"delivered"}:
        return "delivered"
    if "deferred" in kinds:
        return "deferred"
    if kinds == {"failed"}:
        return "bounced"
    return "partly bounced"
