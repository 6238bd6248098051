"""Building blocks for state keys: client networks, bounded digests, fixed windows.

Keys are built from client-supplied text (addresses, AUTH logins), so anything not
already bounded and printable goes through :func:`digest`: every key stays short, cannot
contain separators or control characters, and does not spell out addresses in a shared
store.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
from collections.abc import Iterable

__all__ = ["client_network", "digest", "in_networks", "window_bucket"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_network(ip: str, ipv4_prefix: int = 24, ipv6_prefix: int = 64) -> str:
    """The network ``ip`` belongs to, in CIDR form (``192.0.2.0/24``).

    A sending site often retries from another address of the same pool (several
    outbound MTAs behind one service), so greylisting and per-network limits look at the
    network, not the single address. IPv6 sites get a /64 per LAN (RFC 6177), hence the
    default prefix there.

    :param ip: the client address (IPv4-mapped IPv6 is treated as IPv4)
    :param ipv4_prefix: prefix length for IPv4 clients
    :param ipv6_prefix: prefix length for IPv6 clients
    :raises ValueError: ``ip`` is not an address
    """
    address = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = ipv4_prefix if address.version == 4 else ipv6_prefix
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def in_networks(ip: str, networks: Iterable[Network]) -> bool:
    """``ip`` lies in one of ``networks`` (an unparsable ``ip`` lies in none).

    :param ip: the client address
    :param networks: the networks to test
    """
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in net for net in networks)


def digest(*parts: str) -> str:
    """A fixed-length hex digest of ``parts``, unambiguous (NUL-separated).

    :param parts: the texts that identify the thing counted
    :returns: 32 hex digits (128 bits of SHA-256: collisions are not a concern here)
    """
    joined = "\0".join(parts).encode("utf-8", "surrogateescape")
    return hashlib.sha256(joined).hexdigest()[:32]


def window_bucket(now: float, window: float) -> int:
    """The number of the fixed window ``now`` falls in: ``floor(now / window)``.

    Every node computes the same number for the same moment (clocks in sync, NTP), so
    a counter keyed by it is shared; the count starts again from zero at each window
    boundary (see ``docs/state.md`` for the burst this allows at a boundary).

    :param now: seconds since the epoch
    :param window: window length in seconds, positive
    """
    if not window > 0:
        raise ValueError("window must be positive")
    return math.floor(now / window)
