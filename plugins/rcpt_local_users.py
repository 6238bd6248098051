"""Recipient validation for local domains: unknown users are refused at RCPT.

Hook: ``gateway_rcpt``. For a recipient in a local domain (``[local] domains``) or the
bare ``<postmaster>``: ``postmaster`` is always accepted (RFC 5321 §4.5.1); a known
user (``[local] users`` and ``[[local.assign]]``) is accepted, and so is
``user<delimiter>extension`` for a known user (``[local] extension_delimiter``, qmail's
``-``); anything else gets 550 5.1.1, so no bounce is ever owed for an unknown local
user. A virtual domain (``[local] virtual``) accepts every local part when the user it
maps to exists. A name of the aliases file (``[local] aliases``, exactly the local part)
is accepted too, and so are ``abuse`` and ``MAILER-DAEMON`` (RFC 2142), which reach the
postmaster's mailbox when no user or alias of that name exists. Other domains: no opinion.

Put it after ``rcpt_relay``, which refuses routing tricks before a mailbox is looked up.
Settings: ``allow_extensions`` (default true).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.context import Gateway
from gateway.delivery.local.expand import current_aliases, is_alias
from gateway.delivery.router import POSTMASTER_ROLES, split_user
from gateway.hooks import hookimpl
from gateway.model import Recipient
from gateway.verdicts import Reply, Verdict

__all__ = ["Settings"]

REPLY_UNKNOWN = Reply(550, "5.1.1", "Recipient address rejected: user unknown")


@dataclass(frozen=True)
class Settings:
    """Settings of ``rcpt_local_users``."""

    allow_extensions: bool = field(
        default=True, metadata={"doc": "accept user<delimiter>extension for a known user"}
    )


async def _is_alias(gateway: Gateway, local_part: str) -> bool:
    local = gateway.policy.local
    known = is_alias(local, local_part)
    if known is None:  # the aliases file is due a look for changes: not on the loop
        aliases = await gateway.run_in_thread(current_aliases, local)
        known = local_part.lower() in aliases.aliases
    return known


@hookimpl
async def gateway_rcpt(rcpt: Recipient, gateway: Gateway, settings: Settings) -> Verdict | None:
    address = rcpt.address
    domain = address.domain_key
    local = gateway.policy.local
    if domain in local.virtual:
        if local.virtual[domain] in local.users:
            return Verdict.accept(reason="virtual domain")
        return Verdict.reject(REPLY_UNKNOWN, reason="virtual domain user unknown")
    if domain and domain not in local.domains:
        return None
    if address.is_postmaster:
        return Verdict.accept(reason="postmaster")
    delimiter = local.extension_delimiter if settings.allow_extensions else ""
    user, _ = split_user(address.local, local.users, delimiter)
    if user in local.users:
        return Verdict.accept(reason="local user")
    if await _is_alias(gateway, address.local):
        return Verdict.accept(reason="alias")
    if address.local.lower() in POSTMASTER_ROLES:
        return Verdict.accept(reason="role address, delivered to postmaster")
    return Verdict.reject(REPLY_UNKNOWN, reason="unknown local user")
