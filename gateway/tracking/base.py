"""What the index's backends share: the SQL of writing a batch, pruning and reading.

:class:`SqlIndex` is written against the DB-API in the subset SQLite and PostgreSQL
agree on (``?`` placeholders, turned into ``%s`` for psycopg; ``ON CONFLICT`` upserts);
a backend (gateway/tracking/sqlite.py, gateway/tracking/postgres.py) supplies its
connections, its transaction start, its table definitions and the few words that differ
(``max`` or ``GREATEST``, ``LIKE`` or ``ILIKE``). The layout and the story's encoding
are in gateway/tracking/rows.py.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Iterable, Sequence

from gateway.tracking.rows import (
    MESSAGE_COLUMNS, Story, counter_rows, is_maximum, message_rows, read_story, recipient_states, split, summary_state,
)
from gateway.tracking.story import Batch, Step

__all__ = ["MINUTE_KEEP", "SqlIndex", "bucket_series"]

MINUTE_KEEP = 2 * 86400.0
"""Per-minute counters are kept this long; per-hour ones for the retention."""
_PRUNE_CHUNK = 5000
ROWS_A_STATEMENT = 100
"""Rows of one INSERT (its VALUES list): 100 rows of 21 columns stay under SQLite's
32766 placeholders and PostgreSQL's 65535."""


def _like(text: str) -> str:
    """A LIKE pattern matching ``text`` anywhere, its wildcards taken literally."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


class SqlIndex:
    """The index's operations on a DB-API database; see the module docstring.

    Writing (:meth:`write`, :meth:`prune`, :meth:`arrivals`) uses one connection, the
    writer thread's; each read opens its own (the console's thread pool).
    """

    #: exceptions that mean the database failed (the writer drops the batch and says so)
    errors: ClassVar[tuple[type[BaseException], ...]] = (OSError,)
    #: the statement that starts a write transaction
    begin: ClassVar[str] = "BEGIN"
    #: the larger of two values, as a function name
    greatest: ClassVar[str] = "max"
    #: case-insensitive LIKE
    like: ClassVar[str] = "LIKE"
    #: one placeholder
    mark: ClassVar[str] = "?"

    def __init__(self) -> None:
        self._writer: Any = None
        self.node = ""
        columns = (*MESSAGE_COLUMNS, "node")
        story = ", story = CASE WHEN excluded.story = '[]' THEN messages.story WHEN messages.story = '[]' " \
            "THEN excluded.story ELSE substr(messages.story, 1, length(messages.story) - 1) || ',' || " \
            "substr(excluded.story, 2) END"
        # (head, tail, columns) of each table's insert; the rows go between, as VALUES.
        # A key written again (not expected: keys are queue ids or session/n) keeps its story.
        self._upsert_message = (
            f"INSERT INTO messages ({', '.join(columns)}) VALUES",
            "ON CONFLICT (key) DO UPDATE SET "
            + ", ".join(f"{c} = excluded.{c}" for c in columns if c not in ("key", "story")) + story,
            len(columns),
        )
        self._insert_story = ("INSERT INTO stories (time, key, session, story, node) VALUES", "", 5)
        counters = "INSERT INTO counters (period, t, name, key, value) VALUES"
        self._add = (counters, "ON CONFLICT (period, t, name, key) DO UPDATE SET value = counters.value + "
                     "excluded.value", 5)
        self._max = (counters, "ON CONFLICT (period, t, name, key) DO UPDATE SET value = "
                     f"{self.greatest}(counters.value, excluded.value)", 5)

    # -- what a backend provides -----------------------------------------------

    def connect(self) -> Any:
        """A new connection in autocommit mode whose rows read as mappings."""
        raise NotImplementedError

    def create(self) -> None:
        """Make the tables if missing (any process may, at any time)."""
        raise NotImplementedError

    def exists(self) -> bool:
        """Whether there is an index to read (the console shows the pages' empty state if not)."""
        return True

    def describe(self) -> str:
        """Where the index is, for the log (no password)."""
        raise NotImplementedError

    def sql(self, text: str) -> str:
        return text if self.mark == "?" else text.replace("?", self.mark)

    # -- writing (the writer thread) ---------------------------------------------

    @property
    def writer(self) -> Any:
        if self._writer is None:
            self._writer = self.connect()
        return self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _in_transaction(self, db: Any, statements: Iterable[tuple[str, Sequence[Any]]]) -> int:
        """Run ``(sql, rows)`` pairs (executemany) in one transaction; the rows changed."""
        changed = 0
        cursor = db.cursor()
        cursor.execute(self.begin)
        try:
            for sql, rows in statements:
                if rows:
                    cursor.executemany(sql, rows)
                    changed += max(0, cursor.rowcount)
            cursor.execute("COMMIT")
        except BaseException:
            cursor.execute("ROLLBACK")
            raise
        finally:
            cursor.close()
        return changed

    def _insert(self, cursor: Any, statement: tuple[str, str, int], rows: Sequence[Sequence[Any]]) -> None:
        """Rows into a table, :data:`ROWS_A_STATEMENT` a statement (its VALUES list):
        each statement is one step of the database with the GIL released, not one a row
        (executemany steps, and gives up and takes back the GIL, a row at a time)."""
        head, tail, width = statement
        one = "(" + ", ".join([self.mark] * width) + ")"
        for start in range(0, len(rows), ROWS_A_STATEMENT):
            part = rows[start:start + ROWS_A_STATEMENT]
            cursor.execute(f"{head} {', '.join([one] * len(part))} {tail}", [v for row in part for v in row])

    def write(self, batch: Batch, split_batch: tuple[list[Story], dict[str, list[Step]]] | None = None) -> None:
        """Store one batch in one transaction, a few statements a table.

        :param split_batch: the batch's messages with their steps and its other steps
            (:func:`~gateway.tracking.rows.split`), when the writer has split it
        """
        messages, stories = message_rows(*(split_batch or split(batch)))
        node = self.node
        adds, maxima = counter_rows(batch)
        # Counters in one order in every writer: two transactions raising the same
        # buckets take their row locks in the same order (no deadlock on PostgreSQL).
        adds.sort()
        maxima.sort()
        cursor = self.writer.cursor()
        cursor.execute(self.begin)
        try:
            self._insert(cursor, self._upsert_message, [(*m, node) for m in messages])
            self._insert(cursor, self._insert_story, [(*s, node) for s in stories])
            self._insert(cursor, self._add, adds)
            self._insert(cursor, self._max, maxima)
            cursor.execute("COMMIT")
        except BaseException:
            cursor.execute("ROLLBACK")
            raise
        finally:
            cursor.close()

    def arrivals(self, qids: Iterable[str]) -> dict[str, float]:
        """When each of ``qids`` was queued (those the index knows)."""
        wanted = sorted(set(qids))
        found: dict[str, float] = {}
        cursor = self.writer.cursor()
        try:
            for start in range(0, len(wanted), 500):
                part = wanted[start:start + 500]
                cursor.execute(self.sql(
                    f"SELECT key, arrived FROM messages WHERE key IN ({','.join('?' * len(part))}) "
                    "AND arrived IS NOT NULL"), part)
                for row in cursor.fetchall():
                    found[row["key"]] = row["arrived"]
        finally:
            cursor.close()
        return found

    def prune(self, before: float, now: float | None = None) -> int:
        """Remove messages, stories and hourly counters older than ``before``, minute
        counters older than :data:`MINUTE_KEEP`; a chunk per transaction (short locks)."""
        now = time.time() if now is None else now
        db = self.writer
        removed = 0
        for sql in (
            "DELETE FROM stories WHERE id IN (SELECT id FROM stories WHERE time < ? LIMIT ?)",
            "DELETE FROM messages WHERE key IN (SELECT key FROM messages WHERE time < ? LIMIT ?)",
        ):
            while True:
                count = self._in_transaction(db, [(self.sql(sql), [(before, _PRUNE_CHUNK)])])
                removed += count
                if count < _PRUNE_CHUNK:
                    break
        self._in_transaction(db, [
            (self.sql("DELETE FROM counters WHERE period = 60 AND t < ?"), [(now - MINUTE_KEEP,)]),
            (self.sql("DELETE FROM counters WHERE period = 3600 AND t < ?"), [(before,)]),
        ])
        return removed

    # -- reading (the console, in the thread pool) -------------------------------

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        db = self.connect()
        try:
            return self._fetch(db, sql, args)
        finally:
            db.close()

    def _fetch(self, db: Any, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cursor = db.cursor()
        try:
            cursor.execute(self.sql(sql), list(args))
            return [dict(row) for row in cursor.fetchall()]
        finally:
            cursor.close()

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
                where.append(f"{column} {self.like} ? ESCAPE '\\'")
                args.append(_like(value.strip()))
        if qid.strip():
            where.append(f"(qid {self.like} ? ESCAPE '\\' OR key = ?)")
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
            total = self._fetch(db, f"SELECT count(*) AS n FROM messages WHERE {condition}", args)[0]["n"]
            rows = self._fetch(
                db, f"SELECT * FROM messages WHERE {condition} ORDER BY time DESC LIMIT ? OFFSET ?",
                [*args, limit, offset])
            if rows:
                keys = [r["key"] for r in rows]
                states = self._states(db, keys, [r.pop("story") for r in rows])
                for row in rows:
                    row["state"] = summary_state(row["outcome"], states.get(row["key"], {}))
        finally:
            db.close()
        return rows, int(total)

    def _states(self, db: Any, keys: list[str], stories: list[Any]) -> dict[str, dict[str, str]]:
        """key -> recipient -> its last delivery status; ``stories``: the keys' own rows'."""
        parts = self._fetch(db, f"SELECT story FROM stories WHERE key IN ({','.join('?' * len(keys))})", keys)
        return recipient_states([*stories, *(p["story"] for p in parts)], keys)

    def message(self, key: str) -> dict[str, Any] | None:
        """One message's row, its story (its session's steps and its own, in time order,
        each with the node that wrote it) and its recipients' last delivery states;
        ``None`` if the index has no such key."""
        db = self.connect()
        try:
            found = self._fetch(db, "SELECT * FROM messages WHERE key = ?", [key])
            if not found:
                return None
            message = found[0]
            own = message.pop("story")
            session = message["session"]
            others = self._fetch(
                db, "SELECT key, outcome, time, story, node FROM messages WHERE session = ? AND key != ? ORDER BY time",
                [session, key]) if session else []
            keys = [key] + ([session] if session and session != key else [])
            parts = self._fetch(
                db, f"SELECT story, node FROM stories WHERE key IN ({','.join('?' * len(keys))}) ORDER BY id", keys)
            message["story"] = read_story(
                (own, message["node"]), [(o.pop("story"), o["node"]) for o in others],
                [(p["story"], p["node"]) for p in parts], key, session)
            states = recipient_states([own, *(p["story"] for p in parts)], [key]).get(key, {})
            message["state"] = summary_state(message["outcome"], states)
            message["recipient_states"] = {r: s for r, s in states.items() if r}
            message["same_session"] = others
        finally:
            db.close()
        return message

    def series(self, names: Sequence[str], since: float, until: float, step: int) -> dict[str, dict[str, list[float]]]:
        """Counters ``names`` in buckets of ``step`` seconds from ``since`` to ``until``:
        name -> key -> one value a bucket (sums; ``*_max`` and ``queue_*`` the largest)."""
        period = 60 if step < 3600 else 3600
        start = int(since) // step * step
        rows = self._read(
            f"SELECT name, key, t, value FROM counters WHERE period = ? AND t >= ? AND t < ? "
            f"AND name IN ({','.join('?' * len(names))})", [period, start, until, *names],
        )
        return bucket_series(rows, names, start, until, step)


def bucket_series(rows: Iterable[dict[str, Any]], names: Sequence[str], start: int, until: float,
                  step: int) -> dict[str, dict[str, list[float]]]:
    """Counter rows (name, key, t, value) summed (or the largest kept) into ``step`` buckets."""
    buckets = max(1, -(-(int(until) - start) // step))
    out: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    for row in rows:
        index = (int(row["t"]) - start) // step
        if not 0 <= index < buckets:
            continue
        values = out[row["name"]].setdefault(row["key"], [0.0] * buckets)
        if is_maximum(row["name"]):
            values[index] = max(values[index], row["value"])
        else:
            values[index] += row["value"]
    return out
