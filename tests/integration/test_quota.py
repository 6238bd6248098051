"""Maildir++ quotas through a running gateway: 452 4.2.2 at RCPT for a full Maildir,
the defer/bounce choice at delivery, and `gateway maildir expire` making room."""

from __future__ import annotations

import json
import os
import smtplib
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import smtp, wait_for

ROOT = Path(__file__).resolve().parents[2]
R_FULL = (452, "4.2.2")


def policy_text(tmp: Path, quota: str) -> str:
    return f"""
[server]
hostname = "mx.test.example"
queue_dir = "{tmp / 'queue'}"
var_dir = "{tmp / 'var'}"
[[listeners]]
name = "smtp"
tls = "none"
[local]
domains = ["localhost"]
users = ["postmaster", "alice", "bob"]
mail_root = "{tmp / 'mail'}"
[local.quota]
{quota}
[delivery]
retry_base = "1h"
poll_interval = "200ms"
[[plugins]]
name = "rcpt_relay"
[[plugins]]
name = "rcpt_quota"
[[plugins]]
name = "rcpt_local_users"
"""


def maildir(tmp: Path, user: str) -> Path:
    return tmp / "mail" / user / "Maildir"


def inbox(tmp: Path, user: str) -> list[Path]:
    new = maildir(tmp, user) / "new"
    return sorted(new.iterdir()) if new.exists() else []


def maildirsize(tmp: Path, user: str) -> tuple[str, int, int]:
    first, *rest = (maildir(tmp, user) / "maildirsize").read_text().splitlines()
    return first, sum(int(l.split()[0]) for l in rest), sum(int(l.split()[1]) for l in rest)


def message(subject: str, size: int = 0) -> bytes:
    lines, rest = divmod(size, 72)
    return f"Subject: {subject}\r\n\r\n".encode() + (b"x" * 70 + b"\r\n") * lines + b"x" * rest + b"\r\n"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, timeout=60, env=env)


def test_full_maildir_gets_452_at_rcpt_and_expire_makes_room(gateway_factory, tmp_path: Path) -> None:
    gw = gateway_factory(policy_text(tmp_path, "users = { alice = { messages = 2 } }"))
    with smtp(gw.port) as client:
        client.sendmail("x@example.org", ["alice@localhost"], message("one"))
        client.sendmail("x@example.org", ["alice@localhost"], message("two"))
    assert wait_for(lambda: len(inbox(tmp_path, "alice")) == 2 and gw.queue_ids() == [], timeout=10)
    spec, used, count = maildirsize(tmp_path, "alice")
    assert spec == "2C" and count == 2 and used == sum(p.stat().st_size for p in inbox(tmp_path, "alice"))

    # Full: alice is refused at RCPT with 452 4.2.2, bob in the same message still gets it.
    with smtp(gw.port) as client:
        client.ehlo()
        client.mail("x@example.org")
        code, text = client.rcpt("alice@localhost")
        assert (code, text.decode()[:5]) == R_FULL
        assert client.rcpt("bob@localhost")[0] == 250
        assert client.data(message("three"))[0] == 250
    assert wait_for(lambda: len(inbox(tmp_path, "bob")) == 1, timeout=10)
    assert len(inbox(tmp_path, "alice")) == 2

    # Expire: a dry run deletes nothing; then the stale message goes and the quota follows.
    stale = inbox(tmp_path, "alice")[0]
    old = time.time() - 3 * 86400
    os.utime(stale, (old, old))
    dry = run("maildir", "expire", "--days", "2", "--dry-run", str(maildir(tmp_path, "alice")))
    assert dry.returncode == 0 and f"would delete {stale}" in dry.stdout
    assert stale.exists()
    done = run("maildir", "expire", "--days", "2", str(maildir(tmp_path, "alice")), str(maildir(tmp_path, "bob")))
    assert done.returncode == 0, done.stderr
    assert "deleted 1 messages" in done.stdout and not stale.exists()
    assert maildirsize(tmp_path, "alice")[2] == 1
    with smtp(gw.port) as client:
        assert client.sendmail("x@example.org", ["alice@localhost"], message("four")) == {}
    assert wait_for(lambda: len(inbox(tmp_path, "alice")) == 2 and gw.queue_ids() == [], timeout=10)
    assert maildirsize(tmp_path, "alice")[2] == 2
    missing = run("maildir", "expire", "--days", "2", "--folder", "Trash", str(maildir(tmp_path, "alice")))
    assert missing.returncode == 1 and "not a Maildir folder" in missing.stderr


def send_undeclared(port: int, sender: str, rcpt: str, data: bytes) -> None:
    """Send without SIZE= (smtplib's sendmail declares it), so RCPT cannot know the size."""
    with smtp(port) as client:
        client.ehlo()
        assert client.mail(sender)[0] == 250
        assert client.rcpt(rcpt)[0] == 250
        assert client.data(data)[0] == 250


def _queued_reply(policy: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "queue", "list", "--json", "--policy", str(policy)],
                         capture_output=True, text=True, timeout=60, env=env).stdout
    rows = json.loads(out)
    return rows[0]["recipients"][0].get("last_reply", "") if rows else ""


def test_over_quota_at_delivery_defers_or_bounces_by_policy(gateway_factory, tmp_path: Path) -> None:
    # The Maildir is below its quota at RCPT, but this message would take it over.
    policy = tmp_path / "defer.toml"
    policy.write_text(policy_text(tmp_path, 'users = { alice = { storage = "1KB" } }'))
    gw = gateway_factory(policy.read_text())
    send_undeclared(gw.port, "x@example.org", "alice@localhost", message("small"))
    assert wait_for(lambda: len(inbox(tmp_path, "alice")) == 1, timeout=10)
    send_undeclared(gw.port, "x@example.org", "alice@localhost", message("big", 2000))
    assert wait_for(lambda: _queued_reply(policy).startswith("452 4.2.2"), timeout=10)
    assert len(inbox(tmp_path, "alice")) == 1

    bounce_dir = tmp_path / "b"
    bounce_dir.mkdir()
    text = policy_text(bounce_dir, 'users = { alice = { storage = "1KB" } }\nover_quota = "bounce"')
    other = gateway_factory(text)
    send_undeclared(other.port, "bob@localhost", "alice@localhost", message("big", 2000))
    # A bounce to the (local) sender, with the quota's permanent status.
    assert wait_for(lambda: len(inbox(bounce_dir, "bob")) == 1, timeout=10)
    assert b"5.2.2" in inbox(bounce_dir, "bob")[0].read_bytes()
    assert inbox(bounce_dir, "alice") == []
    assert wait_for(lambda: other.queue_ids() == [], timeout=10)


def test_rcpt_quota_uses_the_declared_size(gateway_factory, tmp_path: Path) -> None:
    gw = gateway_factory(policy_text(tmp_path, 'default = { storage = "4KB" }'))
    with smtp(gw.port) as client:
        client.sendmail("x@example.org", ["alice@localhost"], message("one", 100))
    assert wait_for(lambda: len(inbox(tmp_path, "alice")) == 1 and gw.queue_ids() == [], timeout=10)
    with smtp(gw.port) as client:
        client.ehlo()
        client.mail("x@example.org", ["SIZE=10000"])
        code, text = client.rcpt("alice@localhost")
        assert (code, text.decode()[:5]) == R_FULL
        client.rset()
        client.mail("x@example.org", ["SIZE=1000"])
        assert client.rcpt("alice@localhost")[0] == 250
