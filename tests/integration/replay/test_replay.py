"""Replay: sessions recorded from a running gateway, run through changed policies.

A gateway with a DNS list (``bl.test``, reject) and a scoring list (``sc.test``, 3
points) captures five sessions over real SMTP, with answers from a real DNS server on
loopback. Then the server's zones change (``bl.test`` and ``sc.test`` list nobody any
more), so a replay that asked the live server instead of the record would see other
answers. Each test changes the policy and checks the exact differences reported.
"""

from __future__ import annotations

import asyncio
import json
import os
import smtplib
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from gateway import capture
from gateway.hooks import discover_plugins
from gateway.policy import load_policy_text
from gateway.app import registry
from gateway.replay.run import replay_capture
from gateway.testing import running_gateway
from tests.conftest import MESSAGE, wait_for
from tests.dnsserver import DnsTestServer

ZONE = """
$TTL 300
test.                  IN SOA ns.test. hostmaster.test. 1 3600 600 86400 60
1.0.0.127.bl.test.     IN A   127.0.0.2
2.0.0.127.sc.test.     IN A   127.0.0.2
3.0.0.127.bl2.test.    IN A   127.0.0.2
"""
# After the capture: the lists the old policy used list nobody.
LATER_ZONE = """
$TTL 300
test.                  IN SOA ns.test. hostmaster.test. 1 3600 600 86400 60
3.0.0.127.bl2.test.    IN A   127.0.0.2
"""


def policy(dns_port: int, *, zones: str = "", mode: str = "enforce", extra: str = "", capture_on: bool = False) -> str:
    return f"""
[server]
hostname = "mx.test.example"

[[listeners]]
name = "smtp"
address = "127.0.0.1"
port = 2525

[local]
domains = ["localhost"]
users = ["postmaster", "alice", "bob"]

[delivery]
enabled = false

[dns]
nameservers = ["127.0.0.1:{dns_port}"]
timeout = "2s"

[capture]
enabled = {"true" if capture_on else "false"}
{extra}

[[plugins]]
name = "connect_dnsbl"
mode = "{mode}"
[[plugins.zones]]
zone = "bl.test"
[[plugins.zones]]
zone = "sc.test"
action = "score"
score = 3.0
{zones}

[[plugins]]
name = "rcpt_relay"
[[plugins]]
name = "rcpt_local_users"
[[plugins]]
name = "queue_received_header"
"""


def send(port: int, source: str, recipients: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test.example", timeout=10,
                      source_address=(source, 0)) as c:
        try:
            c.sendmail("sender@example.org", recipients, MESSAGE)
        except smtplib.SMTPRecipientsRefused:
            pass


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsTestServer]:
    with DnsTestServer(ZONE) as server:
        yield server


@pytest.fixture(scope="module")
def recorded(dns: DnsTestServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The capture directory of five real sessions; the DNS server changed since."""
    workdir = tmp_path_factory.mktemp("capture")
    with running_gateway(policy(dns.port, capture_on=True), workdir) as gw:
        send(gw.port, "127.0.0.1", ["alice@localhost"])                      # A: refused, listed
        send(gw.port, "127.0.0.1", ["postmaster@localhost", "alice@localhost"])  # B: postmaster only
        send(gw.port, "127.0.0.2", ["bob@localhost"])                        # C: accepted, score 3
        send(gw.port, "127.0.0.3", ["bob@localhost"])                        # D: accepted
        send(gw.port, "127.0.0.3", ["alice@localhost"])                      # E: accepted (DNS cached)
        directory = Path(gw.policy.server.var_dir) / "capture"
        assert wait_for(lambda: capture.flush() and directory.is_dir() and sum(
            len(p.read_text().splitlines()) for p in directory.glob("*.jsonl")) == 5)
    dns.set_zone(LATER_ZONE)
    return directory


def replay(text: str, recorded: Path, **options: Any) -> dict[str, Any]:
    specs = discover_plugins()
    new = load_policy_text(text, source="new.toml", registry=registry(specs))
    report = asyncio.run(replay_capture(new, specs, [recorded], **options))
    return report.to_dict()


def summary(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(client's message, change, new action, plugin) of each reported message."""
    return sorted((m["to"][-1], m["change"], m["new"]["action"], m["new"]["plugin"] or m["old"]["plugin"])
                  for m in result["messages"])


def test_the_same_policy_changes_nothing_with_the_recorded_answers(recorded, dns) -> None:
    result = replay(policy(dns.port), recorded)
    assert result["messages"] == [] and result["damaged"] == []
    totals = result["totals"]
    assert totals["messages"] == 5 and totals["unchanged"] == 5
    assert totals["outcomes"] == {"reject": 1, "accept": 4}
    assert result["dns_not_in_record"] == []


def test_live_dns_would_see_todays_lists(recorded, dns) -> None:
    result = replay(policy(dns.port), recorded, dns="live")
    assert result["totals"]["newly_accepted"] == 1  # A: bl.test no longer lists 127.0.0.1


def test_a_lowered_threshold_refuses_exactly_the_scored_message(recorded, dns) -> None:
    result = replay(policy(dns.port, extra="[scoring]\nreject = 2.0\n"), recorded)
    assert summary(result) == [("bob@localhost", "newly refused", "reject", "scoring")]
    (group,) = result["groups"]
    assert group["plugin"] == "scoring" and group["reason"].startswith("score 3.0 >= 2")
    (message,) = result["messages"]
    assert message["old"]["action"] == "accept" and message["old"]["score"] == 3.0
    totals = result["totals"]
    assert (totals["newly_refused"], totals["newly_accepted"], totals["other_changes"]) == (1, 0, 0)


def test_a_plugin_moved_to_observe_accepts_what_it_refused(recorded, dns) -> None:
    result = replay(policy(dns.port, mode="observe"), recorded)
    assert summary(result) == [
        ("alice@localhost", "changed", "accept", "connect_dnsbl"),  # B: alice accepted too
        ("alice@localhost", "newly accepted", "no message", "connect_dnsbl"),  # A: no message recorded
    ]
    changed = next(m for m in result["messages"] if m["change"] == "changed")
    assert changed["old"]["accepted"] == ["postmaster@localhost"]
    assert changed["new"]["accepted"] == ["postmaster@localhost", "alice@localhost"]
    assert {g["plugin"] for g in result["groups"]} == {"connect_dnsbl"}


def test_an_added_zone_needs_its_answers_live_and_keeps_the_recorded_ones(recorded, dns) -> None:
    zone = '[[plugins.zones]]\nzone = "bl2.test"\n'
    only_record = replay(policy(dns.port, zones=zone), recorded)
    assert only_record["messages"] == []
    assert only_record["dns_not_in_record"] == [f"{n}.0.0.127.bl2.test A" for n in (1, 2, 3)]

    result = replay(policy(dns.port, zones=zone), recorded, dns="record+live")
    # D and E (127.0.0.3) are listed at bl2.test; A stays refused by the recorded bl.test
    # answer although the live bl.test lists nobody now.
    assert summary(result) == [
        ("alice@localhost", "newly refused", "reject", "connect_dnsbl"),
        ("bob@localhost", "newly refused", "reject", "connect_dnsbl"),
    ]
    assert all("bl2.test" in m["new"]["reason"] for m in result["messages"])
    assert result["totals"]["outcomes"] == {"reject": 3, "accept": 2}


def test_a_damaged_or_cut_capture_names_the_record_and_replays_the_rest(recorded, dns, tmp_path) -> None:
    (source,) = sorted(recorded.glob("*.jsonl"))
    lines = source.read_bytes().splitlines(keepends=True)
    damaged = tmp_path / "capture.jsonl"
    damaged.write_bytes(lines[0] + b'{"v":1,"session":"S-broken","client":\n' + b"".join(lines[1:]) + lines[2][:40])
    new = tmp_path / "new.toml"
    new.write_text(policy(dns.port, extra="[scoring]\nreject = 2.0\n"))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[3]))
    run = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "replay", "--policy", str(new), "--json", str(damaged)],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert run.returncode == 1, run.stderr  # a newly refused message fails the gate
    result = json.loads(run.stdout)
    assert result["totals"]["messages"] == 5 and result["totals"]["newly_refused"] == 1
    assert result["damaged"] == [
        f"{damaged}:2: record 2 (session S-broken) is damaged: bad JSON at byte 38 (Expecting value)",
        f"{damaged}:7: record 7 is cut short (40 bytes, no end of line)",
    ]
    assert f"{damaged}:2: record 2 (session S-broken) is damaged" in run.stderr

    gate = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "replay", "--policy", str(new), "--fail-on", "none", str(damaged)],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert gate.returncode == 3  # no gate, but records were passed over
    assert "1 newly refused" in gate.stdout and "Damaged record, not replayed" in gate.stdout


def test_greylisting_replays_against_fresh_state_never_the_real_one(recorded, dns, tmp_path) -> None:
    real = tmp_path / "real-state.sqlite3"
    greylist = f'\n[[plugins]]\nname = "rcpt_greylist"\nstate = "sqlite://{real}"\n'
    text = policy(dns.port).replace('[[plugins]]\nname = "rcpt_relay"', greylist + '[[plugins]]\nname = "rcpt_relay"')
    result = replay(text, recorded)
    # First contact for every triplet: C, D and E, accepted before, are deferred now (A
    # and B's alice are refused by the DNS list first; postmaster is exempt).
    assert sorted((m["to"][-1], m["change"], m["new"]["action"], m["new"]["plugin"]) for m in result["messages"]) == [
        ("alice@localhost", "newly refused", "tempfail", "rcpt_greylist"),
        ("bob@localhost", "newly refused", "tempfail", "rcpt_greylist"),
        ("bob@localhost", "newly refused", "tempfail", "rcpt_greylist"),
    ]
    assert not real.exists()


def test_a_session_whose_lookups_a_plugin_cache_spared_replays_from_earlier_answers(recorded, dns) -> None:
    records = [json.loads(line) for p in sorted(recorded.glob("*.jsonl")) for line in p.read_text().splitlines()]
    last = records[-1]  # E: 127.0.0.3 again, connect_dnsbl answered from its cache
    assert last["client"] == "127.0.0.3" and last["dns"] == []
    # Without a cache in the replay too, E's lookups come from D's answers in the record.
    uncached = policy(dns.port).replace('mode = "enforce"', 'mode = "enforce"\ncache_size = 0')
    result = replay(uncached, recorded)
    assert result["dns_not_in_record"] == [] and result["messages"] == []


def test_a_changed_score_is_a_score_shift_not_a_change_of_outcome(recorded, dns) -> None:
    text = policy(dns.port).replace("score = 3.0", "score = 5.5")
    result = replay(text, recorded)
    totals = result["totals"]
    assert (totals["newly_refused"], totals["newly_accepted"], totals["other_changes"]) == (0, 0, 0)
    assert (totals["score_shifts"], totals["score_shift_mean"]) == (1, 2.5)
    assert result["groups"] == []
    (message,) = result["messages"]
    assert (message["change"], message["old"]["score"], message["new"]["score"]) == ("score", 3.0, 5.5)
