"""A worker that dies is replaced (``[server] workers = 2``), as Postfix's master(8) does.

Before, the master forked its workers once and only waited for them at shutdown: a worker
killed by the OOM killer or ``kill -9`` left the gateway on fewer processes for ever,
silently, and `gateway reload` called it "not running". A worker that failed at start-up
exited without a word.
"""

from __future__ import annotations

import email
import json
import os
import re
import signal
import smtplib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.conftest import wait_for
from tests.processes import free_port, gateway_env, port_open, start_gateway, stop_gateway, write_policy

STARTED = r"gateway\[(\d+)\] INFO gateway\.app .*gateway started"


def gateway(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True,
                          timeout=90, env=gateway_env())


def children(pid: int) -> list[int]:
    """The processes ``pid`` (its main thread) started and has not reaped."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def found(log: Path, pattern: str, timeout: float = 60.0) -> re.Match[str]:
    """The first match of ``pattern`` in the log, once there is one."""
    match: list[re.Match[str]] = []

    def there() -> bool:
        m = re.search(pattern, log.read_text())
        match[:] = [m] if m else []
        return bool(match)

    assert wait_for(there, timeout), f"not logged: {pattern}\n{log.read_text()[-4000:]}"
    return match[0]


def started(log: Path, count: int) -> list[int]:
    """The pids that logged 'gateway started', once ``count`` of them have."""
    assert wait_for(lambda: len(re.findall(STARTED, log.read_text())) >= count, timeout=60), log.read_text()[-4000:]
    return [int(pid) for pid in re.findall(STARTED, log.read_text())]


def send(port: int, rcpt: str, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail("a@example.org", [rcpt], f"Subject: {subject}\r\n\r\nx\r\n".encode())


def rcpt_code(port: int, rcpt: str) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo()
        client.mail("a@example.org")
        return client.rcpt(rcpt)[0]


def served_by(log: Path, pid: int) -> int:
    """How many connections process ``pid`` took."""
    return len(re.findall(rf"gateway\[{pid}\] INFO \S+ session=\S+ queue=\S+ connect client=", log.read_text()))


def with_users(policy: Path, users: str) -> None:
    text = re.sub(r"users = \[[^\]]*\]", f"users = [{users}]", policy.read_text(), count=1)
    policy.write_text(text)


def test_a_killed_worker_is_logged_and_replaced_and_takes_reloads(tmp_path: Path) -> None:
    port = free_port()
    policy = write_policy(tmp_path, port, workers=2)
    log = tmp_path / "gateway.log"
    with open(log, "w") as log_file:
        proc = start_gateway(policy, port, stderr=log_file)
    try:
        started(log, 2)
        assert wait_for(lambda: len(children(proc.pid)) == 1, timeout=30)
        [worker] = children(proc.pid)
        os.kill(worker, signal.SIGKILL)
        found(log, rf"gateway\[{proc.pid}\] ERROR gateway\.workers .*worker pid={worker} was killed by signal 9 "
                   rf"\(SIGKILL\) after \d+s; starting a replacement in 1s")
        # The master alone serves meanwhile: no connection is lost to the dead socket.
        for i in range(10):
            send(port, "alice@localhost", f"after-{i}")
        replaced = found(log, rf"INFO gateway\.workers .*worker pid=(\d+) started to replace pid={worker}")
        replacement = int(replaced.group(1))
        assert replacement != worker
        assert replacement in started(log, 3), "the replacement serves"
        assert children(proc.pid) == [replacement]
        assert not (tmp_path / "var" / "reload" / f"{worker}.json").exists()
        # It joins the port: new connections reach both processes again.
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: send(port, "alice@localhost", f"again-{i}"), range(40)))
        assert served_by(log, replacement) > 0 and served_by(log, proc.pid) > 0
        new = tmp_path / "mail" / "alice" / "Maildir" / "new"
        assert wait_for(lambda: new.exists() and len(list(new.iterdir())) == 50, timeout=60)
        subjects = sorted(email.message_from_bytes(f.read_bytes())["Subject"] for f in new.iterdir())
        assert subjects == sorted([f"after-{i}" for i in range(10)] + [f"again-{i}" for i in range(40)])
        # gateway reload counts it among the workers, and it takes the reload.
        done = gateway("reload", "--policy", str(policy))
        assert done.returncode == 0, done.stdout + done.stderr
        assert "every gateway process (2)" in done.stdout
        assert f"pid {replacement} (worker): loaded" in done.stdout
        assert f"pid {proc.pid} (master): loaded" in done.stdout
        assert f"pid {worker} " not in done.stdout
    finally:
        assert stop_gateway(proc) == 0
    # SIGTERM stopped the replacement too, and the master waited for it.
    assert not Path(f"/proc/{replacement}").exists()
    assert not port_open(port)


def test_a_replacement_runs_the_policy_the_master_runs_not_the_file(tmp_path: Path) -> None:
    """The master reloaded a policy adding carol; the file has been edited since (carol
    gone again) but not reloaded. A replacement reading the file would refuse carol on
    its share of the connections; it runs what the master runs. It also reports its
    counts to the master's metrics endpoint, as the worker it replaces did."""
    port, metrics_port = free_port(), free_port()
    policy = write_policy(tmp_path, port, workers=2, extra=f"[metrics]\nenabled = true\nport = {metrics_port}")
    log = tmp_path / "gateway.log"
    with open(log, "w") as log_file:
        proc = start_gateway(policy, port, stderr=log_file)
    try:
        started(log, 2)
        with_users(policy, '"postmaster", "alice", "carol"')
        assert gateway("reload", "--policy", str(policy)).returncode == 0
        with_users(policy, '"postmaster", "alice"')
        assert wait_for(lambda: len(children(proc.pid)) == 1, timeout=30)
        [worker] = children(proc.pid)
        os.kill(worker, signal.SIGKILL)
        replacement = int(found(log, rf"worker pid=(\d+) started to replace pid={worker}").group(1))
        assert replacement in started(log, 3)
        with ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(lambda _: rcpt_code(port, "carol@localhost"), range(40)))
        assert codes == [250] * 40, f"{codes.count(550)} of 40 connections refused carol"
        assert served_by(log, replacement) > 0, "the replacement took some of them"
        snapshot = tmp_path / "var" / "metrics" / f"worker-{replacement}.json"

        def reported() -> bool:
            try:
                sessions = dict(json.loads(snapshot.read_text())["counters"]["sessions"])
                return bool(sessions.get("smtp") == served_by(log, replacement))
            except (OSError, ValueError, KeyError):
                return False

        assert wait_for(reported, timeout=30), "the replacement's counts reach the master"
        # A reload now reaches it: the file's policy, carol refused everywhere.
        done = gateway("reload", "--policy", str(policy))
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"pid {replacement} (worker): loaded" in done.stdout
        with ThreadPoolExecutor(4) as pool:
            assert set(pool.map(lambda _: rcpt_code(port, "carol@localhost"), range(20))) == {550}
    finally:
        assert stop_gateway(proc) == 0


def test_a_worker_that_cannot_start_is_logged_and_retried_with_back_off(tmp_path: Path) -> None:
    """A real start-up fault: the users file the policy names was edited into one a
    plugin cannot read (not reloaded, so the running processes are fine). A worker killed
    now cannot come back: each try is logged with its error and traceback, and the tries
    back off (1 s, 2 s, 4 s) instead of spinning. Once the file is fixed, one starts."""
    port = free_port()
    users = tmp_path / "users"
    policy = write_policy(tmp_path, port, workers=2)
    policy.write_text(policy.read_text() + f'[[plugins]]\nname = "auth_users_file"\npath = "{users}"\n')
    log = tmp_path / "gateway.log"
    with open(log, "w") as log_file:
        proc = start_gateway(policy, port, stderr=log_file)
    try:
        started(log, 2)
        assert wait_for(lambda: len(children(proc.pid)) == 1, timeout=30)
        [worker] = children(proc.pid)
        users.write_text("this line is not login:hash\n")
        os.kill(worker, signal.SIGKILL)
        first = int(found(log, rf"worker pid=(\d+) started to replace pid={worker}").group(1))
        # The worker says why, with the traceback, before it exits non-zero ...
        failure = found(log, rf"gateway\[{first}\] ERROR gateway\.workers .*worker pid={first} cannot start: "
                             rf"{re.escape(str(users))}:1: expected login:hash\nTraceback \(most recent call last\):\n")
        assert "read_users" in log.read_text()[failure.end():], "the traceback shows where"
        # ... and the master logs the exit and backs off.
        found(log, rf"ERROR gateway\.workers .*worker pid={first} exited with status 1 after \d+s; "
                   rf"starting a replacement in 2s \(backing off: 2 exits in a row")
        second = int(found(log, rf"worker pid=(\d+) started to replace pid={first}").group(1))
        found(log, rf"worker pid={second} cannot start: ")
        found(log, rf"worker pid={second} exited with status 1 after \d+s; starting a replacement in 4s "
                   rf"\(backing off: 3 exits in a row")
        # The master serves throughout.
        assert all(rcpt_code(port, "alice@localhost") == 250 for _ in range(5))
        users.write_text("")
        third = int(found(log, rf"worker pid=(\d+) started to replace pid={second}").group(1))
        assert third in started(log, 3)
        assert children(proc.pid) == [third]
        done = gateway("reload", "--policy", str(policy))
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"pid {third} (worker): loaded" in done.stdout
    finally:
        assert stop_gateway(proc) == 0
