"""VERP by policy: a return path per recipient for the senders a site names (mailing lists).

Hooks: ``gateway_startup`` (checks ``delimiters``) and ``gateway_mail``. When the
envelope sender matches ``senders`` (an address, or ``@domain`` for every sender of the
domain, compared without regard to case) and the client did not already ask with
``XVERP``, the transaction gets VERP with ``delimiters``: delivery then sends the copy
for ``user@example.org`` from ``list-return-user=example.org@lists.example.com`` (one
SMTP transaction per recipient), and delivery status notifications go to that address,
naming the subscriber who failed. By default only mail of our own users (relay clients,
authenticated sessions) is changed: ``outbound_only``.

Clients can ask for the same per message with the ``XVERP`` MAIL parameter (Postfix's;
offered to relay clients and, after AUTH, to authenticated users), and local programs
with ``gateway inject -V`` or ``sendmail -XV``. See ``docs/outbound.md``.

Settings: ``senders`` (default none), ``delimiters`` (default ``-=``: the first one is the
default ``[local] extension_delimiter``, so bounces to a local list's VERP addresses reach
the list user; use ``+=`` with ``extension_delimiter = "+"``), ``outbound_only`` (default
true).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from gateway.address import Address
from gateway.delivery.verp import DEFAULT_DELIMITERS, check_delimiters
from gateway.hooks import hookimpl
from gateway.model import Session, Transaction

__all__ = ["Settings", "sender_matches"]

log = logging.getLogger("plugins.mail_verp")


@dataclass(frozen=True)
class Settings:
    """Settings of ``mail_verp``."""

    senders: tuple[str, ...] = field(default=(), metadata={"doc": "envelope senders (address or @domain) that get VERP"})
    delimiters: str = field(default=DEFAULT_DELIMITERS, metadata={"doc": "two of - = +: before the recipient, in place of its @"})
    outbound_only: bool = field(default=True, metadata={"doc": "only for relay clients and authenticated users"})


def sender_matches(sender: str, patterns: tuple[str, ...]) -> bool:
    """Whether ``sender`` is one of ``patterns`` (addresses, ``@domain``)."""
    if not sender:
        return False
    sender = sender.lower()
    domain = "@" + sender.rpartition("@")[2]
    return any(p.lower() in (sender, domain) for p in patterns)


@hookimpl
def gateway_startup(settings: Settings) -> None:
    try:
        check_delimiters(settings.delimiters)
    except ValueError as exc:
        raise ValueError(f"mail_verp: delimiters: {exc}") from None


@hookimpl
def gateway_mail(session: Session, txn: Transaction, sender: Address, settings: Settings) -> None:
    if txn.params.verp is not None or not settings.senders:
        return None
    if settings.outbound_only and not (session.is_relay_client or session.is_authenticated):
        return None
    if sender_matches(str(sender), settings.senders):
        txn.params.verp = settings.delimiters
        log.info("txn=%s VERP for <%s>", txn.id, str(sender)[:200])
    return None
