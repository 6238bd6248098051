"""Replies, verdicts and the two failure classes.

Every answer the gateway gives a client is a :class:`Reply` (code, enhanced status
code, text). Every decision a plugin takes is a :class:`Verdict` carrying a reply.
Every failure is either temporary (4xx, retry) or permanent (5xx, bounce).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

__all__ = [
    "Action",
    "GatewayError",
    "PermanentFailure",
    "Reply",
    "TemporaryFailure",
    "Verdict",
]

_STATUS_RE = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
# Reply text is printable ASCII (RFC 5321 §4.2: textstring = 1*(%d09 / %d32-126)).
_UNPRINTABLE_RE = re.compile(r"[^\x20-\x7e\t]")


def _clean_text(text: str) -> str:
    return _UNPRINTABLE_RE.sub("?", text)


_WIRE: dict[Reply, bytes] = {}  # Reply.wire()'s encodings
_WIRE_MAX = 1024


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: basic code, enhanced status code (RFC 3463) and text.

    The text may hold several lines separated by ``\\n``; each is sent as its own
    reply line. Characters outside printable ASCII are replaced, so a value that came
    from a client or a DNS record can never break the reply framing.
    """

    code: int
    status: str = ""
    text: str = ""

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"SMTP reply code out of range: {self.code}")
        if self.status:
            if not _STATUS_RE.match(self.status):
                raise ValueError(f"malformed enhanced status code: {self.status!r}")
            if self.status[0] != str(self.code)[0]:
                raise ValueError(f"enhanced status {self.status} does not match code {self.code}")

    @property
    def is_positive(self) -> bool:
        return self.code < 400

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def lines(self, enhanced: bool = True) -> list[str]:
        """The reply as wire lines without CRLF (``250-first``, ``250 last``)."""
        texts = [_clean_text(t) for t in (self.text.split("\n") if self.text else [""])]
        out = []
        for i, text in enumerate(texts):
            sep = "-" if i < len(texts) - 1 else " "
            prefix = f"{self.status} " if enhanced and self.status else ""
            out.append(f"{self.code}{sep}{prefix}{text}".rstrip())
        return out

    def __str__(self) -> str:
        return "\r\n".join(self.lines())

    def wire(self) -> bytes:
        """The reply as sent, CRLF after every line; encoded once per distinct reply
        (most are the same few constants)."""
        data = _WIRE.get(self)
        if data is None:
            data = (str(self) + "\r\n").encode("ascii", "replace")
            if len(_WIRE) >= _WIRE_MAX:  # one-off texts (queue ids) must not grow it for ever
                _WIRE.clear()
            _WIRE[self] = data
        return data

    def with_text(self, text: str) -> Reply:
        return Reply(self.code, self.status, text)


class Action(enum.Enum):
    """What a verdict decides."""

    ACCEPT = "accept"
    REJECT = "reject"
    TEMPFAIL = "tempfail"
    DISCONNECT = "disconnect"
    QUARANTINE = "quarantine"


@dataclass(frozen=True, slots=True)
class Verdict:
    """A plugin's decision at one hook, with the reply the client gets.

    ``plugin`` and ``reason`` name who decided and why, for the logs; the hook runner
    fills ``plugin`` in when a plugin leaves it empty.
    """

    action: Action
    reply: Reply
    plugin: str = ""
    reason: str = field(default="", compare=False)
    #: at ``gateway_auth`` only: the name the backend knows the user by (Dovecot's
    #: ``user=``), which the session then carries instead of the login as typed
    login: str = field(default="", compare=False)

    @classmethod
    def accept(cls, reply: Reply | None = None, reason: str = "", login: str = "") -> Verdict:
        return cls(Action.ACCEPT, reply or Reply(250, "2.0.0", "OK"), reason=reason, login=login)

    @classmethod
    def reject(cls, reply: Reply, reason: str = "") -> Verdict:
        if not reply.is_permanent:
            raise ValueError("a reject verdict needs a 5xx reply")
        return cls(Action.REJECT, reply, reason=reason)

    @classmethod
    def tempfail(cls, reply: Reply, reason: str = "") -> Verdict:
        if not reply.is_temporary:
            raise ValueError("a tempfail verdict needs a 4xx reply")
        return cls(Action.TEMPFAIL, reply, reason=reason)

    @classmethod
    def disconnect(cls, reply: Reply | None = None, reason: str = "") -> Verdict:
        return cls(
            Action.DISCONNECT,
            reply or Reply(421, "4.7.0", "closing connection"),
            reason=reason,
        )

    @classmethod
    def quarantine(cls, reason: str, reply: Reply | None = None) -> Verdict:
        return cls(Action.QUARANTINE, reply or Reply(250, "2.0.0", "OK"), reason=reason)

    def named(self, plugin: str) -> Verdict:
        """The same verdict, attributed to ``plugin`` unless it already names one."""
        if self.plugin:
            return self
        return Verdict(self.action, self.reply, plugin, self.reason, self.login)

    @property
    def is_refusal(self) -> bool:
        return self.action in (Action.REJECT, Action.TEMPFAIL, Action.DISCONNECT)


class GatewayError(Exception):
    """Root of the gateway's own failures; each carries the reply to give."""

    def __init__(self, reply: Reply, detail: str = "") -> None:
        super().__init__(detail or reply.text)
        self.reply = reply


class TemporaryFailure(GatewayError):
    """Try again later: 4xx to a client, retry for a delivery."""

    def __init__(self, reply: Reply | str, detail: str = "") -> None:
        if isinstance(reply, str):
            reply = Reply(451, "4.3.0", reply)
        super().__init__(reply, detail)


class PermanentFailure(GatewayError):
    """Will never work: 5xx to a client, bounce for a delivery."""

    def __init__(self, reply: Reply | str, detail: str = "") -> None:
        if isinstance(reply, str):
            reply = Reply(554, "5.0.0", reply)
        super().__init__(reply, detail)
