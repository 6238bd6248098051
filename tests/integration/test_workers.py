"""Several worker processes on one port: all accept mail, the master delivers it all."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
from pathlib import Path

from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_workers_share_the_port_and_one_scheduler_delivers(tmp_path: Path) -> None:
    port = free_port()
    policy = tmp_path / "policy.toml"
    policy.write_text(f"""
[server]
hostname = "workers.test.example"
queue_dir = "{tmp_path / 'queue'}"
var_dir = "{tmp_path / 'var'}"
workers = 2
[[listeners]]
name = "smtp"
port = {port}
tls = "none"
[local]
domains = ["localhost"]
users = ["postmaster", "alice"]
mail_root = "{tmp_path / 'mail'}"
[limits]
max_connections_per_ip = 200
[delivery]
poll_interval = "30s"
[[plugins]]
name = "rcpt_relay"
[[plugins]]
name = "rcpt_local_users"
""")
    log_path = tmp_path / "gateway.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "run", "--policy", str(policy)],
            env=env, stdout=subprocess.DEVNULL, stderr=log_file,
        )
    try:
        def up() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return True
            except OSError:
                return False

        assert wait_for(up, timeout=20)
        errors: list[Exception] = []

        def send(n: int) -> None:
            try:
                for i in range(10):
                    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                        client.sendmail("a@example.org", ["alice@localhost"], f"Subject: {n}-{i}\r\n\r\nx\r\n".encode())
            except Exception as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=send, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        new = tmp_path / "mail" / "alice" / "Maildir" / "new"
        # poll_interval is long: only the workers' notifications can make this quick.
        assert wait_for(lambda: new.exists() and len(list(new.iterdir())) == 80, timeout=20)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    text = log_path.read_text()
    accepting = set(re.findall(r"gateway\[(\d+)\] INFO gateway\.smtp\.handler .* queued from=", text))
    delivering = set(re.findall(r"gateway\[(\d+)\] INFO gateway\.delivery\.scheduler .* status=delivered", text))
    assert len(accepting) == 2, "both processes should have accepted mail"
    assert len(delivering) == 1, "only the master delivers"
    assert not up_after_stop(port)


def up_after_stop(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False
