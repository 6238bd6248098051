"""Dovecot's userdb as the local users: unknown ones refused at RCPT, known ones delivered.

Hooks: ``gateway_startup`` (refuses a policy that cannot work; checks that Dovecot
answers, for at most 3 s, a WARNING if not, start-up goes on), ``gateway_probe`` (the
same check for ``gateway check --probe``), ``gateway_rcpt`` and ``gateway_route``.

For a recipient in one of ``domains`` (default: ``[local] domains``), the plugin asks
Dovecot's ``auth-userdb`` listener at ``address`` (a Unix socket path, or
``host:port``) for the user with a ``USER`` request, ``service=<service>``. The name
asked is the whole address (``lookup = "address"``, for virtual users, the usual
Dovecot setup) or only the local part (``lookup = "local_part"``, for system users).
Dovecot's ``USER`` answer accepts the recipient; ``NOTFOUND`` refuses it with 550 5.1.1,
so no bounce is ever owed for an unknown user. With ``allow_extensions`` (default
true), ``user<delimiter>ext`` (``[local] extension_delimiter``) is accepted when the
full name is unknown but ``user`` exists; the longest known prefix wins and at most
three prefixes are tried. ``postmaster`` is always accepted (RFC 5321 §4.5.1) without
a lookup. Recipients in other domains get no opinion.

Answers are kept in a bounded cache: ``cache_ttl`` for users found, ``negative_ttl``
for users not found (0 turns either off); failures are never cached. Dovecot down,
slower than ``connect_timeout``/``answer_timeout``, answering something unreadable or
``FAIL`` (its own userdb failed): ``on_dovecot_error`` decides, ``tempfail`` (default:
451 4.4.3, the sender retries), ``accept`` (fail open: the recipient is taken and
delivery sorts it out) or ``continue`` (ask the next plugin; with none, the core's
default deny gives 550 5.7.1).

Delivery (``gateway_route``): what this plugin accepts at RCPT, local delivery must be
able to deliver, so the scheduler asks it too. For a pending recipient in ``domains``
it looks the user up the same way (same names, extensions, cache) and answers a local
route to that user with Dovecot's ``home=`` (the Maildir is ``<home>/Maildir/``, or the
path of a ``mail=maildir:...`` field), ``uid=`` and ``gid=``, so a user Dovecot knows
needs no ``[local] users`` line. A user Dovecot no longer knows gets no answer, and the
built-in routing bounces it as an unknown user (550 5.1.1). Dovecot down, failing, or
an entry the gateway cannot deliver to (no home, a mailbox format other than Maildir):
a temporary failure, the message stays queued and is retried; never a bounce.

Put it after ``rcpt_relay``, instead of ``rcpt_local_users`` for the domains Dovecot
knows. Settings: ``address``, ``connect_timeout``, ``answer_timeout``, ``domains``,
``lookup``, ``allow_extensions``, ``service``, ``cache_ttl``, ``negative_ttl``,
``cache_size``, ``on_dovecot_error``.
"""

from __future__ import annotations

import grp
import logging
import pwd
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gateway.address import Address, AddressError
from gateway.context import Gateway
from gateway.delivery.types import LocalAccount, LocalRoute
from gateway.hooks import hookimpl
from gateway.logs import short
from gateway.model import QueuedRecipient, Recipient
from gateway.policy import Duration, setting
from gateway.probe import Probes
from gateway.verdicts import Reply, TemporaryFailure, Verdict
from plugins._dnslist import RecordCache
from plugins._dovecot import DovecotError, add_probe, lookup_user, start_up

__all__ = ["Plugin", "Settings", "candidates", "mail_location"]

NAME = "rcpt_dovecot_users"
log = logging.getLogger(f"plugins.{NAME}")

REPLY_UNKNOWN = Reply(550, "5.1.1", "Recipient address rejected: user unknown")
# RFC 3463 §3.5: X.4.3 "Directory server failure".
REPLY_UNAVAILABLE = Reply(451, "4.4.3", "Recipient lookup temporarily unavailable, try again later")
# RFC 3463 §3.5: X.3.5 "System incorrectly configured": an entry we cannot deliver to.
REPLY_UNUSABLE = Reply(451, "4.3.5", "Mailbox location unusable here, try again later")
_MAX_PREFIXES = 3
_NOT_FOUND: tuple[str, ...] = ()
# The userdb fields delivery uses; a found user is cached as ("found", "home=...", ...).
_KEPT = ("home", "mail", "uid", "gid")


@dataclass(frozen=True)
class Settings:
    """Settings of ``rcpt_dovecot_users``."""

    address: str = setting(
        "/run/dovecot/auth-userdb", "Dovecot's auth-userdb listener: a Unix socket path, or host:port"
    )
    connect_timeout: Duration = setting(5.0, "longest wait to connect to Dovecot", min=0.001)
    answer_timeout: Duration = setting(10.0, "longest wait for Dovecot's answer once connected", min=0.001)
    domains: tuple[str, ...] = setting((), "domains whose users Dovecot knows; empty: [local] domains")
    lookup: Literal["address", "local_part"] = setting(
        "address", "name to ask: the whole address (virtual users) or the local part (system users)"
    )
    allow_extensions: bool = setting(True, "accept user<delimiter>extension when user exists")
    service: str = setting("smtp", "service name Dovecot's userdb sees")
    cache_ttl: Duration = setting(60.0, "remember a user found this long; 0: ask every time", min=0)
    negative_ttl: Duration = setting(30.0, "remember a user not found this long; 0: ask every time", min=0)
    cache_size: int = setting(10000, "most answers remembered", min=0)
    on_dovecot_error: Literal["tempfail", "accept", "continue"] = setting(
        "tempfail", "Dovecot down, slow or failing: tempfail (451 4.4.3), accept, or continue (ask the next)"
    )


def candidates(local: str, delimiter: str, allow_extensions: bool) -> list[str]:
    """The local parts to ask for, in order: the whole one, then shorter prefixes.

    ``mary-ann-lists`` with ``-`` gives ``mary-ann-lists``, ``mary-ann``, ``mary``:
    the longest name Dovecot knows wins, as qmail's extensions do.
    """
    names = [local]
    if not allow_extensions or not delimiter:
        return names
    cut = len(local)
    while len(names) <= _MAX_PREFIXES:
        cut = local.rfind(delimiter, 0, cut)
        if cut <= 0:
            break
        names.append(local[:cut])
    return names


def mail_location(fields: dict[str, str]) -> tuple[Path, Path | None]:
    """The home and Maildir delivery uses for a Dovecot user, from its userdb fields.

    ``mail=maildir:<path>[:options]`` names the Maildir (``~`` is the home); no ``mail=``
    (Dovecot's own ``mail_location`` applies, which it does not send) means the gateway's
    default mailbox in the home. Without a home, an absolute Maildir's parent serves.

    :returns: (home, Maildir or ``None`` for the default mailbox)
    :raises ValueError: an entry the gateway cannot deliver to, saying why
    """
    home = fields.get("home", "")
    mail = fields.get("mail", "")
    maildir: Path | None = None
    if mail:
        kind, _, rest = mail.partition(":")
        if kind.lower() != "maildir":
            raise ValueError(f"mail={kind[:20]!r} is not a Maildir (deliver by LMTP instead)")
        path = rest.split(":", 1)[0]
        if path == "~" or path.startswith("~/"):
            if not home:
                raise ValueError("mail= is relative to a home Dovecot does not give")
            path = home + path[1:]
        if path:
            maildir = Path(path)
            if not maildir.is_absolute():
                raise ValueError("mail= is not an absolute path")
    if not home:
        if maildir is None:
            raise ValueError("Dovecot gives no home (home=) for this user")
        home = str(maildir.parent)
    if not home.startswith("/"):
        raise ValueError("home= is not an absolute path")
    return Path(home), maildir


def _ids_in_thread(uid: str, gid: str) -> tuple[int | None, int | None]:
    """Dovecot's uid=/gid= (numbers or names) as numbers; names go through NSS, which may block.

    :raises ValueError: a name this host does not know
    """
    try:
        return (
            None if not uid else int(uid) if uid.isdigit() else pwd.getpwnam(uid).pw_uid,
            None if not gid else int(gid) if gid.isdigit() else grp.getgrnam(gid).gr_gid,
        )
    except KeyError:
        raise ValueError(f"uid={uid[:40]!r} or gid={gid[:40]!r} is not known on this host") from None


class Plugin:
    """Holds the answer cache, shared by all sessions."""

    def __init__(self) -> None:
        self._cache: RecordCache | None = None

    @hookimpl
    async def gateway_startup(self, gateway: Gateway, settings: Settings) -> None:
        self._cache = RecordCache(settings.cache_size)
        # A policy that cannot work stops start-up; a Dovecot that does not answer yet does not.
        await start_up(gateway, NAME, settings, log, master=True, request="RCPT")

    @hookimpl
    async def gateway_probe(self, settings: Settings, probes: Probes) -> None:
        await add_probe(probes, NAME, settings, master=True)

    async def _lookup(self, name: str, settings: Settings) -> dict[str, str] | None:
        """The user's fields delivery uses (:data:`_KEPT`), or ``None`` when unknown."""
        key = (settings.address, name)
        cache = self._cache
        cached = cache.get(key) if cache is not None else None
        if cached is not None:
            return dict(item.partition("=")[::2] for item in cached[1:]) if cached else None
        fields = await lookup_user(
            settings.address, name, service=settings.service,
            connect_timeout=settings.connect_timeout, timeout=settings.answer_timeout,
        )
        kept = None if fields is None else {k: fields[k] for k in _KEPT if k in fields}
        if cache is not None:
            ttl = settings.cache_ttl if kept is not None else settings.negative_ttl
            records = _NOT_FOUND if kept is None else ("found", *(f"{k}={v}" for k, v in kept.items()))
            cache.put(key, records, ttl)
        return kept

    async def _find(self, address: Address, gateway: Gateway, settings: Settings) -> tuple[str, str, dict[str, str]] | None:
        """The longest name Dovecot knows for ``address``: (name, extension, fields), or None.

        :raises DovecotError: Dovecot gave no usable answer
        """
        domain = address.domain_key
        delimiter = gateway.policy.local.extension_delimiter
        for local in candidates(address.local, delimiter, settings.allow_extensions):
            name = f"{local}@{domain}" if settings.lookup == "address" and domain else local
            fields = await self._lookup(name, settings)
            if fields is not None:
                extension = address.local[len(local) + len(delimiter):] if local != address.local else ""
                return name, extension, fields
        return None

    @staticmethod
    def _is_ours(address: Address, gateway: Gateway, settings: Settings) -> bool:
        domain = address.domain_key
        domains = settings.domains or gateway.policy.local.domains
        return not domain or domain in {d.lower().rstrip(".") for d in domains}

    @hookimpl
    async def gateway_rcpt(self, rcpt: Recipient, gateway: Gateway, settings: Settings) -> Verdict | None:
        address = rcpt.address
        if not self._is_ours(address, gateway, settings):
            return None
        if address.is_postmaster:
            return Verdict.accept(reason="postmaster")
        try:
            found = await self._find(address, gateway, settings)
            if found is not None:
                return Verdict.accept(reason=f"Dovecot user {short(found[0], 100)}")
        except DovecotError as exc:
            action = settings.on_dovecot_error
            log.warning("%s: no answer for <%s> (%s): %s", NAME, short(address), action, exc)
            if action == "accept":
                return Verdict.accept(reason="Dovecot unavailable, accepted unchecked")
            if action == "continue":
                return None
            return Verdict.tempfail(REPLY_UNAVAILABLE, reason=f"Dovecot unavailable: {exc}")
        return Verdict.reject(REPLY_UNKNOWN, reason="unknown Dovecot user")

    @hookimpl
    async def gateway_route(self, recipient: QueuedRecipient, gateway: Gateway, settings: Settings) -> LocalRoute | None:
        """Deliver to the Dovecot user RCPT accepted; see the module docstring.

        :raises TemporaryFailure: Dovecot gave no usable answer, or an entry the gateway
            cannot deliver to: the recipient is retried, never bounced
        """
        if "@" not in recipient.address:
            return None  # bare <postmaster>: the built-in local user
        try:
            address = Address.parse(recipient.address)
        except AddressError:
            return None  # the built-in routing refuses it
        if not self._is_ours(address, gateway, settings) or address.is_postmaster:
            return None
        try:
            found = await self._find(address, gateway, settings)
        except DovecotError as exc:
            log.warning("%s: no answer for delivery to <%s>, deferred: %s", NAME, short(recipient.address), exc)
            raise TemporaryFailure(REPLY_UNAVAILABLE, f"Dovecot unavailable: {exc}") from exc
        if found is None:
            return None  # gone since RCPT: the built-in route bounces it as unknown
        name, extension, fields = found
        try:
            home, maildir = mail_location(fields)
            uid, gid = await gateway.run_in_thread(_ids_in_thread, fields.get("uid", ""), fields.get("gid", ""))
        except ValueError as exc:
            log.error("%s: cannot deliver to Dovecot user %s, deferred: %s", NAME, short(name, 100), exc)
            raise TemporaryFailure(REPLY_UNUSABLE, str(exc)) from exc
        account = LocalAccount(home, uid, gid, maildir)
        return LocalRoute(name.lower(), extension.lower(), address.domain_key, account)
