"""Per-user allow and block lists of senders, which users edit in the web console.

Hooks: ``gateway_startup``/``gateway_shutdown`` (open and close the lists' state store,
``[console] user_lists_state``: the console writes there, so every node sharing that
store honours the same lists) and ``gateway_rcpt``. Its partner ``data_user_lists``
acts on what this plugin notes.

For each recipient, the lists of its owner are read: the recipient address in lower
case, a local-domain ``user<delimiter>ext`` counted as ``user`` (the console stores a
user's lists under each of their addresses, aliases included). An entry is an address
(``bob@example.org``) or a domain (``@example.org``, which matches that domain and its
subdomains); the message's envelope sender (MAIL FROM) is matched, case-insensitively,
and the null sender matches nothing. Then:

- a sender on the recipient's **block** list: that recipient is refused with ``550
  5.7.1 Sender blocked by the recipient`` (no bounce is owed; the others go on);
- a sender on the **allow** list (and not blocked): the recipient is noted as allowing
  it (:data:`ALLOWING`); ``data_user_lists`` then lets the message skip the spam
  score when every recipient allows its sender. A recipient whose answer differs from
  the recipients already accepted in the transaction (one allows the sender, the other
  does not) gets ``452 4.5.3``, RFC 5321's "too many recipients": the client sends it
  again in a transaction of its own, so each message has one answer for all its
  recipients.

No opinion otherwise (acceptance is ``rcpt_local_users``' business): put it before the
plugins that accept recipients, after ``rcpt_relay``. The state store down:
``on_state_error``, ``continue`` (lists not honoured; a WARNING) or ``tempfail`` (451).

Settings: ``on_state_error``. The lists are stored as JSON under
``userlists:<digest of the address>`` (:func:`load_lists`, :func:`save_lists`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gateway.context import Gateway
from gateway.delivery.router import split_user
from gateway.hooks import hookimpl
from gateway.logs import short
from gateway.model import Recipient, StashKey, Transaction
from gateway.policy import setting
from gateway.policy.local import LocalSettings
from gateway.state import REPLY_STATE_UNAVAILABLE, PluginStores, StateStore, StateUnavailable
from gateway.state.keys import digest
from gateway.verdicts import Reply, Verdict

__all__ = ["ALLOWING", "MAX_ENTRIES", "Settings", "UserLists", "load_lists", "normal_entry", "owner_of", "save_lists"]

NAME = "rcpt_user_lists"
log = logging.getLogger(f"plugins.{NAME}")

REPLY_BLOCKED = Reply(550, "5.7.1", "Sender blocked by the recipient")
REPLY_SPLIT = Reply(452, "4.5.3", "Too many recipients: send to this one in another transaction")
MAX_ENTRIES = 500
"""Most entries in one list."""

ALLOWING = StashKey[dict[str, bool]]("rcpt_user_lists.allowing")
"""Recipient address (lower case) -> whether it allows the transaction's sender."""


@dataclass(frozen=True)
class Settings:
    """Settings of ``rcpt_user_lists``."""

    on_state_error: Literal["continue", "tempfail"] = setting(
        "continue", "lists' state store down: mail passes as if no lists existed, or answer 451 4.3.0"
    )


@dataclass
class UserLists:
    """One user's lists: addresses and ``@domains``, lower case."""

    allow: list[str] = field(default_factory=list)
    block: list[str] = field(default_factory=list)

    @staticmethod
    def _matches(entry: str, sender: str) -> bool:
        if entry.startswith("@"):
            domain = sender.rpartition("@")[2]
            return domain == entry[1:] or domain.endswith("." + entry[1:])
        return sender == entry

    def blocks(self, sender: str) -> bool:
        return any(self._matches(e, sender) for e in self.block)

    def allows(self, sender: str) -> bool:
        return not self.blocks(sender) and any(self._matches(e, sender) for e in self.allow)


def normal_entry(text: str) -> str:
    """A list entry as stored: ``user@domain`` or ``@domain``, lower case.

    :raises ValueError: not one of those forms
    """
    entry = text.strip().lower().strip("<>")
    local, at, domain = entry.rpartition("@")
    if not at or len(entry) > 254 or not domain or "." not in domain.strip(".") or any(
        c.isspace() or c in '<>,;"()[]\\' for c in entry
    ) or "@" in local or domain.startswith(".") or domain.endswith("."):
        raise ValueError(f"{text[:80]!r} is neither an address (bob@example.org) nor a domain (@example.org)")
    return entry


def owner_of(local: LocalSettings, address: str) -> str:
    """Whose lists apply to ``address``: itself lower case, a local extension cut off."""
    address = address.lower()
    name, _, domain = address.rpartition("@")
    if domain in local.domains and local.extension_delimiter:
        user, extension = split_user(name, local.users, local.extension_delimiter)
        if extension:
            return f"{user}@{domain}"
    return address


def _key(address: str) -> str:
    return f"userlists:{digest(address.lower())}"


async def load_lists(store: StateStore, address: str) -> UserLists:
    """The lists stored for ``address`` (empty if none, or unreadable).

    :raises StateUnavailable: the store did not answer
    """
    raw = await store.get(_key(address))
    if not raw:
        return UserLists()
    try:
        data = json.loads(raw)
        return UserLists(allow=[str(e) for e in data["allow"]][:MAX_ENTRIES],
                         block=[str(e) for e in data["block"]][:MAX_ENTRIES])
    except (ValueError, KeyError, TypeError):
        log.warning("unreadable lists under %s: ignored", _key(address))
        return UserLists()


async def save_lists(store: StateStore, addresses: frozenset[str] | set[str], lists: UserLists) -> None:
    """Store ``lists`` under each of ``addresses`` (a user's own addresses).

    :raises StateUnavailable: the store did not answer
    """
    value = json.dumps({"allow": lists.allow[:MAX_ENTRIES], "block": lists.block[:MAX_ENTRIES]})
    for address in sorted(addresses):
        await store.set(_key(address), value)


class Plugin:
    """Holds the lists' store."""

    def __init__(self) -> None:
        self._stores = PluginStores()

    @hookimpl
    async def gateway_startup(self, gateway: Gateway) -> None:
        await self._stores.open(gateway.policy.console.user_lists_state, Path(gateway.policy.server.var_dir))

    @hookimpl
    async def gateway_shutdown(self, gateway: Gateway) -> None:
        await self._stores.close(gateway.policy.console.user_lists_state)

    @hookimpl
    async def gateway_rcpt(
        self, txn: Transaction, rcpt: Recipient, gateway: Gateway, settings: Settings
    ) -> Verdict | None:
        if txn.sender.is_null or not rcpt.address.domain:
            return None
        sender = f"{txn.sender.local}@{txn.sender.domain_key}".lower()
        address = str(rcpt.address).lower()
        try:
            store = self._stores.require(gateway.policy.console.user_lists_state)
            lists = await load_lists(store, owner_of(gateway.policy.local, address))
        except StateUnavailable as exc:
            if settings.on_state_error == "tempfail":
                return Verdict.tempfail(REPLY_STATE_UNAVAILABLE, reason=f"user lists: {exc}")
            log.warning("txn=%s lists of <%s> not read: %s", txn.id, short(address, 80), exc)
            return None
        if lists.blocks(sender):
            return Verdict.reject(REPLY_BLOCKED, reason=f"<{short(sender, 80)}> on the block list of <{short(address, 80)}>")
        is_allowing = lists.allows(sender)
        allowing = txn.stash.get(ALLOWING)
        if allowing is None:
            allowing = {}
            txn.stash[ALLOWING] = allowing
        others = {allowing.get(str(r.address).lower(), False) for r in txn.recipients}
        if others and others != {is_allowing}:
            return Verdict.tempfail(REPLY_SPLIT, reason="recipients' lists differ on the sender")
        allowing[address] = is_allowing
        if is_allowing:
            log.info("txn=%s <%s> allows <%s>", txn.id, short(address, 80), short(sender, 80))
        return None
