"""Capture: real sessions against a running gateway are recorded, bounded and private."""

from __future__ import annotations

import base64
import json
import logging
import smtplib
import stat
import time
from pathlib import Path
from typing import Any

from gateway import capture
from gateway.passwords import hash_password
from gateway.policy.model import CaptureSettings
from tests.conftest import BASE_POLICY, MESSAGE, RawClient, no_verify_context, wait_for

CAPTURE = "\n[capture]\nenabled = true\n"


def records(var: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted((var / "capture").glob("capture-*.jsonl")):
        out += [json.loads(line) for line in path.read_text().splitlines()]
    return out


def wait_records(var: Path, count: int) -> list[dict[str, Any]]:
    assert wait_for(lambda: capture.flush() and (var / "capture").is_dir() and len(records(var)) >= count)
    return records(var)


def var_dir(gw: Any) -> Path:
    return Path(gw.policy.server.var_dir)


def test_sessions_are_recorded_with_tls_auth_commands_verdicts_and_message(gateway_factory, tmp_path) -> None:
    users = tmp_path / "users"
    users.write_text(f"alice:{hash_password('s3cret', ln=4)}\n")
    gw = gateway_factory(BASE_POLICY + f'\n[auth]\nusers_file = "{users}"\n' + CAPTURE)
    with smtplib.SMTP("127.0.0.1", gw.port, local_hostname="client.test.example", timeout=10) as c:
        c.starttls(context=no_verify_context())
        c.ehlo("client.test.example")
        c.login("alice", "s3cret")
        assert c.sendmail("alice@localhost", ["someone@example.net"], MESSAGE) == {}
    with smtplib.SMTP("127.0.0.1", gw.port, local_hostname="other.test.example", timeout=10) as c:
        refused = c.sendmail("x@example.org", ["nobody@example.net", "bob@localhost"], MESSAGE)
        assert list(refused) == ["nobody@example.net"]
    first, second = wait_records(var_dir(gw), 2)

    assert first["client"] == "127.0.0.1" and first["helo"] == "client.test.example"
    assert first["tls"]["version"].startswith("TLS") and first["auth"] == {"login": "alice"}
    commands = [line for line, _ in first["log"]]
    assert "AUTH PLAIN" in commands  # the mechanism, never the credentials
    (txn,) = first["txns"]
    assert txn["mail"].startswith("FROM:<alice@localhost>") and txn["mail_reply"].startswith("250")
    assert txn["reply"].startswith("250 2.0.0 OK queued as")
    assert base64.b64decode(txn["data"]["message"]) == MESSAGE

    assert second["auth"] is None and second["tls"] is None
    (txn,) = second["txns"]
    denied, accepted = txn["rcpts"]
    assert denied["rcpt"] == "TO:<nobody@example.net>" and denied["reply"].startswith("550 5.7.1")
    assert denied["verdicts"][0]["plugin"] == "rcpt_relay" and denied["verdicts"][0]["action"] == "reject"
    assert accepted["reply"].startswith("250")
    assert txn["data"]["queue_id"] in gw.queue_ids()
    assert ["QUIT", ["221 2.0.0 Bye"]] in second["log"]

    text = b"".join(p.read_bytes() for p in (var_dir(gw) / "capture").iterdir())
    secret = base64.b64encode(b"\0alice\0s3cret")
    assert b"s3cret" not in text and secret not in text
    assert stat.S_IMODE((var_dir(gw) / "capture").stat().st_mode) == 0o700
    for path in (var_dir(gw) / "capture").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_capture_is_off_by_default(gateway_factory) -> None:
    gw = gateway_factory()
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as c:
        assert c.sendmail("x@example.org", ["bob@localhost"], MESSAGE) == {}
    time.sleep(0.2)
    capture.flush()
    assert not (var_dir(gw) / "capture").exists()


def test_headers_only_keeps_the_header_section(gateway_factory) -> None:
    gw = gateway_factory(BASE_POLICY + CAPTURE + "headers_only = true\n")
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as c:
        assert c.sendmail("x@example.org", ["bob@localhost"], MESSAGE) == {}
    (record,) = wait_records(var_dir(gw), 1)
    data = record["txns"][0]["data"]
    assert base64.b64decode(data["message"]) == MESSAGE.split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    assert data["headers_only"] and data["size"] > len(base64.b64decode(data["message"]))


def test_a_capture_that_cannot_be_written_never_breaks_a_session_and_says_so_once(
    gateway_factory, caplog
) -> None:
    gw = gateway_factory(BASE_POLICY + CAPTURE)
    (var_dir(gw) / "capture").write_text("not a directory: every write fails")
    with caplog.at_level(logging.WARNING, logger="gateway.capture"):
        for _ in range(3):
            with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as c:
                assert c.sendmail("x@example.org", ["bob@localhost"], MESSAGE) == {}
        assert wait_for(lambda: capture.flush() and len(gw.queue_ids()) == 3)
        time.sleep(0.2)
        capture.flush()
    warnings = [r for r in caplog.records if "best effort" in r.getMessage()]
    assert len(warnings) == 1


def test_files_rotate_by_size_and_the_oldest_go_past_max_size(tmp_path) -> None:
    settings = CaptureSettings(enabled=True, file_size=2000, max_size=5000)
    writer = capture.CaptureWriter(tmp_path / "capture", settings)
    record = {"txns": [{"data": {"message": b"x" * 1500}}], "log": []}
    for i in range(12):
        writer.submit(dict(record, n=i))
        assert writer.flush()
    files = sorted((tmp_path / "capture").glob("capture-*.jsonl"))
    total = sum(p.stat().st_size for p in files)
    assert 1 < len(files) and total <= 5000 + 2 * 2100
    kept = [json.loads(line)["n"] for p in sorted(files, key=lambda p: p.stat().st_mtime_ns)
            for line in p.read_text().splitlines()]
    assert kept == sorted(kept) and kept[-1] == 11 and kept[0] > 0


def test_a_long_session_keeps_a_bounded_command_log(gateway_factory) -> None:
    gw = gateway_factory(BASE_POLICY + CAPTURE)
    c = RawClient(gw.port)
    c.reply()
    c.cmd("EHLO client.test.example")
    for _ in range(2100):
        c.send(b"NOOP\r\n")
    for _ in range(2100):
        c.reply()
    c.cmd("QUIT")
    c.close()
    (record,) = wait_records(var_dir(gw), 1)
    # The greeting, EHLO, 2100 NOOPs and QUIT: 2103 entries, the last one kept.
    assert len(record["log"]) == 2000 and record["log_dropped"] == 103
    assert record["log"][-1][0] == "QUIT"
