"""Greylisting: tempfail the first delivery attempt of an unknown (network, sender, recipient).

Hooks: ``gateway_startup``, ``gateway_rcpt``, ``gateway_shutdown``. Real MTAs retry a
4xx (RFC 5321 §4.5.4.1); much bulk and botnet software does not. For each recipient the
plugin looks up the triplet (client network, envelope sender lower-cased with the null
sender as "", recipient lower-cased) in the shared state store named by ``state``:

- never seen, or its pending entry expired (``expiry``): remember when it was first
  seen and answer ``451 4.7.1 Greylisted, please try again later``;
- seen less than ``delay`` ago: the same 451 again;
- seen at least ``delay`` ago (and less than ``expiry``), or passed before: no opinion
  (the chain's relay and recipient plugins still decide), and the triplet is remembered
  as passed for ``pass_ttl``, refreshed on every later pass.

The client network is the /``ipv4_prefix`` or /``ipv6_prefix`` around the address,
because large senders retry from another host of the same pool. Skipped entirely for
relay clients, authenticated sessions, clients in ``allow_networks``, senders in
``allow_sender_domains``, recipients in ``allow_recipient_domains`` (a
``.example.com`` entry covers subdomains) and recipients whose local part is in
``exempt_local_parts`` (postmaster and abuse, of any domain, and bare ``<postmaster>``:
RFC 5321 §4.5.1, RFC 2142; a site must be able to reach them at once, and relay
control refuses those of foreign domains).

If the store fails, ``on_state_error`` decides: ``"continue"`` (the default) lets the
recipient through, because greylisting is a nuisance filter (a store outage should cost
some spam, not all incoming mail); ``"tempfail"`` answers 451 4.3.0.

Runs on recipients, so put it before the plugins that accept them (``rcpt_relay``
accepts relay domains, ``rcpt_local_users`` local users): an ``accept`` ends the chain.
Put relay control's refusals before it (an ``rcpt_relay`` entry with ``refuse_only``),
so that a relay attempt is refused at once and leaves no triplet in the store.
Adds no headers or results.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Literal

from gateway.address import Address
from gateway.hooks import hookimpl
from gateway.model import Recipient, Session, Transaction
from gateway.policy import Duration, IPNetwork, setting
from gateway.state import REPLY_STATE_UNAVAILABLE, StateStore, StateUnavailable, check_url
from gateway.state.keys import client_network, digest, in_networks
from gateway.verdicts import Reply, Verdict
from plugins._state import StatePlugin
from plugins.rcpt_relay import domain_matches

__all__ = ["REPLY_GREYLISTED", "Plugin", "Settings", "triplet_key"]

log = logging.getLogger("plugins.rcpt_greylist")

REPLY_GREYLISTED = Reply(451, "4.7.1", "Greylisted, please try again later")
_PASSED = "pass"


@dataclass(frozen=True)
class Settings:
    """Settings of ``rcpt_greylist``."""

    state: str = setting("sqlite", 'state store: "sqlite" (embedded) or "redis://host:port/db"')
    delay: Duration = setting(
        300.0, "a retry earlier than this after the first attempt is refused again", min=0
    )
    expiry: Duration = setting(
        4 * 3600.0, "a first attempt not retried successfully within this is forgotten", min=1
    )
    pass_ttl: Duration = setting(
        36 * 86400.0, "how long a passed triplet passes at once (refreshed on each pass)", min=1
    )
    ipv4_prefix: int = setting(24, "IPv4 clients are grouped by this prefix length", min=8, max=32)
    ipv6_prefix: int = setting(64, "IPv6 clients are grouped by this prefix length", min=16, max=128)
    allow_networks: tuple[IPNetwork, ...] = setting((), "clients never greylisted")
    allow_sender_domains: tuple[str, ...] = setting(
        (), "sender domains never greylisted (.example.com: with subdomains)"
    )
    allow_recipient_domains: tuple[str, ...] = setting(
        (), "recipient domains never greylisted (.example.com: with subdomains)"
    )
    exempt_local_parts: tuple[str, ...] = setting(
        ("postmaster", "abuse"), "recipients (any domain, bare <postmaster>) never greylisted"
    )
    on_state_error: Literal["continue", "tempfail"] = setting(
        "continue", "state store down: let recipients through, or answer 451 4.3.0"
    )

    def __post_init__(self) -> None:
        check_url(self.state)
        if self.expiry <= self.delay:
            raise ValueError("expiry must be longer than delay, or no retry can ever pass")


def _address_key(address: Address) -> str:
    """Lower-cased address; "" for the null sender (bounces are greylisted too)."""
    return "" if address.is_null else f"{address.local_key}@{address.domain_key}"


def triplet_key(client_ip: str, sender: Address, rcpt: Address, settings: Settings) -> str:
    """The store key of one greylisting triplet.

    :param client_ip: the client's address
    :param sender: the envelope sender
    :param rcpt: the recipient
    :param settings: for the network prefix lengths
    """
    network = client_network(client_ip, settings.ipv4_prefix, settings.ipv6_prefix)
    return "grey:" + digest(network, _address_key(sender), _address_key(rcpt))


def _is_allowed(session: Session, sender: Address, rcpt: Address, settings: Settings) -> str | None:
    """Why this recipient skips greylisting, or ``None``."""
    if session.is_relay_client:
        return "relay client"
    if session.is_authenticated:
        return "authenticated"
    if in_networks(session.peer_ip, settings.allow_networks):
        return "allowed network"
    if sender.domain and domain_matches(sender.domain_key, settings.allow_sender_domains):
        return "allowed sender domain"
    if rcpt.domain and domain_matches(rcpt.domain_key, settings.allow_recipient_domains):
        return "allowed recipient domain"
    if rcpt.local_key in {part.lower() for part in settings.exempt_local_parts}:
        return "exempt local part"  # RFC 5321 §4.5.1, RFC 2142
    return None


class Plugin(StatePlugin):
    """Holds the state store; ``clock`` is replaceable for tests."""

    def __init__(self) -> None:
        super().__init__()
        self.clock: Callable[[], float] = time.time

    @hookimpl
    async def gateway_rcpt(
        self, session: Session, txn: Transaction, rcpt: Recipient, settings: Settings
    ) -> Verdict | None:
        skip = _is_allowed(session, txn.sender, rcpt.address, settings)
        if skip is not None:
            log.debug("not greylisting <%s>: %s", rcpt.address, skip)
            return None
        key = triplet_key(session.peer_ip, txn.sender, rcpt.address, settings)
        try:
            store = self._stores.require(settings.state)
            return await self._judge(store, key, settings)
        except StateUnavailable as exc:
            if settings.on_state_error == "tempfail":
                return Verdict.tempfail(REPLY_STATE_UNAVAILABLE, reason=f"greylist state unavailable: {exc}")
            log.warning("greylisting skipped, state unavailable: %s", exc)
            return None

    async def _judge(self, store: StateStore, key: str, settings: Settings) -> Verdict | None:
        """The greylisting decision for one triplet key (see the module docstring)."""
        now = self.clock()
        seen = await store.get(key)
        if seen == _PASSED:
            await store.set(key, _PASSED, settings.pass_ttl)
            return None
        if seen is None:
            # only_if_absent: when two nodes see the first attempt at once, both
            # tempfail and the earlier timestamp stays.
            await store.set(key, repr(now), settings.expiry, only_if_absent=True)
            return Verdict.tempfail(REPLY_GREYLISTED, reason="greylisted: first attempt")
        try:
            first = float(seen)
        except ValueError:  # not ours or damaged: start over
            await store.set(key, repr(now), settings.expiry)
            return Verdict.tempfail(REPLY_GREYLISTED, reason="greylisted: first attempt")
        waited = now - first
        if waited < settings.delay:
            return Verdict.tempfail(
                REPLY_GREYLISTED,
                reason=f"greylisted: retry after {waited:.0f}s, before the {settings.delay:.0f}s delay",
            )
        await store.set(key, _PASSED, settings.pass_ttl)
        log.info("greylist passed after %.0fs", waited)
        return None
