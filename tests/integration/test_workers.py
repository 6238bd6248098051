"""Several worker processes on one port: all accept mail, each delivers what it accepted,
the master retries what a worker could not deliver, and no message goes out twice."""

from __future__ import annotations

import collections
import email
import os
import re
import signal
import smtplib
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import wait_for
from tests.processes import free_port, gateway_env, port_open, start_gateway, stop_gateway, write_policy
from tests.smtppeer import SmtpPeer


@contextmanager
def running(tmp_path: Path, port: int, extra: str) -> Iterator[Path]:
    """The gateway with ``workers = 2`` on ``port``; yields its log file."""
    policy = write_policy(tmp_path, port, workers=2, extra=extra)
    log_path = tmp_path / "gateway.log"
    with open(log_path, "w") as log_file:
        proc = start_gateway(policy, port, stderr=log_file)
    try:
        yield log_path
    finally:
        assert stop_gateway(proc) == 0
    assert not port_open(port)


def send_in_parallel(port: int, recipient: str, sessions: int = 8, each: int = 10) -> None:
    """``sessions`` clients at once, ``each`` messages apiece, one per connection (so the
    kernel spreads them over both processes); Subjects ``<session>-<i>``, and
    ``recipient`` formatted with ``n`` (session) and ``i``."""
    errors: list[Exception] = []

    def send(n: int) -> None:
        try:
            for i in range(each):
                with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                    client.sendmail("a@example.org", [recipient.format(n=n, i=i)], f"Subject: {n}-{i}\r\n\r\nx\r\n".encode())
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors


def pids(log: str, pattern: str) -> set[str]:
    return set(re.findall(r"gateway\[(\d+)\] INFO gateway\.[\w.]+ .*" + pattern, log))


def test_two_workers_share_the_port_and_each_delivers_what_it_accepted(tmp_path: Path) -> None:
    port = free_port()
    # poll_interval is long: only the processes' own schedulers can make this quick.
    with running(tmp_path, port, '[delivery]\npoll_interval = "30s"') as log_path:
        send_in_parallel(port, "alice@localhost")
        new = tmp_path / "mail" / "alice" / "Maildir" / "new"
        assert wait_for(lambda: new.exists() and len(list(new.iterdir())) == 80, timeout=20)
    subjects = collections.Counter(
        email.message_from_bytes(f.read_bytes())["Subject"] for f in new.iterdir()
    )
    assert len(subjects) == 80 and set(subjects.values()) == {1}, "every message exactly once"
    text = log_path.read_text()
    assert len(pids(text, "queued from=")) == 2, "both processes should have accepted mail"
    assert len(pids(text, "status=delivered")) == 2, "both processes should have delivered"


def test_what_a_worker_could_not_deliver_the_master_retries_once(tmp_path: Path) -> None:
    port = free_port()
    with SmtpPeer() as peer:
        # Each message's first attempt is deferred (its recipient's first RCPT).
        for n in range(4):
            for i in range(10):
                peer.script_rcpt(f"bob+{n}-{i}@remote.example", "451 4.2.0 try again later")
        extra = f"""
[relay]
clients = ["127.0.0.0/8"]
[delivery]
poll_interval = "300ms"
retry_base = "200ms"
retry_max = "1s"
[[routes]]
domain = "*"
host = "127.0.0.1"
port = {peer.port}
tls = "none"
"""
        with running(tmp_path, port, extra) as log_path:
            send_in_parallel(port, "bob+{n}-{i}@remote.example", sessions=4)
            assert wait_for(lambda: len(peer.messages) >= 40, timeout=30)
            assert wait_for(lambda: not list((tmp_path / "queue" / "msg").iterdir()), timeout=30)
        subjects = collections.Counter(
            email.message_from_bytes(m.content)["Subject"] for m in peer.messages
        )
    assert len(subjects) == 40 and set(subjects.values()) == {1}, "every message accepted exactly once"
    text = log_path.read_text()
    master = re.search(r"gateway\[(\d+)\] INFO gateway\.app .*role=master", text)
    assert master is not None
    deferred_by = pids(text, "status=deferred")
    delivered_by = pids(text, "status=delivered")
    assert len(deferred_by) == 2, "both processes made first attempts"
    assert delivered_by == {master.group(1)}, "every retry is the master's"


def test_workers_stop_when_the_master_is_killed(tmp_path: Path) -> None:
    """SIGKILL leaves the master no chance to stop its workers; the kernel does, so no
    orphan keeps the port (a restarted gateway would otherwise share it with them)."""
    port = free_port()
    policy = write_policy(tmp_path, port, workers=2, plugins=("rcpt_local_users",))
    proc = start_gateway(policy, port)
    children: list[int] = []
    try:
        def forked() -> list[int]:
            return [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]

        # The port may answer before the master has forked its worker (a busy machine).
        assert wait_for(lambda: len(forked()) == 1, timeout=15)
        children = forked()
        proc.kill()
        proc.wait(10)
        assert wait_for(lambda: not Path(f"/proc/{children[0]}").exists() or _zombie(children[0]), timeout=15)
        assert not port_open(port)
    finally:
        for pid in [proc.pid, *children]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(10)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _starttls_pids(port: int, log: Path, connections: int) -> set[str]:
    """STARTTLS on ``connections`` new connections (each must succeed); the pids of the
    processes that served them, from the log's connect lines."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    ports = []
    for _ in range(connections):
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
            ports.append(client.sock.getsockname()[1])
            client.starttls(context=context)
            assert client.noop()[0] == 250
    text = log.read_text()
    return {
        m.group(1) for p in ports
        for m in [re.search(rf"gateway\[(\d+)\] INFO \S+ session=\S+ queue=\S+ connect client=127\.0\.0\.1 port={p} ", text)]
        if m is not None
    }


def _tls_policy(tmp_path: Path, port: int, workers: int) -> Path:
    policy = write_policy(tmp_path, port, workers=workers)
    policy.write_text(policy.read_text().replace('tls = "none"', 'tls = "starttls"'))
    return policy


def _all_started(log: Path, count: int) -> bool:
    return wait_for(lambda: len(re.findall(r"INFO gateway\.app .*gateway started", log.read_text())) >= count, timeout=30)


def test_first_starts_with_four_workers_make_one_certificate(tmp_path: Path) -> None:
    """Each worker made the self-signed pair on a first start: some starts failed with
    KEY_VALUES_MISMATCH and left a mismatched pair that stopped every later start."""
    for round in range(3):
        root = tmp_path / f"start{round}"
        root.mkdir()
        port = free_port()
        log = root / "gateway.log"
        with open(log, "w") as log_file:
            proc = start_gateway(_tls_policy(root, port, 4), port, stderr=log_file, timeout=60)
        try:
            assert _all_started(log, 4), log.read_text()
            assert len(_starttls_pids(port, log, 24)) >= 2, "connections reached several processes"
            assert log.read_text().count("made a self-signed TLS certificate") == 1
        finally:
            assert stop_gateway(proc) == 0


def test_a_mismatched_pair_left_on_disk_is_remade_at_start(tmp_path: Path) -> None:
    from gateway.smtp.tls import ensure_self_signed

    cert, key = ensure_self_signed(tmp_path / "var" / "tls", "gw.test.example")
    key.write_bytes(ensure_self_signed(tmp_path / "other", "gw.test.example")[1].read_bytes())
    port = free_port()
    log = tmp_path / "gateway.log"
    with open(log, "w") as log_file:
        proc = start_gateway(_tls_policy(tmp_path, port, 2), port, stderr=log_file, timeout=60)
    try:
        assert _all_started(log, 2)
        assert _starttls_pids(port, log, 10)
        text = log.read_text()
        assert f"the self-signed TLS pair {cert} and {key} cannot serve (KEY_VALUES_MISMATCH)" in text
    finally:
        assert stop_gateway(proc) == 0


def test_a_configured_pair_that_does_not_match_stops_the_start_naming_both(tmp_path: Path) -> None:
    from gateway.smtp.tls import ensure_self_signed

    cert, _ = ensure_self_signed(tmp_path / "a", "gw.test.example")
    _, key = ensure_self_signed(tmp_path / "b", "gw.test.example")
    port = free_port()
    policy = _tls_policy(tmp_path, port, 2)
    policy.write_text(policy.read_text() + f'[tls]\ncert = "{cert}"\nkey = "{key}"\n')
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "run", "--policy", str(policy)],
        env=gateway_env(), capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1
    assert f"cannot start: TLS certificate {cert} and key {key} cannot serve: KEY_VALUES_MISMATCH" in done.stderr


def test_session_ids_are_unique_across_workers(tmp_path: Path) -> None:
    """Each process counted sessions from 1: S3 could be two connections at once."""
    port = free_port()
    with running(tmp_path, port, "") as log_path:
        for _ in range(30):
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                assert client.noop()[0] == 250
        assert wait_for(lambda: log_path.read_text().count(" disconnect client=") >= 30, timeout=20)
    sessions = re.findall(r"gateway\[(\d+)\] INFO \S+ session=(\S+) queue=\S+ connect client=", log_path.read_text())
    assert len({pid for pid, _ in sessions}) == 2, "both processes took connections"
    assert len(sessions) >= 30  # and start_gateway's probes
    assert len({sid for _, sid in sessions}) == len(sessions), "one id per connection"
    assert all(sid.startswith(f"S{pid}-") for pid, sid in sessions), "the id names its process"
