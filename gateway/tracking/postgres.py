"""The index in a PostgreSQL database, shared by several gateway nodes and their console.

``[console] index_url = "postgresql://user@host/db"``: every process of every node
writes its batches there from its writer thread (psycopg 3, its synchronous API, one
connection a writer, ``executemany`` in one transaction a batch: psycopg sends a
table's rows in one pipeline of a prepared statement); a console, on any node, reads with connections of its
own in its thread pool, and sees the mail of every node. Each row names the node that
wrote it (``[server] hostname``), and a node's session ids carry ``@node`` in the index,
since each node names its sessions from its own process ids.

The tables are those of gateway/tracking/sqlite.py with PostgreSQL's types; any process
may create them (under an advisory lock, so two nodes starting at once do not race).
The password, if the URL has one, is never logged; prefer a ``~/.pgpass`` file or the
``PGPASSWORD`` environment variable to one in the policy.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Sequence

from gateway.tracking.base import SqlIndex

__all__ = ["PostgresIndex", "is_postgres_url"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    key TEXT PRIMARY KEY, qid TEXT NOT NULL DEFAULT '', session TEXT NOT NULL DEFAULT '',
    time DOUBLE PRECISION NOT NULL, arrived DOUBLE PRECISION, client TEXT, helo TEXT, tls TEXT, auth TEXT,
    sender TEXT, recipients TEXT, refused TEXT, size BIGINT, message_id TEXT, area TEXT, score DOUBLE PRECISION,
    outcome TEXT, decided_by TEXT, reply TEXT, story TEXT NOT NULL DEFAULT '[]', node TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS messages_time ON messages (time);
CREATE INDEX IF NOT EXISTS messages_session ON messages (session);
CREATE TABLE IF NOT EXISTS stories (
    id BIGSERIAL PRIMARY KEY, time DOUBLE PRECISION NOT NULL, key TEXT NOT NULL,
    session TEXT NOT NULL DEFAULT '', story TEXT NOT NULL, node TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS stories_key ON stories (key);
CREATE INDEX IF NOT EXISTS stories_time ON stories (time);
CREATE TABLE IF NOT EXISTS counters (
    period INTEGER NOT NULL, t BIGINT NOT NULL, name TEXT NOT NULL, key TEXT NOT NULL,
    value DOUBLE PRECISION NOT NULL, PRIMARY KEY (period, t, name, key)
)
"""
_CREATE_LOCK = 0x6761746577617931  # pg_advisory_xact_lock key: any constant all nodes share
_PASSWORD = re.compile(r"(://[^:/@]*:)[^@]*@")


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


class PostgresIndex(SqlIndex):
    """The index in the database ``url`` (a libpq connection URI).

    :param connect_timeout: seconds to wait for the server when connecting
    """

    begin: ClassVar[str] = "BEGIN"
    greatest: ClassVar[str] = "GREATEST"
    like: ClassVar[str] = "ILIKE"
    mark: ClassVar[str] = "%s"

    def __init__(self, url: str, *, connect_timeout: float = 10.0) -> None:
        import psycopg

        self.errors = (psycopg.Error, OSError)  # type: ignore[misc]
        super().__init__()
        self.url = url
        self.connect_timeout = connect_timeout

    def describe(self) -> str:
        return _PASSWORD.sub(r"\1***@", self.url)

    def connect(self) -> Any:
        """A new connection (autocommit; transactions are explicit), rows as dicts."""
        import psycopg
        from psycopg.rows import dict_row

        return psycopg.connect(self.url, autocommit=True, row_factory=dict_row,
                               connect_timeout=max(1, int(self.connect_timeout)))

    def _insert(self, cursor: Any, statement: tuple[str, str, int], rows: Sequence[Sequence[Any]]) -> None:
        """executemany here: psycopg sends the rows in one pipeline of a prepared
        statement (no GIL hand-over a row: it waits for the server once), which costs
        the writer about half of a long VALUES list that it adapts and prepares anew."""
        if rows:
            head, tail, width = statement
            cursor.executemany(f"{head} ({', '.join([self.mark] * width)}) {tail}", rows)

    def create(self) -> None:
        db = self.connect()
        try:
            with db.transaction():
                db.execute("SELECT pg_advisory_xact_lock(%s)", (_CREATE_LOCK,))
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
        finally:
            db.close()
