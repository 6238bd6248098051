"""Restriction classes: limit where some users may send, and who may write to some addresses.

Hook: ``gateway_rcpt``. Two kinds of rules, each a list of tables in the policy:

``restrict_senders`` (``[[plugins.restrict_senders]]``): the sessions a rule names by AUTH
``logins`` or client ``networks`` may send only to the local domains (``local_domains``,
default true: ``[local] domains`` and ``[local] virtual``) and the recipient ``domains``
listed (``.example.com`` covers subdomains). Any other recipient is refused with
``550 5.7.1 Recipient domain not allowed for this sender``. Bare ``<postmaster>`` is
always allowed (RFC 5321 §4.5.1)::

    [[plugins.restrict_senders]]
    logins = ["intern", "kiosk"]
    networks = ["10.20.0.0/16"]
    domains = ["example.org"]       # besides the local domains

``protect_recipients`` (``[[plugins.protect_recipients]]``): the ``recipients`` a rule names
(addresses, or ``@domain``) accept mail only from the envelope ``senders`` listed
(addresses or ``@domain``), from the AUTH ``logins`` listed, or from client ``networks``;
anyone else gets ``550 5.7.1 Recipient accepts mail only from authorized senders``::

    [[plugins.protect_recipients]]
    recipients = ["all-staff@example.com"]
    logins = ["ceo", "hr"]
    senders = ["@example.com"]       # envelope senders: pair with mail_sender_login
    networks = ["192.0.2.0/24"]

When several rules of one kind apply, any one that allows the recipient is enough.
Envelope senders are whatever the client says: a ``senders`` entry protects an address
only where ``mail_sender_login`` makes senders honest (authenticated submission) or for
mail that cannot come from outside. Matching ignores case for addresses and domains;
logins are compared exactly, as the AUTH backends do.

Put this plugin *before* the plugins that accept recipients (``rcpt_relay``,
``rcpt_local_users``): the first verdict wins, so a recipient already accepted is never
checked. It answers only refusals (or nothing), never ``accept``. Adds no headers or
results.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from gateway.context import Gateway
from gateway.hooks import hookimpl
from gateway.model import Recipient, Session, Transaction
from gateway.policy import IPNetwork, setting
from gateway.verdicts import Reply, Verdict
from plugins.rcpt_relay import domain_matches

__all__ = ["REPLY_PROTECTED", "REPLY_RESTRICTED", "RecipientRule", "SenderRule", "Settings"]

REPLY_RESTRICTED = Reply(550, "5.7.1", "Recipient domain not allowed for this sender")
REPLY_PROTECTED = Reply(550, "5.7.1", "Recipient accepts mail only from authorized senders")

_ADDRESS_OR_DOMAIN = re.compile(r"^([^@\s]+@|@)\.?[A-Za-z0-9\-]+(\.[A-Za-z0-9\-]+)*\.?$")
_DOMAIN = re.compile(r"^\.?[A-Za-z0-9\-]+(\.[A-Za-z0-9\-]+)*\.?$")


def _check_patterns(kind: str, items: tuple[str, ...], pattern: re.Pattern[str]) -> tuple[str, ...]:
    for item in items:
        if not pattern.match(item):
            raise ValueError(f"{kind}: {item!r} is not valid")
    return tuple(item.lower().rstrip(".") for item in items)


@dataclass(frozen=True)
class SenderRule:
    """Sessions that may send only to some domains: a ``[[plugins.restrict_senders]]`` table."""

    logins: tuple[str, ...] = setting((), "AUTH logins this rule applies to")
    networks: tuple[IPNetwork, ...] = setting((), "client networks this rule applies to")
    local_domains: bool = setting(True, "the local and virtual domains are allowed")
    domains: tuple[str, ...] = setting((), 'further allowed recipient domains (".example.com": subdomains)')

    def __post_init__(self) -> None:
        if not self.logins and not self.networks:
            raise ValueError("a restrict_senders rule needs logins or networks")
        object.__setattr__(self, "domains", _check_patterns("domains", self.domains, _DOMAIN))

    def applies(self, session: Session, client: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
        if session.auth_login is not None and session.auth_login in self.logins:
            return True
        return client is not None and any(client in net for net in self.networks)


@dataclass(frozen=True)
class RecipientRule:
    """Addresses that accept mail only from some senders: a ``[[plugins.protect_recipients]]`` table."""

    recipients: tuple[str, ...] = field(metadata={"doc": "protected addresses or @domains"})
    senders: tuple[str, ...] = setting((), "envelope senders allowed (addresses or @domains)")
    logins: tuple[str, ...] = setting((), "AUTH logins allowed")
    networks: tuple[IPNetwork, ...] = setting((), "client networks allowed")

    def __post_init__(self) -> None:
        if not self.recipients:
            raise ValueError("a protect_recipients rule needs recipients")
        object.__setattr__(self, "recipients", _check_patterns("recipients", self.recipients, _ADDRESS_OR_DOMAIN))
        object.__setattr__(self, "senders", _check_patterns("senders", self.senders, _ADDRESS_OR_DOMAIN))

    def allows(
        self, session: Session, sender: str, client: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    ) -> bool:
        if session.auth_login is not None and session.auth_login in self.logins:
            return True
        if client is not None and any(client in net for net in self.networks):
            return True
        return bool(sender) and _address_matches(sender, self.senders)


@dataclass(frozen=True)
class Settings:
    """Settings of ``rcpt_restrictions``."""

    restrict_senders: tuple[SenderRule, ...] = setting(
        (), "restriction classes, as [[plugins.restrict_senders]] tables"
    )
    protect_recipients: tuple[RecipientRule, ...] = setting(
        (), "protected recipients, as [[plugins.protect_recipients]] tables"
    )


def _address_matches(address: str, patterns: tuple[str, ...]) -> bool:
    """``address`` (any case) is listed, or its domain is, as ``@domain`` or ``@.suffix``."""
    address = address.lower()
    if address in patterns:
        return True
    domain = address.rpartition("@")[2].rstrip(".")
    return domain_matches(domain, tuple(p[1:] for p in patterns if p.startswith("@")))


def _client(session: Session) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(session.peer_ip)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@hookimpl
def gateway_rcpt(
    session: Session, txn: Transaction, rcpt: Recipient, gateway: Gateway, settings: Settings
) -> Verdict | None:
    address = rcpt.address
    client = _client(session)
    if settings.restrict_senders and address.domain:
        rules = [rule for rule in settings.restrict_senders if rule.applies(session, client)]
        if rules:
            domain = address.domain_key
            local = gateway.policy.local
            is_local = domain in local.domains or domain in local.virtual
            if not any((rule.local_domains and is_local) or domain_matches(domain, rule.domains) for rule in rules):
                who = session.auth_login or session.peer_ip
                return Verdict.reject(REPLY_RESTRICTED, reason=f"{who} may not send to {domain}")
    if settings.protect_recipients and address.domain:
        target = f"{address.local}@{address.domain_key}"
        protecting = [rule for rule in settings.protect_recipients if _address_matches(target, rule.recipients)]
        if protecting and not any(rule.allows(session, str(txn.sender), client) for rule in protecting):
            return Verdict.reject(REPLY_PROTECTED, reason=f"{target} is protected")
    return None
