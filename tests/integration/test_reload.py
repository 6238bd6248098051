"""Reload and shutdown of a real gateway process: SIGHUP / `gateway reload`, SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.conftest import RawClient, wait_for
from tests.processes import free_port, gateway_env, start_gateway, stop_gateway, write_policy


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


# -- several processes (``[server] workers``) -----------------------------------------

def _started_pids(log: Path, count: int) -> list[str]:
    """The pids that logged 'gateway started', once ``count`` of them have."""
    found: list[str] = []

    def started() -> bool:
        found[:] = re.findall(r"gateway\[(\d+)\] INFO gateway\.app .*gateway started", log.read_text())
        return len(found) >= count

    assert wait_for(started, timeout=30), "the gateway's processes did not all start"
    return found


def _carol_codes(port: int, connections: int) -> list[int]:
    """RCPT TO:<carol@localhost> on ``connections`` new connections, four at a time."""
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda _: rcpt_code(port, "carol@localhost"), range(connections)))


def _with_carol(policy: Path) -> None:
    policy.write_text(policy.read_text().replace('users = ["postmaster", "alice"]', 'users = ["postmaster", "alice", "carol"]'))


def test_reload_reaches_every_worker_and_says_so(tmp_path: Path) -> None:
    """SIGHUP used to reach only the master: after a reload adding a user, the worker's
    half of the new connections still refused it, and `gateway reload` said nothing."""
    port = free_port()
    policy = write_policy(tmp_path, port, workers=2)
    log = tmp_path / "gateway.log"
    with open(log, "w") as log_file:
        proc = start_gateway(policy, port, stderr=log_file)
    try:
        pids = _started_pids(log, 2)
        _with_carol(policy)
        done = gateway("reload", "--policy", str(policy))
        assert done.returncode == 0, done.stderr
        for pid in pids:
            assert re.search(rf"pid {pid} \((master|worker)\): loaded", done.stdout), done.stdout
        codes = _carol_codes(port, 40)
        assert codes == [250] * 40, f"{codes.count(550)} of 40 new connections refused the new user"
        accepted_by = re.findall(r"gateway\[(\d+)\] INFO \S+ session=\S+ .*rcpt to=<carol@localhost> accepted", log.read_text())
        assert len(accepted_by) == 40 and set(accepted_by) == set(pids), "both processes took connections"
    finally:
        assert stop_gateway(proc) == 0


def test_reload_names_a_worker_that_did_not_take_it(tmp_path: Path) -> None:
    """A worker that cannot answer (stopped here) makes `gateway reload` fail and name it;
    once it runs again it takes the reload it missed."""
    port = free_port()
    policy = write_policy(tmp_path, port, workers=2)
    log = tmp_path / "gateway.log"
    with open(log, "w") as log_file:
        proc = start_gateway(policy, port, stderr=log_file)
    try:
        pids = _started_pids(log, 2)
        worker = next(int(pid) for pid in pids if int(pid) != proc.pid)
        _with_carol(policy)
        os.kill(worker, signal.SIGSTOP)
        try:
            stuck = gateway("reload", "--policy", str(policy), "--timeout", "3")
        finally:
            os.kill(worker, signal.SIGCONT)
        assert stuck.returncode == 1, stuck.stdout
        assert f"pid {worker} did not" in stuck.stderr
        assert f"pid {worker}: did not reload (no answer within 3s)" in stuck.stderr
        assert f"pid {proc.pid} (master): loaded" in stuck.stderr
        again = gateway("reload", "--policy", str(policy))
        assert again.returncode == 0, again.stderr
        assert f"pid {worker} (worker): loaded" in again.stdout
        assert _carol_codes(port, 20) == [250] * 20
    finally:
        assert stop_gateway(proc) == 0


def test_reload_refused_by_the_processes_is_reported_as_refused(tmp_path: Path) -> None:
    """The command's own check passes (the settings are valid), but every process fails
    to start a plugin on it (a users file with a bad line): reported, named, non-zero,
    and the running policy stays."""
    port = free_port()
    policy = write_policy(tmp_path, port, workers=2)
    log = tmp_path / "gateway.log"
    with open(log, "w") as log_file:
        proc = start_gateway(policy, port, stderr=log_file)
    try:
        pids = _started_pids(log, 2)
        users = tmp_path / "users"
        users.write_text("this line is not login:hash\n")
        _with_carol(policy)
        policy.write_text(policy.read_text() + f'[[plugins]]\nname = "auth_users_file"\npath = "{users}"\n')
        refused = gateway("reload", "--policy", str(policy))
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "reload refused by pid" in refused.stderr
        for pid in pids:
            assert re.search(rf"pid {pid} \((master|worker)\): refused, keeps sha256=\w+: .*{users}", refused.stderr)
        assert set(_carol_codes(port, 20)) == {550}, "the old policy still runs everywhere"
    finally:
        assert stop_gateway(proc) == 0
