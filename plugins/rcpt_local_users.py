"""Recipient validation for local domains: unknown users are refused at RCPT.

Hook: ``gateway_rcpt``. For a recipient in a local domain (``[local] domains``) or the
bare ``<postmaster>``: ``postmaster`` is always accepted (RFC 5321 §4.5.1), a name in
``[local] users`` is accepted (case-insensitive), anything else gets 550 5.1.1, so no
bounce is ever owed for an unknown local user. Other domains: no opinion.

Put it after ``rcpt_relay``, which refuses routing tricks before a mailbox is looked up.
Settings: ``recipient_delimiter`` (default empty: off), e.g. ``"+"`` accepts
``user+tag@domain`` for a known ``user``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.context import Gateway
from gateway.hooks import hookimpl
from gateway.model import Recipient
from gateway.verdicts import Reply, Verdict

__all__ = ["Settings"]

REPLY_UNKNOWN = Reply(550, "5.1.1", "Recipient address rejected: user unknown")


@dataclass(frozen=True)
class Settings:
    """Settings of ``rcpt_local_users``."""

    recipient_delimiter: str = field(
        default="", metadata={"doc": "characters that start an address extension, e.g. '+' or '-'"}
    )


def _user_exists(local: str, users: tuple[str, ...], delimiter: str) -> bool:
    known = {u.lower() for u in users}
    if local in known:
        return True
    for char in delimiter:
        base = local.split(char, 1)[0]
        if base and base in known:
            return True
    return False


@hookimpl
def gateway_rcpt(rcpt: Recipient, gateway: Gateway, settings: Settings) -> Verdict | None:
    address = rcpt.address
    domain = address.domain_key
    if domain and domain not in gateway.policy.local.domains:
        return None
    if address.is_postmaster:
        return Verdict.accept(reason="postmaster")
    if _user_exists(address.local_key, gateway.policy.local.users, settings.recipient_delimiter):
        return Verdict.accept(reason="local user")
    return Verdict.reject(REPLY_UNKNOWN, reason="unknown local user")
