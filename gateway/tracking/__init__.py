"""The index of what happens to mail: each message's story and per-minute counters.

Every gateway process (the master and each worker) runs an :class:`IndexWriter` while
``[console] enabled`` and ``index`` are on: a logging handler takes the lines the
gateway logs anyway (connection, each verdict, the queue commit, each delivery attempt,
notices, the removal), a thread assembles and writes them in batches to the index: the
SQLite file ``var_dir/console/index.sqlite`` (:class:`SqliteIndex`), or with ``[console]
index_url`` a PostgreSQL database that several nodes share (:class:`PostgresIndex`,
gateway/tracking/postgres.py). Both implement :class:`~gateway.tracking.base.SqlIndex`
(``create``, ``write``, ``arrivals``, ``prune``, ``search``, ``message``, ``series``).
The console's tracking and statistics pages read it (:func:`console_index`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.tracking.base import SqlIndex
from gateway.tracking.sqlite import SqliteIndex
from gateway.tracking.writer import IndexWriter

__all__ = ["IndexWriter", "SqlIndex", "SqliteIndex", "console_index", "index_path", "open_index", "start_index"]


def index_path(var_dir: str | Path) -> Path:
    """Where a host's index is: ``var_dir/console/index.sqlite``."""
    return Path(var_dir) / "console" / "index.sqlite"


def open_index(url: str, path: str | Path) -> SqlIndex:
    """The index ``url`` names (``postgresql://...``); empty: the SQLite file ``path``."""
    if url:
        from gateway.tracking.postgres import PostgresIndex

        return PostgresIndex(url)
    return SqliteIndex(path)


def console_index(policy: Any) -> SqlIndex:
    """The index a policy's console reads."""
    return open_index(policy.console.index_url, index_path(policy.server.var_dir))


def start_index(gateway_app: Any) -> IndexWriter | None:
    """Start this process's writer if the policy wants an index (on the event loop's
    thread: the handler takes the records of that thread only)."""
    policy = gateway_app.policy
    settings = policy.console
    if not (settings.enabled and settings.index):
        return None
    index = console_index(policy)
    index.node = policy.server.hostname
    writer = IndexWriter(
        index, gateway_app.queue, settings.index_retention, sample_queue=gateway_app.role != "worker",
        session_suffix=f"@{index.node}" if settings.index_url else "",
    )
    writer.start()
    return writer
