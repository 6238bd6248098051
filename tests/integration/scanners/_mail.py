"""Test messages and a real SMTP round trip for the scanner tests."""

from __future__ import annotations

import base64
import contextlib
import email
import email.policy
import email.utils
import os
import random
import subprocess
import sys
from email.message import EmailMessage, Message
from pathlib import Path
from types import ModuleType
from typing import Iterator

from gateway.address import Address
from gateway.content import Content
from gateway.message import Message as GatewayMessage
from gateway.model import Recipient, Session, Transaction
from gateway.testing import RunningGateway
from tests.conftest import BASE_POLICY, plugin_specs, smtp
from tests.integration.scanners.conftest import EICAR, GTUBE

ROOT = Path(__file__).resolve().parents[3]


def policy(name: str, **settings: object) -> str:
    """The base test policy with one scanner entry after the stock plugins."""
    lines = [f'name = "{name}"']
    for key, value in settings.items():
        if isinstance(value, str):
            lines.append(f'{key} = "{value}"')
        elif isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        else:
            lines.append(f"{key} = {value}")
    return BASE_POLICY + "\n[[plugins]]\n" + "\n".join(lines) + "\n"


def start(gateway_factory: object, module: ModuleType, extra: str = "", **settings: object) -> RunningGateway:
    specs = plugin_specs(**{module.NAME: module})
    return gateway_factory(policy(module.NAME, **settings) + extra, specs=specs)  # type: ignore[operator]


def _base(subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Sender Name <sender@example.org>"
    msg["To"] = "Alice <alice@localhost>"
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate(localtime=True)
    msg["Message-ID"] = email.utils.make_msgid(domain="example.org")
    return msg


def _wire(msg: EmailMessage) -> bytes:
    return msg.as_bytes(policy=email.policy.SMTP)


def clean() -> bytes:
    msg = _base("Lunch on Thursday")
    msg.set_content("Hello Alice,\n\nshall we have lunch on Thursday at noon?\n\nRegards,\nSender\n")
    return _wire(msg)


def eicar_attached() -> bytes:
    msg = _base("The report")
    msg.set_content("Please find the file attached.\n")
    msg.add_attachment(EICAR, maintype="application", subtype="octet-stream", filename="report.com")
    return _wire(msg)


def eicar_inline() -> bytes:
    msg = _base("Test")
    msg.set_content(EICAR.decode("ascii") + "\n", cte="7bit")
    return _wire(msg)


def gtube(extra_headers: bytes = b"") -> bytes:
    msg = _base("Test spam")
    msg.set_content(GTUBE.decode("ascii") + "\n", cte="7bit")
    return extra_headers + _wire(msg)


def send(gw: RunningGateway, data: bytes, sender: str = "sender@example.org") -> tuple[int, str]:
    """Send ``data`` to alice@localhost; the reply to the final dot."""
    with smtp(gw.port) as client:
        client.ehlo()
        client.mail(sender)
        assert client.rcpt("alice@localhost")[0] == 250
        code, text = client.data(data)
    return code, text.decode("utf-8", "replace")


def queued(gw: RunningGateway, area: str = "msg") -> Message:
    """The single message in ``area``, parsed."""
    (qid,) = gw.queue_ids(area)
    return email.message_from_bytes(gw.queue.read_message(qid, area), policy=email.policy.default)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``gateway`` as an operator runs it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, timeout=60, env=env
    )


def policy_file(gw: RunningGateway, tmp_path: Path) -> str:
    """A policy file naming the gateway's queue directory, for the command line."""
    path = tmp_path / "cli-policy.toml"
    path.write_text(f'[server]\nqueue_dir = "{gw.policy.server.queue_dir}"\n')
    return str(path)


class WholeReadForbidden(GatewayMessage):
    """A spooled message that fails the test if a plugin loads it whole into memory
    (``raw``, ``body``, ``as_bytes``): our own object, made strict, not a daemon's mock."""

    __slots__ = ()

    @property
    def raw(self) -> bytes:
        raise AssertionError("the plugin read the whole spooled message into memory (message.raw)")

    @property
    def body(self) -> bytes:
        raise AssertionError("the plugin read the whole spooled body into memory (message.body)")

    def as_bytes(self) -> bytes:
        raise AssertionError("the plugin read the whole spooled message into memory (as_bytes)")


@contextlib.contextmanager
def spooled(data: bytes, directory: Path) -> Iterator[WholeReadForbidden]:
    """``data`` as a message spooled to a file (between other octets, as in a spool
    file), for the hooks to read from disk."""
    path = directory / "spool"
    path.write_bytes(b"#" * 4096 + data + b"not part of the message")
    fd = os.open(path, os.O_RDONLY)
    try:
        message = WholeReadForbidden(Content.of_file(fd, [(4096, len(data))]))
        assert message.is_spooled
        yield message
    finally:
        os.close(fd)


def big(marker: bytes, size: int, *, at_end: bool = True) -> bytes:
    """A plain-text message of about ``size`` octets with ``marker`` (EICAR, GTUBE) on
    a line of its own at the end of its body (or at the start)."""
    msg = _base("The big report")
    msg.set_content("See below.\n", cte="7bit")
    head = _wire(msg)
    line = b"lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod 0123\r\n"
    filler = line * (size // len(line))
    return head + (filler + marker + b"\r\n" if at_end else marker + b"\r\n" + filler)


def session_and_txn() -> tuple[Session, Transaction]:
    """A session and transaction such as the SMTP front end makes: one recipient."""
    session = Session(peer_ip="192.0.2.7", peer_port=4000, listener="smtp", helo="client.example")
    txn = Transaction(sender=Address("sender", "example.org"), queue_id="Q1")
    txn.recipients.append(Recipient(Address("alice", "localhost")))
    return session, txn


def big_attachment_then(marker: bytes, size: int) -> bytes:
    """A multipart message of about ``size`` octets: a base64 attachment, then a short
    text part holding ``marker`` (GTUBE): a scanner that reads text parts sees it only
    after the whole attachment."""
    head = (
        b"From: Sender Name <sender@example.org>\r\nTo: Alice <alice@localhost>\r\n"
        b"Subject: The big report\r\nDate: " + email.utils.formatdate(localtime=True).encode() + b"\r\n"
        b"Message-ID: " + email.utils.make_msgid(domain="example.org").encode() + b"\r\n"
        b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="part-boundary"\r\n\r\n'
    )
    data = base64.encodebytes(random.Random(1).randbytes(size * 3 // 4)).replace(b"\n", b"\r\n")
    return (
        head + b"--part-boundary\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"data.bin\"\r\n\r\n"
        + data + b"--part-boundary\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        + marker + b"\r\n--part-boundary--\r\n"
    )
