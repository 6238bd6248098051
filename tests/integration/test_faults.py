"""Fault injection with real processes: a full disk mid-message, a corrupted queue file
found at start-up."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.model import Envelope, Message, QueuedRecipient
from gateway.queue import QueueStore
from tests.conftest import wait_for
from tests.processes import ROOT, free_port, port_open, start_gateway, write_policy


def fault_policy(tmp: Path, port: int, delivering: bool) -> Path:
    """The shared test policy (``tests.processes.write_policy``), delivery on or off."""
    delivery = f'[delivery]\nenabled = {str(delivering).lower()}\npoll_interval = "200ms"'
    return write_policy(tmp, port, extra=delivery)


def _can_unshare() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    return subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs root and unshare to mount a small private filesystem")
def test_disk_full_mid_message_gives_452_and_leaves_nothing_half_written(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "queue").mkdir()
    policy = fault_policy(tmp_path, port, delivering=False)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # The queue lives on a 256 KiB tmpfs that only the gateway's mount namespace sees.
    script = (
        f"mount -t tmpfs -o size=256k tmpfs {tmp_path / 'queue'} && "
        f"exec {sys.executable} -m gateway.cli run --policy {policy}"
    )
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: port_open(port), timeout=20)
        big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 400  # 400 KB > the disk
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo()
            client.mail("a@example.org")
            client.rcpt("alice@localhost")
            code, text = client.data(big)
            assert (code, text[:5]) == (452, b"4.3.1")
            # The session goes on, and a small message still fits.
            assert client.sendmail("a@example.org", ["alice@localhost"], b"Subject: small\r\n\r\nx\r\n") == {}

        def listing(sub: str) -> list[str]:
            out = subprocess.run(["nsenter", "-t", str(proc.pid), "-m", "ls", "-A", str(tmp_path / "queue" / sub)],
                                 capture_output=True, text=True)
            return out.stdout.split()

        assert listing("tmp") == []
        assert len(listing("msg")) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_corrupt_queue_file_is_moved_aside_and_the_rest_delivered(tmp_path: Path) -> None:
    store = QueueStore(tmp_path / "queue")
    store.open()

    async def fill() -> list[str]:
        ids = []
        for n in range(3):
            qid = store.new_id()
            env = Envelope(sender="a@example.org", recipients=[QueuedRecipient("alice@localhost")])
            await store.commit(qid, env, Message(f"Subject: {n}\r\n\r\nbody {n}\r\n".encode()))
            ids.append(qid)
        await store.close()
        return ids

    good1, bad, good2 = asyncio.run(fill())
    path = tmp_path / "queue" / "msg" / bad
    path.write_bytes(path.read_bytes()[:-7])  # truncated, as a disk error might leave it
    port = free_port()
    policy = fault_policy(tmp_path, port, delivering=True)
    proc = start_gateway(policy, port, stderr=subprocess.PIPE, text=True)
    new = tmp_path / "mail" / "alice" / "Maildir" / "new"
    try:
        assert wait_for(lambda: new.exists() and len(list(new.iterdir())) == 2, timeout=15)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, log = proc.communicate(timeout=30)
    bodies = sorted(p.read_bytes().split(b"\r\n\r\n", 1)[1] for p in new.iterdir())
    assert bodies == [b"body 0\r\n", b"body 2\r\n"]
    assert (tmp_path / "queue" / "corrupt" / bad).exists()
    assert bad in log and "ERROR" in log


def _scrape(port: int) -> dict[str, float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def _place_damaged(queue: Path, qid: str, envelope: bytes) -> None:
    """A queue file whose header, lengths and separator check out, with ``envelope``
    (JSON that does not parse, or does not fit the schema) as its envelope; renamed
    into ``msg/`` whole, as a commit would."""
    message = b"Subject: damaged\r\n\r\nnever delivered\r\n"
    tmp = queue / "tmp" / f"{qid}.test"
    tmp.write_bytes(b"GWQ1 %d %d\n" % (len(envelope), len(message)) + envelope + b"\n" + message)
    os.rename(tmp, queue / "msg" / qid)


def test_damaged_envelope_is_moved_aside_once_at_start_and_when_found_later(tmp_path: Path) -> None:
    """A right-size queue file whose envelope is bad JSON is set aside by the start-up
    recovery; one whose envelope fails the schema, dropped in while the gateway runs, by
    the attempt that loads it. Each gets one ERROR line, none a traceback, both are
    counted at /metrics, and neither is retried; the good mail is delivered."""
    store = QueueStore(tmp_path / "queue")
    store.open()

    async def fill() -> None:
        env = Envelope(sender="a@example.org", recipients=[QueuedRecipient("alice@localhost")])
        await store.commit(store.new_id(), env, Message(b"Subject: good\r\n\r\nbody 0\r\n"))
        await store.close()

    asyncio.run(fill())
    at_start, later = store.new_id(), store.new_id()
    _place_damaged(tmp_path / "queue", at_start, b'{"version":1,"sender":"a@example.org","recipients":[')
    port, metrics_port = free_port(), free_port()
    delivery = f'[delivery]\npoll_interval = "200ms"\n[metrics]\nenabled = true\nport = {metrics_port}'
    proc = start_gateway(write_policy(tmp_path, port, extra=delivery), port, stderr=subprocess.PIPE, text=True)
    new = tmp_path / "mail" / "alice" / "Maildir" / "new"
    corrupt = tmp_path / "queue" / "corrupt"
    try:
        assert wait_for(lambda: new.exists() and len(list(new.iterdir())) == 1, timeout=15)
        assert (corrupt / at_start).exists()
        # Valid JSON, but no recipients: the queue scan finds it and the attempt loads it.
        _place_damaged(tmp_path / "queue", later, b'{"version":1,"sender":"a@example.org","arrived":1}')
        assert wait_for(lambda: (corrupt / later).exists(), timeout=15)
        assert not (tmp_path / "queue" / "msg" / later).exists()
        assert wait_for(lambda: _scrape(metrics_port).get("gateway_queue_corrupt_total") == 2, timeout=10)
        # Later scans do not find it again: a good message sent now is delivered, and
        # the count stays.
        from tests.conftest import MESSAGE, smtp

        with smtp(port) as client:
            client.sendmail("a@example.org", ["alice@localhost"], MESSAGE)
        assert wait_for(lambda: len(list(new.iterdir())) == 2, timeout=15)
        assert _scrape(metrics_port)["gateway_queue_corrupt_total"] == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        _, log = proc.communicate(timeout=30)
    assert "Traceback" not in log
    for qid in (at_start, later):
        (line,) = [line for line in log.splitlines() if qid in line]
        assert "ERROR" in line and "bad envelope" in line and "corrupt" in line


@pytest.mark.skipif(not _can_unshare(), reason="needs root and unshare to mount a small private filesystem")
def test_disk_full_during_delivery_keeps_the_back_off_in_memory_and_records_it_later(tmp_path: Path) -> None:
    """The queue's filesystem (a small tmpfs only the gateway sees) fills up while a
    message is being retried: the state writes after each deferral fail. One WARNING,
    no traceback; the retries still follow the back-off (not once a minute) and count
    their attempts in memory; once space returns the state on disk catches up, and the
    message is delivered once the peer takes it."""
    from tests.smtppeer import SmtpPeer

    with SmtpPeer() as peer:
        attempts_scripted = 200
        peer.script_rcpt("bob@peer.test.example", *["451 4.3.0 try later"] * attempts_scripted)

        def tried() -> int:  # the peer's RCPT answers used: one per delivery attempt
            with peer._lock:
                return attempts_scripted - len(peer._script.rcpt_once["bob@peer.test.example"])

        port = free_port()
        (tmp_path / "queue").mkdir()
        extra = (f'[relay]\nclients = ["127.0.0.0/8"]\n'
                 f'[delivery]\npoll_interval = "200ms"\nretry_base = "1s"\nretry_max = "2s"\n'
                 f'[[routes]]\ndomain = "peer.test.example"\nhost = "127.0.0.1"\nport = {peer.port}\ntls = "none"\n')
        policy = write_policy(tmp_path, port, extra=extra)
        queue = tmp_path / "queue"
        script = f"mount -t tmpfs -o size=256k tmpfs {queue} && exec {sys.executable} -m gateway.cli run --policy {policy}"
        log_path = tmp_path / "gateway.log"
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                                    env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL,
                                    stderr=log_file)

        def inside(*command: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["nsenter", "-t", str(proc.pid), "-m", *command], capture_output=True, text=True)

        def recorded_attempts() -> int:
            out = inside("sh", "-c", f"cat {queue}/state/*")
            try:
                return int(json.loads(out.stdout)["attempts"])
            except ValueError:
                return -1

        try:
            assert wait_for(lambda: port_open(port), timeout=20)
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.sendmail("a@example.org", ["bob@peer.test.example"], b"Subject: s\r\n\r\nbody\r\n")
            assert wait_for(lambda: recorded_attempts() >= 1, timeout=15)
            inside("sh", "-c", f"cat /dev/zero > {queue}/filler")  # ends with ENOSPC: the disk is full
            full_since, tried_then = time.monotonic(), tried()
            # Retried at the back-off's pace (1 s, then 2 s), not 60 s later.
            assert wait_for(lambda: tried() >= tried_then + 4, timeout=40), tried()
            assert recorded_attempts() <= tried_then + 1, "the disk took no state meanwhile"
            elapsed, done = time.monotonic() - full_since, tried() - tried_then
            assert done <= elapsed / 1.0 + 2, "no faster than the back-off allows"
            inside("rm", f"{queue}/filler")
            # The state on disk catches up with every attempt made meanwhile.
            assert wait_for(lambda: recorded_attempts() == tried(), timeout=20), (recorded_attempts(), tried())
            with peer._lock:
                peer._script.rcpt_once.clear()  # the peer takes it now
            assert wait_for(lambda: len(peer.messages) == 1, timeout=20)
            assert wait_for(lambda: inside("ls", "-A", f"{queue}/msg").stdout.split() == [], timeout=10)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    log = log_path.read_text()
    assert "Traceback" not in log
    warnings = [line for line in log.splitlines() if "WARNING gateway.delivery" in line or "WARNING gateway.queue" in line]
    assert len(warnings) == 1 and "cannot record delivery state" in warnings[0], warnings
    assert "No space left on device" in warnings[0]
    assert "takes state writes again" in log
    assert len(peer.messages) == 1
