"""Large messages end to end: past ``[limits] spool_threshold`` DATA goes to the queue's
disk as it arrives; the queue file is the spool itself (GWQ2); delivery, copies and
the queue tools see exactly the message that was sent. Real SMTP sessions (smtplib),
a real queue directory and real Maildirs."""

from __future__ import annotations

import hashlib
import os
import smtplib
from pathlib import Path

from gateway.queue import QueueStore
from tests.conftest import wait_for

# Lines that start with a dot (smtplib stuffs them, the gateway must unstuff them), long
# lines, and a little 8-bit text: 3 MB, well past the 256 KiB default threshold.
BODY = b"".join(
    (b".dotted line %06d\r\n" if i % 7 == 0 else b"plain line %06d with some text \xc3\xa9\r\n") % i
    for i in range(100_000)
)
MESSAGE = (
    b"From: <sender@example.org>\r\nTo: <alice@localhost>\r\nSubject: large\r\n"
    b"Message-ID: <large@example.org>\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + BODY
)

POLICY = """
[server]
hostname = "mx.test.example"
[[listeners]]
name = "smtp"
tls = "none"
[local]
domains = ["localhost"]
users = ["postmaster", "alice", "archive"]
[delivery]
enabled = {delivery}
retry_base = "200ms"
retry_max = "1s"
poll_interval = "200ms"
[[plugins]]
name = "rcpt_relay"
[[plugins]]
name = "rcpt_local_users"
[[plugins]]
name = "queue_archive"
always = ["archive@localhost"]
[[plugins]]
name = "queue_received_header"
"""


def _send(port: int, message: bytes = MESSAGE) -> str:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test.example", timeout=60) as client:
        client.ehlo()
        client.mail("sender@example.org", ["BODY=8BITMIME"])
        client.rcpt("alice@localhost")
        code, reply = client.data(message)
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[-1]


def _maildir(gw, user: str) -> list[Path]:
    new = Path(gw.policy.local.mail_root) / user / "Maildir" / "new"
    return sorted(new.glob("*")) if new.exists() else []


def _original(delivered: bytes) -> bytes:
    """The delivered message without the lines the gateway added above it."""
    at = delivered.find(b"From: <sender@example.org>\r\n")
    assert at > 0
    return delivered[at:]


def test_a_large_message_is_queued_from_its_spool_file(gateway_factory) -> None:
    gw = gateway_factory(POLICY.format(delivery="false"))
    qid = _send(gw.port)
    root = Path(gw.policy.server.queue_dir)
    path = root / "msg" / qid
    data = path.read_bytes()
    assert data[:5] == b"GWQ2 "  # the spool itself, renamed into msg/
    assert len(data) < len(MESSAGE) + 4096  # the body is in the file once
    store = QueueStore(root)
    queued = store.read_message(qid)
    assert queued.startswith(b"Received: from client.test.example")
    assert _original(queued) == MESSAGE
    # The archive copy is its own file with the same message.
    (copy,) = [q for q in os.listdir(root / "msg") if q != qid]
    assert _original(store.read_message(copy)) == MESSAGE
    assert store.load(copy).envelope.recipients[0].address == "archive@localhost"
    assert os.listdir(root / "tmp") == []


def test_a_large_message_is_delivered_exactly(gateway_factory) -> None:
    gw = gateway_factory(POLICY.format(delivery="true"))
    _send(gw.port)
    assert wait_for(lambda: _maildir(gw, "alice") and _maildir(gw, "archive"), timeout=60)
    for user in ("alice", "archive"):
        (path,) = _maildir(gw, user)
        delivered = path.read_bytes()
        assert delivered.startswith(b"Return-Path: <")
        assert hashlib.sha256(_original(delivered)).hexdigest() == hashlib.sha256(MESSAGE).hexdigest()
    assert wait_for(lambda: gw.queue_ids() == [], timeout=20)
    assert os.listdir(Path(gw.policy.server.queue_dir) / "tmp") == []


def test_a_large_message_over_the_limit_is_refused_and_nothing_is_kept(gateway_factory) -> None:
    gw = gateway_factory(POLICY.format(delivery="false").replace(
        "[delivery]", '[limits]\nmax_message_size = "1MB"\n[delivery]'))
    with smtplib.SMTP("127.0.0.1", gw.port, local_hostname="client.test.example", timeout=60) as client:
        client.ehlo()
        client.mail("sender@example.org")  # no SIZE= declared: found out while reading
        client.rcpt("alice@localhost")
        code, reply = client.data(MESSAGE)
        assert code == 552, reply
        assert client.noop()[0] == 250  # the session goes on
    root = Path(gw.policy.server.queue_dir)
    assert wait_for(lambda: os.listdir(root / "tmp") == [], timeout=5)
    assert os.listdir(root / "msg") == []
