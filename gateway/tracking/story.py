"""Turns :class:`~gateway.tracking.events.Event` s into rows: messages, their story, counters.

One :class:`Assembler` per process, in the writer thread. A session's lines arrive in
order (one process serves a session); it keeps each open session's connection facts
and its current transaction in memory until the transaction ends (queued, refused, a
new MAIL, the disconnect), then makes it a :class:`MessageRow` keyed by its queue id
(or ``<session>/<n>`` when it got no queue id) with its :class:`EventRow` s. Delivery
lines (any process, any time later) are events keyed by the queue id alone, so the
message's row and its attempts meet in the index whoever wrote them first.

Counters are per-minute buckets: ``(name, key, minute) -> value``, summed; ``maxima``
keep the largest value of a bucket (queue size and age, the slowest delivery).
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, NamedTuple

from gateway.tracking.events import Event, close_head

__all__ = ["Assembler", "Batch", "EventRow", "MessageRow", "Step", "result_steps", "threat_of"]

MAX_SESSIONS = 20000
"""Open sessions remembered; past that the oldest is closed as it stands."""
MAX_TXN_EVENTS = 300
"""Events kept per transaction (a client looping on RCPT: the first ones)."""
MAX_ARRIVALS = 50000
"""Queue ids whose arrival time is remembered for the delivery latency."""
_DETAIL_ADDRESS = re.compile(r"\b(?:sender|rcpt)=<([^<>]*)>")

Step = tuple[Any, ...]
"""A step as stored: ``(time, key, session, kind, *arguments)``, the log line's kind and
arguments as it was logged; gateway/tracking/steps.py says what each means (what the
story shows is made when it is read, not on the busy path)."""


def threat_of(plugin: str) -> str | None:
    """``virus``, ``spam`` or ``None``: what a refusal or quarantine by ``plugin`` counts as."""
    name = plugin.lower()
    if "clamav" in name or "virus" in name:
        return "virus"
    if "spam" in name or name == "scoring":
        return "spam"
    return None


class EventRow(NamedTuple):
    """One step of a message's story (or of its session's: ``key`` is the session id), as
    the console shows it (:func:`gateway.tracking.steps.describe` of a :data:`Step`)."""

    time: float
    key: str
    session: str
    kind: str
    plugin: str = ""
    recipient: str = ""
    status: str = ""
    relay: str = ""
    reply: str = ""
    detail: str = ""
    score: float | None = None
    delay: float | None = None


@dataclass
class MessageRow:
    """One transaction: what was asked, and what became of it at the SMTP stage."""

    key: str
    session: str
    time: float
    qid: str = ""
    arrived: float | None = None  # when it was queued (the delivery latency's start)
    client: str = ""
    helo: str = ""
    tls: str = ""
    auth: str = ""
    sender: str = ""
    recipients: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    size: int | None = None
    message_id: str = ""
    area: str = ""
    score: float | None = None
    outcome: str = "abandoned"  # queued, quarantined, refused, generated, copy, abandoned
    decided_by: str = ""
    reply: str = ""
    head: Any = None  # a claim's head (bytes, or a descriptor and extents), for message_id
    rcpt_refused_by: str = ""  # the first plugin that refused a recipient (not stored)


@dataclass
class Batch:
    """What one write puts in the index."""

    messages: list[MessageRow] = field(default_factory=list)
    events: list[Step] = field(default_factory=list)
    counters: dict[tuple[str, str, int], float] = field(default_factory=dict)
    maxima: dict[tuple[str, str, int], float] = field(default_factory=dict)
    # Delivered recipients whose message arrived in another process: (qid, time, index in events).
    unknown_arrivals: list[tuple[str, float, int]] = field(default_factory=list)

    def count(self, name: str, key: str, when: float, value: float = 1.0) -> None:
        bucket = (name, key, int(when // 60) * 60)
        self.counters[bucket] = self.counters.get(bucket, 0.0) + value

    def peak(self, name: str, key: str, when: float, value: float) -> None:
        bucket = (name, key, int(when // 60) * 60)
        if value > self.maxima.get(bucket, float("-inf")):
            self.maxima[bucket] = value

    def latency(self, when: float, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.count("latency_sum", "", when, seconds)
        self.count("latency_count", "", when)
        self.peak("latency_max", "", when, seconds)

    def __bool__(self) -> bool:
        return bool(self.messages or self.events or self.counters or self.maxima)


@dataclass
class _Session:
    id: str
    time: float
    client: str = ""
    helo: str = ""
    tls: str = ""
    auth: str = ""
    txns: int = 0
    txn: MessageRow | None = None
    txn_events: list[Step] = field(default_factory=list)
    early: list[Step] = field(default_factory=list)  # its steps before its first transaction ended
    refusal: tuple[str, str] | None = None  # a connect/helo refusal: (plugin, reply)


def result_steps(when: float, key: str, session: str, notes: Iterable[dict[str, Any]]) -> list[Step]:
    """The ``result`` steps of a message's results (each plugin's score and reason)."""
    return [(when, key, session, "result", str(n.get("plugin", "")), str(n.get("reason", "")),
             float(n.get("score", 0.0))) for n in notes]


def _addresses(text: str) -> list[str]:
    """``<a>,<b>`` (as the queued lines join them) -> ``["a", "b"]``."""
    return [a.strip("<>") for a in text.split(",") if a]


class Assembler:
    """Keeps open sessions; :meth:`feed` returns the rows the events complete."""

    def __init__(self, session_suffix: str = "") -> None:
        self.session_suffix = session_suffix
        self._handlers: dict[str, Callable[..., None]] = {
            name[4:]: getattr(self, name) for name in dir(self) if name.startswith("_on_")
        }
        self.sessions: collections.OrderedDict[str, _Session] = collections.OrderedDict()
        self.arrivals: collections.OrderedDict[str, float] = collections.OrderedDict()
        self.claims: collections.OrderedDict[str, tuple[list[dict[str, Any]], Any]] = collections.OrderedDict()

    # -- plumbing ------------------------------------------------------------

    def feed(self, events: Iterable[Event]) -> Batch:
        batch = Batch()
        handlers = self._handlers
        suffix = self.session_suffix
        for event in events:
            handler = handlers.get(event.kind)
            if handler is None:
                continue
            if suffix and event.session != "-":
                event = event._replace(session=event.session + suffix)
            try:
                handler(batch, event, *event.args)
            except (TypeError, ValueError, IndexError):  # a log call changed shape: skip it
                continue
        return batch

    def close_all(self, batch: Batch) -> None:
        """The process stops: what open sessions have is written as it stands."""
        for session in list(self.sessions.values()):
            self._end_txn(batch, session)
        self.sessions.clear()
        for _, head in self.claims.values():
            close_head(head)
        self.claims.clear()

    def _session(self, event: Event) -> _Session:
        session = self.sessions.get(event.session)
        if session is None:  # its connect line came before the index started
            session = self._open(event.session, event.time)
        return session

    def _open(self, sid: str, when: float) -> _Session:
        session = self.sessions[sid] = _Session(sid, when)
        if len(self.sessions) > MAX_SESSIONS:
            self.sessions.popitem(last=False)
        return session

    def _arrived(self, qid: str, when: float) -> None:
        self.arrivals[qid] = when
        if len(self.arrivals) > MAX_ARRIVALS:
            self.arrivals.popitem(last=False)

    def _txn(self, batch: Batch, session: _Session, when: float) -> MessageRow:
        if session.txn is None:
            session.txns += 1
            session.txn = MessageRow(
                key=f"{session.id}/{session.txns}", session=session.id, time=when, client=session.client,
                helo=session.helo, tls=session.tls, auth=session.auth,
            )
            session.txn_events = []
        return session.txn

    def _note(self, batch: Batch, session: _Session, row: Step, *, in_txn: bool = True) -> None:
        if in_txn and session.txn is not None:
            if len(session.txn_events) < MAX_TXN_EVENTS:
                session.txn_events.append(row)
        else:
            batch.events.append(row)

    def _early(self, session: _Session, step: Step) -> None:
        """A step of the session itself (connect, TLS, HELO, AUTH, a refusal), kept until
        its first transaction ends or it disconnects: then it lands in the batch that
        writes that transaction's row, and goes in it (gateway/tracking/rows.py)."""
        if len(session.early) < MAX_TXN_EVENTS:
            session.early.append(step)

    def _end_txn(self, batch: Batch, session: _Session) -> None:
        if session.early:
            batch.events += session.early
            session.early = []
        txn = session.txn
        if txn is None:
            return
        session.txn = None
        if txn.qid:
            txn.key = txn.qid
        claim = self.claims.pop(txn.qid, None) if txn.qid else None
        if claim is not None:
            notes, txn.head = claim
            batch.events.extend(result_steps(txn.time, txn.key, session.id, notes))
        if txn.outcome == "abandoned" and txn.refused and not txn.recipients:
            txn.outcome, txn.decided_by = "refused", txn.rcpt_refused_by
        batch.messages.append(txn)
        key = txn.key
        batch.events.extend((row[0], key, *row[2:]) for row in session.txn_events)
        session.txn_events = []

    def _refused(self, batch: Batch, plugin: str, when: float, threat_kind: str = "refused") -> None:
        batch.count("refused", plugin, when)
        threat = threat_of(plugin)
        if threat is not None:
            batch.count(threat, threat_kind, when)

    # -- the SMTP session ----------------------------------------------------

    def _on_connect(self, batch: Batch, e: Event, client: str, port: int, listener: str, relay: Any) -> None:
        session = self._open(e.session, e.time)
        session.client = str(client)
        batch.count("connections", "", e.time)
        self._early(session, (e.time, e.session, e.session, "connect", client, port, listener, relay))

    def _on_tls(self, batch: Batch, e: Event, version: str, cipher: str) -> None:
        session = self._session(e)
        session.tls = f"{version} {cipher}"
        self._early(session, (e.time, e.session, e.session, "tls", version, cipher))

    def _on_helo(self, batch: Batch, e: Event, name: str, esmtp: Any) -> None:
        session = self._session(e)
        session.helo = str(name)
        self._early(session, (e.time, e.session, e.session, "helo", name, esmtp))

    def _on_auth_ok(self, batch: Batch, e: Event, mechanism: str, login: str, as_: str, plugin: str) -> None:
        session = self._session(e)
        session.auth = str(login)
        self._early(session, (e.time, e.session, e.session, "auth_ok", mechanism, login, as_, plugin))

    def _on_auth_failed(self, batch: Batch, e: Event, mechanism: str, login: str, client: str, plugin: str) -> None:
        self._refused(batch, plugin, e.time)
        self._early(self._session(e), (e.time, e.session, e.session, "auth_failed", mechanism, login, client, plugin))

    def _on_too_many(self, batch: Batch, e: Event, client: str) -> None:
        session = self._session(e)
        session.client = session.client or str(client)
        session.refusal = ("core", "too many connections")
        self._refused(batch, "core", e.time)
        self._early(session, (e.time, e.session, e.session, "too_many", client))

    def _on_mail(self, batch: Batch, e: Event, sender: str, size: Any) -> None:
        session = self._session(e)
        self._end_txn(batch, session)
        txn = self._txn(batch, session, e.time)
        txn.sender = str(sender)
        self._note(batch, session, (e.time, "", e.session, "mail", sender, size))

    def _on_rcpt_ok(self, batch: Batch, e: Event, rcpt: str, plugin: str) -> None:
        session = self._session(e)
        self._txn(batch, session, e.time).recipients.append(str(rcpt))
        self._note(batch, session, (e.time, "", e.session, "rcpt_ok", rcpt, plugin))

    def _on_rcpt_denied(self, batch: Batch, e: Event, rcpt: str) -> None:
        self._rcpt_refused(batch, e, rcpt, "default-deny", (e.time, "", e.session, "rcpt_denied", rcpt))

    def _on_rcpt_size(self, batch: Batch, e: Event, rcpt: str, size: int, limit: int) -> None:
        self._rcpt_refused(batch, e, rcpt, "core", (e.time, "", e.session, "rcpt_size", rcpt, size, limit))

    def _rcpt_refused(self, batch: Batch, e: Event, rcpt: str, plugin: str, step: Step) -> None:
        session = self._session(e)
        txn = self._txn(batch, session, e.time)
        txn.refused.append(str(rcpt))
        txn.rcpt_refused_by = txn.rcpt_refused_by or plugin
        self._refused(batch, plugin, e.time)
        self._note(batch, session, step)

    def _on_verdict(self, batch: Batch, e: Event, stage: str, action: str, plugin: str, reply: str,
                    reason: str, details: str) -> None:
        session = self._session(e)
        address = _DETAIL_ADDRESS.search(details or "")
        self._refused(batch, plugin, e.time)
        row: Step = (e.time, "", e.session, "verdict", stage, action, plugin, reply, reason, details)
        if stage in ("connect", "helo") and session.txn is None:
            session.refusal = (plugin, reply)
            self._early(session, (e.time, e.session, *row[2:]))
            return
        if stage == "mail":  # MAIL refused: a transaction of its own, without a 'mail from' line
            self._end_txn(batch, session)
        txn = self._txn(batch, session, e.time)
        if stage == "mail" and address:
            txn.sender = address.group(1)
        if stage == "rcpt":
            if address:
                txn.refused.append(address.group(1))
            txn.rcpt_refused_by = txn.rcpt_refused_by or plugin
            self._note(batch, session, row)
            return
        if e.queue != "-":
            txn.qid = e.queue
        txn.outcome, txn.decided_by, txn.reply = "refused", plugin, reply
        self._note(batch, session, row)
        self._end_txn(batch, session)

    def _on_quarantine(self, batch: Batch, e: Event, plugin: str, reason: str) -> None:
        session = self._session(e)
        self._txn(batch, session, e.time).decided_by = str(plugin)
        batch.count("quarantined", plugin, e.time)
        threat = threat_of(plugin)
        if threat is not None:
            batch.count(threat, "quarantined", e.time)
        self._note(batch, session, (e.time, "", e.session, "quarantine", plugin, reason))

    def _on_observe(self, batch: Batch, e: Event, plugin: str, hook: str, would: str, reply: str, reason: str) -> None:
        session = self.sessions.get(e.session)
        row = (e.time, e.queue if e.queue != "-" else e.session, e.session, "observe", plugin, hook, would, reply, reason)
        if session is not None:
            self._note(batch, session, row)
        else:
            batch.events.append(row)

    def _on_plugin_timeout(self, batch: Batch, e: Event, plugin: str, hook: str, seconds: float) -> None:
        self._plugin_error(batch, e, plugin, hook, f"timed out after {seconds:.1f}s")

    def _on_plugin_failed(self, batch: Batch, e: Event, plugin: str, hook: str, exc: Any) -> None:
        self._plugin_error(batch, e, plugin, hook, f"failed: {type(exc).__name__}")

    def _plugin_error(self, batch: Batch, e: Event, plugin: str, hook: str, what: str) -> None:
        row = (e.time, e.queue if e.queue != "-" else e.session, e.session, "error", plugin, hook, what)
        session = self.sessions.get(e.session)
        if session is not None:
            self._note(batch, session, row)
        else:
            batch.events.append(row)

    def _on_data(self, batch: Batch, e: Event, sender: str, rcpts: int, size: int) -> None:
        session = self._session(e)
        txn = self._txn(batch, session, e.time)
        txn.size = int(size)
        if e.queue != "-":
            txn.qid = e.queue

    def _on_data_refused(self, batch: Batch, e: Event, reply: Any) -> None:
        session = self._session(e)
        txn = self._txn(batch, session, e.time)
        txn.outcome, txn.decided_by, txn.reply = "refused", "core", str(reply)
        self._refused(batch, "core", e.time)
        self._note(batch, session, (e.time, "", e.session, "data_refused", str(reply)))
        self._end_txn(batch, session)

    def _on_queued(self, batch: Batch, e: Event, sender: str, to: str, rcpts: int, size: int, area: str,
                   score: float) -> None:
        session = self._session(e)
        txn = self._txn(batch, session, e.time)
        txn.qid, txn.size, txn.area, txn.score, txn.arrived = e.queue, int(size), str(area), float(score), e.time
        txn.outcome = "quarantined" if area == "quarantine" else "queued"
        if not txn.recipients:
            txn.recipients = _addresses(to)
        # A message delivered at once (area "direct") was received for delivery as one
        # queued in msg/ is: the traffic chart counts both.
        batch.count("received", "quarantine" if area == "quarantine" else "msg", e.time)
        batch.count("received_bytes", "", e.time, float(size))
        if area != "quarantine":
            self._arrived(e.queue, e.time)
        self._note(batch, session, (e.time, "", e.session, "queued", e.queue, size, rcpts, area, score))
        self._end_txn(batch, session)

    def _on_copy(self, batch: Batch, e: Event, qid: str, to: str) -> None:
        session = self._session(e)
        txn = self._txn(batch, session, e.time)
        self._note(batch, session, (e.time, "", e.session, "copy", qid, to))
        batch.messages.append(MessageRow(
            key=qid, qid=qid, session=session.id, time=e.time, client=session.client, helo=session.helo,
            sender=txn.sender, recipients=_addresses(to), outcome="copy", decided_by=f"copy of {e.queue}",
            arrived=e.time,
        ))
        self._arrived(qid, e.time)

    def _on_claim(self, batch: Batch, e: Event, notes: list[dict[str, Any]], head: Any) -> None:
        self.claims[e.queue] = (notes, head)
        while len(self.claims) > 1000:  # queued lines that never came: forget their heads
            close_head(self.claims.popitem(last=False)[1][1])

    def _on_disconnect(self, batch: Batch, e: Event, client: str, transactions: int) -> None:
        session = self.sessions.pop(e.session, None)
        if session is None:
            return
        self._end_txn(batch, session)
        batch.events.append((e.time, e.session, e.session, "disconnect", transactions))
        if session.refusal is not None and not session.txns:
            # A connection refused before any MAIL: searchable by its client.
            plugin, reply = session.refusal
            batch.messages.append(MessageRow(
                key=session.id, session=session.id, time=session.time, client=session.client, helo=session.helo,
                tls=session.tls, outcome="refused", decided_by=plugin, reply=reply,
            ))

    # -- the queue and delivery ------------------------------------------------

    def _on_delivery(self, batch: Batch, e: Event, rcpt: str, status: str, relay: str, reply: str) -> None:
        batch.count("delivery", str(status), e.time)
        delay = None
        if status == "delivered":
            arrived = self.arrivals.get(e.queue)
            if arrived is None:
                batch.unknown_arrivals.append((e.queue, e.time, len(batch.events)))
            else:
                delay = e.time - arrived
                batch.latency(e.time, delay)
        batch.events.append((e.time, e.queue, "", "delivery", rcpt, status, relay, reply, delay))

    def _on_generated(self, batch: Batch, e: Event, qid: str, sender: str, to: str) -> None:
        batch.count("generated", "", e.time)
        self._arrived(qid, e.time)
        batch.messages.append(MessageRow(
            key=qid, qid=qid, session="", time=e.time, arrived=e.time, sender=str(sender), recipients=_addresses(to),
            outcome="generated", decided_by=f"for {e.queue}" if e.queue != "-" else "",
        ))
        batch.events.append((e.time, qid, "", "generated", e.queue))

    def _on_dsn(self, batch: Batch, e: Event, kind: str, to: str, qid: str, rcpts: int) -> None:
        batch.count("dsn", str(kind), e.time)
        batch.events.append((e.time, e.queue, "", "dsn", kind, to, qid, rcpts))

    def _on_expired(self, batch: Batch, e: Event, rcpt: str) -> None:
        batch.events.append((e.time, e.queue, "", "expired", rcpt))

    def _on_discarded(self, batch: Batch, e: Event, to: str) -> None:
        batch.events.append((e.time, e.queue, "", "discarded", to))

    def _on_not_at_once(self, batch: Batch, e: Event, to: str, wait: float) -> None:
        batch.events.append((e.time, e.queue, "", "not_at_once", to, wait))

    def _on_removed(self, batch: Batch, e: Event) -> None:
        self._done(batch, e, "removed")

    def _on_at_once(self, batch: Batch, e: Event) -> None:
        self._done(batch, e, "at_once")

    def _done(self, batch: Batch, e: Event, kind: str) -> None:
        """The message's story ends here: nothing more is delivered from it."""
        self.arrivals.pop(e.queue, None)
        batch.events.append((e.time, e.queue, "", kind))
