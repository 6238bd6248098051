"""``gateway quarantine`` as an operator runs it, on a real gateway's quarantine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

from gateway.hooks import hookimpl
from gateway.testing import RunningGateway
from gateway.verdicts import Verdict
from tests.conftest import MESSAGE, plugin_specs, smtp, wait_for
from tests.localmail import local_policy, messages

ROOT = Path(__file__).resolve().parents[2]

POLICY = local_policy("data_hold")


def _hold(message):  # type: ignore[no-untyped-def]
    if b"hold me" in message.raw:
        return Verdict.quarantine("looks suspicious")
    return None


def _hold_plugin() -> types.ModuleType:
    mod = types.ModuleType("data_hold")

    @dataclass(frozen=True)
    class Settings:
        pass

    mod.Settings = Settings  # type: ignore[attr-defined]
    mod.gateway_data = hookimpl(_hold)  # type: ignore[attr-defined]
    return mod


def start(gateway_factory) -> RunningGateway:  # type: ignore[no-untyped-def]
    gw: RunningGateway = gateway_factory(POLICY, specs=plugin_specs(data_hold=_hold_plugin()))
    return gw


def send(gw: RunningGateway, data: bytes) -> None:
    with smtp(gw.port) as client:
        assert client.sendmail("sender@example.org", ["alice@localhost"], data) == {}


def gateway_cli(gw: RunningGateway, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    policy = tmp_path / "cli-policy.toml"
    policy.write_text(f'[server]\nqueue_dir = "{gw.policy.server.queue_dir}"\n')
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "quarantine", *args, "--policy", str(policy)],
        capture_output=True, text=True, timeout=60, env=env,
    )


def held_message(tag: str) -> bytes:
    return MESSAGE.replace(b"Hello, world.", f"Please hold me ({tag}).".encode())


def test_list_shows_held_messages_with_their_reason(gateway_factory, tmp_path: Path) -> None:
    gw = start(gateway_factory)
    send(gw, held_message("one"))
    send(gw, MESSAGE)  # not held: delivered normally
    (qid,) = gw.queue_ids("quarantine")

    listing = gateway_cli(gw, tmp_path, "list")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].startswith(qid) and lines[0].endswith("<sender@example.org>  data_hold: looks suspicious")
    assert lines[1].strip() == "<alice@localhost>"

    as_json = gateway_cli(gw, tmp_path, "list", "--json")
    (row,) = json.loads(as_json.stdout)
    assert row["id"] == qid and row["reason"] == "data_hold: looks suspicious"
    assert row["recipients"] == ["alice@localhost"] and row["size"] == len(gw.queue.read_message(qid, "quarantine"))


def test_show_prints_the_reason_then_the_message(gateway_factory, tmp_path: Path) -> None:
    gw = start(gateway_factory)
    send(gw, held_message("show"))
    (qid,) = gw.queue_ids("quarantine")
    stored = gw.queue.read_message(qid, "quarantine")

    shown = gateway_cli(gw, tmp_path, "show", qid)
    assert shown.returncode == 0, shown.stderr
    head, _, rest = shown.stdout.partition("\n\n")
    assert f"Queue-ID: {qid}" in head and "Reason: data_hold: looks suspicious" in head
    assert "Recipient: <alice@localhost>" in head
    assert rest.encode() == stored.replace(b"\r\n", b"\n")  # text mode reads CRLF as LF

    raw = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "quarantine", "show", qid, "--raw", "--policy",
         str(tmp_path / "cli-policy.toml")],
        capture_output=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert raw.stdout == stored


def test_release_delivers_the_message_untouched(gateway_factory, tmp_path: Path) -> None:
    gw = start(gateway_factory)
    send(gw, held_message("release"))
    (qid,) = gw.queue_ids("quarantine")
    stored = gw.queue.read_message(qid, "quarantine")
    assert messages(gw, "alice") == []

    released = gateway_cli(gw, tmp_path, "release", qid)
    assert released.returncode == 0, released.stderr
    assert gw.queue_ids("quarantine") == []
    # The running gateway's scheduler finds it at its next poll and delivers it.
    assert wait_for(lambda: len(messages(gw, "alice")) == 1, timeout=10)
    (delivered,) = messages(gw, "alice")
    assert delivered.endswith(stored)
    assert wait_for(lambda: gw.queue_ids() == [], timeout=5)


def test_delete_removes_the_message(gateway_factory, tmp_path: Path) -> None:
    gw = start(gateway_factory)
    send(gw, held_message("delete"))
    (qid,) = gw.queue_ids("quarantine")

    deleted = gateway_cli(gw, tmp_path, "delete", qid)
    assert deleted.returncode == 0, deleted.stderr
    assert gw.queue_ids("quarantine") == [] and gw.queue_ids() == []
    assert gateway_cli(gw, tmp_path, "list").stdout == ""


def test_unknown_or_malformed_ids_are_refused(gateway_factory, tmp_path: Path) -> None:
    gw = start(gateway_factory)
    for action in ("show", "release", "delete"):
        missing = gateway_cli(gw, tmp_path, action, "0123456789ABCDEF")
        assert missing.returncode == 1 and "no quarantined message 0123456789ABCDEF" in missing.stderr
    bad = gateway_cli(gw, tmp_path, "release", "../msg/x")
    assert bad.returncode == 2 and "malformed queue id" in bad.stderr
