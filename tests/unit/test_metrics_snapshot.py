"""A worker's counts, written as a JSON snapshot and added to the master's totals."""

from __future__ import annotations

import json
from types import SimpleNamespace

from gateway.hooks import HookStats
from gateway.metrics import Counters, _copied, merge, snapshot


def test_every_counter_table_and_histogram_adds_up() -> None:
    counters = Counters(queued=5, queued_bytes=100)
    counters.bump(counters.sessions, "smtp", 3)
    counters.bump(counters.refused, ("rcpt", "reject"), 2)
    counters.bump(counters.deliveries, ("delivered", "local"), 4)
    stats = HookStats()
    stats.observe(("p", "gateway_rcpt"), 0.002)
    stats.observe(("p", "gateway_rcpt"), 0.3)
    stats.verdicts[("p", "gateway_rcpt", "reject")] = 1
    worker = SimpleNamespace(counters=counters, hook_stats=stats,
                             listeners={"smtp": SimpleNamespace(tracker=SimpleNamespace(total=2))})
    snap = json.loads(json.dumps(snapshot(worker)))  # as the file carries it

    totals, totals_stats, open_now = _copied(counters), _copied(stats), {"smtp": 1}
    merge(totals, totals_stats, open_now, snap)

    assert totals == Counters(sessions={"smtp": 6}, queued=10, queued_bytes=200,
                              refused={("rcpt", "reject"): 4}, deliveries={("delivered", "local"): 8})
    key = ("p", "gateway_rcpt")
    assert totals_stats.calls == {key: 4} and round(totals_stats.seconds[key], 6) == 0.604
    assert totals_stats.buckets[key] == [2 * n for n in stats.buckets[key]]
    assert totals_stats.verdicts == {("p", "gateway_rcpt", "reject"): 2}
    assert open_now == {"smtp": 3}
    # The copies were added to, not the worker's own counts.
    assert counters.queued == 5 and stats.calls == {key: 2} and sum(stats.buckets[key]) == 2
