"""Refuse mail for a local user whose Maildir is over quota, at RCPT, with 452 4.2.2.

Hook: ``gateway_rcpt``. For a recipient in a local or virtual domain whose user has a
Maildir++ quota (``[local.quota]``: ``users``, then ``domains``, then ``default``), it
reads ``<home>/Maildir/maildirsize`` (in the gateway's thread pool) and answers 452
4.2.2 "Mailbox full" when the Maildir is at or over its quota, or, with
``use_declared_size``, when the size the client declared in ``MAIL FROM ... SIZE=``
would take it over. The client keeps the message and tries later, so no bounce is
owed; other recipients of the same message are not affected.

No opinion (the next plugin decides) for other domains, unknown users (left to
``rcpt_local_users``), ``postmaster``, users without a quota, ``[local] mailbox =
"mbox"``, and a Maildir without a ``maildirsize`` file yet: local delivery counts the
Maildir and keeps the file up to date (docs/local-delivery.md). Mail a ``.qmail`` file
sends elsewhere is judged at delivery, by ``[local.quota] over_quota``.

Put it before ``rcpt_local_users``, whose accept ends the chain. Settings:
``use_declared_size`` (default true).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gateway.context import Gateway
from gateway.delivery.local.quota import REPLY_FULL_DEFER, Quota, read_usage
from gateway.delivery.router import split_user
from gateway.hooks import hookimpl
from gateway.model import Recipient, Transaction
from gateway.verdicts import Verdict

__all__ = ["Settings"]


@dataclass(frozen=True)
class Settings:
    """Settings of ``rcpt_quota``."""

    use_declared_size: bool = field(
        default=True, metadata={"doc": "also refuse when the SIZE declared at MAIL would go over"}
    )


def _maildir(gateway: Gateway, rcpt: Recipient) -> tuple[Path, Quota] | None:
    """The recipient's default Maildir and its quota, or None when there is nothing to check."""
    local = gateway.policy.local
    address = rcpt.address
    domain = address.domain_key
    if local.mailbox != "maildir" or address.is_postmaster:
        return None
    if domain in local.virtual:
        user = local.virtual[domain]
    elif not domain or domain in local.domains:
        user, _ = split_user(address.local, local.users, local.extension_delimiter)
    else:
        return None
    if user not in local.users:
        return None
    limit = local.quota.limit_for(user, domain)
    if limit is None:
        return None
    assign = next((a for a in local.assign if a.user.lower() == user), None)
    home = assign.home if assign is not None and assign.home != Path() else Path(local.mail_root) / user
    return home / "Maildir", Quota(limit.storage, limit.messages)


@hookimpl
async def gateway_rcpt(txn: Transaction, rcpt: Recipient, gateway: Gateway, settings: Settings) -> Verdict | None:
    found = _maildir(gateway, rcpt)
    if found is None:
        return None
    maildir, quota = found
    used = await gateway.run_in_thread(read_usage, maildir)
    if used is None:
        return None
    size = txn.params.size if settings.use_declared_size and txn.params.size else 0
    if quota.is_full(used, size, 1 if size else 0):
        return Verdict.tempfail(REPLY_FULL_DEFER, reason=f"over quota {quota.spec}: {used.bytes} bytes, {used.count} messages")
    return None
