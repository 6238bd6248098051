"""queue_authentication_results: forged fields out, one field of ours in."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from gateway.address import Address
from gateway.authres import AuthResult, add_result
from gateway.model import Message, Transaction
from plugins.queue_authentication_results import Settings, authserv_id_of, gateway_queue

OURS = "mx.example.net"
GATEWAY = SimpleNamespace(hostname=OURS)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("mx.example.net; spf=pass", "mx.example.net"),
        (" MX.Example.NET 1; none", "mx.example.net"),
        ("(forged (nested) comment) mx.example.net;\r\n\tdkim=pass", "mx.example.net"),
        ("mx.example.net(comment);dkim=pass", "mx.example.net"),
        ('"mx.example.net"; none', "mx.example.net"),
        ("other.example; spf=pass smtp.mailfrom=mx.example.net", "other.example"),
        ("", ""),
    ],
)
def test_authserv_id_of(value: str, expected: str) -> None:
    assert authserv_id_of(value) == expected


def run(raw: bytes, *found: AuthResult, settings: Settings = Settings()) -> bytes:
    txn = Transaction(sender=Address("a", "example.org"))
    for result in found:
        add_result(txn, result)
    message = Message(raw)
    gateway_queue(txn=txn, message=message, gateway=GATEWAY, settings=settings)
    return message.as_bytes()


BODY = b"Subject: x\r\n\r\nbody\r\n"


def test_forged_fields_go_and_ours_is_added_on_top() -> None:
    raw = (
        b"Authentication-Results: mx.example.net; dkim=pass header.d=bank.example\r\n"
        b"Authentication-Results: upstream.example; spf=fail\r\n" + BODY
    )
    dkim = AuthResult("dkim", "pass", properties=(("header.d", "example.org"), ("header.s", "s1")))
    dmarc = AuthResult("dmarc", "pass", properties=(("header.from", "example.org"),))
    out = run(raw, dkim, dmarc)
    assert out == (
        b"Authentication-Results: mx.example.net;\r\n"
        b"\tdkim=pass header.d=example.org header.s=s1;\r\n"
        b"\tdmarc=pass header.from=example.org\r\n"
        b"Authentication-Results: upstream.example; spf=fail\r\n" + BODY
    )


def test_nothing_recorded_adds_nothing_unless_asked() -> None:
    forged = b"Authentication-Results: mx.example.net; spf=pass\r\n" + BODY
    assert run(forged) == BODY
    assert run(BODY, settings=Settings(add_when_empty=True)) == b"Authentication-Results: mx.example.net; none\r\n" + BODY


def test_configured_authserv_id() -> None:
    raw = b"Authentication-Results: auth.example.net; spf=pass\r\nAuthentication-Results: mx.example.net; x=y\r\n" + BODY
    out = run(raw, AuthResult("spf", "none"), settings=Settings(authserv_id="auth.example.net"))
    assert out == (
        b"Authentication-Results: auth.example.net;\r\n\tspf=none\r\n"
        b"Authentication-Results: mx.example.net; x=y\r\n" + BODY
    )
