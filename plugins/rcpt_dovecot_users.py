"""Recipient validation against Dovecot's userdb: unknown local users are refused at RCPT.

Hooks: ``gateway_startup`` (refuses a policy that cannot work; checks that Dovecot
answers, a WARNING if not, start-up goes on) and ``gateway_rcpt``.

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

Put it after ``rcpt_relay``, instead of ``rcpt_local_users`` for the domains Dovecot
knows. Settings: ``address``, ``connect_timeout``, ``answer_timeout``, ``domains``,
``lookup``, ``allow_extensions``, ``service``, ``cache_ttl``, ``negative_ttl``,
``cache_size``, ``on_dovecot_error``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from gateway.context import Gateway
from gateway.hooks import hookimpl
from gateway.logs import short
from gateway.model import Recipient
from gateway.policy import Duration, setting
from gateway.verdicts import Reply, Verdict
from plugins._dnslist import RecordCache
from plugins._dovecot import DovecotError, lookup_user, start_up

__all__ = ["Plugin", "Settings", "candidates"]

NAME = "rcpt_dovecot_users"
log = logging.getLogger(f"plugins.{NAME}")

REPLY_UNKNOWN = Reply(550, "5.1.1", "Recipient address rejected: user unknown")
# RFC 3463 §3.5: X.4.3 "Directory server failure".
REPLY_UNAVAILABLE = Reply(451, "4.4.3", "Recipient lookup temporarily unavailable, try again later")
_MAX_PREFIXES = 3
_FOUND: tuple[str, ...] = ("found",)
_NOT_FOUND: tuple[str, ...] = ()


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


class Plugin:
    """Holds the answer cache, shared by all sessions."""

    def __init__(self) -> None:
        self._cache: RecordCache | None = None

    @hookimpl
    async def gateway_startup(self, gateway: Gateway, settings: Settings) -> None:
        self._cache = RecordCache(settings.cache_size)
        # A policy that cannot work stops start-up; a Dovecot that does not answer yet does not.
        await start_up(gateway, NAME, settings, log, master=True, request="RCPT")

    async def _exists(self, name: str, settings: Settings) -> bool:
        key = (settings.address, name)
        cache = self._cache
        cached = cache.get(key) if cache is not None else None
        if cached is not None:
            return cached == _FOUND
        found = await lookup_user(
            settings.address, name, service=settings.service,
            connect_timeout=settings.connect_timeout, timeout=settings.answer_timeout,
        ) is not None
        if cache is not None:
            ttl = settings.cache_ttl if found else settings.negative_ttl
            cache.put(key, _FOUND if found else _NOT_FOUND, ttl)
        return found

    @hookimpl
    async def gateway_rcpt(self, rcpt: Recipient, gateway: Gateway, settings: Settings) -> Verdict | None:
        address = rcpt.address
        domain = address.domain_key
        domains = settings.domains or gateway.policy.local.domains
        if domain and domain not in {d.lower().rstrip(".") for d in domains}:
            return None
        if address.is_postmaster:
            return Verdict.accept(reason="postmaster")
        delimiter = gateway.policy.local.extension_delimiter
        try:
            for local in candidates(address.local, delimiter, settings.allow_extensions):
                name = f"{local}@{domain}" if settings.lookup == "address" and domain else local
                if await self._exists(name, settings):
                    return Verdict.accept(reason=f"Dovecot user {short(name, 100)}")
        except DovecotError as exc:
            action = settings.on_dovecot_error
            log.warning("%s: no answer for <%s> (%s): %s", NAME, short(address), action, exc)
            if action == "accept":
                return Verdict.accept(reason="Dovecot unavailable, accepted unchecked")
            if action == "continue":
                return None
            return Verdict.tempfail(REPLY_UNAVAILABLE, reason=f"Dovecot unavailable: {exc}")
        return Verdict.reject(REPLY_UNKNOWN, reason="unknown Dovecot user")
