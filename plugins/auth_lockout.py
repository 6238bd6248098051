"""Brute-force protection for SMTP AUTH: failed attempts per client address and per login.

Hooks: ``gateway_startup``, ``gateway_auth``, ``gateway_auth_result``,
``gateway_shutdown``. Put it *before* the AUTH backends (``auth_users_file``,
``auth_dovecot``) in the chain, so that its ``gateway_auth`` runs first.

- ``gateway_auth_result`` counts each failed attempt (535) twice in the shared state
  store named by ``state``: once for the client address, once for the login. A counter
  starts at the first failure and lives ``window`` long. When the address reaches
  ``max_failures_per_ip`` or the login ``max_failures_per_login`` failures, it is locked
  out for ``lockout``.
- ``gateway_auth``, while the address or the login is locked out, answers
  ``421 4.7.0`` (temporary) and closes the connection, without asking the backends, even
  for a correct password: the attacker learns nothing and cannot go on trying in the same
  session, and the user gets in again once the lock-out ends.

Successful logins do not reset the counters (a password guesser who also owns one
account must not be able to clear its record). A limit of 0 turns that counter off.
``exempt_networks`` are never counted nor locked (an office address shared by many
users). Counting by login lets an attacker lock a user out for ``lockout`` by failing on
purpose; set ``max_failures_per_login = 0`` where that matters more than slow guessing
spread over many addresses.

If the store fails, ``on_state_error`` decides: ``"continue"`` (default: AUTH goes on
unprotected, logged) or ``"tempfail"`` (every AUTH answers 454 4.7.0).

Each failure is logged as one line with the client address and the login, never the
password. Keys hold the address and a digest of the login (see ``docs/state.md``).
Adds no headers or results.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from gateway.hooks import hookimpl
from gateway.logs import short
from gateway.model import Session
from gateway.policy import Duration, IPNetwork, setting
from gateway.state import StateUnavailable, check_url
from gateway.state.keys import digest, in_networks
from gateway.verdicts import Reply, Verdict
from plugins._state import StatePlugin

__all__ = ["REPLY_LOCKED", "REPLY_UNAVAILABLE", "Plugin", "Settings", "failure_keys"]

log = logging.getLogger("plugins.auth_lockout")

# A locked-out client is answered and dropped: staying connected, it could go on asking.
REPLY_UNAVAILABLE = Reply(454, "4.7.0", "Temporary authentication failure")
REPLY_LOCKED = Reply(421, "4.7.0", "Too many authentication failures, try again later; closing connection")


@dataclass(frozen=True)
class Settings:
    """Settings of ``auth_lockout``."""

    state: str = setting("sqlite", 'state store: "sqlite" (embedded) or "redis://host:port/db"')
    window: Duration = setting(600.0, "failures are counted over this long from the first one", min=1)
    max_failures_per_ip: int = setting(10, "failures from one client address before its lock-out (0: off)", min=0)
    max_failures_per_login: int = setting(5, "failures for one login before its lock-out (0: off)", min=0)
    lockout: Duration = setting(900.0, "how long AUTH answers 421 (and the connection is closed) once a limit is reached", min=1)
    exempt_networks: tuple[IPNetwork, ...] = setting((), "client networks never counted nor locked")
    on_state_error: Literal["continue", "tempfail"] = setting(
        "continue", "state store down: AUTH unprotected, or answer 454 4.7.0"
    )

    def __post_init__(self) -> None:
        check_url(self.state)


def failure_keys(session: Session, login: str, settings: Settings) -> list[tuple[str, str, int]]:
    """The (counter key, lock key, limit) pairs an AUTH attempt of ``login`` touches.

    :param session: the session (its client address)
    :param login: the login the client gave
    :param settings: the limits
    :returns: one entry per counter in force; empty for exempt clients
    """
    if in_networks(session.peer_ip, settings.exempt_networks):
        return []
    keys = []
    if settings.max_failures_per_ip:
        who = "ip:" + session.peer_ip
        keys.append((f"authfail:{who}", f"authlock:{who}", settings.max_failures_per_ip))
    if settings.max_failures_per_login:
        # Logins are client-supplied: digest them (bounded, no separators). Case-folded,
        # so "Alice" and "alice" share one counter whatever the backend thinks of case.
        who = "login:" + digest(login.casefold())
        keys.append((f"authfail:{who}", f"authlock:{who}", settings.max_failures_per_login))
    return keys


class Plugin(StatePlugin):
    """Holds the state store."""

    @hookimpl
    async def gateway_auth(self, session: Session, login: str, settings: Settings) -> Verdict | None:
        keys = failure_keys(session, login, settings)
        if not keys:
            return None
        try:
            store = self._stores.require(settings.state)
            for _, lock_key, _ in keys:
                if await store.get(lock_key) is not None:
                    log.warning(
                        "auth refused, locked out client=%s login=%s (%s)",
                        session.peer_ip, short(login, 64), lock_key.split(":", 2)[1],
                    )
                    return Verdict.disconnect(REPLY_LOCKED, reason=f"{lock_key.split(':', 2)[1]} locked out")
        except StateUnavailable as exc:
            if settings.on_state_error == "tempfail":
                return Verdict.tempfail(REPLY_UNAVAILABLE, reason=f"lock-out state unavailable: {exc}")
            log.warning("auth lock-outs not checked, state unavailable: %s", exc)
        return None

    @hookimpl
    async def gateway_auth_result(
        self, session: Session, mechanism: str, login: str, outcome: str, settings: Settings
    ) -> None:
        if outcome != "failure":
            return
        keys = failure_keys(session, login, settings)
        counts = []
        try:
            store = self._stores.require(settings.state)
            for count_key, lock_key, limit in keys:
                count = await store.incr(count_key, 1, settings.window)
                counts.append(f"{count_key.split(':', 2)[1]}={count}/{limit}")
                if count >= limit:
                    await store.set(lock_key, str(count), settings.lockout)
                    log.warning(
                        "auth lock-out for %gs: %s reached %d failures client=%s login=%s",
                        settings.lockout, count_key.split(":", 2)[1], count, session.peer_ip,
                        short(login, 64),
                    )
        except StateUnavailable as exc:
            log.warning("auth failure not counted, state unavailable: %s", exc)
        # The core logs the failure itself (INFO, with login and client); this adds the counts.
        log.debug(
            "auth failure mechanism=%s client=%s login=%s failures=%s",
            mechanism, session.peer_ip, short(login, 64), ",".join(counts) or "not counted",
        )
