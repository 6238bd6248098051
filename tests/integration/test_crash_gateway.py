"""Crash safety of the whole gateway: SIGKILL at random moments while mail flows.

After every restart, each message that got a 250 is in the queue exactly once, and no
partial file is visible. A message that was committed but whose 250 was lost with the
process may also be there (the client could not know); nothing else may.
"""

from __future__ import annotations

import os
import random
import signal
import smtplib
import threading
import time
from pathlib import Path

import pytest

from gateway.queue import QueueStore
from tests.processes import free_port, start_gateway



def policy_text(tmp: Path, port: int) -> str:
    return f"""
[server]
hostname = "crash.test.example"
queue_dir = "{tmp / 'queue'}"
var_dir = "{tmp / 'var'}"
log_level = "warning"
[[listeners]]
name = "smtp"
address = "127.0.0.1"
port = {port}
tls = "none"
[local]
domains = ["localhost"]
users = ["postmaster"]
[delivery]
enabled = false
[[plugins]]
name = "rcpt_relay"
[[plugins]]
name = "rcpt_local_users"
[[plugins]]
name = "queue_received_header"
"""


class Sender(threading.Thread):
    """Sends numbered messages over and over; records which got a 250."""

    def __init__(self, port: int, tag: str) -> None:
        super().__init__(daemon=True)
        self.port, self.tag = port, tag
        self.acked: list[str] = []
        self.attempted = 0
        self.stop = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=5) as client:
                    while not self.stop.is_set():
                        n += 1
                        mid = f"<{self.tag}-{n}@crash.test>"
                        body = f"Message-ID: {mid}\r\nSubject: crash {n}\r\n\r\n".encode() + (b"x" * 76 + b"\r\n") * random.randint(1, 500)
                        self.attempted += 1
                        client.sendmail("a@example.org", ["postmaster@localhost"], body)
                        self.acked.append(mid)
            except (OSError, smtplib.SMTPException):
                time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing(tmp_path: Path) -> None:
    port = free_port()
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_text(tmp_path, port))
    senders = [Sender(port, f"s{i}") for i in range(4)]
    proc = start_gateway(policy, port)
    for s in senders:
        s.start()
    rng = random.Random(os.getpid())
    for _ in range(5):
        time.sleep(rng.uniform(0.3, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc = start_gateway(policy, port)
    time.sleep(0.5)
    for s in senders:
        s.stop.set()
    for s in senders:
        s.join(10)
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)

    store = QueueStore(tmp_path / "queue")
    ids = store.open()
    assert not any((tmp_path / "queue" / "corrupt").glob("*")), "a partial or corrupt file was found"
    assert not any((tmp_path / "queue" / "tmp").glob("*"))
    seen: dict[str, int] = {}
    for qid in ids:
        data = store.read_message(qid)
        mid = data.split(b"Message-ID: ", 1)[1].split(b"\r\n", 1)[0].decode()
        seen[mid] = seen.get(mid, 0) + 1
    acked = [mid for s in senders for mid in s.acked]
    assert len(acked) > 20, "too few messages got through to prove anything"
    missing = [mid for mid in acked if mid not in seen]
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {missing[:3]}"
    assert all(count == 1 for count in seen.values()), "a message was queued twice"
    # At most one unacknowledged message per sender per kill may have been committed.
    assert len(seen) - len(acked) <= len(senders) * 5
