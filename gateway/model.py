"""The typed objects that travel between the gateway's parts.

:class:`Session` is one SMTP connection, :class:`Transaction` one MAIL..DATA exchange,
:class:`Message` the message as the data hooks see it, and :class:`Envelope` the queued
record the delivery side works from.
"""

from __future__ import annotations

import enum
import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, TypeVar

from gateway.address import Address
from gateway.message import Message

__all__ = [
    "Envelope",
    "Message",
    "MailParams",
    "QueueCopy",
    "Recipient",
    "RecipientState",
    "RcptParams",
    "Result",
    "Results",
    "Session",
    "Stash",
    "StashKey",
    "Transaction",
]

T = TypeVar("T")


class StashKey(Generic[T]):
    """A typed key for plugin data on a session or transaction stash.

    The producing plugin exports the key (``SPF_RESULT = StashKey[SpfResult]("spf")``)
    and consumers import it, so the type of the stored value is known at both ends.
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"StashKey({self.name!r})"


class Stash:
    """Per-object plugin storage keyed by :class:`StashKey`."""

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: dict[StashKey[Any], Any] = {}

    def __getitem__(self, key: StashKey[T]) -> T:
        value: T = self._data[key]
        return value

    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self._data[key] = value

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def get(self, key: StashKey[T], default: T | None = None) -> T | None:
        return self._data.get(key, default)


@dataclass(frozen=True, slots=True)
class Result:
    """One finding of one plugin: a score (positive is bad) and why."""

    plugin: str
    score: float
    reason: str


class Results:
    """What the plugins found, kept apart from what they decided."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: list[Result] = []

    def add(self, plugin: str, score: float, reason: str) -> None:
        self._items.append(Result(plugin, float(score), reason))

    @property
    def total(self) -> float:
        return sum(r.score for r in self._items)

    def __iter__(self) -> Iterator[Result]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


# Session and transaction ids are unique on a host while their processes run: the pid,
# then a counter in hex (S4021-1a, T4021-1b). With ``[server] workers`` several
# processes log side by side, each counting from 1; the pid is the one in ``gateway[pid]``.
_ids = itertools.count(1)
_pid = os.getpid()


def _forked() -> None:
    global _ids, _pid
    _ids, _pid = itertools.count(1), os.getpid()


os.register_at_fork(after_in_child=_forked)


def _next_id(prefix: str) -> str:
    return f"{prefix}{_pid}-{next(_ids):x}"


@dataclass(slots=True)
class Session:
    """One SMTP connection, from accept to close."""

    peer_ip: str
    peer_port: int
    listener: str
    local_ip: str = ""
    local_port: int = 0
    id: str = field(default_factory=lambda: _next_id("S"))
    started: float = field(default_factory=time.time)
    helo: str | None = None
    is_esmtp: bool = False
    tls_version: str | None = None
    tls_cipher: str | None = None
    auth_login: str | None = None
    is_relay_client: bool = False
    transactions: int = 0
    stash: Stash = field(default_factory=Stash)
    results: Results = field(default_factory=Results)
    has_early_data: Callable[[], bool] = field(default=lambda: False, repr=False)
    """True if the client sent bytes the server has not asked for yet (before the
    greeting, this is an early talker: RFC 5321 §4.3.1, postscreen's pregreet test)."""

    @property
    def has_tls(self) -> bool:
        return self.tls_version is not None

    @property
    def is_authenticated(self) -> bool:
        return self.auth_login is not None

    def reset_for_tls(self) -> None:
        """RFC 3207 §4.2: after STARTTLS forget everything learnt from the client."""
        self.helo = None
        self.is_esmtp = False


@dataclass(slots=True)
class MailParams:
    """The MAIL FROM parameters the gateway understands (RFC 1870, 6152, 6531, 3461)."""

    size: int | None = None
    body: str = "7BIT"
    smtputf8: bool = False
    ret: str | None = None  # FULL or HDRS
    envid: str | None = None
    verp: str | None = None  # VERP delimiters (XVERP, e.g. "+="): a sender per recipient


@dataclass(slots=True)
class RcptParams:
    """The RCPT TO parameters the gateway understands (RFC 3461)."""

    notify: tuple[str, ...] = ()
    orcpt: str | None = None


@dataclass(slots=True)
class Recipient:
    """One recipient of a transaction, as accepted at RCPT."""

    address: Address
    params: RcptParams = field(default_factory=RcptParams)
    accepted_by: str = ""
    stash: Stash = field(default_factory=Stash)


@dataclass(frozen=True, slots=True)
class QueueCopy:
    """A copy of the message queued as its own entry beside it (archive, always_bcc).

    Plugins append these to :attr:`Transaction.copies`; the core commits each one with
    the message (same final bytes, its own envelope) in the same group commit, and only
    when the message itself goes to ``msg/``. The 250 never depends on a copy.
    """

    recipients: tuple[str, ...]
    sender: str = ""  # the copy's envelope sender; "" is the null sender
    reason: str = ""  # noted in the copy's envelope, for ``gateway queue show``


@dataclass(slots=True)
class Transaction:
    """One MAIL FROM .. DATA exchange within a session."""

    sender: Address
    params: MailParams = field(default_factory=MailParams)
    recipients: list[Recipient] = field(default_factory=list)
    id: str = field(default_factory=lambda: _next_id("T"))
    queue_id: str | None = None
    stash: Stash = field(default_factory=Stash)
    results: Results = field(default_factory=Results)
    copies: list[QueueCopy] = field(default_factory=list)


class RecipientState(enum.Enum):
    """Where one queued recipient stands."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"  # permanent failure, bounce owed or sent


@dataclass(slots=True)
class QueuedRecipient:
    """A recipient in the queued envelope with its delivery state."""

    address: str
    orcpt: str | None = None
    notify: tuple[str, ...] = ()
    state: RecipientState = RecipientState.PENDING
    attempts: int = 0
    last_reply: str = ""
    remote: str = ""
    notified: bool = False  # the DSN this state owes (failure or success) is queued
    warned: bool = False  # a delay DSN was queued
    dsn_relayed: bool = False  # delivered to a DSN-capable next hop, which notifies
    # Set on the targets an alias or .forward expanded into: "\\user" (that mailbox,
    # no further expansion), "|command", "/mbox" or "/maildir/"; "" for an address.
    target: str = ""
    owner: str = ""  # whose rights a program/file target uses: "" = the aliases file

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"address": self.address, "state": self.state.value}
        if self.target:
            out["target"] = self.target
        if self.owner:
            out["owner"] = self.owner
        for flag in ("notified", "warned", "dsn_relayed"):
            if getattr(self, flag):
                out[flag] = True
        if self.remote:
            out["remote"] = self.remote
        if self.orcpt is not None:
            out["orcpt"] = self.orcpt
        if self.notify:
            out["notify"] = list(self.notify)
        if self.attempts:
            out["attempts"] = self.attempts
        if self.last_reply:
            out["last_reply"] = self.last_reply
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QueuedRecipient:
        return cls(
            address=str(data["address"]),
            orcpt=data.get("orcpt"),
            notify=tuple(data.get("notify", ())),
            state=RecipientState(data.get("state", "pending")),
            attempts=int(data.get("attempts", 0)),
            last_reply=str(data.get("last_reply", "")),
            remote=str(data.get("remote", "")),
            notified=bool(data.get("notified", False)),
            warned=bool(data.get("warned", False)),
            dsn_relayed=bool(data.get("dsn_relayed", False)),
            target=str(data.get("target", "")),
            owner=str(data.get("owner", "")),
        )


@dataclass(slots=True)
class Envelope:
    """The queued record of one message: who sent it, to whom, and what happened."""

    sender: str
    recipients: list[QueuedRecipient]
    arrived: float = field(default_factory=time.time)
    client_ip: str = ""
    helo: str = ""
    auth_login: str | None = None
    body: str = "7BIT"
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None
    notes: list[dict[str, Any]] = field(default_factory=list)
    quarantine_reason: str | None = None
    verp: str | None = None  # VERP delimiters: each recipient gets its own sender

    @classmethod
    def from_transaction(cls, session: Session, txn: Transaction) -> Envelope:
        return cls(
            sender=str(txn.sender),
            recipients=[
                QueuedRecipient(
                    address=str(r.address), orcpt=r.params.orcpt, notify=r.params.notify
                )
                for r in txn.recipients
            ],
            client_ip=session.peer_ip,
            helo=session.helo or "",
            auth_login=session.auth_login,
            body=txn.params.body,
            smtputf8=txn.params.smtputf8,
            ret=txn.params.ret,
            envid=txn.params.envid,
            verp=txn.params.verp,
            notes=[
                {"plugin": r.plugin, "score": r.score, "reason": r.reason}
                for r in itertools.chain(session.results, txn.results)
            ],
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": 1,
            "sender": self.sender,
            "recipients": [r.to_dict() for r in self.recipients],
            "arrived": self.arrived,
            "client_ip": self.client_ip,
            "helo": self.helo,
            "body": self.body,
            "smtputf8": self.smtputf8,
        }
        for key in ("auth_login", "ret", "envid", "quarantine_reason", "verp"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.notes:
            out["notes"] = self.notes
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Envelope:
        if data.get("version") != 1:
            raise ValueError(f"unknown envelope version {data.get('version')!r}")
        return cls(
            sender=str(data["sender"]),
            recipients=[QueuedRecipient.from_dict(r) for r in data["recipients"]],
            arrived=float(data["arrived"]),
            client_ip=str(data.get("client_ip", "")),
            helo=str(data.get("helo", "")),
            auth_login=data.get("auth_login"),
            body=str(data.get("body", "7BIT")),
            smtputf8=bool(data.get("smtputf8", False)),
            ret=data.get("ret"),
            envid=data.get("envid"),
            notes=list(data.get("notes", [])),
            quarantine_reason=data.get("quarantine_reason"),
            verp=data.get("verp"),
        )
