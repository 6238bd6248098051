"""Relay control: who may send mail through us to which domains (default deny).

Hook: ``gateway_rcpt``. For each recipient:

1. Address routing syntax in the local part (``user%other@local``, ``"user@other"@local``,
   ``other!user@local``) is refused with 550 5.7.1: those are the classic open-relay
   tricks, and no part of this gateway routes on them. (Source routes such as
   ``@local:user@other`` are stripped by the core parser, RFC 5321 §3.6.1, leaving
   ``user@other``, which step 4 judges.)
2. Local and virtual domains (``[local] domains``, ``[local] virtual``) and bare
   ``<postmaster>``: no opinion; a later plugin (``rcpt_local_users``) validates the
   mailbox.
3. Relay domains (``[relay] domains``; ``.example.com`` covers subdomains): accepted.
4. Any other domain: accepted only from a relay client (``[relay] clients``) or an
   authenticated session (when ``[relay] authenticated`` is true); otherwise refused
   with ``550 5.7.1 Relay access denied`` (550, not Postfix's 554: RFC 5321 §4.3.2 lists
   no 554 for RCPT).

With ``refuse_only = true`` the entry refuses (steps 1 and 4) but accepts nothing: what
steps 3 and 4 would accept gets no opinion, so the checks after it still run. A chain
with greylisting or DNS lists uses the plugin twice: a ``refuse_only`` entry first, so a
relay attempt is refused at once (no greylist entry, no DNS lookup, no score), and a
plain entry after those checks, which accepts the relay domains, relay clients and
authenticated users (``policies/edge-relay.toml``). Without that later entry the
core's default deny refuses what the first let through.

Settings: ``refuse_routing_syntax`` (default true), ``refuse_only`` (default false).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.context import Gateway
from gateway.hooks import hookimpl
from gateway.model import Recipient, Session
from gateway.verdicts import Reply, Verdict

__all__ = ["REPLY_DENIED", "REPLY_ROUTING", "Settings", "domain_matches"]

REPLY_ROUTING = Reply(550, "5.7.1", "Address routing syntax not allowed (relay denied)")
REPLY_DENIED = Reply(550, "5.7.1", "Relay access denied")
_ROUTING_CHARS = frozenset("%!@")


@dataclass(frozen=True)
class Settings:
    """Settings of ``rcpt_relay``."""

    refuse_routing_syntax: bool = field(
        default=True, metadata={"doc": "refuse %, ! and quoted @ in local parts with 5.7.1"}
    )
    refuse_only: bool = field(
        default=False,
        metadata={"doc": "refuse what relay control never allows, accept nothing (first entry of two)"},
    )


def domain_matches(domain: str, patterns: tuple[str, ...]) -> bool:
    """``domain`` equals a pattern, or a ``.suffix`` pattern covers it."""
    for pattern in patterns:
        if pattern.startswith("."):
            if domain.endswith(pattern) or domain == pattern[1:]:
                return True
        elif domain == pattern:
            return True
    return False


@hookimpl
def gateway_rcpt(session: Session, rcpt: Recipient, gateway: Gateway, settings: Settings) -> Verdict | None:
    address = rcpt.address
    if settings.refuse_routing_syntax and _ROUTING_CHARS & set(address.local):
        return Verdict.reject(REPLY_ROUTING, reason="routing syntax in local part")
    domain = address.domain_key
    policy = gateway.policy
    if not domain or domain in policy.local.domains or domain in policy.local.virtual:
        return None
    if domain_matches(domain, policy.relay.domains):
        allowed = "relay domain"
    elif session.is_relay_client:
        allowed = "relay client"
    elif session.is_authenticated and policy.relay.authenticated:
        allowed = "authenticated"
    else:
        return Verdict.reject(REPLY_DENIED, reason=f"relay to {domain} denied")
    return None if settings.refuse_only else Verdict.accept(reason=allowed)
