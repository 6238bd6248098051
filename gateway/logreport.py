"""Summaries of the gateway's own log, as qmailanalog gave them for qmail.

The input is what :data:`gateway.logs.FORMAT` writes, one record a line::

    2026-11-25 11:45:14,615 gateway[1234] INFO gateway.delivery.scheduler session=- queue=QID delivery to=<x> status=deferred relay=local reply='451 ...'

:class:`LogReport` reads the lines in order and keeps counters. The lines it understands
(every other line is counted and skipped):

- ``connect client=...`` (smtp handler): one connection.
- ``queued from=<S> to=... size=N area=A score=X`` (smtp handler, ``queue=QID``): a
  message received; its arrival time is kept until its story ends.
- ``queued qid=QID from=<S> to=... (generated)`` (scheduler): a bounce or a forward.
- ``delivery to=<R> status=delivered|failed|deferred relay=... reply=...`` (scheduler,
  ``queue=QID``): one delivery attempt of one recipient; ``delivered`` also gives the
  delay since the message was queued.
- ``expired to=<R>``: a recipient given up after the queue lifetime (a bounce).
- ``done: removed from the queue`` or ``done: delivered at once, never queued``
  (``queue=QID``): the story ends; the arrival time is dropped, so memory grows with the
  messages in flight, not with the log.
- ``STAGE reject|tempfail|disconnect by=PLUGIN reply='...' reason=...`` at connect, helo,
  mail, rcpt, data and queue; ``rcpt to=<R> refused by=default-deny``; ``auth failed``;
  ``data refused: REPLY`` and ``connection refused ...: WHY`` (the core's own limits).
- ``observe plugin=P hook=H would=ACTION ...``: what an observe-mode plugin would have done.
- ``quarantine by=PLUGIN reason=...``.

Counters keyed by client-supplied text (senders, domains, reasons) are bounded: past
``capacity`` distinct keys the least frequent are dropped (the report then says its top
lists are approximate). Delays go into logarithmic buckets 1% wide, so percentiles are
within 1% and memory does not grow with the number of deliveries.
"""

from __future__ import annotations

import calendar
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

__all__ = ["DelayHistogram", "LogReport", "Tally", "format_duration"]

_LINE = re.compile(
    r"^(?P<date>\d{4}-\d\d-\d\d) (?P<hh>\d\d):(?P<mm>\d\d):(?P<ss>\d\d)[,.](?P<ms>\d{3}) "
    r"\S+ (?P<level>[A-Z]+) (?P<logger>\S+) session=(?P<session>\S*) queue=(?P<queue>\S*) (?P<msg>.*)$"
)
# A Python repr of a str, as the gateway logs replies with %r.
_QUOTED = r"(?:'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")"
_QUEUED = re.compile(r"^queued from=<(?P<sender>.*)> to=(?P<to>.*) size=(?P<size>\d+) area=(?P<area>\w+) score=\S+$")
_GENERATED = re.compile(r"^queued qid=(?P<qid>\S+) from=<(?P<sender>.*)> to=(?P<to>.*) \(generated\)$")
_DELIVERY = re.compile(r"^delivery to=<(?P<rcpt>.*)> status=(?P<status>\w+) relay=\S+ reply=")
_EXPIRED = re.compile(r"^expired to=<(?P<rcpt>.*)>$")
_VERDICT = re.compile(
    rf"^(?P<stage>connect|helo|mail|rcpt|data|queue) (?P<action>reject|tempfail|disconnect) "
    rf"by=(?P<plugin>\S+) reply=(?P<reply>{_QUOTED}) reason=(?P<reason>.*)$"
)
# What the handler appends after the reason: ``sender=<...>`` or ``rcpt=<...>``.
_VERDICT_EXTRA = re.compile(r"\s*(?:\b(?:sender|rcpt)=<[^<>]*>)?\s*$")
_DEFAULT_DENY = re.compile(r"^rcpt to=<.*> refused by=default-deny$")
_AUTH = re.compile(r"^auth (?P<outcome>failed|tempfail) mechanism=\S+ login=.* by=(?P<plugin>\S+)$")
_OBSERVE = re.compile(r"^observe plugin=(?P<plugin>\S+) hook=(?P<hook>\S+) would=(?P<action>\w+) ")
_QUARANTINE = re.compile(r"^quarantine by=(?P<plugin>\S+) reason=")
_DATA_REFUSED = re.compile(r"^data refused: (?P<reply>.*)$")
_CONN_REFUSED = re.compile(r"^connection refused client=\S+: (?P<why>.*)$")
_REMOVED = "done: removed from the queue"
_AT_ONCE = "done: delivered at once, never queued"
_ESCAPE = re.compile(r"\\(.)")

# Replies that the core gives without a plugin (default deny, its own limits).
_DEFAULT_DENY_REPLY = "550 5.7.1 Recipient not accepted"


def _unquote(text: str) -> str:
    # Reply text is printable ASCII (gateway.verdicts), so its repr only escapes the
    # backslash and the quote: cheaper than ast.literal_eval on every reject line.
    return _ESCAPE.sub(r"\1", text[1:-1])


def _domain(address: str) -> str:
    local, at, domain = address.rpartition("@")
    return domain.lower().rstrip(".") if at else "(no domain)"


def format_duration(seconds: float) -> str:
    """``0.042s``, ``12.5s``, ``5m12s``, ``3h05m``, ``2d04h``: short and exact enough."""
    if seconds < 10:
        return f"{seconds:.3f}s"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(round(seconds))
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


class Tally:
    """Counters per key (several numbers each), bounded in the number of keys.

    When more than ``2 * capacity`` keys are held, only the ``capacity`` largest (by the
    sum of their numbers) are kept: frequent keys survive, one-off ones are forgotten, as
    in the Misra-Gries frequent-items summary. :attr:`is_exact` says whether that happened.

    :param width: how many numbers each key carries
    :param capacity: keys kept after a pruning
    """

    def __init__(self, width: int = 1, capacity: int = 10000) -> None:
        self.width = width
        self.capacity = capacity
        self.counts: dict[Any, list[int]] = {}
        self.is_exact = True

    def add(self, key: Any, *values: int) -> None:
        row = self.counts.get(key)
        if row is None:
            if len(self.counts) >= 2 * self.capacity:
                self._prune()
            row = self.counts[key] = [0] * self.width
        for i, value in enumerate(values or (1,)):
            row[i] += value

    def _prune(self) -> None:
        keep = sorted(self.counts.items(), key=lambda kv: sum(kv[1]), reverse=True)[: self.capacity]
        self.counts = dict(keep)
        self.is_exact = False

    def top(self, n: int | None = None) -> list[tuple[Any, list[int]]]:
        """The ``n`` largest rows (all when ``None``), largest first, ties by key."""
        rows = sorted(self.counts.items(), key=lambda kv: (-sum(kv[1]), str(kv[0])))
        return rows if n is None else rows[:n]


class DelayHistogram:
    """Durations in logarithmic buckets 1% wide, from 1 ms up; percentiles by rank."""

    BASE = 0.001
    FACTOR = 1.01

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.max = 0.0
        self._log_factor = math.log(self.FACTOR)

    def add(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        index = -1 if seconds <= self.BASE else int(math.log(seconds / self.BASE) / self._log_factor)
        self.buckets[index] = self.buckets.get(index, 0) + 1
        self.count += 1
        self.max = max(self.max, seconds)

    def percentile(self, p: float) -> float | None:
        """The nearest-rank ``p``-th percentile (the bucket's upper edge, at most the max)."""
        if not self.count:
            return None
        rank = max(1, math.ceil(p / 100 * self.count))
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                return min(self.BASE * self.FACTOR ** (index + 1), self.max)
        return self.max


@dataclass
class LogReport:
    """The counters of one report; feed it lines with :meth:`feed`, read :meth:`summary`.

    :param capacity: keys kept per bounded counter (senders, domains, reasons)
    """

    capacity: int = 10000
    lines: int = 0
    unparsed: int = 0
    first: str = ""
    last: str = ""
    connections: int = 0
    received: int = 0
    received_bytes: int = 0
    quarantined: int = 0
    generated: int = 0
    delivered: int = 0
    bounced: int = 0
    expired: int = 0
    deferred: int = 0
    delays: DelayHistogram = field(default_factory=DelayHistogram)
    in_flight: dict[str, float] = field(default_factory=dict)
    refusals: dict[tuple[str, str, str], int] = field(default_factory=dict)
    observed: dict[tuple[str, str, str], int] = field(default_factory=dict)
    quarantines: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.reasons = Tally(1, self.capacity)
        self.senders = Tally(2, self.capacity)
        self.domains = Tally(3, self.capacity)
        self._hours: dict[str, float] = {}

    # -- input -------------------------------------------------------------

    def _timestamp(self, m: re.Match[str]) -> float:
        # Parsing every time stamp with strptime would dominate; an hour's base is cached.
        # The naive time is read as UTC: only differences matter here.
        hour_key = m["date"] + m["hh"]
        base = self._hours.get(hour_key)
        if base is None:
            if len(self._hours) > 1000:
                self._hours.clear()
            base = calendar.timegm(time.strptime(hour_key, "%Y-%m-%d%H"))
            self._hours[hour_key] = float(base)
        return base + int(m["mm"]) * 60 + int(m["ss"]) + int(m["ms"]) / 1000

    def feed_all(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.feed(line)

    def feed(self, line: str) -> None:
        """Account for one log line (with or without its line end)."""
        self.lines += 1
        m = _LINE.match(line.rstrip("\r\n"))
        if m is None:
            self.unparsed += 1
            return
        stamp = line[:19]
        if not self.first:
            self.first = stamp
        self.last = stamp
        msg = m["msg"]
        head = msg.split(" ", 1)[0]
        handler = _DISPATCH.get(head)
        if handler is not None:
            handler(self, m, msg)

    # -- events ------------------------------------------------------------

    def _on_connect(self, m: re.Match[str], msg: str) -> None:
        if msg.startswith("connect client="):
            self.connections += 1
        else:
            self._on_verdict(m, msg)

    def _on_queued(self, m: re.Match[str], msg: str) -> None:
        q = _QUEUED.match(msg)
        if q is not None:
            size = int(q["size"])
            self.received += 1
            self.received_bytes += size
            self.senders.add(q["sender"], 1, size)
            if q["area"] == "quarantine":
                self.quarantined += 1
            elif m["queue"] != "-":
                self.in_flight[m["queue"]] = self._timestamp(m)
            return
        g = _GENERATED.match(msg)
        if g is not None:
            self.generated += 1
            self.in_flight[g["qid"]] = self._timestamp(m)

    def _on_delivery(self, m: re.Match[str], msg: str) -> None:
        d = _DELIVERY.match(msg)
        if d is None:
            return
        status, domain = d["status"], _domain(d["rcpt"])
        if status == "delivered":
            self.delivered += 1
            self.domains.add(domain, 1, 0, 0)
            arrived = self.in_flight.get(m["queue"])
            if arrived is not None:
                self.delays.add(self._timestamp(m) - arrived)
        elif status == "failed":
            self.bounced += 1
            self.domains.add(domain, 0, 1, 0)
        else:
            self.deferred += 1
            self.domains.add(domain, 0, 0, 1)

    def _on_expired(self, m: re.Match[str], msg: str) -> None:
        e = _EXPIRED.match(msg)
        if e is not None:
            self.bounced += 1
            self.expired += 1
            self.domains.add(_domain(e["rcpt"]), 0, 1, 0)

    def _on_done(self, m: re.Match[str], msg: str) -> None:
        if msg in (_REMOVED, _AT_ONCE):
            self.in_flight.pop(m["queue"], None)

    def _refusal(self, stage: str, action: str, plugin: str, reply: str, reason: str) -> None:
        key = (stage, action, plugin)
        self.refusals[key] = self.refusals.get(key, 0) + 1
        self.reasons.add((stage, action, plugin, reply, reason))

    def _on_verdict(self, m: re.Match[str], msg: str) -> None:
        if " by=" not in msg and not msg.startswith("data refused: "):
            return  # the common case: mail from, rcpt accepted, data from
        v = _VERDICT.match(msg)
        if v is not None:
            reason = _VERDICT_EXTRA.sub("", v["reason"])
            self._refusal(v["stage"], v["action"], v["plugin"], _unquote(v["reply"]), reason)
            return
        if _DEFAULT_DENY.match(msg):
            self._refusal("rcpt", "reject", "default-deny", _DEFAULT_DENY_REPLY, "no plugin accepted the recipient")
            return
        if msg.startswith("data refused: "):
            r = _DATA_REFUSED.match(msg)
            if r is not None:
                self._refusal("data", "reject", "core", r["reply"], "message refused by the core limits")

    def _on_auth(self, m: re.Match[str], msg: str) -> None:
        a = _AUTH.match(msg)
        if a is not None:
            action = "reject" if a["outcome"] == "failed" else "tempfail"
            self._refusal("auth", action, a["plugin"], "", "authentication " + a["outcome"])

    def _on_connection(self, m: re.Match[str], msg: str) -> None:
        c = _CONN_REFUSED.match(msg)
        if c is not None:
            self._refusal("connect", "tempfail", "core", "", c["why"])

    def _on_observe(self, m: re.Match[str], msg: str) -> None:
        o = _OBSERVE.match(msg)
        if o is not None:
            key = (o["plugin"], o["hook"].removeprefix("gateway_"), o["action"])
            self.observed[key] = self.observed.get(key, 0) + 1

    def _on_quarantine(self, m: re.Match[str], msg: str) -> None:
        q = _QUARANTINE.match(msg)
        if q is not None:
            self.quarantines[q["plugin"]] = self.quarantines.get(q["plugin"], 0) + 1

    # -- output ------------------------------------------------------------

    def summary(self, top: int = 10) -> dict[str, Any]:
        """Everything counted, as plain data (what ``--json`` prints).

        :param top: length of the top lists (senders, domains, reasons)
        """
        delay: dict[str, Any] = {"count": self.delays.count}
        for name, p in (("p50", 50), ("p90", 90), ("p99", 99)):
            value = self.delays.percentile(p)
            delay[name] = None if value is None else round(value, 3)
        delay["max"] = round(self.delays.max, 3) if self.delays.count else None
        return {
            "lines": self.lines,
            "unparsed": self.unparsed,
            "first": self.first or None,
            "last": self.last or None,
            "connections": self.connections,
            "messages": {
                "received": self.received,
                "bytes": self.received_bytes,
                "quarantined": self.quarantined,
                "generated": self.generated,
                "in_queue_at_end": len(self.in_flight),
            },
            "recipients": {
                "delivered": self.delivered,
                "bounced": self.bounced,
                "expired": self.expired,
                "deferred": self.deferred,
            },
            "delay": delay,
            "rejects": {
                "total": sum(self.refusals.values()),
                "by_plugin": [
                    {"stage": s, "action": a, "plugin": p, "count": n}
                    for (s, a, p), n in sorted(self.refusals.items(), key=lambda kv: (-kv[1], kv[0]))
                ],
                "reasons": [
                    {"stage": s, "action": a, "plugin": p, "reply": r, "reason": why, "count": row[0]}
                    for (s, a, p, r, why), row in self.reasons.top(top)
                ],
            },
            "observe": [
                {"plugin": p, "stage": h, "would": a, "count": n}
                for (p, h, a), n in sorted(self.observed.items(), key=lambda kv: (-kv[1], kv[0]))
            ],
            "quarantine": [
                {"plugin": p, "count": n} for p, n in sorted(self.quarantines.items(), key=lambda kv: (-kv[1], kv[0]))
            ],
            "senders": [
                {"sender": s, "messages": row[0], "bytes": row[1]} for s, row in self.senders.top(top)
            ],
            "recipient_domains": [
                {"domain": d, "delivered": row[0], "bounced": row[1], "deferred": row[2]}
                for d, row in self.domains.top(top)
            ],
            "approximate": not (self.reasons.is_exact and self.senders.is_exact and self.domains.is_exact),
        }


_DISPATCH = {
    "connect": LogReport._on_connect,
    "helo": LogReport._on_verdict,
    "mail": LogReport._on_verdict,
    "rcpt": LogReport._on_verdict,
    "data": LogReport._on_verdict,
    "queue": LogReport._on_verdict,
    "queued": LogReport._on_queued,
    "delivery": LogReport._on_delivery,
    "expired": LogReport._on_expired,
    "done:": LogReport._on_done,
    "auth": LogReport._on_auth,
    "connection": LogReport._on_connection,
    "observe": LogReport._on_observe,
    "quarantine": LogReport._on_quarantine,
}
