"""Early-talker detection: refuse clients that speak before they are greeted.

Hooks: ``gateway_connect`` and ``gateway_startup``. RFC 5321 §3.1 and §4.3.1 make the
server speak first: a client must wait for the 220 greeting before it sends anything.
Spam-sending software often does not wait, so, like Postfix postscreen's pregreet test
and qpsmtpd's ``check_earlytalker``, the connect hook holds the greeting back for
``delay`` and then asks the core (``session.has_early_data()``) whether the client has
already sent bytes. If it has:

- with ``action = "reject"`` (the default) the client gets
  ``554 5.5.1 Protocol error: talked before the greeting`` instead of the greeting and the
  core closes the connection;
- with ``action = "score"`` the plugin adds ``score`` to the session's results (they are
  recorded in the queued envelope's notes) and the session goes on; the session stash
  key :data:`EARLY_TALKER` is set to ``True`` for later plugins.

Relay clients (``[relay] clients``) and the networks in ``allow`` are neither delayed
nor checked. ``delay = "0s"`` turns the test off.

Settings: ``delay`` (default ``"1s"``), ``action`` (``"reject"``), ``score`` (5.0),
``allow`` (none).

The chain entry's ``timeout`` (default 30 s) bounds the connect hook, delay included, so
it must be longer than ``delay``: ``gateway_startup`` refuses to start (or to reload) a
policy in which it is not, for the base entry and for every override of it. The delay
also counts against ``[limits] session_timeout``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass
from typing import Literal

from gateway.context import Gateway
from gateway.hooks import hookimpl
from gateway.model import Session, StashKey
from gateway.policy import setting
from gateway.policy.units import Duration, IPNetwork
from gateway.verdicts import Reply, Verdict

__all__ = ["EARLY_TALKER", "NAME", "REPLY_EARLY_TALKER", "Settings"]

NAME = "connect_earlytalker"
log = logging.getLogger(f"plugins.{NAME}")

# RFC 3463 §3.6: X.5.1 "invalid command" is the closest enhanced code to "protocol
# violation"; 554 because the connection is refused before any command (RFC 5321 §3.1).
REPLY_EARLY_TALKER = Reply(554, "5.5.1", "Protocol error: talked before the greeting")

EARLY_TALKER = StashKey[bool]("connect_earlytalker.early")
"""Session stash: ``True`` when the client talked before the greeting (score mode)."""


@dataclass(frozen=True)
class Settings:
    """Settings of ``connect_earlytalker``."""

    delay: Duration = setting(
        1.0, 'hold the greeting back this long, then look for early data; "0s" turns the test off', min=0
    )
    action: Literal["reject", "score"] = setting(
        "reject", "reject: 554 5.5.1 and close; score: add score to the session and go on"
    )
    score: float = setting(5.0, "score added for an early talker when action is score")
    allow: tuple[IPNetwork, ...] = setting((), "client networks neither delayed nor checked")


def _is_allowed(peer_ip: str, networks: tuple[IPNetwork, ...]) -> bool:
    try:
        address = ipaddress.ip_address(peer_ip.split("%", 1)[0])
    except ValueError:
        return False
    return any(address in network for network in networks)


def _delays_of(gateway: Gateway) -> list[tuple[str, float, float]]:
    """(entry id, delay, entry timeout) for every entry of this plugin and its overrides."""
    policy = gateway.policy
    found: list[tuple[str, float, float]] = []
    for entry in policy.plugins:
        if entry.name != NAME:
            continue
        settings = entry.settings
        if isinstance(settings, Settings):
            found.append((entry.id, settings.delay, entry.timeout))
        for override in policy.overrides:
            changed = override.plugins.get(entry.id)
            if isinstance(changed, Settings):
                found.append((entry.id, changed.delay, entry.timeout))
    return found


@hookimpl
def gateway_startup(gateway: Gateway) -> None:
    """Refuse a policy whose entry timeout would cut the delay short.

    Without this, every connection would run into the hook runner's time limit and get
    the plugin-failure tempfail instead of the greeting.

    :param gateway: the gateway being started, with its policy
    :raises ValueError: an entry's (or an override's) ``delay`` is not below the
        entry's ``timeout``
    """
    for entry_id, delay, timeout in _delays_of(gateway):
        if delay >= timeout:
            raise ValueError(
                f"plugin {entry_id} ({NAME}): delay {delay:g}s must be shorter than the"
                f" entry's timeout {timeout:g}s"
            )


@hookimpl
async def gateway_connect(session: Session, settings: Settings) -> Verdict | None:
    """Wait ``delay``, then refuse or score a client that has already sent data.

    :param session: the new session; ``has_early_data`` is the core's probe
    :param settings: this entry's settings
    :returns: a reject verdict for an early talker in reject mode, else ``None``
    """
    if settings.delay <= 0 or session.is_relay_client:
        return None
    if _is_allowed(session.peer_ip, settings.allow):
        return None
    # The greeting is only sent after the connect hooks return, so sleeping here is
    # exactly postscreen's "pregreet" wait; the loop serves other sessions meanwhile.
    await asyncio.sleep(settings.delay)
    if not session.has_early_data():
        return None
    if settings.action == "score":
        session.results.add(NAME, settings.score, "talked before the greeting")
        session.stash[EARLY_TALKER] = True
        log.info("early talker client=%s scored %g", session.peer_ip, settings.score)
        return None
    return Verdict.reject(REPLY_EARLY_TALKER, reason="talked before the greeting")
