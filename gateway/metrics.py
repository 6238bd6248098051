"""Prometheus metrics: plain counters on the hot path, series built only when scraped.

The SMTP front end, the hook runner and the scheduler bump integers in
:class:`Counters` and :class:`~gateway.hooks.HookStats`; :class:`GatewayCollector`
turns them, and a look at the queue directory, into Prometheus metric families when
the endpoint is scraped. The endpoint is prometheus-client's own HTTP server, in its
own thread, on the loopback address the policy's ``[metrics]`` section names.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

__all__ = ["Counters", "GatewayCollector", "start_metrics_server"]

log = logging.getLogger(__name__)


@dataclass
class Counters:
    """Event counts of one gateway process (kept across policy reloads)."""

    sessions: dict[str, int] = field(default_factory=dict)
    queued: int = 0
    queued_bytes: int = 0
    quarantined: int = 0
    refused: dict[tuple[str, str], int] = field(default_factory=dict)
    deliveries: dict[tuple[str, str], int] = field(default_factory=dict)

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

        counters: Counters = self.app.counters
        stats = self.app.hook_stats
        sessions = CounterMetricFamily("gateway_sessions", "SMTP sessions accepted", labels=["listener"])
        for listener, count in sorted(counters.sessions.items()):
            sessions.add_metric([listener], count)
        yield sessions
        active = GaugeMetricFamily("gateway_sessions_active", "SMTP sessions open now", labels=["listener"])
        for name, listener in sorted(self.app.listeners.items()):
            active.add_metric([name], listener.tracker.total)
        yield active
        yield CounterMetricFamily("gateway_messages_queued", "messages accepted into the queue", value=counters.queued)
        yield CounterMetricFamily(
            "gateway_messages_queued_bytes", "octets of messages accepted into the queue", value=counters.queued_bytes
        )
        yield CounterMetricFamily("gateway_messages_quarantined", "messages stored in the quarantine", value=counters.quarantined)
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
        deliveries = CounterMetricFamily(
            "gateway_deliveries", "delivery attempts per recipient, by result and kind", labels=["status", "kind"]
        )
        for (status, kind), count in sorted(counters.deliveries.items()):
            deliveries.add_metric([status, kind], count)
        yield deliveries
        size, oldest = self._queue_shape()
        yield GaugeMetricFamily("gateway_queue_messages", "messages in the queue", value=size)
        yield GaugeMetricFamily("gateway_queue_oldest_seconds", "age of the oldest queued message", value=oldest)

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
