"""`gateway queue export` from a running gateway and `import` into a second one:
every recipient is delivered exactly once, counted at a real receiving SMTP server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from tests.conftest import MESSAGE, smtp, wait_for
from tests.smtppeer import SmtpPeer

ROOT = Path(__file__).resolve().parents[2]
PEER = "peer.test.example"


def policy_text(tmp: Path, name: str, peer_port: int, *, hold: bool) -> str:
    return f"""
[server]
hostname = "{name}.test.example"
queue_dir = "{tmp / name / 'queue'}"
var_dir = "{tmp / name / 'var'}"
[[listeners]]
name = "smtp"
tls = "none"
[local]
domains = ["localhost"]
users = ["postmaster", "alice"]
mail_root = "{tmp / name / 'mail'}"
[relay]
domains = ["{PEER}"]
[delivery]
retry_base = "100ms"
retry_max = "200ms"
poll_interval = "200ms"
[[routes]]
domain = "{PEER}"
host = "127.0.0.1"
port = {peer_port}
tls = "none"
hold = {str(hold).lower()}
[[plugins]]
name = "rcpt_relay"
[[plugins]]
name = "rcpt_local_users"
"""


def cli(policy: Path, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "queue", *args, "--policy", str(policy)],
        capture_output=True, timeout=60, env=env, input=stdin,
    )


def inbox(tmp: Path, name: str, user: str) -> list[Path]:
    new = tmp / name / "mail" / user / "Maildir" / "new"
    return list(new.iterdir()) if new.exists() else []


def delivered(peer: SmtpPeer) -> list[str]:
    return sorted(r for m in peer.messages for r in m.rcpt_tos)


def rows(policy: Path) -> list[dict]:
    return json.loads(cli(policy, "list", "--json").stdout)


def test_export_move_then_import_delivers_each_recipient_once(gateway_factory, tmp_path: Path) -> None:
    with SmtpPeer() as peer:
        source_policy = tmp_path / "a.toml"
        source_policy.write_text(policy_text(tmp_path, "a", peer.port, hold=True))
        target_policy = tmp_path / "b.toml"
        target_policy.write_text(policy_text(tmp_path, "b", peer.port, hold=False))
        source = gateway_factory(source_policy.read_text())
        with smtp(source.port) as client:
            client.sendmail("x@example.org", ["alice@localhost", f"carol@{PEER}"], MESSAGE)
            client.sendmail("x@example.org", [f"dave@{PEER}"], MESSAGE)
        # alice is delivered on the source; carol and dave wait on the held route.
        assert wait_for(lambda: len(inbox(tmp_path, "a", "alice")) == 1, timeout=10)
        assert wait_for(lambda: [r["state"] for m in rows(source_policy) for r in m["recipients"]]
                        == ["delivered", "held", "held"], timeout=10)

        export = tmp_path / "queue.tar"
        done = cli(source_policy, "export", "--move", str(export))
        assert done.returncode == 0, done.stderr
        assert source.queue_ids() == []  # moved out of the running source
        with tarfile.open(export) as tar:
            names = tar.getnames()
        assert names[0] == "GATEWAY-QUEUE" and sum(n.startswith("msg/") for n in names) == 2

        target = gateway_factory(target_policy.read_text())
        loaded = cli(target_policy, "import", str(export))
        assert loaded.returncode == 0, loaded.stderr
        assert loaded.stdout.count(b": imported") == 2
        assert wait_for(lambda: delivered(peer) == [f"carol@{PEER}", f"dave@{PEER}"], timeout=10)
        assert wait_for(lambda: target.queue_ids() == [], timeout=10)
        # alice's delivery was recorded before the export: not delivered again.
        assert inbox(tmp_path, "b", "alice") == []

        # The same export again (from standard input): recognised, nothing delivered twice.
        again = cli(target_policy, "import", "-", stdin=export.read_bytes())
        assert again.returncode == 0 and again.stdout.count(b"already here, skipped") == 2
        assert target.queue_ids() == []
        assert delivered(peer) == [f"carol@{PEER}", f"dave@{PEER}"]
        assert inbox(tmp_path, "b", "alice") == []


def test_export_holds_by_default_and_import_skips_what_is_queued(gateway_factory, tmp_path: Path) -> None:
    source_policy = tmp_path / "a.toml"
    source_policy.write_text(policy_text(tmp_path, "a", 9, hold=False).replace("[delivery]", "[delivery]\nenabled = false"))
    source = gateway_factory(source_policy.read_text())
    with smtp(source.port) as client:
        client.sendmail("x@example.org", [f"erin@{PEER}"], MESSAGE)
    (qid,) = source.queue_ids()
    stream = cli(source_policy, "export")  # to standard output, --hold by default
    assert stream.returncode == 0 and b"held here" in stream.stderr
    assert [m["held"] for m in rows(source_policy)] == [True]
    # Importing into the very queue it came from: the message is already there.
    again = cli(source_policy, "import", "-", stdin=stream.stdout)
    assert again.returncode == 0 and b"already here" in again.stdout
    assert source.queue_ids() == [qid]
    # A stream that is not an export is refused, nothing imported.
    bad = cli(source_policy, "import", "-", stdin=b"not a tar stream")
    assert bad.returncode == 1 and b"bad export stream" in bad.stderr
