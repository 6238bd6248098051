"""Real TLS (self-signed certificate made at start) and AUTH PLAIN/LOGIN after it."""

from __future__ import annotations

import base64
import smtplib
from pathlib import Path

import pytest

from gateway.passwords import hash_password
from tests.conftest import BASE_POLICY, MESSAGE, RawClient, no_verify_context, smtp


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    path.write_text(f"# test users\nalice:{hash_password('s3cret', ln=4)}\n")
    return path


def auth_policy(users_file: Path, extra: str = "") -> str:
    return BASE_POLICY + f'\n[auth]\nusers_file = "{users_file}"\nmax_failures = 2\n' + extra


def test_starttls_then_auth_plain_then_relay(gateway_factory, users_file) -> None:
    gw = gateway_factory(auth_policy(users_file))
    with smtp(gw.port) as client:
        client.ehlo()
        assert client.has_extn("starttls") and not client.has_extn("auth")
        client.starttls(context=no_verify_context())
        client.ehlo()
        assert "PLAIN" in client.esmtp_features["auth"]
        assert client.login("alice", "s3cret")[0] == 235
        # Authenticated users may relay.
        assert client.sendmail("alice@local.example", ["someone@example.net"], MESSAGE) == {}
    stored = gw.queue.read_message(gw.queue_ids()[0])
    assert b"with ESMTPSA id" in stored
    assert b"(using TLSv1.3 with cipher" in stored


def test_auth_before_tls_is_refused(gateway_factory, users_file) -> None:
    gw = gateway_factory(auth_policy(users_file))
    c = RawClient(gw.port)
    c.reply()
    c.cmd("EHLO client.test.example")
    token = base64.b64encode(b"\0alice\0s3cret").decode()
    code, text = c.cmd(f"AUTH PLAIN {token}")
    assert code == 538 and text[0].startswith("5.7.11")
    c.close()


def test_wrong_password_then_lockout(gateway_factory, users_file) -> None:
    gw = gateway_factory(auth_policy(users_file))
    c = RawClient(gw.port)
    c.reply()
    c.cmd("EHLO client.test.example")
    c.cmd("STARTTLS")
    c.starttls()
    c.cmd("EHLO client.test.example")
    bad = base64.b64encode(b"\0alice\0wrong").decode()
    code, text = c.cmd(f"AUTH PLAIN {bad}")
    assert code == 535 and text[0].startswith("5.7.8")
    unknown = base64.b64encode(b"\0mallory\0x").decode()
    code, _ = c.cmd(f"AUTH PLAIN {unknown}")
    assert code == 535
    assert c.reply()[0] == 421
    assert c.is_closed()
    c.close()


def test_auth_login_exchange(gateway_factory, users_file) -> None:
    gw = gateway_factory(auth_policy(users_file))
    c = RawClient(gw.port)
    c.reply()
    c.cmd("EHLO client.test.example")
    c.cmd("STARTTLS")
    c.starttls()
    c.cmd("EHLO client.test.example")
    code, text = c.cmd("AUTH LOGIN")
    assert code == 334 and base64.b64decode(text[0]) == b"Username:"
    code, text = c.cmd(base64.b64encode(b"alice"))
    assert code == 334 and base64.b64decode(text[0]) == b"Password:"
    assert c.cmd(base64.b64encode(b"s3cret"))[0] == 235
    assert c.cmd("AUTH LOGIN")[0] == 503
    c.close()


def test_require_tls_and_auth_listener(gateway_factory, users_file) -> None:
    policy = auth_policy(users_file).replace(
        'tls = "starttls"', 'tls = "starttls"\nrequire_tls = true\nrequire_auth = true'
    )
    gw = gateway_factory(policy)
    c = RawClient(gw.port)
    c.reply()
    c.cmd("EHLO client.test.example")
    code, text = c.cmd("MAIL FROM:<a@example.org>")
    assert code == 530 and "STARTTLS" in text[0]
    c.cmd("STARTTLS")
    c.starttls()
    c.cmd("EHLO client.test.example")
    code, text = c.cmd("MAIL FROM:<a@example.org>")
    assert code == 530 and "Authentication required" in text[0]
    token = base64.b64encode(b"\0alice\0s3cret").decode()
    assert c.cmd(f"AUTH PLAIN {token}")[0] == 235
    assert c.cmd("MAIL FROM:<alice@local.example>")[0] == 250
    c.close()


def test_implicit_tls_listener(gateway_factory, users_file) -> None:
    policy = auth_policy(users_file).replace('tls = "starttls"', 'tls = "implicit"')
    gw = gateway_factory(policy)
    with smtplib.SMTP_SSL("127.0.0.1", gw.port, context=no_verify_context(), timeout=10) as client:
        client.ehlo("client.test.example")
        assert not client.has_extn("starttls")
        client.login("alice", "s3cret")
        client.sendmail("alice@local.example", ["bob@localhost"], MESSAGE)
    assert len(gw.queue_ids()) == 1
