"""The ``[local]`` section: the domains and users delivered here, their homes, quotas,
aliases and instruction files (docs/local-delivery.md)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gateway.policy.schema import setting
from gateway.policy.units import Duration, Size

__all__ = ["LocalAssign", "LocalSettings", "QuotaLimit", "QuotaSettings"]


@dataclass(frozen=True)
class LocalAssign:
    """One user's mailbox: ``[[local.assign]]`` (qmail's users/assign)."""

    user: str = field(metadata={"doc": "local user name (lower-case)"})
    home: Path = setting(Path(), "home directory: Maildir/ and .qmail files live here")
    uid: int | None = setting(None, "run program deliveries as this uid (when running as root)")
    gid: int | None = setting(None, "and this gid")


@dataclass(frozen=True)
class QuotaLimit:
    """A Maildir++ quota: ``{ storage = "100MB", messages = 5000 }``; unset parts: no limit."""

    storage: Size | None = setting(None, "bytes a Maildir may hold (Maildir++ S)", min=1)
    messages: int | None = setting(None, "messages a Maildir may hold (Maildir++ C)", min=1)


@dataclass(frozen=True)
class QuotaSettings:
    """Maildir++ quotas of local Maildirs: ``[local.quota]`` (docs/local-delivery.md)."""

    default: QuotaLimit = setting(QuotaLimit(), "every local user's Maildir (unset: no quota)")
    users: Mapping[str, QuotaLimit] = setting({}, "user -> limit; beats domains and default")
    domains: Mapping[str, QuotaLimit] = setting(
        {}, "recipient domain -> limit of each Maildir reached through it; beats default"
    )
    over_quota: Literal["defer", "bounce"] = setting(
        "defer", "at delivery, a Maildir over quota: defer (452 4.2.2, retried) or bounce (552 5.2.2)"
    )

    def limit_for(self, user: str, domain: str) -> QuotaLimit | None:
        """The limit of ``user``'s Maildir for mail to ``domain``, or None for none."""
        limit = self.users.get(user.lower()) or self.domains.get(domain.lower().rstrip(".")) or self.default
        return limit if (limit.storage is not None or limit.messages is not None) else None


@dataclass(frozen=True)
class LocalSettings:
    """Domains and users delivered here: ``[local]``."""

    domains: tuple[str, ...] = setting(("localhost",), "domains delivered locally (lower-cased)")
    users: tuple[str, ...] = setting(("postmaster",), "local users")
    mail_root: Path = setting(
        Path("var/mail"), "a user's home without an assign entry is <mail_root>/<user>"
    )
    extension_delimiter: str = setting("-", "separates user and extension: user-ext@domain")
    dot_files: bool = setting(True, "read .qmail instruction files in users' homes")
    aliases: Path = setting(
        Path(), "sendmail-style aliases file (name: target, ...); empty = no aliases"
    )
    dot_forward: bool = setting(False, "read .forward files in users' homes (sendmail syntax)")
    mailbox: Literal["maildir", "mbox"] = setting(
        "maildir", "default delivery without a .qmail file: <home>/Maildir/ or <home>/mbox"
    )
    virtual: Mapping[str, str] = setting(
        {}, "virtual domains (qmail virtualdomains): domain -> user; local part becomes the extension"
    )
    assign: tuple[LocalAssign, ...] = setting((), "per-user homes and ids (qmail users/assign)")
    program_timeout: Duration = setting(600.0, "time limit of a program delivery", min=0.001)
    program_user: str = setting(
        "nobody", "when running as root: run programs of users without uid as this user"
    )
    quota: QuotaSettings = setting(QuotaSettings(), "Maildir++ quotas (off unless a limit is set)")
