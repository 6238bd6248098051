"""Reload and shutdown of a real gateway process: SIGHUP / `gateway reload`, SIGTERM."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import RawClient, wait_for
from tests.processes import free_port, gateway_env, start_gateway



def policy_text(tmp: Path, port: int, users: str) -> str:
    return f"""
[server]
hostname = "reload.test.example"
queue_dir = "{tmp / 'queue'}"
var_dir = "{tmp / 'var'}"
[[listeners]]
name = "smtp"
port = {port}
tls = "none"
[local]
domains = ["localhost"]
users = [{users}]
[delivery]
enabled = false
[[plugins]]
name = "rcpt_relay"
[[plugins]]
name = "rcpt_local_users"
"""


def gateway(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, timeout=60,
                          env=gateway_env())


def start(policy: Path, port: int) -> subprocess.Popen[str]:
    return start_gateway(policy, port, stderr=subprocess.PIPE, text=True)


def rcpt_code(port: int, rcpt: str) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo()
        client.mail("a@example.org")
        return client.rcpt(rcpt)[0]


def test_reload_refuses_a_broken_policy_and_applies_a_good_one(tmp_path: Path) -> None:
    port = free_port()
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_text(tmp_path, port, '"postmaster"'))
    proc = start(policy, port)
    try:
        assert rcpt_code(port, "carol@localhost") == 550
        # A broken policy: the command names file, line and key, the gateway keeps going.
        policy.write_text(policy_text(tmp_path, port, '"postmaster"').replace("[local]", "[local]\nusers_typo = 1"))
        broken = gateway("reload", "--policy", str(policy))
        assert broken.returncode == 2
        assert f"{policy}:" in broken.stderr and "local.users_typo" in broken.stderr
        # Even if the signal arrives anyway, the running policy stays.
        os.kill(proc.pid, signal.SIGHUP)
        time.sleep(0.5)
        assert rcpt_code(port, "postmaster@localhost") == 250
        policy.write_text(policy_text(tmp_path, port, '"postmaster", "carol"'))
        ok = gateway("reload", "--policy", str(policy))
        assert ok.returncode == 0, ok.stderr
        assert wait_for(lambda: rcpt_code(port, "carol@localhost") == 250, timeout=10)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert "reload refused, keeping the running policy" in err
    assert "policy reloaded" in err


def test_sigterm_lets_a_session_in_progress_finish(tmp_path: Path) -> None:
    port = free_port()
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_text(tmp_path, port, '"postmaster"'))
    proc = start(policy, port)
    client = RawClient(port)
    client.reply()
    client.cmd("EHLO client.test.example")
    client.cmd("MAIL FROM:<a@example.org>")
    client.cmd("RCPT TO:<postmaster@localhost>")
    assert client.cmd("DATA")[0] == 354
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    # New connections are refused, the running session completes its message.
    refused = False
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        refused = True
    assert refused
    code, text = client.cmd(b"Subject: in flight\r\n\r\nbody\r\n.")
    assert code == 250
    client.cmd("QUIT")
    client.close()
    assert proc.wait(30) == 0
    from gateway.queue import QueueStore

    assert len(QueueStore(tmp_path / "queue").ids()) == 1
