"""The Dovecot protocol client's pure parts: addresses, escaping, answer fields.

The exchanges themselves are tested against a real Dovecot in
tests/integration/dovecot/.
"""

from __future__ import annotations

import asyncio

import pytest

from plugins._dovecot import DovecotError, authenticate, escape, lookup_user, parse_address, parse_fields, unescape


@pytest.mark.parametrize(
    ("address", "where"),
    [
        ("/run/dovecot/auth-client", "/run/dovecot/auth-client"),
        ("unix:/var/spool/postfix/private/auth", "/var/spool/postfix/private/auth"),
        ("127.0.0.1:12345", ("127.0.0.1", 12345)),
        ("[::1]:12345", ("::1", 12345)),
        ("auth.example:9000", ("auth.example", 9000)),
    ],
)
def test_parse_address(address: str, where: object) -> None:
    assert parse_address(address) == where


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("", "empty"),
        ("unix:", "no socket path"),
        ("127.0.0.1", "no port"),
        ("::1", "no port"),
        ("auth-client", "no port"),
        ("127.0.0.1:0", "bad port"),
        ("127.0.0.1:65536", "bad port"),
        ("127.0.0.1:x", "bad port"),
        ("[::1:12345", "unclosed"),
    ],
)
def test_parse_address_refuses(address: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_address(address)


@pytest.mark.parametrize("value", ["plain", "a\tb", "line\nbreak\r", "\x01", "\x01t literal", ""])
def test_escape_round_trip(value: str) -> None:
    escaped = escape(value)
    assert not any(c in escaped for c in "\t\r\n")
    assert unescape(escaped) == value


def test_parse_fields_keeps_flags_and_unescapes() -> None:
    fields = parse_fields(["user=alice", "temp", "reason=db\x01tdown", "code=temp_fail"])
    assert fields == {"user": "alice", "temp": "", "reason": "db\tdown", "code": "temp_fail"}


def test_nothing_listening_is_an_error_not_a_refusal(tmp_path) -> None:
    missing = str(tmp_path / "none")

    async def main() -> None:
        with pytest.raises(DovecotError, match="cannot connect"):
            await authenticate(missing, "alice", "secret", connect_timeout=1, timeout=1)
        with pytest.raises(DovecotError, match="cannot connect"):
            await lookup_user(missing, "alice", connect_timeout=1, timeout=1)

    asyncio.run(main())


def test_nul_in_credentials_is_refused_without_asking(tmp_path) -> None:
    answer = asyncio.run(authenticate(str(tmp_path / "none"), "al\0ice", "x", connect_timeout=1, timeout=1))
    assert not answer.ok
