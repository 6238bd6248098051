"""Tests for gateway.policy.units: durations, sizes, networks."""

from __future__ import annotations

import ipaddress

import pytest

from gateway.policy.units import (
    UnitError,
    format_duration,
    format_size,
    parse_duration,
    parse_network,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("7d", 604800.0),
        ("1w", 604800.0),
        ("500ms", 0.5),
        ("1h30m", 5400.0),
        ("1m 30s", 90.0),
        ("1.5s", 1.5),
        (" 10S ", 10.0),
        ("30", 30.0),
        ("0s", 0.0),
        (30, 30.0),
        (0.25, 0.25),
    ],
)
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "bad", ["", "s", "5x", "5 minutes", "-5s", "5s5", "m5", -1, True, [1], float("nan")]
)
def test_parse_duration_rejects(bad: object) -> None:
    with pytest.raises(UnitError):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("100", 100),
        (100, 100),
        ("100B", 100),
        ("512KB", 512 * 1024),
        ("512K", 512 * 1024),
        ("512KiB", 512 * 1024),
        ("25MB", 25 * 1024**2),
        ("25mb", 25 * 1024**2),
        ("25 MiB", 25 * 1024**2),
        ("1GiB", 1024**3),
        ("1G", 1024**3),
        ("2TB", 2 * 1024**4),
        ("1.5MB", 1572864),
        (0, 0),
        (1024.0, 1024),
    ],
)
def test_parse_size(text: object, size: int) -> None:
    assert parse_size(text) == size
    assert isinstance(parse_size(text), int)


@pytest.mark.parametrize("bad", ["", "MB", "25XB", "25 M B", "-1", -1, 1.5, False, "1e6"])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(UnitError):
        parse_size(bad)


def test_parse_network() -> None:
    assert parse_network("10.0.0.0/8") == ipaddress.ip_network("10.0.0.0/8")
    assert parse_network("127.0.0.1") == ipaddress.ip_network("127.0.0.1/32")
    assert parse_network("::1") == ipaddress.ip_network("::1/128")
    assert parse_network("10.1.2.3/8") == ipaddress.ip_network("10.0.0.0/8")  # host bits cleared
    for bad in ("10.0.0.0/33", "localhost", "", 10):
        with pytest.raises(UnitError):
            parse_network(bad)


@pytest.mark.parametrize("seconds", [0.0, 0.5, 30.0, 300.0, 5400.0, 86400.0, 604800.0, 1.25])
def test_format_duration_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


def test_format_duration_picks_largest_unit() -> None:
    assert format_duration(300.0) == "5m"
    assert format_duration(0.5) == "500ms"
    assert format_duration(90.0) == "90s"


@pytest.mark.parametrize("size", [0, 1, 1000, 1024, 25 * 1024**2, 3 * 1024**3, 1024**4 + 1])
def test_format_size_round_trips(size: int) -> None:
    assert parse_size(format_size(size)) == size


def test_format_size_uses_binary_units() -> None:
    assert format_size(25 * 1024**2) == "25MB"
    assert format_size(1000) == "1000"
