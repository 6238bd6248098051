"""The gateway command as an operator runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from gateway.passwords import verify_password

ROOT = Path(__file__).resolve().parents[2]


def gateway(*args: str, stdin: str = "", cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args], input=stdin, capture_output=True,
        text=True, timeout=60, env=env, cwd=cwd,
    )


def test_check_accepts_the_shipped_policies() -> None:
    for policy in ("policies/default.toml", "policies/edge-relay.toml", "policies/examples/submission.toml"):
        result = gateway("check", str(ROOT / policy))
        assert result.returncode == 0, result.stderr
        assert "OK" in result.stdout
    embedded = gateway("check")
    assert embedded.returncode == 0
    assert "auth_users_file -> rcpt_relay -> rcpt_local_users -> queue_received_header" in embedded.stdout


def test_check_names_file_line_and_key(tmp_path: Path) -> None:
    policy = tmp_path / "broken.toml"
    policy.write_text('[server]\nhostname = "mx"\n\n[limits]\nmax_recipients = "many"\n')
    result = gateway("check", str(policy))
    assert result.returncode == 2
    assert f"{policy}:5: limits.max_recipients:" in result.stderr


def test_check_names_a_bad_plugin_setting(tmp_path: Path) -> None:
    policy = tmp_path / "broken.toml"
    policy.write_text('[[plugins]]\nname = "rcpt_relay"\n\n[[plugins]]\nname = "rcpt_local_users"\nrecipient_delimitr = "+"\n')
    result = gateway("check", str(policy))
    assert result.returncode == 2
    assert f"{policy}:6: plugins[1].recipient_delimitr:" in result.stderr


def test_run_refuses_an_invalid_policy(tmp_path: Path) -> None:
    policy = tmp_path / "broken.toml"
    policy.write_text("[[listeners]]\nname = 'a'\nport = 70000\n")
    result = gateway("run", "--policy", str(policy))
    assert result.returncode == 2
    assert f"{policy}:3: listeners[0].port:" in result.stderr


def test_passwd_makes_a_users_file_line() -> None:
    result = gateway("passwd", "alice", stdin="correct horse\n")
    assert result.returncode == 0
    login, _, hashed = result.stdout.strip().partition(":")
    assert login == "alice"
    assert verify_password("correct horse", hashed)
    assert not verify_password("wrong", hashed)


def test_check_warns_when_dane_only_cannot_believe_any_tlsa_record(tmp_path: Path) -> None:
    """dane-only without a trusted validating resolver would hold all mail to MX hosts."""
    def check(dns: str, delivery: str, routes: str = "") -> subprocess.CompletedProcess[str]:
        policy = tmp_path / "policy.toml"
        policy.write_text(f'[server]\nhostname = "mx.test"\n\n[dns]\n{dns}\n\n[delivery]\n{delivery}\n{routes}')
        result = gateway("check", str(policy))
        assert result.returncode == 0, result.stderr
        return result

    off = check('dnssec = "off"', 'dane = "dane-only"')
    assert '[delivery] dane: dane-only, but [dns] dnssec = "off": no TLSA record is believed' in off.stdout
    # auto believes loopback resolvers only (the tests' own DNS server stands for one on 127.0.0.1)
    remote = check('nameservers = ["192.0.2.53"]\ndnssec = "auto"', 'dane = "dane"',
                   '\n[[routes]]\ndomain = "bank.example"\ndane = "dane-only"\n')
    assert "route 'bank.example': dane-only, but [dns] dnssec = \"auto\" and not every nameserver" in remote.stdout
    for dns in ('nameservers = ["127.0.0.1:5353"]\ndnssec = "auto"', 'nameservers = ["192.0.2.53"]\ndnssec = "trusted"'):
        assert "dane-only" not in check(dns, 'dane = "dane-only"').stdout
    assert "warning" not in check('dnssec = "off"', 'dane = "dane"').stdout
