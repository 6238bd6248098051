"""``gateway report`` over the log of a real gateway session."""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import smtplib
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from gateway import logs
from tests.conftest import MESSAGE, smtp, wait_for
from tests.localmail import LOCAL_POLICY, dot_qmail, messages

ROOT = Path(__file__).resolve().parents[2]

POLICY = LOCAL_POLICY


def gateway_cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args], input=stdin, capture_output=True, timeout=60, env=env
    )


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[Path]:
    """The gateway's log lines (gateway.logs.FORMAT) go to this file during the test."""
    path = tmp_path / "gateway.log"
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    with path.open("w") as stream:
        logs.configure("info", stream=stream)
        try:
            yield path
        finally:
            root.handlers[:] = saved[0]
            root.setLevel(saved[1])


@pytest.fixture
def session_log(gateway_factory, log_file: Path) -> Path:
    """A log of: 2 recipients delivered, 2 refused at RCPT, 1 bounce (and its DSN), 1 retry."""
    gw = gateway_factory(POLICY)
    # Programs never run as root: as root they run as nobody, so the marker lives in a
    # directory anyone may write.
    shared = Path(tempfile.mkdtemp(prefix="gateway-test-"))
    shared.chmod(0o777)
    marker = shared / "marker"
    dot_qmail(gw, "alice", ".qmail-fail", "|echo 'no such list'; exit 100\n")
    dot_qmail(gw, "alice", ".qmail-flaky", f"|test -f {marker} || {{ touch {marker}; exit 111; }}\n./Maildir/\n")
    with smtp(gw.port) as client:
        assert client.sendmail("s@example.org", ["alice@localhost", "bob@localhost"], MESSAGE) == {}
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail("s@example.org", ["x@remote.example"], MESSAGE)
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail("s@example.org", ["nobody@localhost"], MESSAGE)
        assert client.sendmail("bob@localhost", ["alice-fail@localhost"], MESSAGE) == {}
        assert client.sendmail("s@example.org", ["alice-flaky@localhost"], MESSAGE) == {}
    # alice: the first message and the retried one; bob: the first message and the DSN.
    assert wait_for(lambda: len(messages(gw, "alice")) == 2 and len(messages(gw, "bob")) == 2, timeout=15)
    assert wait_for(lambda: gw.queue_ids() == [], timeout=10)
    # msg/ empties at the unlink; the "done" line follows the removal's fsync. Four
    # messages: the first (two plain Maildirs: delivered at once, never queued), the
    # bounced one, its DSN and the retried one.
    assert wait_for(lambda: done_lines(log_file) == 4, timeout=10)
    shutil.rmtree(shared)
    logging.getLogger().handlers[0].flush()
    return log_file


def done_lines(path: Path) -> int:
    logging.getLogger().handlers[0].flush()
    text = path.read_text()
    return text.count("done: removed from the queue") + text.count("done: delivered at once, never queued")


def test_report_counts_what_happened(session_log: Path) -> None:
    result = gateway_cli("report", "--json", str(session_log))
    assert result.returncode == 0, result.stderr
    s = json.loads(result.stdout)
    assert s["unparsed"] == 0
    assert s["connections"] == 1
    assert s["messages"]["received"] == 3
    assert s["messages"]["bytes"] == 3 * len(MESSAGE)
    assert s["messages"]["generated"] == 1  # the DSN
    assert s["messages"]["in_queue_at_end"] == 0
    # alice, bob, the DSN to bob, the retried alice-flaky.
    assert s["recipients"]["delivered"] == 4
    assert s["recipients"]["bounced"] == 1
    assert s["recipients"]["deferred"] == 1
    assert s["delay"]["count"] == 4
    assert 0 < s["delay"]["p50"] <= s["delay"]["p90"] <= s["delay"]["p99"] <= s["delay"]["max"]
    by_plugin = {(r["stage"], r["action"], r["plugin"]): r["count"] for r in s["rejects"]["by_plugin"]}
    assert by_plugin == {("rcpt", "reject", "rcpt_relay"): 1, ("rcpt", "reject", "rcpt_local_users"): 1}
    reasons = {r["plugin"]: r["reason"] for r in s["rejects"]["reasons"]}
    assert reasons["rcpt_relay"] == "relay to remote.example denied"
    assert s["senders"][0] == {"sender": "s@example.org", "messages": 2, "bytes": 2 * len(MESSAGE)}
    assert s["recipient_domains"] == [{"domain": "localhost", "delivered": 4, "bounced": 1, "deferred": 1}]


def test_report_reads_gzip_and_standard_input_alike(session_log: Path, tmp_path: Path) -> None:
    # The gateway is still running and may log a line more: compare one frozen copy.
    frozen = tmp_path / "frozen.log"  # not session_log's own name: that file is still open
    frozen.write_bytes(session_log.read_bytes())
    compressed = tmp_path / "gateway.log.1.gz"
    compressed.write_bytes(gzip.compress(frozen.read_bytes()))
    from_file = json.loads(gateway_cli("report", "--json", str(frozen)).stdout)
    from_gz = json.loads(gateway_cli("report", "--json", str(compressed)).stdout)
    from_stdin = json.loads(gateway_cli("report", "--json", stdin=frozen.read_bytes()).stdout)
    assert from_file == from_gz == from_stdin
    both = json.loads(gateway_cli("report", "--json", str(compressed), str(frozen)).stdout)
    assert both["messages"]["received"] == 2 * from_file["messages"]["received"]


def test_text_report_and_progress(session_log: Path) -> None:
    result = gateway_cli("report", "--progress-every", "5", str(session_log))
    assert result.returncode == 0
    text = result.stdout.decode()
    assert "Messages received                  3" in text
    assert "rcpt_relay: relay to remote.example denied [550 5.7.1 Relay access denied]" in text
    assert "<s@example.org>" in text
    progress = result.stderr.decode().splitlines()
    assert progress and all(line.startswith("gateway report: ") and "% read" in line for line in progress)
    quiet = gateway_cli("report", "--quiet", "--progress-every", "5", str(session_log))
    assert quiet.stderr == b"" and quiet.stdout == result.stdout


def test_report_on_a_missing_file_fails_cleanly(tmp_path: Path) -> None:
    result = gateway_cli("report", str(tmp_path / "nope.log"))
    assert result.returncode == 1
    assert b"nope.log" in result.stderr
