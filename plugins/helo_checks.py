"""HELO/EHLO argument checks: malformed names, bare IPs, forged literals, "you are not me".

Hook: ``gateway_helo``. RFC 5321 §4.1.1.1 asks a client to give its fully qualified
domain name, or an address literal (§4.1.3) when it has none. Legitimate MTAs do; bots
send ``localhost``, bare IPs, our own name or random words. In this order, the checks
are:

1. ``bare_ip``: an IP address without brackets (``192.0.2.1``; RFC 5321 §4.1.3 wants
   ``[192.0.2.1]``): 501 5.5.2. A bare IP is judged by this check only.
2. ``invalid_name``: neither a valid domain name nor a valid address literal
   (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``). A domain has labels of letters, digits
   and hyphens, not starting or ending with a hyphen, at most 63 octets each and 255 in
   all, and a top label that is not all digits (RFC 1123 §2.1, RFC 3696 §2); with
   ``require_dot`` (the default) it must have at least one dot. U-labels (RFC 6531) are
   judged in their IDNA form: 501 5.5.2.
3. ``claims_us``: our own name (``gateway.hostname``), one of our local domains
   (``[local] domains``) or the literal of the address the client connected to: 550 5.7.1.
4. ``literal_mismatch``: an address literal that is not the client's address: 550 5.7.1.
5. ``unresolvable`` (off by default): a name with no A or AAAA record (NXDOMAIN, or no
   address), asked through ``gateway.resolver`` within ``dns_timeout``: 550 5.7.1. A DNS
   failure or timeout is no opinion.

Each check's setting is ``"reject"`` (the reply above), ``"score"`` (add ``score`` to the
session's results once per check and session, which the queued envelope's notes record,
and go on) or ``"off"``. The names of the checks the latest HELO failed are left in the
session stash under :data:`HELO_FAILED`.

Relay clients (``[relay] clients``) and authenticated sessions are not checked. AUTH
comes after EHLO, so at the first EHLO only relay clients are exempt: a submission
listener, where mail clients behind NAT give dotless names and private address
literals, should disable this plugin with a listener override.

Settings: ``bare_ip``, ``invalid_name``, ``claims_us``, ``literal_mismatch`` (each
``"reject"``), ``unresolvable`` (``"off"``), ``require_dot`` (true), ``score`` (2.0),
``dns_timeout`` (``"5s"``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from dataclasses import dataclass
from typing import Literal

from gateway.context import Gateway
from gateway.dns import DnsNotFound, DnsTemporaryError, resolve_addresses
from gateway.hooks import hookimpl
from gateway.model import Session, StashKey
from gateway.policy import setting
from gateway.policy.units import Duration
from gateway.verdicts import Reply, Verdict

__all__ = [
    "HELO_FAILED",
    "NAME",
    "REPLIES",
    "Settings",
    "is_bare_ip",
    "is_valid_domain",
    "parse_address_literal",
]

NAME = "helo_checks"
log = logging.getLogger(f"plugins.{NAME}")

Action = Literal["reject", "score", "off"]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Syntax problems are 501 5.5.2 (RFC 3463 §3.6 "syntax error"); policy refusals of a
# well-formed name are 550 5.7.1 ("delivery not authorized").
REPLIES: dict[str, Reply] = {
    "bare_ip": Reply(501, "5.5.2", "Invalid HELO: put an address literal in brackets, as [192.0.2.1]"),
    "invalid_name": Reply(
        501, "5.5.2", "Invalid HELO: give your fully qualified domain name or an address literal"
    ),
    "claims_us": Reply(550, "5.7.1", "HELO refused: that name belongs to this server"),
    "literal_mismatch": Reply(550, "5.7.1", "HELO refused: the address literal is not your address"),
    "unresolvable": Reply(550, "5.7.1", "HELO refused: the name does not resolve"),
}

HELO_FAILED = StashKey[tuple[str, ...]]("helo_checks.failed")
"""Session stash: the checks the latest HELO/EHLO argument failed (any action)."""

_SCORED = StashKey[set[str]]("helo_checks.scored")
_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


@dataclass(frozen=True)
class Settings:
    """Settings of ``helo_checks``."""

    bare_ip: Action = setting("reject", "IP address without brackets: reject (501 5.5.2), score or off")
    invalid_name: Action = setting(
        "reject", "not a domain name nor an address literal: reject (501 5.5.2), score or off"
    )
    claims_us: Action = setting(
        "reject", "our hostname, a local domain or our address literal: reject (550 5.7.1), score or off"
    )
    literal_mismatch: Action = setting(
        "reject", "address literal other than the client's address: reject (550 5.7.1), score or off"
    )
    unresolvable: Action = setting(
        "off", "name without A/AAAA records (DNS errors: no opinion): reject (550 5.7.1), score or off"
    )
    require_dot: bool = setting(True, "a domain name needs at least one dot (a FQDN)")
    score: float = setting(2.0, "score added per failed check whose action is score")
    dns_timeout: Duration = setting(5.0, "time limit of the unresolvable lookup", min=0.001)


def is_bare_ip(helo: str) -> bool:
    """True for an IPv4 or IPv6 address given without the brackets of a literal."""
    try:
        ipaddress.ip_address(helo)
    except ValueError:
        return False
    return True


def parse_address_literal(helo: str) -> IPAddress | None:
    """The address of ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]``; ``None`` if not one.

    RFC 5321 §4.1.3: IPv4 in dotted-quad form, IPv6 after the tag ``IPv6:`` (the tag is
    case-insensitive, §2.4). General literals with other tags name no address we could
    check, and no such tag is registered, so they are not accepted.
    """
    if len(helo) < 3 or helo[0] != "[" or helo[-1] != "]":
        return None
    inner = helo[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            return ipaddress.IPv6Address(inner[5:])
        return ipaddress.IPv4Address(inner)
    except ValueError:
        return None


def is_valid_domain(helo: str, require_dot: bool = True) -> bool:
    """True for a syntactically valid domain name (RFC 5321 §4.1.2 ``Domain``).

    :param helo: the name; U-labels are checked in their IDNA (A-label) form
    :param require_dot: demand at least two labels (a fully qualified name)
    """
    if not helo.isascii():
        try:
            helo = helo.encode("idna").decode("ascii")
        except UnicodeError:
            return False
    # RFC 1035 §2.3.4: 255 octets on the wire is 253 characters in text form.
    if not helo or len(helo) > 253:
        return False
    labels = helo.split(".")
    if require_dot and len(labels) < 2:
        return False
    if not all(_LABEL.match(label) for label in labels):
        return False
    # RFC 3696 §2: a top-level domain is never all-numeric (else 1.2.3.4 would be a name).
    return not labels[-1].isdigit()


def _is_us(helo: str, literal: IPAddress | None, session: Session, gateway: Gateway) -> bool:
    if literal is not None:
        try:
            return literal == ipaddress.ip_address(session.local_ip.split("%", 1)[0])
        except ValueError:
            return False
    name = helo.lower().rstrip(".")
    if gateway.hostname and name == gateway.hostname.lower().rstrip("."):
        return True
    return name in gateway.policy.local.domains


def _is_client(literal: IPAddress, peer_ip: str) -> bool:
    try:
        peer = ipaddress.ip_address(peer_ip.split("%", 1)[0])
    except ValueError:
        return True  # nothing to compare with: no opinion
    if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
        peer = peer.ipv4_mapped
    return literal == peer


async def _resolves(name: str, gateway: Gateway, timeout: float) -> bool | None:
    """True/False whether ``name`` has an address; ``None`` when DNS could not tell."""
    if gateway.resolver is None:
        return None
    try:
        async with asyncio.timeout(timeout):
            await resolve_addresses(gateway.resolver, name)
    except DnsNotFound:
        return False
    except (DnsTemporaryError, TimeoutError) as exc:
        log.info("helo %s: DNS could not tell (%s); no opinion", name[:80], exc)
        return None
    return True


async def _failed_checks(helo: str, session: Session, gateway: Gateway, settings: Settings) -> list[str]:
    """The names of the enabled checks ``helo`` fails, in the order of the module doc."""
    if is_bare_ip(helo):
        return ["bare_ip"] if settings.bare_ip != "off" else []
    literal = parse_address_literal(helo)
    if literal is None and not is_valid_domain(helo, settings.require_dot):
        return ["invalid_name"] if settings.invalid_name != "off" else []
    failed: list[str] = []
    if settings.claims_us != "off" and _is_us(helo, literal, session, gateway):
        failed.append("claims_us")
    if literal is not None:
        if settings.literal_mismatch != "off" and not _is_client(literal, session.peer_ip):
            failed.append("literal_mismatch")
    elif settings.unresolvable != "off" and not failed:
        if await _resolves(helo, gateway, settings.dns_timeout) is False:
            failed.append("unresolvable")
    return failed


@hookimpl
async def gateway_helo(session: Session, helo: str, gateway: Gateway, settings: Settings) -> Verdict | None:
    """Run the enabled checks; refuse at the first one set to reject, score the others.

    :param session: the session; relay clients and authenticated sessions are exempt
    :param helo: the HELO/EHLO argument (the core checked it is one printable word)
    :param gateway: hostname, local domains and resolver
    :param settings: this entry's settings
    :returns: a reject verdict with the check's reply, or ``None``
    """
    if session.is_relay_client or session.is_authenticated:
        return None
    failed = await _failed_checks(helo, session, gateway, settings)
    session.stash[HELO_FAILED] = tuple(failed)
    for check in failed:
        if getattr(settings, check) == "reject":
            return Verdict.reject(REPLIES[check], reason=f"{check}: {helo[:80]!r}")
    scored = session.stash.get(_SCORED)
    if scored is None:
        scored = session.stash[_SCORED] = set()
    for check in failed:
        # A second EHLO (after STARTTLS, RFC 3207 §4.2) must not count the same fault twice.
        if check not in scored:
            scored.add(check)
            session.results.add(NAME, settings.score, f"{check}: {helo[:80]!r}")
            log.info("helo %r failed %s: scored %g", helo[:80], check, settings.score)
    return None
