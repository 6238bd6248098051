"""What a recorded session's transactions came to: one :class:`Outcome` each.

The same reading serves the captured record (the old policy) and the record a replay
makes (the new one), so both sides are described alike: the replies decide the action,
the verdicts the handler logged name the plugin and the reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Outcome", "outcomes"]

_REFUSALS = ("reject", "tempfail", "disconnect")


@dataclass(frozen=True)
class Outcome:
    """One transaction's end: ``accept``, ``quarantine``, ``reject``, ``tempfail``,
    ``disconnect``, or ``no message`` (recipients accepted, but no message was recorded
    to go on with)."""

    action: str
    stage: str = ""
    plugin: str = ""
    reason: str = ""
    reply: str = ""
    accepted: tuple[str, ...] = ()
    score: float | None = None
    refused: tuple[str, ...] = ()
    """Recipients refused while others were accepted; ``plugin`` and ``reason`` then
    say why the first of them was."""

    @property
    def is_refused(self) -> bool:
        return self.action in _REFUSALS

    @property
    def is_accepted(self) -> bool:
        return self.action in ("accept", "quarantine", "no message")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def describe(self) -> str:
        text = self.action
        if self.is_refused:
            text += f" at {self.stage}" if self.stage else ""
            text += f" by {self.plugin}" if self.plugin else ""
            text += f" ({self.reason})" if self.reason else ""
        elif self.action == "quarantine" and self.plugin:
            text += f" by {self.plugin}" + (f" ({self.reason})" if self.reason else "")
        if self.is_accepted and self.accepted:
            text += f" for {', '.join(f'<{a}>' for a in self.accepted)}"
        if self.is_accepted and self.refused:
            text += f"; refused {', '.join(f'<{a}>' for a in self.refused)}"
            text += f" by {self.plugin}" + (f" ({self.reason})" if self.reason else "")
        if self.score is not None and self.action != "no message":
            text += f", score {self.score:g}"
        return text


def _action(reply: str) -> str:
    code = reply[:1]
    if code == "2" or code == "3":
        return "accept"
    return "tempfail" if code == "4" else "reject"


def _refusal(verdicts: list[dict[str, Any]], stages: tuple[str, ...]) -> dict[str, Any] | None:
    for verdict in reversed(verdicts):
        if verdict.get("stage") in stages and verdict.get("action") in _REFUSALS:
            return dict(verdict)
    return None


def _address(arg: str) -> str:
    start, end = arg.find("<"), arg.find(">")
    return arg[start + 1 : end] if 0 <= start < end else arg.partition(":")[2].strip()


def outcomes(record: dict[str, Any]) -> list[Outcome]:
    """Each transaction's outcome; a session refused before any (connect, HELO) gives one."""
    out: list[Outcome] = []
    txns = record.get("txns") or []
    if not txns:
        verdict = _refusal(record.get("verdicts") or [], ("connect", "helo"))
        if verdict is not None:
            out.append(Outcome(verdict["action"], verdict["stage"], verdict["plugin"], verdict["reason"], verdict["reply"]))
        return out
    for txn in txns:
        out.append(_transaction(txn))
    return out


def _transaction(txn: dict[str, Any]) -> Outcome:
    verdicts = txn.get("verdicts") or []
    mail_reply = txn.get("mail_reply") or ""
    if not mail_reply.startswith("2"):
        verdict = _refusal(verdicts, ("mail",)) or {}
        return Outcome(_action(mail_reply) if mail_reply else "reject", "mail",
                       verdict.get("plugin", "core"), verdict.get("reason", ""), mail_reply)
    rcpts = txn.get("rcpts") or []
    accepted = tuple(_address(r["rcpt"]) for r in rcpts if str(r.get("reply", "")).startswith("2"))
    data = txn.get("data")
    score = data.get("score") if data else None
    if not accepted:
        answered = [r for r in rcpts if r.get("reply")]
        head: dict[str, Any] = answered[0] if answered else {"reply": "", "verdicts": []}
        found = _refusal(head.get("verdicts") or [], ("rcpt",))
        action = "tempfail" if any(str(r["reply"]).startswith("4") for r in answered) else "reject"
        reply_text = str(head["reply"])
        if found is not None:
            return Outcome(action, "rcpt", found["plugin"], found["reason"], reply_text)
        by = "default-deny" if reply_text.startswith("550 5.7.1 Recipient not accepted") else "core"
        return Outcome(action, "rcpt", by, "", reply_text)
    refused = [r for r in rcpts if r.get("reply") and not str(r["reply"]).startswith("2")]
    names = tuple(_address(r["rcpt"]) for r in refused)
    first = _refusal(refused[0].get("verdicts") or [], ("rcpt",)) if refused else None
    by, why = (first["plugin"], first["reason"]) if first else ("default-deny" if refused else "", "")
    reply = txn.get("reply") or ""
    if data is None or not reply or reply.startswith("354"):
        return Outcome("no message", "data", by, why, accepted=accepted, refused=names)
    if reply.startswith("2"):
        quarantine = next((v for v in verdicts if v.get("action") == "quarantine"), None)
        if quarantine is not None:
            return Outcome("quarantine", "data", quarantine["plugin"], quarantine["reason"], reply, accepted, score, names)
        return Outcome("accept", "data", by, why, reply, accepted, score, names)
    verdict = _refusal(verdicts, ("data", "queue")) or {"stage": "data", "plugin": "core", "reason": ""}
    return Outcome(_action(reply), verdict["stage"], verdict["plugin"], verdict["reason"], reply, accepted, score)
