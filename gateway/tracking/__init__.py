"""The index of what happens to mail: each message's story and per-minute counters.

Every gateway process (the master and each worker) runs an :class:`IndexWriter` while
``[console] enabled`` and ``index`` are on: a logging handler takes the lines the
gateway logs anyway (connection, each verdict, the queue commit, each delivery attempt,
notices, the removal), a thread assembles and writes them in batches to
``var_dir/console/index.sqlite`` (:class:`SqliteIndex`). The console's tracking and
statistics pages read it. A PostgreSQL backend would implement the same methods as
:class:`SqliteIndex` (``create``, ``write``, ``arrivals``, ``prune``, ``search``,
``message``, ``series``); see docs/console.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.tracking.sqlite import SqliteIndex
from gateway.tracking.writer import IndexWriter

__all__ = ["IndexWriter", "SqliteIndex", "index_path", "start_index"]


def index_path(var_dir: str | Path) -> Path:
    """Where a host's index is: ``var_dir/console/index.sqlite``."""
    return Path(var_dir) / "console" / "index.sqlite"


def start_index(gateway_app: Any) -> IndexWriter | None:
    """Start this process's writer if the policy wants an index (on the event loop's
    thread: the handler takes the records of that thread only)."""
    policy = gateway_app.policy
    settings = policy.console
    if not (settings.enabled and settings.index):
        return None
    writer = IndexWriter(
        SqliteIndex(index_path(policy.server.var_dir)), gateway_app.queue, settings.index_retention,
        sample_queue=gateway_app.role != "worker",
    )
    writer.start()
    return writer
