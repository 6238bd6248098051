"""How a :class:`~gateway.tracking.story.Batch` is stored, and read back, by any backend.

Few rows, few statements: a write costs the gateway's CPU, and every statement a row is a
Python step and a hand-over of the GIL in a busy process (the sqlite3 and psycopg drivers
release it around each one). So a message is one row, and its story is a column of it:
the JSON array of its steps (:data:`~gateway.tracking.story.Step` s: the log line's kind
and arguments, worded when read by gateway/tracking/steps.py) that
the batch holds, its session's steps too (connect, TLS, HELO, the disconnect), since a
session's transactions are usually written in the batch that also holds its connection.
Steps of a message or session whose row was written in an earlier batch (a delivery
attempt, a removal, a disconnect; or written by another process: the master's retries)
become one row a key and batch in the ``stories`` table, keyed the same way. A message's
story is then its row's steps, its session's steps kept in its sibling rows (the other
transactions of the session), and its ``stories`` rows, in time order.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator, Sequence

from gateway.tracking.steps import describe, status_of
from gateway.tracking.story import Batch, EventRow, MessageRow, Step

__all__ = [
    "EVENT_FIELDS", "MESSAGE_COLUMNS", "PERIODS", "Story", "counter_rows", "is_maximum", "message_rows", "read_story",
    "recipient_states", "split", "story_rows", "summary_state",
]

PERIODS = (60, 3600)
"""Counters are kept per minute and per hour (written together)."""
MESSAGE_COLUMNS = (
    "key", "qid", "session", "time", "arrived", "client", "helo", "tls", "auth", "sender", "recipients", "refused",
    "size", "message_id", "area", "score", "outcome", "decided_by", "reply", "story",
)
EVENT_FIELDS = EventRow._fields

_py_dumps = json.JSONEncoder(ensure_ascii=False, check_circular=False, separators=(",", ":"), default=str).encode
# The C encoder made once: json.dumps makes one a call, a third of its cost on a story.
# Non-JSON values (a log argument that is an object) become their str().
_make_encoder: Any = getattr(json.encoder, "c_make_encoder", None)
_encoder: Any = None if _make_encoder is None else _make_encoder(
    None, str, json.encoder.encode_basestring, None, ":", ",", False, False, True)


def _dumps(steps: list[Step]) -> str:
    if _encoder is None:  # a Python without the _json accelerator
        return _py_dumps(steps)
    return "".join(_encoder(steps, 0))


def _message(m: MessageRow, story: list[Step]) -> tuple[Any, ...]:
    return (m.key, m.qid, m.session, m.time, m.arrived, m.client, m.helo, m.tls, m.auth, m.sender,
            ", ".join(m.recipients), ", ".join(m.refused), m.size, m.message_id, m.area, m.score, m.outcome,
            m.decided_by, m.reply, _dumps(story))


Story = tuple[MessageRow, list[Step]]
"""A message and the steps of it (and of its session) that go in its row."""


def split(batch: Batch, carried: Iterable[Story] = ()) -> tuple[list[Story], dict[str, list[Step]]]:
    """The batch's messages (after those ``carried`` over from an earlier batch, whose
    rows are not written yet) each with its steps, and the other steps by key."""
    messages: list[Story] = []
    stories: dict[str, list[Step]] = {}
    where: dict[str, int] = {}
    for message, steps in (*carried, *((m, []) for m in batch.messages)):
        if message.key in where:  # the same key again: one row, the later facts, both stories
            messages[where[message.key]] = (message, stories[message.key])
            continue
        where[message.key] = len(messages)
        stories[message.key] = steps
        messages.append((message, steps))
    # A session's own steps go with its last transaction at hand.
    home = {message.session: steps for message, steps in messages if message.session}
    loose: dict[str, list[Step]] = {}
    for event in batch.events:
        key = event[1]
        story = stories.get(key)
        if story is None:
            story = home.get(key) if key == event[2] else None
            if story is None:
                story = loose.get(key)
                if story is None:
                    story = loose[key] = []
        story.append(event)
    return messages, loose


def message_rows(messages: Iterable[Story], loose: dict[str, list[Step]]
                 ) -> tuple[list[tuple[Any, ...]], list[tuple[float, str, str, str]]]:
    """Message rows (:data:`MESSAGE_COLUMNS`, the story last) and ``stories`` rows
    ``(time, key, session, story)`` of the steps whose message is not at hand."""
    rows = [_message(m, steps) for m, steps in messages]
    rest = [(steps[0][0], key, steps[0][2], _dumps(steps)) for key, steps in loose.items()]
    return rows, rest


def counter_rows(batch: Batch) -> tuple[list[tuple[int, int, str, str, float]], list[tuple[int, int, str, str, float]]]:
    """``(period, t, name, key, value)`` rows to add and to raise to a maximum."""
    adds = [(period, t // period * period, name, key, value)
            for (name, key, t), value in batch.counters.items() for period in PERIODS]
    maxima = [(period, t // period * period, name, key, value)
              for (name, key, t), value in batch.maxima.items() for period in PERIODS]
    return adds, maxima


def _steps(story: Any) -> list[Any]:
    if not story:
        return []
    return json.loads(story) if isinstance(story, (str, bytes)) else list(story)


def story_rows(story: Any, keys: Sequence[str] | None = None, node: str = "") -> Iterator[dict[str, Any]]:
    """A stored story's steps as dicts of :data:`EVENT_FIELDS` and the ``node`` that
    wrote them (those keyed one of ``keys``)."""
    for step in _steps(story):
        if keys is None or step[1] in keys:
            row = describe(step)
            row["node"] = node
            yield row


def read_story(own: tuple[Any, str], siblings: Iterable[tuple[Any, str]], parts: Iterable[tuple[Any, str]],
               key: str, session: str) -> list[dict[str, Any]]:
    """A message's whole story: its row's steps, its session's steps kept in its
    ``siblings`` (the stories of the session's other rows) and its ``parts`` (its and its
    session's ``stories`` rows), in time order; each ``(story, node)``."""
    steps = list(story_rows(own[0], None, own[1]))
    for story, node in siblings:
        steps += story_rows(story, (session,), node)
    for story, node in parts:
        steps += story_rows(story, None, node)
    steps.sort(key=lambda step: step["time"])
    return steps


def recipient_states(stories: Iterable[Any], keys: Iterable[str]) -> dict[str, dict[str, str]]:
    """key -> recipient -> its last delivery status (delivered, deferred, failed), and
    ``""`` -> ``removed`` once removed from the queue, from stored stories."""
    wanted = set(keys)
    last: dict[tuple[str, str], tuple[float, str]] = {}
    found: dict[str, dict[str, str]] = {}
    for story in stories:
        for step in _steps(story):
            key = step[1]
            if key not in wanted:
                continue
            outcome = status_of(step)
            if outcome is not None:
                when, (recipient, status) = step[0], outcome
                if (key, recipient) not in last or when >= last[key, recipient][0]:
                    last[key, recipient] = (when, status)
            elif step[3] == "removed":
                found.setdefault(key, {})[""] = "removed"
    for (key, recipient), (_, status) in last.items():
        found.setdefault(key, {})[recipient] = status
    return found


def is_maximum(name: str) -> bool:
    """Whether a counter keeps a bucket's largest value rather than its sum."""
    return name.endswith("_max") or name.startswith("queue_")


def summary_state(outcome: str, states: dict[str, str]) -> str:
    """What became of a message, in a word or two, from its SMTP outcome and its
    recipients' last delivery states."""
    if outcome not in ("queued", "generated", "copy"):
        return outcome
    last = [s for r, s in states.items() if r]
    if not last:
        return "removed" if "" in states else "queued"
    kinds = set(last)
    if kinds == {"delivered"}:
        return "delivered"
    if "deferred" in kinds:
        return "deferred"
    if kinds == {"failed"}:
        return "bounced"
    return "partly bounced"
