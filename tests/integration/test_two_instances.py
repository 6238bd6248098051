"""Two gateways on one host, as qmail operators run several copies: separate policies,
queues, ports and mailboxes, and the tools act on the one whose policy they are given."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import subprocess
import sys
from pathlib import Path

from tests.conftest import wait_for
from tests.processes import free_port, port_open

ROOT = Path(__file__).resolve().parents[2]


def policy(tmp: Path, name: str, port: int, delivering: bool) -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(f"""
[server]
hostname = "{name}.test.example"
queue_dir = "{tmp / name / 'queue'}"
var_dir = "{tmp / name / 'var'}"
[[listeners]]
name = "smtp"
port = {port}
tls = "none"
[local]
domains = ["{name}.test.example"]
users = ["postmaster", "user"]
mail_root = "{tmp / name / 'mail'}"
[delivery]
enabled = {str(delivering).lower()}
poll_interval = "200ms"
[[plugins]]
name = "rcpt_relay"
[[plugins]]
name = "rcpt_local_users"
""")
    return path


def test_two_instances_side_by_side(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    ports = {"one": free_port(), "two": free_port()}
    policies = {"one": policy(tmp_path, "one", ports["one"], True), "two": policy(tmp_path, "two", ports["two"], False)}
    procs = {
        name: subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "--policy", str(p)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for name, p in policies.items()
    }
    try:
        for port in ports.values():
            assert wait_for(lambda: port_open(port), timeout=20)
        with smtplib.SMTP("127.0.0.1", ports["one"], timeout=10) as client:
            client.sendmail("a@example.org", ["user@one.test.example"], b"Subject: one\r\n\r\nx\r\n")
        with smtplib.SMTP("127.0.0.1", ports["two"], timeout=10) as client:
            client.ehlo()
            client.mail("a@example.org")
            # Each instance only knows its own domain.
            assert client.rcpt("user@one.test.example")[0] == 550
            client.rset()
            client.sendmail("a@example.org", ["user@two.test.example"], b"Subject: two\r\n\r\nx\r\n")
        inbox = tmp_path / "one" / "mail" / "user" / "Maildir" / "new"
        assert wait_for(lambda: inbox.exists() and len(list(inbox.iterdir())) == 1, timeout=10)
        listed = subprocess.run([sys.executable, "-m", "gateway.cli", "queue", "list", "--json", "--policy", str(policies["two"])],
                                capture_output=True, text=True, env=env, timeout=60)
        rows = json.loads(listed.stdout)
        assert [r["recipients"][0]["address"] for r in rows] == ["user@two.test.example"]
        assert not (tmp_path / "two" / "mail").exists()
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            assert proc.wait(30) == 0

