"""Shared fixtures: a running gateway on a free port, SMTP clients, a raw socket client."""

from __future__ import annotations

import contextlib
import smtplib
import socket
import ssl
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from gateway.hooks import PluginSpec, discover_plugins
from gateway.testing import RunningGateway, running_gateway

BASE_POLICY = """
[server]
hostname = "mx.test.example"

[[listeners]]
name = "smtp"
address = "127.0.0.1"
port = 2525
tls = "starttls"

[local]
domains = ["localhost", "local.example"]
users = ["postmaster", "alice", "bob"]

# These tests look at what the SMTP front end queued: no delivery behind it.
[delivery]
enabled = false

[[plugins]]
name = "auth_users_file"
[[plugins]]
name = "rcpt_relay"
[[plugins]]
name = "rcpt_local_users"
[[plugins]]
name = "queue_received_header"
"""


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[Callable[..., RunningGateway]]:
    """Start gateways on policy texts; all are stopped at the end of the test."""
    with contextlib.ExitStack() as stack:
        count = 0

        def start(policy: str = BASE_POLICY, specs: dict[str, PluginSpec] | None = None) -> RunningGateway:
            nonlocal count
            count += 1
            workdir = tmp_path / f"gw{count}"
            workdir.mkdir()
            return stack.enter_context(running_gateway(policy, workdir, specs=specs))

        yield start


@pytest.fixture
def gateway(gateway_factory: Callable[..., RunningGateway]) -> RunningGateway:
    """A gateway on the base test policy."""
    return gateway_factory()


def plugin_specs(**extra: object) -> dict[str, PluginSpec]:
    """The stock plugins plus test plugins given as name=module."""
    specs = discover_plugins()
    for name, module in extra.items():
        specs[name] = PluginSpec(name, module, getattr(module, "Settings"))  # type: ignore[arg-type]
    return specs


class RawClient:
    """A line-oriented SMTP client that sends exactly the bytes it is given."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, list[str]]:
        """Read one (possibly multi-line) reply: (code, text lines)."""
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("connection closed")
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text[4:])
            if len(text) < 4 or text[3] != "-":
                return int(text[:3]), lines

    def cmd(self, line: str | bytes) -> tuple[int, list[str]]:
        data = line if isinstance(line, bytes) else line.encode()
        self.send(data + b"\r\n")
        return self.reply()

    def is_closed(self, wait: float = 3.0) -> bool:
        self.sock.settimeout(wait)
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def starttls(self) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        self.sock = ctx.wrap_socket(self.sock, server_hostname="localhost")
        self.file = self.sock.makefile("rb")

    def close(self) -> None:
        # The makefile() reader holds the descriptor open: close both.
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            self.sock.close()


@pytest.fixture
def raw(gateway: RunningGateway) -> Iterator[Callable[..., RawClient]]:
    clients: list[RawClient] = []

    def connect(port: int | None = None, greet: bool = True) -> RawClient:
        client = RawClient(port or gateway.port)
        clients.append(client)
        if greet:
            code, _ = client.reply()
            assert code == 220
        return client

    yield connect
    for c in clients:
        c.close()


def smtp(port: int) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", port, local_hostname="client.test.example", timeout=10)


def no_verify_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


MESSAGE = (
    b"From: Sender <sender@example.org>\r\n"
    b"To: postmaster@localhost\r\n"
    b"Subject: test\r\n"
    b"Message-ID: <test-1@example.org>\r\n"
    b"\r\n"
    b"Hello, world.\r\n"
)


def send_for_reply(gw: RunningGateway, sender: str, rcpts: list[str], *, rcpt_options: tuple[str, ...] = ()) -> str:
    """Send MESSAGE in a session of its own; the text of the reply to the end of DATA
    (``2.0.0 OK queued as <qid>`` or ``2.0.0 OK delivered as <qid>``)."""
    with smtp(gw.port) as client:
        client.ehlo()
        assert client.mail(sender)[0] == 250
        for rcpt in rcpts:
            assert client.rcpt(rcpt, list(rcpt_options))[0] == 250
        code, text = client.data(MESSAGE)
    assert code == 250
    return text.decode()


def spy_commits(gw: RunningGateway) -> list[str]:
    """The queue ids ``gw``'s sessions commit to its queue from now on."""
    store = gw.app.queue
    commit = store.commit
    committed: list[str] = []

    async def recording_commit(qid, *args, **kwargs):  # type: ignore[no-untyped-def]
        committed.append(qid)
        return await commit(qid, *args, **kwargs)

    store.commit = recording_commit
    return committed
