"""``gateway explain``: who decides what about a message, with nothing queued."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

from gateway.app import registry
from gateway.explain import explain
from gateway.hooks import hookimpl
from gateway.policy import load_policy_text
from gateway.verdicts import Reply, Verdict
from tests.conftest import plugin_specs

ROOT = Path(__file__).resolve().parents[2]

MESSAGE = b"From: a@example.org\nTo: alice@localhost\nSubject: hello\n\nHello, Alice.\n"


def policy_text(tmp_path: Path, extra: str = "", relay_mode: str = "enforce", port: int = 2525) -> str:
    return f"""
[server]
hostname = "mx.test.example"
queue_dir = "{tmp_path / 'queue'}"
var_dir = "{tmp_path / 'var'}"

[[listeners]]
name = "smtp"
address = "127.0.0.1"
port = {port}
tls = "none"

[local]
domains = ["localhost"]
users = ["postmaster", "alice"]

[dns]
nameservers = ["127.0.0.1:1"]
timeout = "500ms"

[[plugins]]
name = "rcpt_relay"
mode = "{relay_mode}"
[[plugins]]
name = "rcpt_local_users"
[[plugins]]
name = "queue_received_header"
{extra}
"""


def run_explain(
    tmp_path: Path, *args: str, relay_mode: str = "enforce", port: int = 2525
) -> subprocess.CompletedProcess[str]:
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_text(tmp_path, relay_mode=relay_mode, port=port))
    message = tmp_path / "message.eml"
    message.write_bytes(MESSAGE)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "explain", "--policy", str(policy), str(message), *args],
        capture_output=True, text=True, timeout=60, env=env,
    )


def stage_lines(text: str, header: str) -> list[str]:
    """The lines of one stage of the text output, its header line first."""
    lines = text.splitlines()
    start = lines.index(header)
    end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i].startswith(" ")), len(lines))
    return lines[start:end]


def test_relay_denied_at_rcpt_local_user_accepted_nothing_queued(tmp_path: Path) -> None:
    # The listener's port is held here: explain must not need it.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        result = run_explain(
            tmp_path, "--client-ip", "192.0.2.7", "--helo", "mail.example.org", "--from", "a@example.org",
            "--to", "x@remote.example", "--to", "alice@localhost", port=held.getsockname()[1],
        )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    relay = stage_lines(out, "rcpt <x@remote.example>")
    assert "rcpt_relay" in relay[1] and "reject: 550 5.7.1 Relay access denied (relay to remote.example denied)" in relay[1]
    assert relay[-1] == "  => 550 5.7.1 Relay access denied  [by rcpt_relay]"
    local = stage_lines(out, "rcpt <alice@localhost>")
    assert "rcpt_relay" in local[1] and "no opinion" in local[1]
    assert "rcpt_local_users" in local[2] and "accept" in local[2] and "(local user)" in local[2]
    assert local[-1] == "  => 250 2.1.5 Recipient OK  [by rcpt_local_users]"
    assert "Headers that would be added:\n  Received: from mail.example.org ([192.0.2.7])" in out
    assert "Result: would go to the queue for <alice@localhost> (score 0). Nothing was queued." in out
    assert not (tmp_path / "queue").exists()


def test_observe_mode_shows_what_the_plugin_would_have_done(tmp_path: Path) -> None:
    result = run_explain(
        tmp_path, "--client-ip", "192.0.2.7", "--from", "a@example.org", "--to", "x@remote.example",
        "--json", relay_mode="observe",
    )
    assert result.returncode == 1  # nobody accepted the only recipient: refused
    data = json.loads(result.stdout)
    rcpt = next(s for s in data["stages"] if s["name"] == "rcpt")
    relay = rcpt["steps"][0]
    assert (relay["plugin"], relay["outcome"], relay["observe"]) == ("rcpt_relay", "reject", True)
    assert relay["reply"] == "550 5.7.1 Relay access denied"
    assert rcpt["decided_by"] == "default-deny"
    assert rcpt["answer"] == "550 5.7.1 Recipient not accepted"
    assert data["queued"] is False
    text = run_explain(
        tmp_path, "--client-ip", "192.0.2.7", "--from", "a@example.org", "--to", "x@remote.example",
        relay_mode="observe",
    ).stdout
    assert "(observe) would reject: 550 5.7.1 Relay access denied" in text
    assert "Result: refused; nothing would be queued." in text


def test_relay_client_and_bad_arguments(tmp_path: Path) -> None:
    authenticated = run_explain(
        tmp_path, "--client-ip", "192.0.2.7", "--auth-user", "alice", "--from", "alice@localhost",
        "--to", "x@remote.example",
    )
    assert authenticated.returncode == 0
    assert "accept: 250 2.0.0 OK (authenticated)" in authenticated.stdout
    bad = run_explain(tmp_path, "--client-ip", "192.0.2.7", "--from", "a@example.org", "--to", "not an address")
    assert bad.returncode == 2 and "gateway:" in bad.stderr
    unknown = run_explain(
        tmp_path, "--client-ip", "192.0.2.7", "--from", "a@example.org", "--to", "alice@localhost", "--listener", "nope"
    )
    assert unknown.returncode == 2 and "no listener named 'nope'" in unknown.stderr


# -- the library with test plugins: data verdicts, results, scoring, added headers ------


def make_plugin(name: str, **hooks: object) -> types.ModuleType:
    mod = types.ModuleType(name)

    @dataclass(frozen=True)
    class Settings:
        score: float = 0.0

    mod.Settings = Settings  # type: ignore[attr-defined]
    for hook, fn in hooks.items():
        setattr(mod, hook, hookimpl(fn))
    return mod


def spammy(txn, settings):
    txn.results.add("data_spammy", settings.score, "looks spammy")


def tag(message):
    message.prepend_header("X-Tag", "seen")


def broken(message):
    raise RuntimeError("scanner exploded")


def run_library(tmp_path: Path, extra: str, **plugins: types.ModuleType):
    specs = plugin_specs(**plugins)
    policy = load_policy_text(policy_text(tmp_path, extra), source="test.toml", registry=registry(specs))
    return asyncio.run(explain(
        policy, specs, message=MESSAGE, client_ip="192.0.2.7", sender="a@example.org",
        recipients=["alice@localhost"],
    ))


def test_scores_and_headers_are_shown_and_scoring_decides(tmp_path: Path) -> None:
    plugins = {
        "data_spammy": make_plugin("data_spammy", gateway_data=spammy),
        "queue_tag": make_plugin("queue_tag", gateway_queue=tag),
    }
    chain = '[[plugins]]\nname = "data_spammy"\nscore = 4.0\n[[plugins]]\nname = "queue_tag"\n'
    passed = run_library(tmp_path, chain + "[scoring]\nreject = 5.0\n", **plugins)
    data = next(s for s in passed.stages if s.name == "data")
    assert data.steps[0].results == [{"plugin": "data_spammy", "score": 4.0, "reason": "looks spammy"}]
    scoring = next(s for s in passed.stages if s.name == "scoring")
    assert scoring.subject == "total 4 (reject at 5)" and scoring.steps == []
    assert passed.queued and passed.score == 4.0
    assert "X-Tag: seen" in passed.added_headers
    assert any(h.startswith("Received: from [192.0.2.7]") for h in passed.added_headers)

    refused = run_library(tmp_path, chain + "[scoring]\nreject = 3.0\n", **plugins)
    scoring = next(s for s in refused.stages if s.name == "scoring")
    assert [(s.plugin, s.outcome) for s in scoring.steps] == [("scoring", "reject")]
    assert scoring.answer == "550 5.7.1 Message rejected as spam"
    assert not refused.queued
    assert all(s.name != "queue" for s in refused.stages)


def test_a_failing_plugin_is_shown_with_its_error(tmp_path: Path) -> None:
    chain = '[[plugins]]\nname = "data_broken"\n'
    result = run_library(tmp_path, chain, data_broken=make_plugin("data_broken", gateway_data=broken))
    data = next(s for s in result.stages if s.name == "data")
    step = data.steps[0]
    assert (step.plugin, step.outcome) == ("data_broken", "tempfail")
    assert step.reply.startswith("451 4.3.0")
    assert any("scanner exploded" in line for line in step.log)
    assert not result.queued
