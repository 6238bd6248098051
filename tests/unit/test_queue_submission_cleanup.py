"""plugins/queue_submission_cleanup.py: what submitted mail gets, and that other mail is untouched."""

from __future__ import annotations

import re
from types import SimpleNamespace

from gateway.address import Address
from gateway.model import Message, Session, Transaction
from plugins.queue_received_header import HIDE_CLIENT, Settings as ReceivedSettings, received_header
from plugins.queue_submission_cleanup import Settings, gateway_queue

RAW = (
    b"Received: from laptop.internal (10.9.8.7)\r\n\tby relay.internal; Tue, 1 Dec 2026 10:00:00 +0000\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"bcc: hidden@example.org\r\n"
    b"To: bob@example.net\r\n"
    b"Resent-Bcc: also-hidden@example.org\r\n"
    b"Subject: hi\r\n"
    b"\r\n"
    b"Bcc: in the body stays\r\n"
)
GATEWAY = SimpleNamespace(hostname="mx.test.example")


def run(session: Session, settings: Settings, raw: bytes = RAW) -> tuple[Message, Transaction]:
    txn = Transaction(sender=Address("alice", "example.com"), queue_id="Q123")
    message = Message(raw)
    gateway_queue(session, txn, message, GATEWAY, settings)
    return message, txn


def session(login: str | None = "alice", relay: bool = False) -> Session:
    s = Session(peer_ip="192.0.2.1", peer_port=1, listener="submission", auth_login=login)
    s.is_relay_client = relay
    return s


def test_authenticated_mail_is_cleaned_up() -> None:
    message, txn = run(session(), Settings(remove_received=True, hide_client=True))
    out = message.as_bytes()
    assert re.match(rb"Date: \w{3}, \d{1,2} \w{3} \d{4} [\d:]{8} [+-]\d{4}\r\nMessage-ID: <Q123\.[0-9a-f]{12}@mx\.test\.example>\r\n", out)
    assert b"hidden@example.org" not in out and b"10.9.8.7" not in out
    assert out.endswith(b"Subject: hi\r\n\r\nBcc: in the body stays\r\n")
    assert txn.stash.get(HIDE_CLIENT) is True


def test_defaults_keep_received_and_existing_date_and_message_id() -> None:
    raw = RAW.replace(b"Subject: hi\r\n", b"Subject: hi\r\nDate: Tue, 1 Dec 2026 10:00:00 +0000\r\nMessage-Id: <m@x>\r\n")
    message, txn = run(session(), Settings(message_id_domain="ids.example.com"))
    assert message.header_values("Received") and HIDE_CLIENT not in txn.stash
    message, _ = run(session(), Settings(), raw)
    out = message.as_bytes()
    assert out.count(b"Date:") == 1 and out.count(b"Message-Id:") == 1 and b"Message-ID" not in out
    assert out == raw.replace(b"bcc: hidden@example.org\r\n", b"").replace(b"Resent-Bcc: also-hidden@example.org\r\n", b"")


def test_message_id_domain_setting() -> None:
    message, _ = run(session(), Settings(message_id_domain="ids.example.com"))
    assert message.as_bytes().split(b"\r\n")[1].endswith(b"@ids.example.com>")


def test_other_mail_is_left_alone() -> None:
    for who in (session(login=None), session(login=None, relay=True)):
        message, txn = run(who, Settings(remove_received=True, hide_client=True))
        assert not message.is_modified and message.as_bytes() == RAW
        assert HIDE_CLIENT not in txn.stash
    # Relay clients only when asked for.
    message, _ = run(session(login=None, relay=True), Settings(relay_clients=True))
    assert message.is_modified
    message, _ = run(session(), Settings(authenticated=False))
    assert not message.is_modified


def test_received_header_without_client_when_hidden() -> None:
    s = session()
    s.helo, s.is_esmtp = "laptop.example", True
    txn = Transaction(sender=Address("alice", "example.com"), queue_id="Q1")
    shown = received_header(s, txn, "mx.test.example", ReceivedSettings())
    assert shown.startswith("from laptop.example ([192.0.2.1])\n\tby mx.test.example with ESMTPA id Q1")
    txn.stash[HIDE_CLIENT] = True
    hidden = received_header(s, txn, "mx.test.example", ReceivedSettings())
    assert hidden.startswith("by mx.test.example with ESMTPA id Q1;")
    assert "192.0.2.1" not in hidden and "laptop" not in hidden
