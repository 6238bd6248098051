"""Sender ownership: an authenticated user may send only as the addresses it owns.

Hooks: ``gateway_startup``, ``gateway_mail``, ``gateway_data``. The sender map
(``map_file``) says which envelope senders and ``From:`` addresses each AUTH login may
use, one login per line::

    # login: addresses and @domains it may send as
    alice: alice@example.com, alice.smith@example.com
    bob:   bob@example.com @example.org       # commas or blanks separate
    lists: @lists.example.com

``@domain`` covers every address of that domain. Matching ignores case, and an address
extension after ``extension_delimiter`` (``alice+news@example.com``) counts as the address
without it. An error in the file (a line without ``:``, something that is not an address or
``@domain``, a login listed twice) stops start-up naming the file and line; when the file
changes later it is read again at the next check, and a broken new version is logged and
the last good one kept.

- At MAIL FROM, an authenticated session whose envelope sender its login does not own is
  refused with ``553 5.7.1 Sender address not owned by user`` (Postfix's
  ``reject_sender_login_mismatch``). A login absent from the map owns nothing. The null
  sender ``<>`` is not checked (bounces carry no sender).
- At DATA, with ``check_header_from`` (default true), every address in the ``From:``
  header must be owned too (``553 5.7.1 From: header address not owned by user``); a
  ``From:`` with no readable address is refused the same way, a message without one
  passes (``queue_submission_cleanup`` does not invent one).
- ``unauthenticated_mismatch`` (default false; Postfix's
  ``reject_unauthenticated_sender_login_mismatch``): an unauthenticated session may not
  use an envelope sender some login owns, so outsiders cannot send as your users through
  the MX. Relay clients (``[relay] clients``) are exempt when ``exempt_relay_clients``
  (default true). Put this plugin on the MX listener too for that, and mind that mail
  from outside legitimately carries your users' addresses when forwarded back to you.

Adds no headers or results. Needs the AUTH backends before it in the session.
"""

from __future__ import annotations

import email.utils
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from gateway.address import Address
from gateway.context import Gateway
from gateway.hooks import hookimpl
from gateway.logs import short
from gateway.model import Message, Session, Transaction
from gateway.policy import setting
from gateway.verdicts import Reply, Verdict

__all__ = [
    "REPLY_ENVELOPE",
    "REPLY_HEADER",
    "Plugin",
    "SenderMap",
    "SenderMapError",
    "Settings",
    "read_sender_map",
]

log = logging.getLogger("plugins.mail_sender_login")

REPLY_ENVELOPE = Reply(553, "5.7.1", "Sender address not owned by user")
REPLY_HEADER = Reply(553, "5.7.1", "From: header address not owned by user")
REPLY_UNAUTHENTICATED = Reply(553, "5.7.1", "Sender address requires authentication")

# Deliberately plain: what a login may send as is written by the administrator.
_ADDRESS = re.compile(r"^[^@\s,]+@[A-Za-z0-9.\-]+$")
_DOMAIN = re.compile(r"^@[A-Za-z0-9.\-]+$")
_LOGIN = re.compile(r"^[^\s:#]+$")


@dataclass(frozen=True)
class Settings:
    """Settings of ``mail_sender_login``."""

    map_file: Path = field(metadata={"doc": "sender map: 'login: address, @domain, ...' lines"})
    check_header_from: bool = setting(True, "also check the From: header at DATA")
    extension_delimiter: str = setting("+", "ignore an address extension after this (empty: none)")
    unauthenticated_mismatch: bool = setting(
        False, "refuse unauthenticated sessions using a sender some login owns"
    )
    exempt_relay_clients: bool = setting(True, "relay clients are exempt from unauthenticated_mismatch")


class SenderMapError(ValueError):
    """A bad sender map line; ``str()`` is ``"{file}:{line}: {message}"``."""


@dataclass(frozen=True)
class SenderMap:
    """Login -> owned addresses and ``@domains`` (all lower-case), and the reverse index."""

    owned: dict[str, frozenset[str]]
    owners: dict[str, frozenset[str]]

    def owns(self, login: str, address: str, delimiter: str) -> bool:
        """Whether ``login`` may send as ``address``."""
        patterns = self.owned.get(login, frozenset())
        return not patterns.isdisjoint(_candidates(address, delimiter))

    def owned_by_anyone(self, address: str, delimiter: str) -> bool:
        """Whether some login owns ``address`` (for unauthenticated sessions)."""
        return any(item in self.owners for item in _candidates(address, delimiter))


def _candidates(address: str, delimiter: str) -> list[str]:
    """The map entries that would cover ``address``: itself, without extension, its domain."""
    local, _, domain = address.lower().rpartition("@")
    if not local or not domain:
        return []
    found = [f"{local}@{domain}", f"@{domain}"]
    if delimiter and delimiter in local:
        found.append(f"{local.split(delimiter, 1)[0]}@{domain}")
    return found


def read_sender_map(path: Path) -> SenderMap:
    """Parse a sender map file.

    :param path: the file
    :raises SenderMapError: naming the file and line of the first bad line
    :raises OSError: the file cannot be read
    """
    owned: dict[str, frozenset[str]] = {}
    lines: dict[str, int] = {}
    owners: dict[str, set[str]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        login, sep, rest = line.partition(":")
        login = login.strip()
        if not sep or not _LOGIN.match(login):
            raise SenderMapError(f"{path}:{number}: expected 'login: address, @domain, ...'")
        if login in lines:
            raise SenderMapError(f"{path}:{number}: login {login!r} already listed at line {lines[login]}")
        items = [item for item in re.split(r"[\s,]+", rest.strip()) if item]
        if not items:
            raise SenderMapError(f"{path}:{number}: login {login!r} has no addresses")
        for item in items:
            if not (_ADDRESS.match(item) or _DOMAIN.match(item)):
                raise SenderMapError(f"{path}:{number}: {item!r} is not an address or @domain")
        patterns = frozenset(item.lower().rstrip(".") for item in items)
        owned[login] = patterns
        lines[login] = number
        for pattern in patterns:
            owners.setdefault(pattern, set()).add(login)
    return SenderMap(owned, {k: frozenset(v) for k, v in owners.items()})


def header_addresses(message: Message) -> list[str] | None:
    """The addresses of the ``From:`` header(s); ``None`` when one has none readable."""
    values = message.header_values("From")
    found = []
    for value in values:
        addresses = [addr for _, addr in email.utils.getaddresses([value]) if addr]
        if not addresses or any("@" not in addr for addr in addresses):
            return None
        found.extend(addresses)
    return found


class Plugin:
    """Holds the parsed sender map, read again when its modification time changes."""

    def __init__(self) -> None:
        self._map = SenderMap({}, {})
        self._mtime: float | None = None

    def _refresh(self, path: Path, strict: bool) -> SenderMap:
        try:
            mtime = os.stat(path).st_mtime
        except OSError as exc:
            if strict:
                raise SenderMapError(f"{path}: cannot read the sender map: {exc.strerror}") from exc
            log.error("sender map %s unreadable, keeping the previous one: %s", path, exc)
            return self._map
        if mtime == self._mtime:
            return self._map
        try:
            self._map = read_sender_map(path)
            log.info("loaded %d logins from %s", len(self._map.owned), path)
        except (OSError, UnicodeDecodeError, SenderMapError) as exc:
            if strict:
                raise
            # Keep the last good map, and do not read the broken file again at every
            # message: only when it changes again.
            log.error("sender map not reloaded, keeping the previous one: %s", exc)
        self._mtime = mtime
        return self._map

    @hookimpl
    async def gateway_startup(self, gateway: Gateway, settings: Settings) -> None:
        await gateway.run_in_thread(self._refresh, Path(settings.map_file), True)

    async def _current(self, gateway: Gateway, settings: Settings) -> SenderMap:
        return await gateway.run_in_thread(self._refresh, Path(settings.map_file), False)

    @hookimpl
    async def gateway_mail(
        self, session: Session, sender: Address, gateway: Gateway, settings: Settings
    ) -> Verdict | None:
        if sender.is_null:
            return None
        senders = await self._current(gateway, settings)
        address = str(sender)
        login = session.auth_login
        if login is not None:
            if senders.owns(login, address, settings.extension_delimiter):
                return None
            return Verdict.reject(REPLY_ENVELOPE, reason=f"{short(address)} not owned by {short(login, 64)}")
        if not settings.unauthenticated_mismatch:
            return None
        if session.is_relay_client and settings.exempt_relay_clients:
            return None
        if senders.owned_by_anyone(address, settings.extension_delimiter):
            return Verdict.reject(REPLY_UNAUTHENTICATED, reason=f"{short(address)} is owned by a login")
        return None

    @hookimpl
    async def gateway_data(
        self, session: Session, txn: Transaction, message: Message, gateway: Gateway, settings: Settings
    ) -> Verdict | None:
        login = session.auth_login
        if login is None or not settings.check_header_from:
            return None
        addresses = header_addresses(message)
        if addresses is None:
            return Verdict.reject(REPLY_HEADER, reason="From: header without a readable address")
        senders = await self._current(gateway, settings)
        for address in addresses:
            if not senders.owns(login, address, settings.extension_delimiter):
                return Verdict.reject(REPLY_HEADER, reason=f"From: {short(address)} not owned by {short(login, 64)}")
        return None
