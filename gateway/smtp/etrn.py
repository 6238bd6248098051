"""The ETRN command (RFC 1985): a client asks us to deliver the mail we hold for it.

Used by sites on intermittent connections whose mail waits here on a route with
``hold = true`` (docs/queue.md, "Hold and flush"). ``ETRN domain`` flushes that
domain, ``ETRN @domain`` the domain and its subdomains; ``#queue`` names are not
supported. Only clients in ``[etrn] clients`` or, with ``[etrn] authenticated``,
authenticated clients may; ETRN is advertised in EHLO only when someone may.

Replies (RFC 1985 §5): 251 nothing waiting, 253 ``n`` messages started, 458 when the
flush cannot be started (no delivering gateway listens on the queue's trigger, or a
``#queue`` name), 459 client not allowed, 501 bad or missing domain. 250 and 252 (count
unknown) are not used: we always count.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from gateway.delivery.flush import TRIGGER_PREFIX, FlushTarget, matching_messages, parse_target
from gateway.logs import short
from gateway.verdicts import Reply

__all__ = ["etrn", "is_offered"]

log = logging.getLogger(__name__)


def is_offered(policy: Any) -> bool:
    """Whether ETRN is on at all (then it is listed in the EHLO answer)."""
    return bool(policy.etrn.is_enabled)


def _is_allowed(policy: Any, session: Any) -> bool:
    settings = policy.etrn
    if settings.authenticated and session.is_authenticated:
        return True
    try:
        address = ipaddress.ip_address(session.peer_ip)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in settings.clients)


def _start(gateway: Any, target: FlushTarget) -> int | None:
    """Count what waits for ``target`` and wake the scheduler; None if nobody listens."""
    count = len(matching_messages(gateway.queue, target))
    if count and not gateway.queue.trigger(TRIGGER_PREFIX + str(target)):
        return None
    return count


async def etrn(gateway: Any, session: Any, arg: str) -> Reply:
    """Answer one ETRN command.

    :param gateway: the running gateway (policy, queue, thread pool)
    :param session: the SMTP session (client address, authentication)
    :param arg: the argument as received
    :returns: the reply for the client
    """
    node = arg.strip()
    if not node:
        return Reply(501, "5.5.4", "Syntax: ETRN domain")
    if node.startswith("#"):
        return Reply(458, "4.3.0", f"Unable to queue messages for node {short(node, 64)}: named queues not supported")
    try:
        target = parse_target(node)
    except ValueError:
        return Reply(501, "5.5.4", "Syntax error in parameters: ETRN domain or ETRN @domain")
    if not _is_allowed(gateway.policy, session):
        log.info("etrn refused node=%s client=%s", target, session.peer_ip)
        return Reply(459, "4.7.1", f"Node {target} not allowed: client not authorized for ETRN")
    count = await gateway.run_in_thread(_start, gateway, target)
    log.info("etrn node=%s client=%s messages=%s", target, session.peer_ip, count)
    if count is None:
        return Reply(458, "4.3.0", f"Unable to queue messages for node {target}")
    if count == 0:
        return Reply(251, "2.0.0", f"OK, no messages waiting for node {target}")
    return Reply(253, "2.0.0", f"OK, {count} pending messages for node {target} started")
