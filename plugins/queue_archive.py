"""Archive copies ("log all mail"): Postfix's always_bcc, sender_bcc_maps, recipient_bcc_maps.

Hooks: ``gateway_startup`` (checks every address and map key; a bad one stops start-up
or refuses the reload, naming the setting) and ``gateway_queue``. For each message of the selected ``direction`` it asks the core
for a copy (:class:`~gateway.model.QueueCopy`) addressed to:

- every address in ``always`` (always_bcc);
- ``sender_map[<sender>]``, else ``sender_map["@<sender domain>"]`` (sender_bcc_maps);
- for each recipient, ``recipient_map[<recipient>]``, else
  ``recipient_map["@<recipient domain>"]`` (recipient_bcc_maps).

Keys match without regard to case; an archive address named several times gets one copy.
``direction`` is ``inbound`` (sessions that are neither relay clients nor authenticated:
mail from outside, which relay control only lets in for our local and relay domains),
``outbound`` (relay clients and authenticated users) or ``all``; list the plugin twice
(with ``id``) to archive the two directions to different places.

The copy is its own queue entry, not an extra recipient of the message: the core commits
it in the same group commit as the message, with the message's final bytes (every header
the queue plugins add, DKIM signature included, wherever this entry sits in the chain).
The 250 depends on the message's commit alone: a copy that cannot be committed is logged
at ERROR and the message is still accepted; a message refused at commit takes its copies
back. A copy is delivered and retried on its own schedule, so a failing archive never
delays the message. Quarantined messages are not copied (release does not copy either).
The copies' envelope sender is ``copy_sender``, by default the null sender: the original
sender never hears of the archive, and a copy that fails for good goes to the postmaster.

An archive Maildir is an ordinary local delivery: a local user whose home holds it::

    [local]
    users = ["postmaster", "archive"]
    [[local.assign]]
    user = "archive"
    home = "/srv/mail-archive"          # copies land in /srv/mail-archive/Maildir/

    [[plugins]]
    name = "queue_archive"
    always = ["archive@example.org"]

Settings: ``direction`` (default ``all``), ``always``, ``sender_map``, ``recipient_map``
(default empty: copy nothing), ``copy_sender`` (default null).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from gateway.address import Address, AddressError
from gateway.context import Gateway
from gateway.hooks import hookimpl
from gateway.model import QueueCopy, Session, Transaction

__all__ = ["Settings", "archive_addresses", "is_outbound"]

log = logging.getLogger("plugins.queue_archive")


@dataclass(frozen=True)
class Settings:
    """Settings of ``queue_archive``."""

    direction: Literal["all", "inbound", "outbound"] = field(
        default="all", metadata={"doc": "inbound (from outside), outbound (relay clients, authenticated) or all"}
    )
    always: tuple[str, ...] = field(default=(), metadata={"doc": "addresses that get a copy of every message"})
    sender_map: Mapping[str, str] = field(
        default_factory=dict, metadata={"doc": "sender address or @domain -> archive address"}
    )
    recipient_map: Mapping[str, str] = field(
        default_factory=dict, metadata={"doc": "recipient address or @domain -> archive address"}
    )
    copy_sender: str = field(default="", metadata={"doc": 'envelope sender of the copies ("" = <>)'})


def is_outbound(session: Session) -> bool:
    """Mail our own users send: from a relay client or an authenticated session."""
    return session.is_relay_client or session.is_authenticated


def _lookup(table: Mapping[str, str], address: str) -> str | None:
    address = address.lower()
    hit = table.get(address)
    if hit is None and "@" in address:
        hit = table.get("@" + address.rpartition("@")[2])
    return hit


def archive_addresses(settings: Settings, sender: str, recipients: list[str]) -> list[str]:
    """The archive addresses for one message, in order, each once."""
    out: dict[str, None] = dict.fromkeys(settings.always)
    sender_map = {k.lower(): v for k, v in settings.sender_map.items()}
    recipient_map = {k.lower(): v for k, v in settings.recipient_map.items()}
    if sender and sender_map:
        hit = _lookup(sender_map, sender)
        if hit:
            out[hit] = None
    if recipient_map:
        for rcpt in recipients:
            hit = _lookup(recipient_map, rcpt)
            if hit:
                out[hit] = None
    return list(out)


def _check(settings: Settings) -> None:
    """Refuse a policy with a malformed address, naming the setting."""
    named = [("always", a) for a in settings.always]
    named += [(f"sender_map[{k!r}]", v) for k, v in settings.sender_map.items()]
    named += [(f"recipient_map[{k!r}]", v) for k, v in settings.recipient_map.items()]
    if settings.copy_sender:
        named.append(("copy_sender", settings.copy_sender))
    for where, address in named:
        try:
            Address.parse(address)
        except AddressError as exc:
            raise ValueError(f"queue_archive: {where}: bad address {address!r}: {exc}") from None
    for name, table in (("sender_map", settings.sender_map), ("recipient_map", settings.recipient_map)):
        for key in table:
            local, at, domain = key.rpartition("@")
            if not at or not domain:
                raise ValueError(f"queue_archive: {name}: key {key!r} is neither an address nor @domain")


@hookimpl
def gateway_startup(settings: Settings) -> None:
    _check(settings)


@hookimpl
def gateway_queue(session: Session, txn: Transaction, gateway: Gateway, settings: Settings) -> None:
    if settings.direction != "all" and (settings.direction == "outbound") != is_outbound(session):
        return None
    sender = str(txn.sender)
    addresses = archive_addresses(settings, sender, [str(r.address) for r in txn.recipients])
    if addresses:
        txn.copies.append(QueueCopy(tuple(addresses), settings.copy_sender, "archive copy"))
        log.debug("txn=%s archive copy to %s", txn.id, ",".join(addresses))
    return None
