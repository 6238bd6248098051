"""Messages and recipients per time window, per client address and per authenticated user.

Hooks: ``gateway_startup``, ``gateway_mail``, ``gateway_rcpt``, ``gateway_shutdown``.
Counts in the shared state store named by ``state``, so the limits hold for a cluster of
gateway nodes:

- each MAIL FROM counts one message (as Postfix's anvil does: the client asked to send
  one, whatever happens to it later); above ``messages_per_ip`` or
  ``messages_per_user`` in the current window, MAIL is answered
  ``451 4.7.1 Message rate limit exceeded, try again later``;
- each RCPT TO counts one recipient, accepted or not (a dictionary attack is a burst of
  refused recipients); above ``recipients_per_ip`` or ``recipients_per_user``, RCPT is
  answered ``451 4.7.1 Recipient rate limit exceeded, try again later``.

Always 4xx, never 5xx: a legitimate sender over its budget retries later and loses
nothing. A limit of 0 is no limit (all four default to 0: the right numbers depend on
the site).

An authenticated session is counted by its login (the ``_per_user`` limits), not by its
address: many users of one office share an address. Other sessions are counted by the
client address (the ``_per_ip`` limits), except relay clients and ``exempt_networks``.

Windows are fixed, ``window`` long: a counter's key holds ``floor(now / window)``, so
all nodes count into the same key, and the count starts from zero at each boundary. A
client may thus send up to twice a limit around a boundary, in exchange for one atomic
increment per event and no per-event history (see ``docs/state.md``).

If the store fails, ``on_state_error`` decides: ``"continue"`` (default: mail flows
unlimited) or ``"tempfail"`` (451 4.3.0). Put it before the plugin that accepts
recipients, or its ``gateway_rcpt`` never runs. Adds no headers or results.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Literal

from gateway.hooks import hookimpl
from gateway.model import Session
from gateway.policy import Duration, IPNetwork, setting
from gateway.state import REPLY_STATE_UNAVAILABLE, StateUnavailable, check_url
from gateway.state.keys import digest, in_networks, window_bucket
from gateway.verdicts import Reply, Verdict
from plugins._state import StatePlugin

__all__ = ["REPLY_MESSAGES", "REPLY_RECIPIENTS", "Plugin", "Settings", "rate_key"]

log = logging.getLogger("plugins.mail_rate_limit")

REPLY_MESSAGES = Reply(451, "4.7.1", "Message rate limit exceeded, try again later")
REPLY_RECIPIENTS = Reply(451, "4.7.1", "Recipient rate limit exceeded, try again later")


@dataclass(frozen=True)
class Settings:
    """Settings of ``mail_rate_limit``."""

    state: str = setting("sqlite", 'state store: "sqlite" (embedded) or "redis://host:port/db"')
    window: Duration = setting(3600.0, "length of the fixed counting windows", min=1)
    messages_per_ip: int = setting(0, "MAIL commands per window per client address (0: no limit)", min=0)
    recipients_per_ip: int = setting(0, "RCPT commands per window per client address (0: no limit)", min=0)
    messages_per_user: int = setting(0, "MAIL commands per window per AUTH login (0: no limit)", min=0)
    recipients_per_user: int = setting(0, "RCPT commands per window per AUTH login (0: no limit)", min=0)
    exempt_networks: tuple[IPNetwork, ...] = setting((), "unauthenticated clients not counted")
    on_state_error: Literal["continue", "tempfail"] = setting(
        "continue", "state store down: no limits, or answer 451 4.3.0"
    )

    def __post_init__(self) -> None:
        check_url(self.state)


def rate_key(kind: str, session: Session, settings: Settings, now: float) -> tuple[str, int] | None:
    """The counter one ``kind`` of event of ``session`` adds to now, with its limit.

    :param kind: ``"msg"`` or ``"rcpt"``
    :param session: the session (its login or address picks the counter)
    :param settings: the limits and the window length
    :param now: seconds since the epoch
    :returns: ``None`` when this session is not limited for ``kind``
    """
    if session.auth_login is not None:
        limit = settings.messages_per_user if kind == "msg" else settings.recipients_per_user
        who = "user:" + digest(session.auth_login)
    else:
        if session.is_relay_client or in_networks(session.peer_ip, settings.exempt_networks):
            return None
        limit = settings.messages_per_ip if kind == "msg" else settings.recipients_per_ip
        who = "ip:" + session.peer_ip
    if not limit:
        return None
    # The window length is part of the key, so entries with different windows never
    # share a counter.
    bucket = window_bucket(now, settings.window)
    return f"rate:{kind}:{settings.window:g}:{bucket}:{who}", limit


class Plugin(StatePlugin):
    """Holds the state store; ``clock`` is replaceable for tests."""

    def __init__(self) -> None:
        super().__init__()
        self.clock: Callable[[], float] = time.time

    @hookimpl
    async def gateway_mail(self, session: Session, settings: Settings) -> Verdict | None:
        return await self._count("msg", session, settings, REPLY_MESSAGES)

    @hookimpl
    async def gateway_rcpt(self, session: Session, settings: Settings) -> Verdict | None:
        return await self._count("rcpt", session, settings, REPLY_RECIPIENTS)

    async def _count(self, kind: str, session: Session, settings: Settings, reply: Reply) -> Verdict | None:
        found = rate_key(kind, session, settings, self.clock())
        if found is None:
            return None
        key, limit = found
        try:
            store = self._stores.require(settings.state)
            # The key dies one window after its first event: by then its window is over.
            value = await store.incr(key, 1, settings.window)
        except StateUnavailable as exc:
            if settings.on_state_error == "tempfail":
                return Verdict.tempfail(REPLY_STATE_UNAVAILABLE, reason=f"rate limits unavailable: {exc}")
            log.warning("rate limits not checked, state unavailable: %s", exc)
            return None
        if value > limit:
            return Verdict.tempfail(reply, reason=f"{key}: {value} in window, limit {limit}")
        return None
