"""swaks, a real SMTP client, against the gateway; and the embedded default as `make run` starts it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.queue import QueueStore
from tests.conftest import wait_for

pytestmark = pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed (make test installs it)")

# swaks exit codes: 0 success, 24 the server refused a recipient.
SWAKS_RCPT_REFUSED = 24


def swaks(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{port}", "--from", "sender@example.org", "--helo", "client.test.example", *args],
        capture_output=True, text=True, timeout=60,
    )


def test_swaks_plain_and_starttls(gateway) -> None:
    assert swaks(gateway.port, "--to", "postmaster@localhost").returncode == 0
    tls = swaks(gateway.port, "--to", "alice@localhost", "--tls")
    assert tls.returncode == 0, tls.stdout
    assert "TLS started" in tls.stdout
    assert len(gateway.queue_ids()) == 2


def test_swaks_relay_denied(gateway) -> None:
    result = swaks(gateway.port, "--to", "someone@example.net")
    assert result.returncode == SWAKS_RCPT_REFUSED
    assert "550 5.7.1 Relay access denied" in result.stdout
    assert gateway.queue_ids() == []


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _port_free(2525), reason="127.0.0.1:2525 is in use")
def test_embedded_default_as_make_run_starts_it(tmp_path: Path) -> None:
    """`gateway run` with no policy: 127.0.0.1:2525, postmaster@localhost into ./var/queue."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "run"], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert wait_for(lambda: _accepts(2525), timeout=20), "gateway did not start"
        ok = swaks(2525, "--to", "postmaster@localhost")
        assert ok.returncode == 0, ok.stdout
        # One plain Maildir delivery: in the Maildir before the 250, never queued.
        assert "250 2.0.0 OK delivered as" in ok.stdout
        maildir = tmp_path / "var" / "mail" / "postmaster" / "Maildir" / "new"
        assert maildir.exists() and any(maildir.iterdir())
        denied = swaks(2525, "--to", "someone@example.net")
        assert denied.returncode == SWAKS_RCPT_REFUSED
        assert "5.7.1" in denied.stdout
        # Loopback is not a relay client, even though it is our own host.
        assert (tmp_path / "var" / "tls" / "cert.pem").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    # Delivered into the postmaster's Maildir under ./var, and gone from the queue.
    (delivered,) = (tmp_path / "var" / "mail" / "postmaster" / "Maildir" / "new").iterdir()
    data = delivered.read_bytes()
    assert data.startswith(b"Return-Path: <sender@example.org>\r\nDelivered-To: postmaster@localhost\r\n")
    assert b"Received: from client.test.example" in data
    assert QueueStore(tmp_path / "var" / "queue").ids() == []
    qid = data.split(b" id ", 1)[1].split(b";")[0].split()[0].decode()
    # The log tells the message's story by its queue id: arrived, delivered, done.
    story = [line for line in output.splitlines() if f"queue={qid}" in line]
    assert any("queued from=<sender@example.org>" in line and "area=direct" in line for line in story)
    assert any("status=delivered" in line for line in story)
    assert any("done: delivered at once, never queued" in line for line in story)
