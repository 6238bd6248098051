"""Corpus mode: .eml files and an mbox through a policy, before any traffic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.dnsserver import DnsTestServer

ZONE = """
$TTL 300
test.                          IN SOA ns.test. hostmaster.test. 1 3600 600 86400 60
spam.example.dbl.test.         IN A   127.0.1.2
"""


def message(n: int, body: str) -> bytes:
    return (f"From: Sender {n} <s{n}@example.org>\nTo: bob@localhost\nSubject: {n}\n"
            f"Message-ID: <{n}@example.org>\n\n{body}\n").encode()


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsTestServer]:
    with DnsTestServer(ZONE) as server:
        yield server


def policy(tmp_path: Path, dns_port: int) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(f"""
[server]
hostname = "mx.test.example"

[local]
domains = ["localhost"]
users = ["postmaster", "bob"]

[dns]
nameservers = ["127.0.0.1:{dns_port}"]
timeout = "2s"

[[plugins]]
name = "connect_dnsbl"
[[plugins.zones]]
zone = "dbl.test"
type = "domain"
targets = ["body"]

[[plugins]]
name = "rcpt_local_users"
""")
    return path


def replay(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[3]))
    return subprocess.run([sys.executable, "-m", "gateway.cli", "replay", "--corpus", *args],
                          capture_output=True, text=True, timeout=60, env=env)


def test_a_spam_directory_and_a_ham_mbox_against_their_expectations(tmp_path, dns) -> None:
    spam = tmp_path / "spam"
    spam.mkdir()
    for n in range(3):
        (spam / f"{n}.eml").write_bytes(message(n, f"Buy now: http://spam.example/offer/{n}"))
    ham = tmp_path / "ham.mbox"
    ham.write_bytes(b"".join(
        b"From s%d@example.org Sat Dec  5 10:00:00 2026\n" % n + message(n, "See you at lunch.") + b"\n"
        for n in range(10, 12)
    ))
    rules = policy(tmp_path, dns.port)

    run = replay("--policy", str(rules), "--to", "bob@localhost", "--expect", "refused", "--json", str(spam))
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(run.stdout)
    assert result["totals"]["messages"] == 3 and result["totals"]["outcomes"] == {"reject": 3}
    (group,) = result["groups"]
    assert (group["change"], group["plugin"], group["messages"]) == ("reject", "connect_dnsbl", 3)
    assert "dbl.test" in group["reason"]
    first = result["messages"][0]
    assert first["where"] == f"{spam / '0.eml'}#1" and first["from"] == "s0@example.org" and first["old"] is None

    run = replay("--policy", str(rules), "--to", "bob@localhost", "--expect", "accepted", str(ham))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 messages" in run.stdout

    # The mbox counted as spam: both messages are misses, and the exit status says so.
    run = replay("--policy", str(rules), "--to", "bob@localhost", "--expect", "refused", str(ham), str(spam))
    assert run.returncode == 1
    assert f"{ham}#1" in run.stdout and f"{ham}#2" in run.stdout
