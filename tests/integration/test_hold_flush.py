"""Held routes for sites on intermittent connections: ETRN (RFC 1985) and
`gateway queue flush` release the held mail, through a running gateway, to a real
receiving SMTP server on loopback."""

from __future__ import annotations

import json
import os
import smtplib
import subprocess
import sys
from pathlib import Path

from tests.conftest import MESSAGE, smtp, wait_for
from tests.smtppeer import SmtpPeer

ROOT = Path(__file__).resolve().parents[2]
HELD = "dialup.test.example"

R_STARTED = 253
R_NOTHING = 251
R_CANNOT = 458
R_NOT_ALLOWED = 459
R_SYNTAX = 501


def policy_text(tmp: Path, peer_port: int) -> str:
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
users = ["postmaster", "alice"]
mail_root = "{tmp / 'mail'}"
[relay]
domains = ["{HELD}", "sub.{HELD}"]
[etrn]
clients = ["127.0.0.1/32"]
[delivery]
retry_base = "100ms"
retry_max = "200ms"
poll_interval = "200ms"
[[routes]]
domain = ".{HELD}"
host = "127.0.0.1"
port = {peer_port}
tls = "none"
hold = true
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


def send(port: int, rcpts: list[str]) -> None:
    with smtp(port) as client:
        assert client.sendmail("alice@localhost", rcpts, MESSAGE) == {}


def looked_at(gw, count: int) -> bool:
    """Every queued message has been seen by the scheduler (its state recorded)."""
    ids = gw.queue_ids()
    return len(ids) == count and all((Path(gw.policy.server.queue_dir) / "state" / q).exists() for q in ids)


def etrn(port: int, node: str, source: str = "127.0.0.1") -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", port, source_address=(source, 0), timeout=10) as client:
        client.ehlo("client.test.example")
        assert client.has_extn("etrn")
        code, text = client.docmd("ETRN", node)
        return code, text.decode()


def test_held_mail_waits_for_etrn_then_for_queue_flush(gateway_factory, tmp_path: Path) -> None:
    with SmtpPeer() as peer:
        policy = tmp_path / "policy.toml"
        policy.write_text(policy_text(tmp_path, peer.port))
        gw = gateway_factory(policy.read_text())
        send(gw.port, [f"one@{HELD}"])
        send(gw.port, [f"two@{HELD}", f"three@sub.{HELD}"])
        # The scheduler has looked at both and tried nothing: held, no attempt counted.
        assert wait_for(lambda: looked_at(gw, 2), timeout=10)
        rows = json.loads(cli(policy, "list", "--json").stdout)
        assert [r["attempts"] for r in rows] == [0, 0] and peer.messages == []
        # `gateway queue list` shows them held by their route, not pending.
        assert [(r["held"], r["held_by"]) for r in rows] == [(True, "route"), (True, "route")]
        assert {(rcpt["state"], rcpt["held_by_route"]) for r in rows for rcpt in r["recipients"]} == {
            ("held", f".{HELD}")
        }
        text = cli(policy, "list").stdout
        assert text.count(f"held by route .{HELD}") == 2
        assert f"    held      <one@{HELD}> (route .{HELD}: until flushed)" in text.splitlines()

        # ETRN for the domain alone leaves the subdomain's recipient held.
        code, text = etrn(gw.port, HELD)
        assert code == R_STARTED and "2 pending messages" in text
        assert wait_for(lambda: sorted(r for m in peer.messages for r in m.rcpt_tos) == [f"one@{HELD}", f"two@{HELD}"], timeout=10)
        assert wait_for(lambda: len(gw.queue_ids()) == 1, timeout=10)
        rows = json.loads(cli(policy, "list", "--json").stdout)
        assert [(r["address"], r["state"]) for r in rows[0]["recipients"]] == [
            (f"two@{HELD}", "delivered"), (f"three@sub.{HELD}", "held"),
        ]

        # @domain covers the subdomains.
        code, _ = etrn(gw.port, f"@{HELD}")
        assert code == R_STARTED
        assert wait_for(lambda: gw.queue_ids() == [], timeout=10)
        assert sorted(r for m in peer.messages for r in m.rcpt_tos) == [f"one@{HELD}", f"three@sub.{HELD}", f"two@{HELD}"]
        assert etrn(gw.port, HELD)[0] == R_NOTHING

        # Mail arriving after a flush is held again, until `gateway queue flush`.
        send(gw.port, [f"four@{HELD}"])
        assert wait_for(lambda: looked_at(gw, 1), timeout=10)
        assert len(peer.messages) == 3
        flushed = cli(policy, "flush", HELD)
        assert flushed.returncode == 0, flushed.stderr
        assert "flushing 1 messages" in flushed.stdout
        assert wait_for(lambda: len(peer.messages) == 4 and gw.queue_ids() == [], timeout=10)
        assert peer.messages[-1].rcpt_tos == [f"four@{HELD}"]


def test_a_failed_flush_holds_the_mail_again(gateway_factory, tmp_path: Path) -> None:
    with SmtpPeer() as peer:
        policy = tmp_path / "policy.toml"
        policy.write_text(policy_text(tmp_path, peer.port))
        gw = gateway_factory(policy.read_text())
        peer.script_rcpt(f"one@{HELD}", "451 4.3.0 not now")
        send(gw.port, [f"one@{HELD}"])
        assert wait_for(lambda: looked_at(gw, 1), timeout=10)
        assert etrn(gw.port, HELD)[0] == R_STARTED
        assert wait_for(lambda: json.loads(cli(policy, "list", "--json").stdout)[0]["attempts"] == 1, timeout=10)
        (row,) = json.loads(cli(policy, "list", "--json").stdout)
        assert row["recipients"][0]["last_reply"].startswith("451")
        # Held again: the short retry_base does not bring it back; the next flush does.
        assert cli(policy, "flush", f"@{HELD}").returncode == 0
        assert wait_for(lambda: len(peer.messages) == 1 and gw.queue_ids() == [], timeout=10)
        assert json.loads(cli(policy, "stat", "--json").stdout)["messages"] == 0


def test_etrn_answers_by_rfc_1985(gateway_factory, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_text(tmp_path, 9))
    gw = gateway_factory(policy.read_text())
    send(gw.port, [f"one@{HELD}"])
    # A client outside [etrn] clients: 459, and nothing leaves the queue.
    code, text = etrn(gw.port, HELD, source="127.0.0.2")
    assert code == R_NOT_ALLOWED and HELD in text
    assert etrn(gw.port, "")[0] == R_SYNTAX
    assert etrn(gw.port, "bad domain!")[0] == R_SYNTAX
    assert etrn(gw.port, "#queue")[0] == R_CANNOT
    assert etrn(gw.port, "nothing.example")[0] == R_NOTHING
    assert len(gw.queue_ids()) == 1
    # Before EHLO, and with ETRN off in the policy.
    with smtp(gw.port) as client:
        assert client.docmd("ETRN", HELD)[0] == 503
    off = gateway_factory(policy.read_text().replace('clients = ["127.0.0.1/32"]', ""))
    with smtp(off.port) as client:
        client.ehlo()
        assert not client.has_extn("etrn")
        assert client.docmd("ETRN", HELD)[0] == 500


def test_queue_flush_without_a_running_gateway_says_so(tmp_path: Path, gateway_factory) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_text(tmp_path, 9).replace("[delivery]", "[delivery]\nenabled = false"))
    gw = gateway_factory(policy.read_text())
    send(gw.port, [f"one@{HELD}"])
    refused = cli(policy, "flush", HELD)
    assert refused.returncode == 1 and "no delivering gateway" in refused.stderr
    assert etrn(gw.port, HELD)[0] == R_CANNOT
    assert cli(policy, "flush", "nothing.example").returncode == 0
    assert cli(policy, "flush", "bad domain").returncode == 2


def test_etrn_for_authenticated_clients(gateway_factory, tmp_path: Path) -> None:
    from gateway.passwords import hash_password
    from tests.conftest import no_verify_context

    users = tmp_path / "users"
    users.write_text(f"site:{hash_password('s3cret', ln=4)}\n")
    with SmtpPeer() as peer:
        text = policy_text(tmp_path, peer.port).replace('tls = "none"\n[local]', 'tls = "starttls"\n[local]', 1)
        text = text.replace('clients = ["127.0.0.1/32"]', "authenticated = true")
        text += f'\n[[plugins]]\nname = "auth_users_file"\n[auth]\nusers_file = "{users}"\n'
        gw = gateway_factory(text)
        send(gw.port, [f"one@{HELD}"])
        assert wait_for(lambda: looked_at(gw, 1), timeout=10)
        with smtp(gw.port) as client:
            client.ehlo()
            assert client.has_extn("etrn")
            assert client.docmd("ETRN", HELD)[0] == R_NOT_ALLOWED  # not authenticated yet
            client.starttls(context=no_verify_context())
            client.ehlo()
            assert client.login("site", "s3cret")[0] == 235
            assert client.docmd("ETRN", HELD)[0] == R_STARTED
        assert wait_for(lambda: len(peer.messages) == 1 and gw.queue_ids() == [], timeout=10)
