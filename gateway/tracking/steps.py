"""What a stored step says: :func:`describe` turns a :data:`~gateway.tracking.story.Step`
(the log line's kind and arguments, as the writer stored them) into the
:class:`~gateway.tracking.story.EventRow` the console shows.

The writer thread stores the arguments as they were logged and leaves the wording to
the reader: a message's story is read a few times at most, written once for every
message, on a machine whose cores the event loops need.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

from gateway.tracking.story import EventRow

__all__ = ["DELIVERY_DELAY", "describe"]

DELIVERY_DELAY = 8
"""Where a ``delivery`` step keeps its delay (seconds since queued, or ``None``)."""
_DETAIL_ADDRESS = re.compile(r"\b(?:sender|rcpt)=<([^<>]*)>")
_DEFAULT_DENY_REPLY = "550 5.7.1 Recipient not accepted"


def _connect(client: Any, port: Any, listener: Any, relay: Any) -> dict[str, Any]:
    return {"detail": f"client {client} port {port} listener {listener}" + (" (relay client)" if relay else "")}


def _verdict(stage: Any, action: Any, plugin: Any, reply: Any, reason: Any, details: Any) -> dict[str, Any]:
    address = _DETAIL_ADDRESS.search(str(details or ""))
    return {"kind": "verdict", "plugin": plugin, "status": f"{stage} {action}", "reply": reply, "detail": reason,
            "recipient": address.group(1) if address and stage == "rcpt" else ""}


def _mail(sender: Any, size: Any) -> dict[str, Any]:
    return {"detail": f"from <{sender}>" + (f" size {size}" if size not in (None, "None") else "")}


def _queued(qid: Any, size: Any, rcpts: Any, area: Any, score: Any) -> dict[str, Any]:
    return {"status": str(area),
            "detail": f"queue id {qid}, {size} octets, {rcpts} recipient(s), score {float(score):.1f}"}


_KINDS: dict[str, Callable[..., dict[str, Any]]] = {
    "connect": _connect,
    "tls": lambda version, cipher: {"detail": f"{version} {cipher}"},
    "helo": lambda name, esmtp: {"detail": f"{name}" + (" (EHLO)" if esmtp else "")},
    "auth_ok": lambda mechanism, login, as_, plugin: {
        "kind": "auth", "plugin": plugin, "status": "ok", "detail": f"{mechanism} {login}{as_}"},
    "auth_failed": lambda mechanism, login, client, plugin: {
        "kind": "auth", "plugin": plugin, "status": "failed", "detail": f"{mechanism} {login}"},
    "too_many": lambda client: {"kind": "verdict", "plugin": "core", "status": "tempfail",
                                "detail": "too many connections"},
    "mail": _mail,
    "rcpt_ok": lambda rcpt, plugin: {"kind": "rcpt", "plugin": plugin, "recipient": rcpt, "status": "accepted"},
    "rcpt_denied": lambda rcpt: {"kind": "rcpt", "plugin": "default-deny", "recipient": rcpt, "status": "reject",
                                 "reply": _DEFAULT_DENY_REPLY, "detail": "no plugin accepted the recipient"},
    "rcpt_size": lambda rcpt, size, limit: {"kind": "rcpt", "plugin": "core", "recipient": rcpt, "status": "reject",
                                            "detail": f"declared size {size} over its limit {limit}"},
    "verdict": _verdict,
    "quarantine": lambda plugin, reason: {"plugin": plugin, "detail": reason},
    "observe": lambda plugin, hook, would, reply, reason: {
        "plugin": plugin, "status": f"{str(hook).removeprefix('gateway_')} would {would}", "reply": reply,
        "detail": reason},
    "error": lambda plugin, hook, what: {"plugin": plugin, "status": str(hook).removeprefix("gateway_"),
                                        "detail": what},
    "data_refused": lambda reply: {"kind": "verdict", "plugin": "core", "status": "data reject", "reply": reply,
                                   "detail": "message refused by the core limits"},
    "queued": _queued,
    "copy": lambda qid, to: {"detail": f"copy queued as {qid} to {to}"},
    "result": lambda plugin, reason, score: {"plugin": plugin, "detail": reason, "score": score},
    "disconnect": lambda transactions: {"detail": f"{transactions} transaction(s)"},
    "delivery": lambda rcpt, status, relay, reply, delay: {
        "recipient": rcpt, "status": status, "relay": relay, "reply": reply, "delay": delay},
    "generated": lambda origin: {"detail": f"made here for {origin}" if origin != "-" else "made here"},
    "dsn": lambda kind, to, qid, rcpts: {"status": str(kind), "recipient": to,
                                        "detail": f"{kind} notice about {rcpts} recipient(s) queued as {qid}"},
    "expired": lambda rcpt: {"recipient": rcpt, "status": "failed", "detail": "given up after the queue lifetime"},
    "discarded": lambda to: {"detail": f"discarded by a route: {to}"},
    "removed": lambda: {"detail": "removed from the queue"},
    "at_once": lambda: {"detail": "delivered before the reply to the client, never queued"},
    "not_at_once": lambda to, wait: {
        "recipient": to, "detail": f"relaying before the reply to the client took over {wait:g}s: cut off"
        " before the final dot (the next hop has nothing), queued instead"},
}


def describe(step: Sequence[Any]) -> dict[str, Any]:
    """A stored step as the story's row: every field of
    :class:`~gateway.tracking.story.EventRow` (a step of a kind this version does not
    know, or of another shape, shows its kind and its arguments)."""
    when, key, session, kind, *args = step
    row = EventRow(when, key, session, kind)._asdict()
    try:
        row.update(_KINDS[kind](*args))
    except (KeyError, TypeError, ValueError):
        row["detail"] = " ".join(str(a) for a in args)
    return row


def status_of(step: Sequence[Any]) -> tuple[str, str] | None:
    """``(recipient, status)`` of a delivery or expiry step; ``None`` for another."""
    kind = step[3]
    if kind == "delivery" and len(step) > 5:
        return str(step[4]), str(step[5])
    if kind == "expired" and len(step) > 4:
        return str(step[4]), "failed"
    return None
