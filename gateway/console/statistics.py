"""The statistics page (admins): charts over the last hour to the last 30 days, from the
counters the gateway keeps in its index (gateway/tracking): messages in and out,
refusals by plugin, spam and viruses, the queue's size and its oldest message's age,
and delivery latency. Each chart is an SVG made here (gateway/console/statistics_charts.py)
with a table of the same figures beside it."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.console.statistics_charts import Chart, Series, legend, number, render
from gateway.tracking import console_index

if TYPE_CHECKING:
    from gateway.console.server import Console
    from gateway.console.sessions import Session

__all__ = ["RANGES", "add_routes", "charts"]

RANGES = {"1h": (3600, 60), "6h": (6 * 3600, 300), "24h": (86400, 900), "7d": (7 * 86400, 3600),
          "30d": (30 * 86400, 86400)}
"""Range -> (its length, one bucket), in seconds."""
TOP_PLUGINS = 7
"""Plugins shown apart in the refusals chart; the rest are summed as ``other``."""
NAMES = ("received", "delivery", "refused", "spam", "virus", "queue_size", "queue_age", "quarantined",
         "latency_sum", "latency_count", "latency_max", "connections", "dsn")


def _sum_keys(found: dict[str, list[float]], size: int) -> list[float]:
    total = [0.0] * size
    for values in found.values():
        total = [a + b for a, b in zip(total, values)]
    return total


def charts(series: dict[str, dict[str, list[float]]], buckets: list[int], step: int) -> list[Chart]:
    """The page's charts from :meth:`~gateway.tracking.base.SqlIndex.series` figures."""
    size = len(buckets)
    zero = [0.0] * size

    def one(name: str, key: str = "") -> list[float]:
        return list(series.get(name, {}).get(key, zero))

    delivery = series.get("delivery", {})
    refused = series.get("refused", {})
    ranked = sorted(refused, key=lambda k: (-sum(refused[k]), k))
    refusal_series = [Series(k, refused[k]) for k in ranked[:TOP_PLUGINS]]
    if len(ranked) > TOP_PLUGINS:
        refusal_series.append(Series("other", _sum_keys({k: refused[k] for k in ranked[TOP_PLUGINS:]}, size)))
    sums, counts = one("latency_sum"), one("latency_count")
    average = [s / c if c else 0.0 for s, c in zip(sums, counts)]
    return [
        Chart("chart-traffic", "Messages in and out", buckets, step, [
            Series("received", one("received", "msg")),
            Series("quarantined", one("received", "quarantine")),
            Series("delivered", list(delivery.get("delivered", zero))),
            Series("deferred", list(delivery.get("deferred", zero))),
            Series("bounced", list(delivery.get("failed", zero))),
        ], kind="lines"),
        Chart("chart-refusals", "Refusals by plugin", buckets, step, refusal_series),
        Chart("chart-threats", "Spam and viruses (refused or quarantined)", buckets, step, [
            Series("spam", _sum_keys(series.get("spam", {}), size)),
            Series("virus", _sum_keys(series.get("virus", {}), size)),
        ]),
        Chart("chart-queue", "Queue size (largest in each interval)", buckets, step, [
            Series("queued messages", one("queue_size")),
            Series("quarantined messages", one("queue_quarantine")),
        ], kind="lines", summary="peak"),
        Chart("chart-queue-age", "Age of the oldest queued message", buckets, step, [
            Series("oldest", one("queue_age")),
        ], kind="lines", unit="s", summary="peak"),
        Chart("chart-latency", "Delivery latency (queued to delivered)", buckets, step, [
            Series("average", average), Series("slowest", one("latency_max")),
        ], kind="lines", unit="s", summary="peak"),
    ]


def add_routes(console: Console, app: web.Application) -> None:
    """``/statistics?range=1h|6h|24h|7d|30d``."""
    admin = console.requires("admin")
    index = console_index(console.policy)

    @admin
    async def page(request: web.Request, session: Session) -> web.StreamResponse:
        chosen = request.query.get("range", "24h")
        chosen = chosen if chosen in RANGES else "24h"
        length, step = RANGES[chosen]
        now = time.time()
        until = (int(now) // step + 1) * step
        since = until - length
        buckets = list(range(since, until, step))
        is_on = getattr(console.gateway_app, "index", None) is not None or index.exists()
        found: dict[str, dict[str, list[float]]] = {}
        if is_on and index.exists():
            found = await console.in_thread(index.series, (*NAMES, "queue_quarantine"), since, until, step)
        shown = []
        for chart in charts(found, buckets, step):
            rows = [(s.name, number(s.total if chart.summary == "total" else s.peak, chart.unit)) for s in chart.series]
            shown.append({"chart": chart, "svg": render(chart), "legend": legend(chart), "rows": rows})
        return console.render("statistics.html", session, charts=shown, range=chosen, ranges=RANGES, is_on=is_on)

    app.router.add_get("/statistics", page)

