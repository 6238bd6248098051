"""Prometheus metrics: plain counters on the hot path, series built only when scraped.

The SMTP front end, the hook runner and the scheduler bump integers in
:class:`Counters` and :class:`~gateway.hooks.HookStats`; :class:`GatewayCollector`
turns them, and a look at the queue directory, into Prometheus metric families when
the endpoint is scraped. The endpoint is prometheus-client's own HTTP server, in its
own thread, on the loopback address the policy's ``[metrics]`` section names.

With ``[server] workers = N`` only the master serves the endpoint. Every worker writes
a snapshot of its counts to ``<var_dir>/metrics/worker-<pid>.json`` every
:data:`REPORT_INTERVAL` seconds (:func:`report_forever`), and the master adds the
snapshots of its living workers to its own: the totals lag by at most that interval.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

__all__ = [
    "Counters", "GatewayCollector", "REPORT_INTERVAL", "clear_snapshots", "merge", "own_counts",
    "read_snapshots", "report_forever", "snapshot", "start_metrics_server",
]

log = logging.getLogger(__name__)

#: seconds between two snapshots of a worker's counts
REPORT_INTERVAL = 2.0


@dataclass
class Counters:
    """Event counts of one gateway process (kept across policy reloads)."""

    sessions: dict[str, int] = field(default_factory=dict)
    queued: int = 0
    queued_bytes: int = 0
    quarantined: int = 0
    #: of ``queued``, delivered before the reply to the client and never written to
    #: the queue (``[delivery] at_once``)
    at_once: int = 0
    refused: dict[tuple[str, str], int] = field(default_factory=dict)
    deliveries: dict[tuple[str, str], int] = field(default_factory=dict)
    #: authentication verdicts by (method, result), bumped by plugins through
    #: :func:`gateway.authres.count` (ARC verdicts, DMARC overrides by a trusted ARC sealer)
    auth_results: dict[tuple[str, str], int] = field(default_factory=dict)
    #: DMARC aggregate reports by outcome (``sent``; ``too_big``, ``unauthorized``,
    #: ``unsupported_uri`` for an address left out; ``deferred`` for a temporary failure;
    #: ``failure_sent``, ``failure_limited`` for failure reports)
    dmarc_reports: dict[str, int] = field(default_factory=dict)
    #: transport security failures by (policy mode, result): an MTA-STS policy that could
    #: not be fetched or parsed, an MX host it does not name, a certificate or STARTTLS
    #: failure under it (RFC 8460 result types); counted by
    #: :class:`gateway.delivery.remote.policy.TransportSecurity`
    tls_failures: dict[tuple[str, str], int] = field(default_factory=dict)
    #: damaged queue files moved to ``corrupt/``; the queue store counts them
    #: (``QueueStore.moved_aside``), and :func:`own_counts` adds them in when reporting
    corrupt: int = 0

    @staticmethod
    def bump(table: dict[Any, int], key: Any, amount: int = 1) -> None:
        table[key] = table.get(key, 0) + amount


class GatewayCollector:
    """A prometheus-client custom collector reading the app's counters."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        from gateway.hooks import LATENCY_BUCKETS

        counters, stats, open_now = self._totals()
        sessions = CounterMetricFamily("gateway_sessions", "SMTP sessions accepted", labels=["listener"])
        for listener, count in sorted(counters.sessions.items()):
            sessions.add_metric([listener], count)
        yield sessions
        active = GaugeMetricFamily("gateway_sessions_active", "SMTP sessions open now", labels=["listener"])
        for name, count in sorted(open_now.items()):
            active.add_metric([name], count)
        yield active
        yield CounterMetricFamily("gateway_messages_queued", "messages accepted into the queue", value=counters.queued)
        yield CounterMetricFamily(
            "gateway_messages_queued_bytes", "octets of messages accepted into the queue", value=counters.queued_bytes
        )
        yield CounterMetricFamily("gateway_messages_quarantined", "messages stored in the quarantine", value=counters.quarantined)
        yield CounterMetricFamily(
            "gateway_messages_delivered_at_once",
            "of the messages accepted, those delivered before the reply to the client, never queued",
            value=counters.at_once,
        )
        refused = CounterMetricFamily(
            "gateway_refusals", "commands refused, by SMTP stage and action", labels=["stage", "action"]
        )
        for (stage, action), count in sorted(counters.refused.items()):
            refused.add_metric([stage, action], count)
        yield refused
        verdicts = CounterMetricFamily(
            "gateway_plugin_verdicts", "verdicts given by plugins", labels=["plugin", "hook", "action"]
        )
        for (plugin, hook, action), count in sorted(stats.verdicts.items()):
            verdicts.add_metric([plugin, hook, action], count)
        yield verdicts
        errors = CounterMetricFamily("gateway_plugin_errors", "plugin failures and timeouts", labels=["plugin", "hook"])
        for (plugin, hook), count in sorted(stats.errors.items()):
            errors.add_metric([plugin, hook], count)
        yield errors
        latency = HistogramMetricFamily(
            "gateway_hook_duration_seconds", "time spent in each plugin's hook", labels=["plugin", "hook"]
        )
        for key, counts in sorted(stats.buckets.items()):
            cumulative, buckets = 0, []
            for bound, count in zip(LATENCY_BUCKETS, counts):
                cumulative += count
                buckets.append((repr(bound), cumulative))
            buckets.append(("+Inf", stats.calls.get(key, cumulative)))
            latency.add_metric(list(key), buckets, stats.seconds.get(key, 0.0))
        yield latency
        yield CounterMetricFamily(
            "gateway_queue_corrupt", "damaged queue files moved to corrupt/ (never retried)", value=counters.corrupt
        )
        deliveries = CounterMetricFamily(
            "gateway_deliveries", "delivery attempts per recipient, by result and kind", labels=["status", "kind"]
        )
        for (status, kind), count in sorted(counters.deliveries.items()):
            deliveries.add_metric([status, kind], count)
        yield deliveries
        auth = CounterMetricFamily(
            "gateway_auth_results", "authentication verdicts plugins counted, by method and result",
            labels=["method", "result"],
        )
        for (method, result), count in sorted(counters.auth_results.items()):
            auth.add_metric([method, result], count)
        yield auth
        reports = CounterMetricFamily(
            "gateway_dmarc_reports", "DMARC aggregate reports queued (sent) or addresses left out, by outcome",
            labels=["result"],
        )
        for result, count in sorted(counters.dmarc_reports.items()):
            reports.add_metric([result], count)
        yield reports
        tls = CounterMetricFamily(
            "gateway_tls_policy_failures", "transport security failures, by policy mode and result (RFC 8460 types)",
            labels=["mode", "result"],
        )
        for (mode, result), count in sorted(counters.tls_failures.items()):
            tls.add_metric([mode, result], count)
        yield tls
        size, oldest = self._queue_shape()
        yield GaugeMetricFamily("gateway_queue_messages", "messages in the queue", value=size)
        yield GaugeMetricFamily("gateway_queue_oldest_seconds", "age of the oldest queued message", value=oldest)

    def _totals(self) -> tuple[Counters, Any, dict[str, int]]:
        """This process's counts plus the latest snapshot of each living worker."""
        counters, stats = own_counts(self.app), _copied(self.app.hook_stats)
        open_now = {name: listener.tracker.total for name, listener in self.app.listeners.items()}
        for snap in read_snapshots(Path(self.app.policy.server.var_dir)):
            merge(counters, stats, open_now, snap)
        return counters, stats, open_now

    def _queue_shape(self) -> tuple[int, float]:
        """Count the queue's message files and the oldest one's age (file times: cheap)."""
        directory = os.path.join(str(self.app.policy.server.queue_dir), "msg")
        count, oldest = 0, time.time()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    count += 1
                    oldest = min(oldest, entry.stat(follow_symlinks=False).st_mtime)
        except OSError:
            return 0, 0.0
        return count, (time.time() - oldest) if count else 0.0


def start_metrics_server(app: Any, address: str, port: int) -> Any:
    """Serve ``/metrics`` for ``app`` on ``address:port`` (its own registry and thread).

    :returns: the HTTP server (``server_address`` has the bound port; ``shutdown()``)
    """
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(GatewayCollector(app))
    server, _thread = start_http_server(port, addr=address, registry=registry)
    log.info("metrics on http://%s:%d/metrics", address, server.server_address[1])
    return server


def _tables(counts: Any) -> dict[str, Any]:
    """The counters and tables of a :class:`Counters` or ``HookStats``, by field name."""
    return {f.name: getattr(counts, f.name) for f in dataclasses.fields(counts)}


def own_counts(app: Any) -> Counters:
    """A copy of this process's :class:`Counters`, with what its queue store counted."""
    counters: Counters = _copied(app.counters)
    queue = getattr(app, "queue", None)
    counters.corrupt += getattr(queue, "moved_aside", 0)
    return counters


def _copied(counts: Any) -> Any:
    """A copy to add to. This runs on the HTTP server's thread while the event loop
    keeps bumping the original: ``list(d.items())`` takes each table in one step under
    the GIL, where iterating the live dict could meet it changing size."""
    return type(counts)(**{
        name: {k: list(v) if isinstance(v, list) else v for k, v in list(value.items())}
        if isinstance(value, dict) else value
        for name, value in _tables(counts).items()
    })


# -- worker snapshots ---------------------------------------------------------------------


def _directory(var_dir: Path) -> Path:
    return var_dir / "metrics"


def _as_json(value: Any) -> Any:
    """A count as is; a table as [key, value] rows, a tuple key as a list."""
    if isinstance(value, dict):
        return [[list(k) if isinstance(k, tuple) else k, v] for k, v in value.items()]
    return value


def snapshot(app: Any) -> dict[str, Any]:
    """A worker's counts as JSON types: every field of its :class:`Counters` and
    ``HookStats``, and the sessions open now per listener."""
    return {
        "counters": {name: _as_json(v) for name, v in _tables(own_counts(app)).items()},
        "stats": {name: _as_json(v) for name, v in _tables(app.hook_stats).items()},
        "active": {name: listener.tracker.total for name, listener in app.listeners.items()},
    }


def _add_into(counts: Any, fields: dict[str, Any]) -> None:
    """Add a snapshot's fields (:func:`snapshot`) to ``counts``, field by field; a
    histogram's bucket counts add up bucket by bucket."""
    for name, value in fields.items():
        mine = getattr(counts, name)
        if not isinstance(mine, dict):
            setattr(counts, name, mine + value)
            continue
        for key, count in value:
            key = tuple(key) if isinstance(key, list) else key
            if key not in mine:
                mine[key] = count
            elif isinstance(count, list):
                mine[key] = [a + b for a, b in zip(mine[key], count)]
            else:
                mine[key] += count


def merge(counters: Counters, stats: Any, open_now: dict[str, int], snap: dict[str, Any]) -> None:
    """Add one worker's snapshot to the totals."""
    _add_into(counters, snap["counters"])
    _add_into(stats, snap["stats"])
    for name, count in snap["active"].items():
        open_now[name] = open_now.get(name, 0) + count


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clear_snapshots(var_dir: Path) -> None:
    """Forget every worker's snapshot (the master, before it starts its workers)."""
    try:
        names = os.listdir(_directory(var_dir))
    except FileNotFoundError:
        return
    for name in names:
        (_directory(var_dir) / name).unlink(missing_ok=True)


def read_snapshots(var_dir: Path) -> list[dict[str, Any]]:
    """The snapshots of the workers that still run (a dead worker's file is removed)."""
    found = []
    try:
        names = os.listdir(_directory(var_dir))
    except FileNotFoundError:
        return []
    for name in names:
        if not (name.startswith("worker-") and name.endswith(".json")):
            continue
        path = _directory(var_dir) / name
        pid = name[len("worker-"):-len(".json")]
        if not pid.isdigit() or not _is_running(int(pid)):
            path.unlink(missing_ok=True)
            continue
        try:
            found.append(json.loads(path.read_bytes()))
        except (OSError, ValueError):
            continue  # replaced or removed meanwhile: the next scrape has it
    return found


def _write_snapshot(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # readers see the old snapshot or the new one, never half


async def report_forever(app: Any, interval: float = REPORT_INTERVAL) -> None:
    """In a worker: write this process's snapshot every ``interval`` seconds until
    cancelled; the file is removed then (a worker that is killed leaves it behind, and
    the master's :func:`read_snapshots` removes it once no process has that pid)."""
    directory = _directory(Path(app.policy.server.var_dir))
    path = directory / f"worker-{os.getpid()}.json"
    try:
        await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("worker metrics not reported: %s", exc)
        return
    try:
        while True:
            data = json.dumps(snapshot(app)).encode()
            try:
                await asyncio.to_thread(_write_snapshot, path, data)
            except OSError as exc:
                log.warning("worker metrics not reported: %s", exc)
            await asyncio.sleep(interval)
    finally:
        path.unlink(missing_ok=True)
