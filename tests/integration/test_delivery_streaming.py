"""Delivery streams a large queued message (issue #17), end to end: a real gateway's
scheduler takes a 6 MB message from its queue file (a file-backed Content past 256 KiB)
and delivers it to a Maildir, an mbox, a program and a real SMTP server, each exactly,
without reading it whole into memory; and, traced, this process allocates far less
than the message while delivering it to a Maildir and to Postfix's smtp-sink."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.testing import RunningGateway
from tests.conftest import wait_for
from tests.smtppeer import SmtpPeer, free_port
from tests.streaming import big_message, no_whole_reads, reference_mboxrd

SENDER = "sender@example.org"
SINK = shutil.which("smtp-sink", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/usr/libexec/postfix")


def _policy(port: int, poll: str = "200ms") -> str:
    return f"""
[server]
hostname = "mx.test.example"
[[listeners]]
name = "smtp"
tls = "none"
[local]
domains = ["localhost"]
users = ["postmaster", "alice", "bob"]
[delivery]
retry_base = "200ms"
retry_max = "1s"
poll_interval = "{poll}"
[[routes]]
domain = "peer.test.example"
host = "127.0.0.1"
port = {port}
tls = "none"
[[plugins]]
name = "rcpt_relay"
[[plugins]]
name = "rcpt_local_users"
"""


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory any uid may write (programs run as nobody when the tests run as root)."""
    path = Path(tempfile.mkdtemp(prefix="gw-stream-test-"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def _lines(recipient: str) -> bytes:
    return f"Return-Path: <{SENDER}>\r\nDelivered-To: {recipient}\r\n".encode()


def _home(gw: RunningGateway, user: str, dot_qmail: str | None = None) -> Path:
    home = Path(gw.policy.local.mail_root) / user
    home.mkdir(parents=True, exist_ok=True)
    if dot_qmail is not None:
        (home / ".qmail").write_text(dot_qmail)
        (home / ".qmail").chmod(0o644)
    return home


def _maildir_files(home: Path) -> list[Path]:
    new = home / "Maildir" / "new"
    return sorted(new.iterdir()) if new.exists() else []


def _queue_empty(gw: RunningGateway) -> bool:
    assert gw.app is not None
    return gw.app.queue.ids() == []


def test_scheduler_streams_a_large_message_to_every_kind_of_delivery(
    gateway_factory, shared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = big_message()
    with SmtpPeer() as peer, no_whole_reads(monkeypatch) as reads:
        gw = gateway_factory(_policy(peer.port))
        alice = _home(gw, "alice")
        bob = _home(gw, "bob", f"./mbox\n|cat > {shared}/stdin\n")
        assert gw.app is not None and gw.app.scheduler is not None
        recipients = ["alice@localhost", "bob@localhost", "carol@peer.test.example"]
        gw.call(gw.app.scheduler.inject(SENDER, recipients, message))
        assert wait_for(lambda: _queue_empty(gw), timeout=60), "not delivered"
        assert reads == []  # (a failed delivery would have stayed queued, deferred)
        [maildir_file] = _maildir_files(alice)
        assert maildir_file.read_bytes() == _lines("alice@localhost") + message
        mbox = (bob / "mbox").read_bytes()
        separator, quoted = mbox.split(b"\n", 1)
        assert separator.startswith(f"From {SENDER} ".encode())
        assert quoted == reference_mboxrd(_lines("bob@localhost") + message)
        assert (shared / "stdin").read_bytes() == _lines("bob@localhost") + message
        [received] = peer.messages
        # Every line that starts with a dot was stuffed, those at chunk boundaries too:
        # what the server unstuffed is the message, with the CRLF DATA needs at its end.
        assert received.content == message + b"\r\n"
        assert f"SIZE={len(message)}" in received.mail_options


@pytest.fixture
def sink() -> Iterator[int]:
    if SINK is None:
        pytest.skip("Postfix smtp-sink is not installed")
    port = free_port()
    proc = subprocess.Popen([SINK, "-u", "root", "-c", f"127.0.0.1:{port}", "100"], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                import socket

                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(5)


def test_delivering_a_large_message_allocates_far_less_than_it(gateway_factory, sink: int) -> None:
    """tracemalloc over the whole process (the gateway runs in a thread of it) while the
    scheduler delivers one 6 MB queued message to a Maildir and to smtp-sink: the peak is
    a few chunks, not the message (before streaming it was at least the message)."""
    message = big_message()
    gw = gateway_factory(_policy(sink, poll="10m"))  # no queue scan: the test says when
    alice = _home(gw, "alice")
    assert gw.app is not None and gw.app.scheduler is not None
    from gateway.model import Envelope, Message, QueuedRecipient

    qid = gw.app.queue.new_id()
    envelope = Envelope(
        sender=SENDER, recipients=[QueuedRecipient("alice@localhost"), QueuedRecipient("dave@peer.test.example")]
    )
    gw.call(gw.app.queue.commit(qid, envelope, Message(message)))
    tracemalloc.start()
    try:
        gw.loop.call_soon_threadsafe(gw.app.scheduler.notify, qid)
        assert wait_for(lambda: _queue_empty(gw), timeout=60), "not delivered"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    [maildir_file] = _maildir_files(alice)
    assert maildir_file.read_bytes() == _lines("alice@localhost") + message
    assert peak < len(message) // 3, f"peak {peak} octets for a {len(message)}-octet message"


def test_a_large_message_forwarded_by_dot_qmail_is_copied_not_read(
    gateway_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """alice's .qmail forwards to bob: the forward is queued as a new message whose file is
    an in-kernel copy of the queued one (never read whole), and bob gets it exactly."""
    message = big_message()
    with no_whole_reads(monkeypatch) as reads:
        gw = gateway_factory(_policy(free_port()))
        _home(gw, "alice", "&bob@localhost\n")
        bob = _home(gw, "bob")
        assert gw.app is not None and gw.app.scheduler is not None
        gw.call(gw.app.scheduler.inject(SENDER, ["alice@localhost"], message))
        assert wait_for(lambda: _maildir_files(bob) and _queue_empty(gw), timeout=60), "not forwarded"
        assert reads == []
    [delivered] = _maildir_files(bob)
    data = delivered.read_bytes()
    assert data.endswith(b"Delivered-To: alice@localhost\r\n" + message)
    assert data.startswith(b"Return-Path: <")
