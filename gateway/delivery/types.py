"""Types shared by the scheduler and the delivery agents."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gateway.verdicts import PermanentFailure, Reply, TemporaryFailure

__all__ = ["LocalAccount", "LocalRoute", "MxRoute", "Outcome", "Route", "SmarthostRoute", "SpecialRoute", "TargetRoute"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one delivery attempt did for one recipient.

    ``status`` is ``delivered``, ``deferred`` (temporary, retry) or ``failed``
    (permanent, bounce). ``reply`` is the answer that decided it: the remote server's
    (with ``remote`` naming the host) or our own words (local delivery, or a remote one
    that no host answered: no such domain, connection refused). ``expired``: the queue
    lifetime failed the recipient, and ``reply`` is the last real error before that.
    """

    status: Literal["delivered", "deferred", "failed"]
    reply: Reply
    remote: str = ""
    dsn_relayed: bool = False  # the next hop took our DSN parameters: it notifies from now on
    expired: bool = False

    @classmethod
    def of_failure(cls, exc: TemporaryFailure | PermanentFailure) -> Outcome:
        """A classified failure as an outcome: retry (temporary) or bounce (permanent)."""
        return cls("deferred" if isinstance(exc, TemporaryFailure) else "failed", exc.reply)

    @property
    def diagnostic(self) -> str:
        """RFC 3464 Diagnostic-Code value: ``smtp; 550 5.1.1 text``."""
        return f"smtp; {' '.join(self.reply.lines())}"


@dataclass(frozen=True, slots=True)
class LocalAccount:
    """Where a user from a user directory (such as Dovecot's userdb) gets its mail.

    A ``gateway_route`` plugin that knows users the policy does not list (``[local]
    users``) puts one in the :class:`LocalRoute` it answers; local delivery then uses
    it instead of ``<mail_root>/<user>`` and ``[[local.assign]]``.

    :ivar home: the user's home (absolute): ``.qmail`` files, and the default mailbox
        ``<home>/Maildir/`` (or ``<home>/mbox``); created (owned by ``uid``/``gid``
        when the gateway runs as root) if missing
    :ivar uid: the owner of what delivery creates, and the uid programs run as (as root)
    :ivar gid: its group
    :ivar maildir: the default mailbox when the directory names one (Dovecot's
        ``mail=maildir:...``), else ``None``
    """

    home: Path
    uid: int | None = None
    gid: int | None = None
    maildir: Path | None = None


@dataclass(frozen=True, slots=True)
class LocalRoute:
    """Deliver to a local user (``user``), with an optional address extension.

    ``account`` is set when a user directory (a ``gateway_route`` plugin) vouches for
    the user; without it, the user must be one of ``[local] users``.
    """

    user: str
    extension: str
    domain: str
    account: LocalAccount | None = None

    @property
    def key(self) -> str:
        return f"local:{self.user}"


@dataclass(frozen=True, slots=True)
class MxRoute:
    """Deliver to the MX hosts of ``domain`` (null MX, implicit MX and A fallback apply)."""

    domain: str

    @property
    def key(self) -> str:
        return f"mx:{self.domain}"


@dataclass(frozen=True, slots=True)
class SmarthostRoute:
    """Deliver through a fixed relay host (qmail smtproutes)."""

    host: str
    port: int
    tls: Literal["none", "opportunistic", "required", "verify"]
    auth_user: str = ""
    auth_password_env: str = ""

    @property
    def key(self) -> str:
        return f"smarthost:{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class SpecialRoute:
    """Keep the recipient in the queue (``hold``) or drop it, logged (``discard``)."""

    action: Literal["hold", "discard"]

    @property
    def key(self) -> str:
        return self.action


@dataclass(frozen=True, slots=True)
class TargetRoute:
    """Deliver to a program or mailbox file an alias or ``.forward`` expanded into.

    ``kind`` is ``program`` (``value`` the command), ``mbox`` or ``maildir`` (``value``
    the absolute path); ``owner`` is the local user whose ``.forward`` named it, whose
    rights it uses, or ``""`` for the aliases file (``[local] program_user``).
    """

    kind: Literal["program", "mbox", "maildir"]
    value: str
    owner: str
    domain: str

    @property
    def key(self) -> str:
        return f"target:{self.kind}:{self.owner}:{self.value}"


Route = LocalRoute | MxRoute | SmarthostRoute | SpecialRoute | TargetRoute
