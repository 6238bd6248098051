"""SMTP AUTH against Dovecot's passdb, over its authentication socket.

Hooks: ``gateway_startup`` (refuses a policy that cannot work; checks that Dovecot
answers, for at most 3 s, a WARNING if not, start-up goes on), ``gateway_probe`` (the
same check for ``gateway check --probe``) and ``gateway_auth``.

The login and password the client sent (AUTH PLAIN or LOGIN, decoded by the core) go
to Dovecot's ``auth`` service at ``address`` (the ``auth-client`` listener: a Unix
socket path, or ``host:port`` for an ``inet_listener``) as a PLAIN response, the way
Postfix does with ``smtpd_sasl_type = dovecot``. The request carries
``service=<service>``, the client's address (``rip``, so Dovecot's log and its
per-address failure penalty see the real client), the listener's address (``lip``),
the gateway's session id (``session``) and ``secured`` (AUTH is only offered on TLS).
``penalty = false`` asks Dovecot not to delay repeated failures (``no-penalty``).
Each check opens its own connection (see docs/dovecot.md).

Dovecot's ``OK`` accepts the login; ``FAIL`` refuses it with 535 5.7.8 and ends the
chain (Dovecot does not say whether the user exists, so put backends that should be
asked first, like ``auth_users_file``, before this one). Dovecot down, slower than
``connect_timeout``/``answer_timeout``, answering something unreadable, or failing
inside (``FAIL`` with ``temp``: its own database is down): ``on_dovecot_error``
decides, ``tempfail`` (default: 454 4.7.0, the client retries later) or ``continue``
(ask the next backend; with none, the core's default deny gives 535). A login is
never accepted unless Dovecot said ``OK``. Passwords are never logged.

Settings: ``address``, ``connect_timeout``, ``answer_timeout``, ``service``,
``penalty``, ``on_dovecot_error``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from gateway.context import Gateway
from gateway.hooks import hookimpl
from gateway.logs import short
from gateway.model import Session
from gateway.policy import Duration, setting
from gateway.probe import Probes
from gateway.verdicts import Reply, Verdict
from plugins._dovecot import DovecotError, add_probe, authenticate, start_up

__all__ = ["Settings"]

NAME = "auth_dovecot"
log = logging.getLogger(f"plugins.{NAME}")

REPLY_INVALID = Reply(535, "5.7.8", "Authentication credentials invalid")
REPLY_UNAVAILABLE = Reply(454, "4.7.0", "Temporary authentication failure")


@dataclass(frozen=True)
class Settings:
    """Settings of ``auth_dovecot``."""

    address: str = setting(
        "/run/dovecot/auth-client", "Dovecot's auth-client listener: a Unix socket path, or host:port"
    )
    connect_timeout: Duration = setting(5.0, "longest wait to connect to Dovecot", min=0.001)
    answer_timeout: Duration = setting(
        20.0, "longest wait for Dovecot's answer once connected (it delays failures)", min=0.001
    )
    service: str = setting("smtp", "service name Dovecot's passdb sees (%s in its config)")
    penalty: bool = setting(True, "let Dovecot slow down repeated failures from one client address")
    on_dovecot_error: Literal["tempfail", "continue"] = setting(
        "tempfail", "Dovecot down, slow or failing: tempfail (454 4.7.0) or continue (ask the next backend)"
    )


@hookimpl
async def gateway_startup(gateway: Gateway, settings: Settings) -> None:
    # A policy that cannot work stops start-up; a Dovecot that does not answer yet does not.
    await start_up(gateway, NAME, settings, log, master=False, request="AUTH")


@hookimpl
async def gateway_probe(settings: Settings, probes: Probes) -> None:
    await add_probe(probes, NAME, settings, master=False)


@hookimpl
async def gateway_auth(
    session: Session, login: str, password: str, settings: Settings
) -> Verdict | None:
    try:
        answer = await authenticate(
            settings.address,
            login,
            password,
            remote_ip=session.peer_ip,
            local_ip=session.local_ip,
            remote_port=session.peer_port,
            local_port=session.local_port,
            secured=session.has_tls,
            session_id=session.id,
            penalty=settings.penalty,
            service=settings.service,
            connect_timeout=settings.connect_timeout,
            timeout=settings.answer_timeout,
        )
    except DovecotError as exc:
        if settings.on_dovecot_error == "continue":
            log.warning("%s: no answer for login=%s, asking the next backend: %s", NAME, short(login, 64), exc)
            return None
        log.warning("%s: no answer for login=%s, temporary failure: %s", NAME, short(login, 64), exc)
        return Verdict.tempfail(REPLY_UNAVAILABLE, reason=f"Dovecot unavailable: {exc}")
    if answer.ok:
        # Dovecot's name for the user (after auth_username_format, e.g. lower case):
        # the session is known by it, as Dovecot's own services know the user.
        return Verdict.accept(reason=f"Dovecot user {short(answer.user, 64)}", login=answer.user)
    reason = f"Dovecot: {short(answer.reason, 100)}" if answer.reason else "Dovecot refused"
    return Verdict.reject(REPLY_INVALID, reason=reason)
