"""Durations, sizes and networks as policy values.

Policy files write durations and sizes with units (``"30s"``, ``"25MB"``); the code works in
plain numbers (float seconds, int bytes). This module parses the former into the latter and
formats them back for ``gateway check``.

Field types in a settings dataclass say which parser applies. :data:`Duration`, :data:`Size`
and :data:`IPNetwork` are ``typing.Annotated`` aliases: to a type checker they are ``float``,
``int`` and an ``ipaddress`` network, to :mod:`gateway.policy.schema` the annotation picks the
parser.

Durations
    A number of seconds (``30``, ``0.5``), or a string of one or more ``<number><unit>`` parts
    (``"500ms"``, ``"30s"``, ``"5m"``, ``"2h"``, ``"7d"``, ``"1w"``, ``"1h30m"``). A bare
    number in a string (``"30"``) is seconds.

Sizes
    A number of bytes (``100``), or a string ``<number><unit>``. Units are **binary** and
    case-insensitive: ``K``/``KB``/``KiB`` = 1024, ``M``/``MB``/``MiB`` = 1024², ``G``/``GB``/
    ``GiB`` = 1024³, ``T``/``TB``/``TiB`` = 1024⁴, ``B`` = 1. So ``"25MB"`` is 26 214 400
    bytes, matching what mail administrators expect from Postfix's ``message_size_limit``
    style numbers and from mail clients that show attachment sizes in binary units.
    Fractions are allowed (``"1.5MB"``) and rounded down to whole bytes.

Networks
    ``"10.0.0.0/8"``, ``"2001:db8::/32"``, or a single address (``"127.0.0.1"``, ``"::1"``),
    which means the /32 or /128 network. Host bits are cleared (``"10.1.2.3/8"`` is
    ``10.0.0.0/8``).
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from typing import Annotated, TypeAlias

__all__ = [
    "DURATION",
    "Duration",
    "IPNetwork",
    "NETWORK",
    "SIZE",
    "Size",
    "UnitError",
    "UnitKind",
    "format_duration",
    "format_size",
    "parse_duration",
    "parse_network",
    "parse_size",
]


class UnitError(ValueError):
    """A duration, size or network value that cannot be parsed."""


@dataclass(frozen=True)
class UnitKind:
    """Marker placed in ``Annotated[...]`` to select a policy value parser."""

    kind: str


DURATION = UnitKind("duration")
SIZE = UnitKind("size")
NETWORK = UnitKind("network")

Duration: TypeAlias = Annotated[float, DURATION]
"""Seconds; written in a policy as ``"30s"``, ``"5m"``, ``"500ms"`` or a number of seconds."""

Size: TypeAlias = Annotated[int, SIZE]
"""Bytes; written in a policy as ``"25MB"``, ``"512KB"`` or a number of bytes."""

IPNetwork: TypeAlias = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, NETWORK]
"""An IP network; written as ``"192.0.2.0/24"`` or a single address such as ``"::1"``."""

_DURATION_UNITS: dict[str, float] = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 604800.0,
}

_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1024**4,
    "tib": 1024**4,
}

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_DURATION_PART = re.compile(rf"({_NUMBER})\s*(ms|s|m|h|d|w)\s*")
_DURATION_WHOLE = re.compile(rf"(?:{_NUMBER}\s*(?:ms|s|m|h|d|w)\s*)+")
_SIZE = re.compile(rf"({_NUMBER})\s*([a-z]*)")

_DURATION_HINT = 'use a number of seconds or a string like "500ms", "30s", "5m", "2h", "7d"'
_SIZE_HINT = 'use a number of bytes or a string like "512KB", "25MB", "1GiB"'


def _check_number(value: object, hint: str) -> float:
    """Return a non-negative finite TOML number as float, else raise :class:`UnitError`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UnitError(f"expected a number or a string, got {type(value).__name__}; {hint}")
    if not math.isfinite(value) or value < 0:
        raise UnitError(f"must be a non-negative finite number, got {value!r}")
    return float(value)


def parse_duration(value: object) -> float:
    """Parse a policy duration into seconds.

    :param value: an int or float (seconds) or a string such as ``"30s"`` or ``"1h30m"``.
    :returns: the duration in seconds.
    :raises UnitError: on a negative number, an unknown unit or a malformed string.
    """
    if not isinstance(value, str):
        return _check_number(value, _DURATION_HINT)
    text = value.strip().lower()
    if re.fullmatch(_NUMBER, text):
        return float(text)
    if not text or not _DURATION_WHOLE.fullmatch(text):
        raise UnitError(f"invalid duration {value!r}; {_DURATION_HINT}")
    return sum(
        float(number) * _DURATION_UNITS[unit] for number, unit in _DURATION_PART.findall(text)
    )


def parse_size(value: object) -> int:
    """Parse a policy size into bytes (binary units, see the module docstring).

    :param value: an int (bytes) or a string such as ``"25MB"`` or ``"512KiB"``.
    :returns: the size in bytes, rounded down.
    :raises UnitError: on a negative number, an unknown unit or a malformed string.
    """
    if not isinstance(value, str):
        number = _check_number(value, _SIZE_HINT)
        if isinstance(value, float) and not number.is_integer():
            raise UnitError(f"a size in bytes must be a whole number, got {value!r}")
        return int(number)
    match = _SIZE.fullmatch(value.strip().lower())
    if match is None or match.group(2) not in _SIZE_UNITS:
        raise UnitError(f"invalid size {value!r}; {_SIZE_HINT}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def parse_network(value: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """Parse a network or single address; host bits are cleared.

    :param value: a string such as ``"10.0.0.0/8"``, ``"::1"`` or ``"127.0.0.1"``.
    :returns: the :mod:`ipaddress` network.
    :raises UnitError: when the value is not a string or not a valid network.
    """
    if not isinstance(value, str):
        raise UnitError(
            f'expected a network string like "192.0.2.0/24", got {type(value).__name__}'
        )
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError as exc:
        raise UnitError(f"invalid network {value!r}: {exc}") from None


def format_duration(seconds: float) -> str:
    """Format seconds in the largest unit that divides them evenly (``300.0`` -> ``"5m"``).

    :param seconds: a non-negative duration.
    :returns: a string that :func:`parse_duration` reads back to the same value.
    """
    if seconds == 0:
        return "0s"
    for unit in ("w", "d", "h", "m", "s"):
        count = seconds / _DURATION_UNITS[unit]
        if count >= 1 and count.is_integer():
            return f"{int(count)}{unit}"
    milliseconds = seconds * 1000
    if milliseconds.is_integer():
        return f"{int(milliseconds)}ms"
    return f"{seconds!r}s"


def format_size(size: int) -> str:
    """Format bytes in the largest binary unit dividing them evenly (``26214400`` -> ``"25MB"``).

    :param size: a non-negative number of bytes.
    :returns: a string that :func:`parse_size` reads back to the same value.
    """
    for unit in ("TB", "GB", "MB", "KB"):
        factor = _SIZE_UNITS[unit.lower()]
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)
