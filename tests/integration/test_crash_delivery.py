"""SIGKILL during deliveries: after restarts, nothing is lost and Maildir recipients get
each message exactly once.

Local Maildir deliveries are idempotent (the file name is fixed per message and
recipient), so a crash between writing the file and recording the success cannot give
a second copy. Over SMTP no MTA can promise that: if the process dies after the peer's
250 and before the success is on disk, the retry sends again (RFC 1047). For the remote
recipient the test asserts nothing lost and at most one extra copy per delivery that
was in flight when the process died (at most the remote concurrency per kill).
"""

from __future__ import annotations

import os
import random
import signal
import smtplib
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from gateway.queue import QueueStore
from tests.conftest import wait_for
from tests.processes import free_port, start_gateway
from tests.smtppeer import SmtpPeer

MESSAGES = 120
KILLS = 4
REMOTE_CONCURRENCY = 5


def policy(tmp: Path, port: int, peer_port: int, delivering: bool, workers: int = 1) -> str:
    return f"""
[server]
hostname = "crash.test.example"
queue_dir = "{tmp / 'queue'}"
var_dir = "{tmp / 'var'}"
log_level = "warning"
workers = {workers}
[[listeners]]
name = "smtp"
port = {port}
tls = "none"
[local]
domains = ["localhost"]
users = ["postmaster", "alice", "bob"]
mail_root = "{tmp / 'mail'}"
[relay]
clients = ["127.0.0.0/8"]
[delivery]
enabled = {str(delivering).lower()}
remote_concurrency = {REMOTE_CONCURRENCY}
retry_base = "100ms"
retry_max = "300ms"
poll_interval = "100ms"
[[routes]]
domain = "peer.test.example"
host = "127.0.0.1"
port = {peer_port}
tls = "none"
[[plugins]]
name = "rcpt_relay"
[[plugins]]
name = "rcpt_local_users"
[limits]
max_connections_per_ip = 100
max_transactions = 1000
"""


def kill_and_restart(proc: subprocess.Popen[bytes], config: Path, port: int,
                     pause: tuple[float, float]) -> subprocess.Popen[bytes]:
    """SIGKILL the gateway's whole process group KILLS times, each after a random pause
    in ``pause`` seconds, starting it again each time; returns the last one started."""
    rng = random.Random(os.getpid())
    for _ in range(KILLS):
        time.sleep(rng.uniform(*pause))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        proc = start_gateway(config, port, new_session=True)
    return proc


def _message_id(data: bytes) -> str:
    return data.split(b"Message-ID: ", 1)[1].split(b"\r\n", 1)[0].decode()


def message_ids(maildir: Path) -> Counter[str]:
    counts: Counter[str] = Counter()
    for sub in ("new", "cur"):
        for path in (maildir / sub).glob("*") if (maildir / sub).exists() else []:
            counts[_message_id(path.read_bytes())] += 1
    return counts


def peer_ids(peer: SmtpPeer) -> Counter[str]:
    """How many times the remote peer received each Message-ID."""
    return Counter(_message_id(m.content) for m in peer.messages)


@pytest.mark.slow
def test_sigkill_during_deliveries(tmp_path: Path) -> None:
    port = free_port()
    with SmtpPeer(delay=0.005) as peer:
        filling = tmp_path / "fill.toml"
        filling.write_text(policy(tmp_path, port, peer.port, delivering=False))
        proc = start_gateway(filling, port, new_session=True)
        sent = []
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            for n in range(MESSAGES):
                mid = f"<m{n}@crash.test>"
                body = f"Message-ID: {mid}\r\nSubject: {n}\r\n\r\n".encode() + b"body\r\n" * 20
                client.sendmail("sender@example.org", ["alice@localhost", "bob@localhost", "carol@peer.test.example"], body)
                sent.append(mid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0

        delivering = tmp_path / "deliver.toml"
        delivering.write_text(policy(tmp_path, port, peer.port, delivering=True))
        proc = start_gateway(delivering, port, new_session=True)
        try:
            proc = kill_and_restart(proc, delivering, port, (0.1, 0.4))
            store = QueueStore(tmp_path / "queue")
            assert wait_for(lambda: store.ids() == [], timeout=60), "the queue did not drain"
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        remote = peer_ids(peer)

    for user in ("alice", "bob"):
        counts = message_ids(tmp_path / "mail" / user / "Maildir")
        assert set(counts) == set(sent), f"{user}: lost {len(set(sent) - set(counts))}"
        assert max(counts.values()) == 1, f"{user}: delivered twice: {[m for m, c in counts.items() if c > 1][:3]}"
    assert set(remote) == set(sent), f"remote: lost {len(set(sent) - set(remote))}"
    assert sum(remote.values()) - len(sent) <= KILLS * REMOTE_CONCURRENCY
    assert not any((tmp_path / "queue" / "corrupt").glob("*"))


@pytest.mark.slow
def test_sigkill_while_two_workers_accept_and_deliver(tmp_path: Path) -> None:
    """With ``workers = 2`` each process delivers what it accepts: the whole process
    group is killed again and again while clients send, and every message that got its
    250 arrives (in each Maildir exactly once), whichever process had it."""
    port = free_port()
    with SmtpPeer(delay=0.005) as peer:
        config = tmp_path / "policy.toml"
        config.write_text(policy(tmp_path, port, peer.port, delivering=True, workers=2))
        proc = start_gateway(config, port, new_session=True)
        acked: list[str] = []
        tried: list[str] = []
        stop = threading.Event()

        def client(k: int) -> None:
            n = 0
            while not stop.is_set():
                mid = f"<w{k}-{n}@crash.test>"
                n += 1
                body = f"Message-ID: {mid}\r\nSubject: {k}-{n}\r\n\r\n".encode() + b"body\r\n" * 20
                tried.append(mid)
                try:  # one message per connection, so both processes take some
                    with smtplib.SMTP("127.0.0.1", port, timeout=5) as smtp:
                        smtp.sendmail("sender@example.org",
                                      ["alice@localhost", "bob@localhost", "carol@peer.test.example"], body)
                except (OSError, smtplib.SMTPException):
                    time.sleep(0.02)  # killed meanwhile: not acknowledged, may or may not arrive
                    continue
                acked.append(mid)

        clients = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in clients:
            t.start()
        try:
            proc = kill_and_restart(proc, config, port, (0.3, 0.6))
            time.sleep(0.3)
            stop.set()
            for t in clients:
                t.join(30)
            store = QueueStore(tmp_path / "queue")
            assert wait_for(lambda: store.ids() == [], timeout=60), "the queue did not drain"
        finally:
            stop.set()
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        remote = peer_ids(peer)

    assert len(acked) > 50, "the clients should have got most messages in"
    for user in ("alice", "bob"):
        counts = message_ids(tmp_path / "mail" / user / "Maildir")
        assert set(acked) <= set(counts), f"{user}: lost {sorted(set(acked) - set(counts))[:3]}"
        assert set(counts) <= set(tried)
        assert max(counts.values()) == 1, f"{user}: delivered twice: {[m for m, c in counts.items() if c > 1][:3]}"
    assert set(acked) <= set(remote), f"remote: lost {sorted(set(acked) - set(remote))[:3]}"
    assert sum(remote.values()) - len(set(remote)) <= KILLS * REMOTE_CONCURRENCY
    assert not any((tmp_path / "queue" / "corrupt").glob("*"))
