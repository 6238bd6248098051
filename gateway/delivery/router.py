"""Built-in routing: where a queued recipient goes, from the policy alone.

Order (qmail's, grown up): a local domain or bare ``postmaster`` goes to a local user
(``abuse`` and ``MAILER-DAEMON`` without a user or alias of their own: the postmaster);
a virtual domain goes to the user it maps to, with the local part as the extension
(qmail virtualdomains); a ``[[routes]]`` entry (exact domain, then ``.suffix``, then
``*``) gives a smarthost, hold or discard; anything else goes to the domain's MX hosts.
Plugins can answer ``gateway_route`` first.
"""

from __future__ import annotations

from typing import Any

from gateway.address import Address, AddressError
from gateway.delivery.types import LocalRoute, MxRoute, Route, SmarthostRoute, SpecialRoute

__all__ = ["POSTMASTER_ROLES", "domain_of", "holding_route", "is_held", "route_for", "split_user"]

#: Role addresses (RFC 2142 ``abuse``; ``MAILER-DAEMON``, where replies to bounces go)
#: that reach the postmaster's mailbox in a local domain when they are neither a local
#: user nor an alias, as the aliases file every Unix MTA ships says.
POSTMASTER_ROLES = frozenset({"abuse", "mailer-daemon"})


def split_user(local: str, users: tuple[str, ...] | frozenset[str], delimiter: str) -> tuple[str, str]:
    """Split a local part into (user, extension), qmail style.

    The longest prefix that is a known user wins, so ``mary-ann-lists`` goes to user
    ``mary-ann`` with extension ``lists`` when ``mary-ann`` exists. Unknown names split
    at the first delimiter.
    """
    local = local.lower()
    known = frozenset(users)
    if local in known or not delimiter:
        return local, ""
    cut = len(local)
    while True:
        cut = local.rfind(delimiter, 0, cut)
        if cut <= 0:
            break
        if local[:cut] in known:
            return local[:cut], local[cut + len(delimiter) :]
    first = local.find(delimiter)
    if first > 0:
        return local[:first], local[first + len(delimiter) :]
    return local, ""


def _domain_matches(domain: str, pattern: str) -> bool:
    if pattern.startswith("."):
        return domain.endswith(pattern) or domain == pattern[1:]
    return domain == pattern


def _matching_route(domain: str, policy: Any) -> Any:
    """The ``[[routes]]`` entry for ``domain``: exact, then the longest ``.suffix``, then ``*``."""
    best = None
    for route in policy.routes:
        if route.domain == "*" and best is None:
            best = route
        elif route.domain != "*" and _domain_matches(domain, route.domain):
            # Exact beats suffix; among suffixes the longest wins.
            if best is None or best.domain == "*" or len(route.domain) > len(best.domain) or route.domain == domain:
                best = route
                if route.domain == domain:
                    break
    return best


def route_for(address: str, policy: Any) -> Route:
    """The built-in route for one recipient address.

    :raises AddressError: the stored address no longer parses (a corrupt envelope)
    """
    if "@" not in address:
        # Bare <postmaster> (RFC 5321 §4.5.1).
        return LocalRoute("postmaster", "", policy.local.domains[0] if policy.local.domains else "")
    parsed = Address.parse(address)
    domain = parsed.domain_key
    local = policy.local
    if domain in local.domains:
        name = parsed.local.lower()
        if name in POSTMASTER_ROLES and name not in local.users:
            return LocalRoute("postmaster", "", domain)  # an alias of that name expands first
        user, ext = split_user(parsed.local, local.users, local.extension_delimiter)
        return LocalRoute(user, ext, domain)
    if domain in local.virtual:
        return LocalRoute(local.virtual[domain], parsed.local.lower(), domain)
    best = _matching_route(domain, policy)
    if best is not None:
        if best.action != "relay":
            return SpecialRoute(best.action)
        if best.host:
            return SmarthostRoute(best.host, best.port, best.tls, best.auth_user, best.auth_password_env)
    return MxRoute(domain)


def domain_of(address: str) -> str | None:
    """The domain of a recipient (lower case, the form routes match), or None when the
    address has none or no longer parses."""
    if "@" not in address:
        return None
    try:
        return Address.parse(address).domain_key
    except AddressError:
        return None


def is_held(address: str, policy: Any) -> bool:
    """Whether the recipient's ``[[routes]]`` entry has ``hold = true`` (serialmail/ETRN:
    the scheduler keeps the mail until ``gateway queue flush`` or ``ETRN`` releases it).

    Local and virtual domains are never held; an address that no longer parses is not
    held either (routing then fails it).
    """
    domain = domain_of(address)
    if domain is None or domain in policy.local.domains or domain in policy.local.virtual:
        return False
    best = _matching_route(domain, policy)
    return bool(best is not None and getattr(best, "hold", False))


def holding_route(address: str, policy: Any) -> str | None:
    """The ``domain`` of the ``[[routes]]`` entry that keeps this recipient queued
    (``hold = true``, or the legacy ``action = "hold"``), or None when none does.

    What ``gateway queue list`` shows: such a recipient is held by its route, not
    merely pending. Local and virtual domains are never held.
    """
    domain = domain_of(address)
    if domain is None or domain in policy.local.domains or domain in policy.local.virtual:
        return None
    best = _matching_route(domain, policy)
    if best is None or not (getattr(best, "hold", False) or getattr(best, "action", "") == "hold"):
        return None
    return str(best.domain)


def is_valid(address: str) -> bool:
    try:
        Address.parse(address)
    except AddressError:
        return False
    return True
