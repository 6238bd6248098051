"""`gateway queue` against a running gateway: list, stat, hold, release, retry, delete."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import smtp, wait_for

ROOT = Path(__file__).resolve().parents[2]


def policy_text(tmp: Path) -> str:
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
[relay]
clients = ["127.0.0.0/8"]
[delivery]
# Long waits: only the commands can make things happen quickly.
retry_base = "1h"
poll_interval = "1h"
[[plugins]]
name = "rcpt_relay"
[[plugins]]
name = "rcpt_local_users"
"""


def cli(policy: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "queue", *args, "--policy", str(policy)],
        capture_output=True, text=True, timeout=60, env=env,
    )


def inbox(tmp: Path, user: str) -> list[Path]:
    new = tmp / "mail" / user / "Maildir" / "new"
    return list(new.iterdir()) if new.exists() else []


def test_queue_commands_on_a_running_gateway(gateway_factory, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_text(tmp_path))
    home = tmp_path / "mail" / "alice"
    home.mkdir(parents=True)
    dot = home / ".qmail"
    dot.write_text("|exit 111\n")  # alice's mail is deferred for now
    gw = gateway_factory(policy.read_text())
    with smtp(gw.port) as client:
        client.sendmail("a@example.org", ["alice@localhost"], b"Subject: one\r\n\r\nx\r\n")
        client.sendmail("a@example.org", ["alice@localhost"], b"Subject: two\r\n\r\nx\r\n")

    def deferred() -> list[dict]:
        rows = json.loads(cli(policy, "list", "--json").stdout)
        return [r for r in rows if r["recipients"][0].get("last_reply", "").startswith("451")]

    assert wait_for(lambda: len(deferred()) == 2, timeout=10)
    first, second = sorted(r["id"] for r in deferred())
    stat = json.loads(cli(policy, "stat", "--json").stdout)
    assert stat["messages"] == 2 and stat["recipients_pending"] == 2

    assert cli(policy, "hold", first).returncode == 0
    assert json.loads(cli(policy, "list", "--json").stdout)[0]["held"] is True
    dot.write_text("./Maildir/\n")
    dot.chmod(0o644)
    # retry wakes the scheduler at once (the trigger FIFO), but a held message waits.
    assert cli(policy, "retry", second).returncode == 0
    assert wait_for(lambda: len(inbox(tmp_path, "alice")) == 1, timeout=10)
    assert wait_for(lambda: gw.queue_ids() == [first], timeout=5)  # removal follows the Maildir link
    assert cli(policy, "release", first).returncode == 0
    assert wait_for(lambda: len(inbox(tmp_path, "alice")) == 2, timeout=10)
    assert wait_for(lambda: gw.queue_ids() == [], timeout=5)


def test_delete_and_show(gateway_factory, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_text(tmp_path).replace('retry_base = "1h"', 'enabled = false'))
    gw = gateway_factory(policy.read_text())
    with smtp(gw.port) as client:
        client.sendmail("a@example.org", ["bob@localhost"], b"Subject: keep\r\n\r\nx\r\n")
        client.sendmail("list@localhost", ["bob@localhost"], b"Subject: list\r\n\r\nx\r\n", mail_options=["XVERP"])
    listed = cli(policy, "list").stdout
    assert listed.count(" verp=-=") == 1 and "<list@localhost> verp=-=" in listed
    rows = {r["sender"]: r for r in json.loads(cli(policy, "list", "--json").stdout)}
    assert rows["list@localhost"]["verp"] == "-=" and rows["a@example.org"]["verp"] is None
    qid = rows["a@example.org"]["id"]
    assert cli(policy, "delete", rows["list@localhost"]["id"]).returncode == 0
    shown = cli(policy, "show", qid)
    assert "Subject: keep" in shown.stdout
    assert cli(policy, "delete", qid).returncode == 0
    assert gw.queue_ids() == []
    missing = cli(policy, "delete", qid)
    assert missing.returncode == 1 and "no message" in missing.stderr


def test_a_damaged_file_does_not_stop_list_stat_or_retry(tmp_path: Path) -> None:
    """A right-size queue file whose envelope does not parse is skipped with one line
    naming it (the gateway moves it to corrupt/), not a traceback instead of the list."""
    import asyncio

    from gateway.model import Envelope, Message, QueuedRecipient
    from gateway.queue import QueueStore

    policy = tmp_path / "policy.toml"
    policy.write_text(policy_text(tmp_path))
    store = QueueStore(tmp_path / "queue")
    store.open()
    good, bad = store.new_id(), store.new_id()

    async def fill() -> None:
        for qid in (good, bad):
            env = Envelope(sender="a@example.org", recipients=[QueuedRecipient("alice@localhost")])
            await store.commit(qid, env, Message(b"Subject: s\r\n\r\nbody\r\n"))
        await store.close()

    asyncio.run(fill())
    path = tmp_path / "queue" / "msg" / bad
    head, rest = path.read_bytes().split(b"\n", 1)
    length = int(head.split()[1])
    path.write_bytes(head + b"\n" + b"x" * length + rest[length:])  # same size, not JSON

    listed = cli(policy, "list", "--json")
    assert listed.returncode == 0 and [row["id"] for row in json.loads(listed.stdout)] == [good]
    assert bad in listed.stderr and "damaged" in listed.stderr and "Traceback" not in listed.stderr
    stat = cli(policy, "stat", "--json")
    assert stat.returncode == 0 and json.loads(stat.stdout)["messages"] == 1
    retried = cli(policy, "retry")
    assert retried.returncode == 0 and bad in retried.stderr and "Traceback" not in retried.stderr
    held = cli(policy, "hold", bad)
    assert held.returncode == 1 and "damaged" in held.stderr and "Traceback" not in held.stderr
