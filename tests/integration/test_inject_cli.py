"""``gateway inject`` and ``sendmail``: local mail into the queue of a running gateway."""

from __future__ import annotations

import email
import email.policy
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.sendmail import UsageError, prepare
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]

EX_USAGE, EX_TEMPFAIL = 64, 75


def policy_text(base: Path) -> str:
    return f"""
[server]
hostname = "mx.test.example"
queue_dir = "{base / 'queue'}"
var_dir = "{base / 'var'}"

[[listeners]]
name = "smtp"
tls = "none"

[local]
domains = ["localhost"]
users = ["postmaster", "alice", "bob", "carol"]
mail_root = "{base / 'mail'}"

[delivery]
poll_interval = "200ms"

[[plugins]]
name = "rcpt_relay"
[[plugins]]
name = "rcpt_local_users"
"""


@pytest.fixture
def gw(gateway_factory, tmp_path: Path):
    """A running gateway, and its policy in a file for the commands."""
    text = policy_text(tmp_path)
    (tmp_path / "policy.toml").write_text(text)
    return gateway_factory(text)


def run(args: list[str], stdin: bytes, **env: str) -> subprocess.CompletedProcess[bytes]:
    environ = dict(os.environ, PYTHONPATH=str(ROOT), USER="carol", **env)
    return subprocess.run([sys.executable, *args], input=stdin, capture_output=True, timeout=60, env=environ)


def mailbox(gw, user: str) -> list[bytes]:
    new = Path(gw.policy.local.mail_root) / user / "Maildir" / "new"
    return [p.read_bytes() for p in sorted(new.glob("*"))] if new.exists() else []


def parse(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)  # type: ignore[return-value]


def test_inject_t_strips_bcc_adds_headers_and_the_gateway_delivers(gw, tmp_path: Path) -> None:
    message = b"To: Alice <alice@localhost>\nBcc: bob@localhost\nSubject: report\n\nAll done.\n"
    result = run(["-m", "gateway.cli", "inject", "-t", "--policy", str(tmp_path / "policy.toml")], message)
    assert result.returncode == 0, result.stderr
    qid = result.stdout.decode().strip()
    assert len(qid) == 23
    assert wait_for(lambda: mailbox(gw, "alice") and mailbox(gw, "bob"), timeout=10)
    (alice,) = mailbox(gw, "alice")
    (bob,) = mailbox(gw, "bob")
    for raw in (alice, bob):
        assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF only
        assert b"Bcc:" not in raw and b"bob@localhost\r\nSubject" not in raw
        msg = parse(raw)
        assert msg["Return-Path"] == "<carol@localhost>"
        assert msg["From"] == "carol@localhost"
        assert msg["Date"] and msg["Message-ID"].endswith("@mx.test.example>")
        assert msg["Subject"] == "report" and raw.endswith(b"\r\n\r\nAll done.\r\n")
    assert wait_for(lambda: gw.queue_ids() == [], timeout=5)


def test_sendmail_entry_point_with_common_flags(gw, tmp_path: Path) -> None:
    message = b"Subject: dots\n\nfirst\n.\nafter the dot\n"
    args = ["-m", "gateway.sendmail", "-oi", "-odb", "-f", "bounces@localhost", "-F", "Carol Example", "alice@localhost"]
    result = run(args, message, GATEWAY_POLICY=str(tmp_path / "policy.toml"))
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    # Without -i, a line with a lone dot ends the message, as sendmail reads it.
    result = run(["-m", "gateway.sendmail", "-C", str(tmp_path / "policy.toml"), "bob"], message)
    assert result.returncode == 0, result.stderr
    assert wait_for(lambda: mailbox(gw, "alice") and mailbox(gw, "bob"), timeout=10)
    alice = parse(mailbox(gw, "alice")[0])
    assert alice["Return-Path"] == "<bounces@localhost>"
    assert alice["From"] == "Carol Example <bounces@localhost>"
    assert mailbox(gw, "alice")[0].endswith(b"\r\n\r\nfirst\r\n.\r\nafter the dot\r\n")
    bob = parse(mailbox(gw, "bob")[0])
    assert bob["Return-Path"] == "<carol@localhost>"
    assert mailbox(gw, "bob")[0].endswith(b"\r\n\r\nfirst\r\n")


def test_usage_errors_and_an_unavailable_queue(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_text(tmp_path))
    no_rcpt = run(["-m", "gateway.sendmail", "-C", str(policy), "-t"], b"Subject: x\n\nbody\n")
    assert no_rcpt.returncode == EX_USAGE and b"no recipients" in no_rcpt.stderr
    bad_flag = run(["-m", "gateway.sendmail", "-bs"], b"")
    assert bad_flag.returncode == EX_USAGE
    bad_rcpt = run(["-m", "gateway.cli", "inject", "--policy", str(policy), "a b@@x"], b"Subject: x\n\nbody\n")
    assert bad_rcpt.returncode == EX_USAGE
    # No gateway ever opened this queue: the caller must keep the message and retry.
    unavailable = run(["-m", "gateway.cli", "inject", "--policy", str(policy), "alice"], b"Subject: x\n\nbody\n")
    assert unavailable.returncode == EX_TEMPFAIL and b"queue" in unavailable.stderr


def test_prepare_keeps_what_is_there_and_reads_resent_fields() -> None:
    common = dict(sender=None, full_name=None, domain="localhost", hostname="mx.test.example", user="carol")
    data = (
        b"From: Boss <boss@example.org>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"Message-ID: <kept@example.org>\r\nTo: old@example.org\r\n"
        b"Resent-To: new@example.org\r\nResent-Bcc: hidden@example.org\r\nReturn-Path: <forged@example.org>\r\n\r\nbody\r\n"
    )
    injection = prepare(data, recipients=[], from_headers=True, **common)
    assert injection.recipients == ["new@example.org", "hidden@example.org"]
    assert injection.sender == "carol@localhost"
    head = injection.message.split(b"\r\n\r\n")[0]
    assert head.count(b"From:") == 1 and b"<kept@example.org>" in head and head.count(b"Date:") == 1
    assert b"hidden" not in head and b"forged" not in head
    # A body without a header section still gets one, and a blank line after it.
    bare = prepare(b"just text\n", recipients=["bob", "Bob <bob@localhost>"], from_headers=False, **common)
    assert bare.recipients == ["bob@localhost"]
    assert bare.message.endswith(b"\r\n\r\njust text\r\n")
    null = prepare(b"x\n", recipients=["bob"], from_headers=False, **{**common, "sender": "<>"})
    assert null.sender == "" and b"From: carol@localhost\r\n" in null.message
    with pytest.raises(UsageError):
        prepare(b"x\n", recipients=["x@exa mple.org"], from_headers=False, **common)
