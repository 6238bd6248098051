"""Tests for plugins.data_clamav: clamd's answers, settings, the plugin rules."""

from __future__ import annotations

import textwrap

import pytest

from gateway.policy import PolicyError, load_policy_text
from plugins import data_clamav
from plugins._scanner import ScannerError, parse_address
from plugins.data_clamav import ClamdAnswer, Settings, parse_clamd_reply
from tests.unit import test_hookspecs as rules


@pytest.mark.parametrize(
    "reply, signature",
    [
        (b"stream: OK", None),
        (b"stream: Eicar-Test-Signature FOUND", "Eicar-Test-Signature"),
        (b"stream: Win.Test.EICAR_HDB-1 FOUND", "Win.Test.EICAR_HDB-1"),
    ],
)
def test_parse_clamd_reply(reply: bytes, signature: str | None) -> None:
    assert parse_clamd_reply(reply) == ClamdAnswer(signature)


@pytest.mark.parametrize(
    "reply",
    [b"INSTREAM size limit exceeded. ERROR", b"stream: Can't allocate memory ERROR", b"", b"UNKNOWN COMMAND"],
)
def test_errors_and_nonsense_are_scanner_failures(reply: bytes) -> None:
    with pytest.raises(ScannerError):
        parse_clamd_reply(reply)


def test_a_found_without_a_name_still_counts_as_infected() -> None:
    assert parse_clamd_reply(b"stream:  FOUND").signature == "unknown"


def _load(entry: str) -> Settings:
    text = textwrap.dedent(
        f"""
        [[plugins]]
        name = "data_clamav"
        {entry}
        """
    )
    policy = load_policy_text(text, source="t.toml", registry={"data_clamav": Settings})
    settings = policy.plugins[0].settings
    assert isinstance(settings, Settings)
    return settings


def test_settings_from_a_policy() -> None:
    settings = _load('address = "127.0.0.1:3310"\nmax_size = "10MB"\nscan_timeout = "2s"\naction = "quarantine"')
    assert settings.max_size == 10 * 1024**2 and settings.scan_timeout == 2.0
    assert settings.action == "quarantine" and settings.on_scanner_error == "tempfail"


@pytest.mark.parametrize("entry", ['action = "drop"', 'on_scanner_error = "ignore"', "max_size = 0"])
def test_bad_settings_stop_the_policy(entry: str) -> None:
    with pytest.raises(PolicyError):
        _load(entry)


def test_follows_the_stock_plugin_rules() -> None:
    rules.test_stock_plugin_has_a_module_docstring(data_clamav.NAME)
    rules.test_stock_plugin_settings_are_a_documented_frozen_dataclass(data_clamav.NAME)
    rules.test_stock_plugin_implements_only_hookspecs(data_clamav.NAME)


@pytest.mark.parametrize(
    "address, where",
    [
        ("/var/run/clamav/clamd.ctl", "/var/run/clamav/clamd.ctl"),
        ("unix:/tmp/clamd.sock", "/tmp/clamd.sock"),
        ("127.0.0.1:3311", ("127.0.0.1", 3311)),
        ("scanner.example", ("scanner.example", 3310)),
        ("[::1]:3312", ("::1", 3312)),
        ("[::1]", ("::1", 3310)),
    ],
)
def test_parse_address(address: str, where: object) -> None:
    assert parse_address(address, 3310) == where


@pytest.mark.parametrize("address", ["", "unix:", "host:0", "host:99999", "host:x", "[::1", "[::1]x"])
def test_bad_addresses(address: str) -> None:
    with pytest.raises(ValueError):
        parse_address(address, 3310)
