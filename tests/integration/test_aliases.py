"""Aliases and .forward end to end: SMTP in, queue, expansion, real Maildirs, mbox files, programs."""

from __future__ import annotations

import email
import email.policy
import json
import logging
import os
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from gateway.policy import PolicyError
from gateway.queue import QueueStore
from tests.conftest import MESSAGE, smtp, wait_for
from tests.processes import free_port, start_gateway

POLICY = """
[server]
hostname = "mx.test.example"

[[listeners]]
name = "smtp"
tls = "none"

[local]
domains = ["localhost"]
users = ["postmaster", "alice", "bob", "carol", "list"]
aliases = "{aliases}"
dot_forward = {dot_forward}

[delivery]
retry_base = "200ms"
retry_max = "1s"
poll_interval = "200ms"

[[plugins]]
name = "rcpt_relay"
[[plugins]]
name = "rcpt_local_users"
"""


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory anyone may write: programs never run as root (as root: nobody)."""
    path = Path(tempfile.mkdtemp(prefix="gateway-aliases-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path)


def start(gateway_factory, shared: Path, aliases: str, *, dot_forward: bool = False):
    path = shared / "aliases"
    path.write_text(aliases)
    text = POLICY.format(aliases=path, dot_forward=str(dot_forward).lower())
    return gateway_factory(text)


def messages(gw, user: str) -> list[bytes]:
    new = Path(gw.policy.local.mail_root) / user / "Maildir" / "new"
    return [p.read_bytes() for p in sorted(new.glob("*"))] if new.exists() else []


def send(gw, rcpts: list[str], sender: str = "sender@example.org") -> None:
    with smtp(gw.port) as client:
        assert client.sendmail(sender, rcpts, MESSAGE) == {}


def script(shared: Path, name: str, body: str) -> Path:
    path = shared / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def test_alias_expands_to_every_kind_of_target(gateway_factory, shared: Path) -> None:
    out = shared / "program.out"
    program = script(shared, "archive.sh", f"cat > {out}\n")
    (shared / "md").mkdir()
    (shared / "staff.list").write_text("# the staff\nbob\n")
    (shared / "staff.list").chmod(0o644)
    gw = start(gateway_factory, shared, f"""\
# every kind of target
staff: alice,
       "|{program}",
       {shared}/staff.mbox, {shared}/md/,
       :include:{shared}/staff.list
team:  staff, carol      # nested
""")
    send(gw, ["team@localhost"])
    assert wait_for(lambda: gw.queue_ids() == [], timeout=15)
    for user in ("alice", "bob", "carol"):
        (data,) = messages(gw, user)
        assert data.endswith(MESSAGE)
        assert f"Delivered-To: {user}@localhost\r\n".encode() in data
    assert out.read_bytes().endswith(MESSAGE)
    assert b"Delivered-To: team@localhost\r\n" in out.read_bytes()
    mbox = (shared / "staff.mbox").read_bytes()
    assert mbox.startswith(b"From sender@example.org ") and b"Subject: test" in mbox
    (copy,) = list((shared / "md" / "new").iterdir())
    assert copy.read_bytes().endswith(MESSAGE)


def test_alias_naming_itself_keeps_a_copy_for_the_user_of_that_name(gateway_factory, shared: Path) -> None:
    gw = start(gateway_factory, shared, "list: list, bob\n")
    send(gw, ["list@localhost"])
    assert wait_for(lambda: messages(gw, "list") and messages(gw, "bob"), timeout=10)
    assert wait_for(lambda: gw.queue_ids() == [], timeout=5)
    assert len(messages(gw, "list")) == 1 and len(messages(gw, "bob")) == 1


def test_a_mailbox_or_program_reached_twice_in_one_message_gets_one_copy(gateway_factory, shared: Path) -> None:
    out = shared / "out"
    program = script(shared, "count.sh", f"cat >> {out}\n")
    gw = start(gateway_factory, shared, f'staff: alice, bob, "|{program}"\nsales: alice, "|{program}"\n')
    send(gw, ["alice@localhost", "staff@localhost", "sales@localhost"])
    assert wait_for(lambda: gw.queue_ids() == [], timeout=15)
    assert len(messages(gw, "alice")) == 1 and len(messages(gw, "bob")) == 1
    assert out.read_bytes().count(b"Subject: test") == 1


def test_alias_names_are_valid_recipients_and_unknown_names_are_refused(gateway_factory, shared: Path) -> None:
    gw = start(gateway_factory, shared, "sales: alice\n")
    with smtp(gw.port) as client:
        client.ehlo()
        client.mail("sender@example.org")
        assert client.rcpt("Sales@localhost")[0] == 250
        assert client.rcpt("nobody-here@localhost")[0] == 550


def test_targets_are_recorded_in_the_queue_and_delivered_once_each(gateway_factory, shared: Path) -> None:
    marker, out = shared / "failed-once", shared / "out"
    flaky = script(shared, "flaky.sh", f"test -f {marker} || {{ touch {marker}; exit 111; }}\ncat >> {out}\n")
    gw = start(gateway_factory, shared, f'staff: alice, bob, "|{flaky}"\n')
    send(gw, ["staff@localhost"])
    assert wait_for(lambda: out.exists(), timeout=15)
    assert wait_for(lambda: gw.queue_ids() == [], timeout=5)
    # The program failed once and was retried; the mailboxes got one copy each.
    assert len(messages(gw, "alice")) == 1 and len(messages(gw, "bob")) == 1
    assert out.read_bytes().count(b"Subject: test") == 1


def test_expansion_is_written_to_the_queue_before_delivery(gateway_factory, shared: Path) -> None:
    hold = script(shared, "hold.sh", "exit 111\n")
    gw = start(gateway_factory, shared, f'staff: alice, "|{hold}"\n')
    send(gw, ["staff@localhost"])
    (qid,) = gw.queue_ids()
    state_file = Path(gw.policy.server.queue_dir) / "state" / qid

    def recorded() -> dict[str, dict[str, object]]:
        if not state_file.exists():
            return {}
        return {r.get("target", ""): r for r in json.loads(state_file.read_text())["recipients"]}

    # The program keeps failing: wait until its first failure and alice's copy are on record.
    assert wait_for(
        lambda: recorded().get(f"|{hold}", {}).get("attempts")
        and recorded().get("\\alice", {}).get("state") == "delivered",
        timeout=10,
    )
    by_target = recorded()
    assert by_target[""]["address"] == "staff@localhost"
    assert by_target[""]["state"] == "delivered"
    assert by_target["\\alice"]["state"] == "delivered"
    assert by_target[f"|{hold}"]["state"] == "pending"
    assert by_target["\\alice"]["orcpt"] == "rfc822;staff@localhost"


def test_a_loop_found_at_delivery_bounces_with_5_4_6(gateway_factory, shared: Path) -> None:
    include = shared / "loop.list"
    include.write_text("carol\n")
    include.chmod(0o644)
    gw = start(gateway_factory, shared, f"first: :include:{include}\nsecond: first\n")
    include.write_text("second\n")  # now first -> second -> first
    send(gw, ["first@localhost"], sender="bob@localhost")
    assert wait_for(lambda: messages(gw, "bob"), timeout=10)
    (raw,) = messages(gw, "bob")
    dsn = email.message_from_bytes(raw.split(b"\r\n", 2)[2], policy=email.policy.default)
    fields = dsn.get_payload()[1].get_payload()[1]
    assert fields["Action"] == "failed"
    assert fields["Status"] == "5.4.6"
    assert "alias loop: first -> second -> first" in fields["Diagnostic-Code"]
    assert wait_for(lambda: gw.queue_ids() == [], timeout=5)
    assert messages(gw, "carol") == []


def test_a_looping_aliases_file_stops_start_up_naming_file_and_line(gateway_factory, shared: Path) -> None:
    with pytest.raises(PolicyError) as info:
        start(gateway_factory, shared, "ok: alice\na: b\nb: a\n")
    assert f"{shared / 'aliases'}:2: alias 'a': alias loop: a -> b -> a" in str(info.value)


def test_role_addresses_without_user_or_alias_reach_the_postmaster(gateway_factory, shared: Path, caplog) -> None:
    # abuse is an alias here, MAILER-DAEMON nothing: it goes to the postmaster, and
    # start-up has nothing to warn about.
    with caplog.at_level(logging.WARNING):
        gw = start(gateway_factory, shared, "abuse: alice\n")
    assert not [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "neither" in r.getMessage()]
    send(gw, ["MAILER-DAEMON@localhost"])
    send(gw, ["abuse@localhost"])
    assert wait_for(lambda: gw.queue_ids() == [], timeout=15)
    assert len(messages(gw, "postmaster")) == 1 and len(messages(gw, "alice")) == 1


def test_changed_aliases_file_is_read_again(gateway_factory, shared: Path) -> None:
    gw = start(gateway_factory, shared, "sales: alice\n")
    (shared / "aliases").write_text("sales: alice\n\nsupport: bob\n")

    def accepted() -> bool:
        with smtp(gw.port) as client:
            client.ehlo()
            client.mail("sender@example.org")
            return client.rcpt("support@localhost")[0] == 250

    assert wait_for(accepted, timeout=10)
    send(gw, ["support@localhost"])
    assert wait_for(lambda: messages(gw, "bob"), timeout=10)


def test_broken_change_keeps_the_previous_aliases(gateway_factory, shared: Path, caplog) -> None:
    gw = start(gateway_factory, shared, "sales: alice\n")
    (shared / "aliases").write_text("sales: alice\nbroken line without colon\nsupport: bob\n")

    def refused_after_a_look() -> bool:
        with smtp(gw.port) as client:
            client.ehlo()
            client.mail("sender@example.org")
            assert client.rcpt("support@localhost")[0] == 550
            assert client.rcpt("sales@localhost")[0] == 250
        return any(
            f"{shared / 'aliases'}:2: expected 'name: target, ...'" in r.getMessage()
            for r in caplog.records if r.levelno == logging.ERROR
        )

    with caplog.at_level(logging.ERROR):
        assert wait_for(refused_after_a_look, timeout=10)
    send(gw, ["sales@localhost"])
    assert wait_for(lambda: messages(gw, "alice"), timeout=10)


# -- .forward -----------------------------------------------------------------


def forward(gw, user: str, text: str) -> None:
    home = Path(gw.policy.local.mail_root) / user
    home.mkdir(parents=True, exist_ok=True)
    (home / ".forward").write_text(text)
    (home / ".forward").chmod(0o644)


def test_dot_forward_with_backslash_self_keeps_a_local_copy(gateway_factory, shared: Path) -> None:
    out = shared / "vacation.out"
    gw = start(gateway_factory, shared, "sales: alice\n", dot_forward=True)
    forward(gw, "alice", f'\\alice, carol\n"|cat > {out}"\n')
    send(gw, ["alice@localhost"])
    assert wait_for(lambda: gw.queue_ids() == [], timeout=15)
    assert len(messages(gw, "alice")) == 1 and len(messages(gw, "carol")) == 1
    assert out.read_bytes().endswith(MESSAGE)
    # An alias pointing at alice follows her .forward too.
    send(gw, ["sales@localhost"])
    assert wait_for(lambda: len(messages(gw, "carol")) == 2, timeout=15)
    # alice's and carol's copies are delivered in parallel: wait for the message to go.
    assert wait_for(lambda: gw.queue_ids() == [], timeout=15)
    assert len(messages(gw, "alice")) == 2


def test_dot_forward_is_ignored_unless_switched_on(gateway_factory, shared: Path) -> None:
    gw = start(gateway_factory, shared, "sales: alice\n", dot_forward=False)
    forward(gw, "alice", "carol\n")
    send(gw, ["alice@localhost"])
    assert wait_for(lambda: messages(gw, "alice"), timeout=10)
    assert wait_for(lambda: gw.queue_ids() == [], timeout=5)
    assert messages(gw, "carol") == []


def test_dot_forward_loop_between_two_users_bounces(gateway_factory, shared: Path) -> None:
    gw = start(gateway_factory, shared, "sales: alice\n", dot_forward=True)
    forward(gw, "alice", "bob\n")
    forward(gw, "bob", "alice\n")
    send(gw, ["alice@localhost"], sender="carol@localhost")
    assert wait_for(lambda: messages(gw, "carol"), timeout=10)
    (raw,) = messages(gw, "carol")
    assert b"alias loop: alice -> bob -> alice" in raw
    assert messages(gw, "alice") == [] and messages(gw, "bob") == []


# -- gateway aliases check ------------------------------------------------------


def run_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "aliases", "check", *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )


def test_check_command_summarises_a_good_file(tmp_path: Path) -> None:
    (tmp_path / "team.list").write_text("carol, dave@example.org\n")
    (tmp_path / "aliases").write_text(
        "postmaster: alice\nabuse: alice\nstaff: alice,\n  bob, :include:team.list,\n"
        '  "|/usr/bin/archive --list staff", /var/mail/staff\n'
    )
    result = run_check(str(tmp_path / "aliases"))
    assert result.returncode == 0, result.stderr
    assert f"{tmp_path / 'aliases'}: OK: 3 aliases" in result.stdout
    assert "1 address, 1 mbox, 1 program" in result.stdout
    assert "MAILER-DAEMON: not an alias" in result.stdout


@pytest.mark.parametrize(
    "text, message",
    [
        ("a: alice\nb: c\nc: b\n", ":2: alias 'b': alias loop: b -> c -> b"),
        ("a: alice\nb: alice,\n  /x /y\n", ":3: alias 'b': white space in target"),
        ("a: alice\na: bob\n", ":2: alias 'a': defined twice (first at line 1)"),
        ("a: alice\nno colon here\n", ":2: expected 'name: target, ...'"),
        ("a: :include:missing.list\n", ":1: alias 'a': "),
        ('a: "|unterminated\n', ":1: alias 'a': unterminated double quote"),
    ],
)
def test_check_command_names_file_and_line_of_a_problem(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "aliases").write_text(text)
    result = run_check(str(tmp_path / "aliases"))
    assert result.returncode == 1
    assert f"{tmp_path / 'aliases'}{message}" in result.stderr


def test_check_command_with_a_policy_reports_unknown_names(tmp_path: Path) -> None:
    (tmp_path / "aliases").write_text("staff: alice,\n   mallory\n")
    (tmp_path / "policy.toml").write_text(
        '[local]\ndomains = ["localhost"]\nusers = ["postmaster", "alice"]\n'
        f'aliases = "{tmp_path / "aliases"}"\n'
    )
    result = run_check("--policy", str(tmp_path / "policy.toml"))
    assert result.returncode == 1
    assert f"{tmp_path / 'aliases'}:2: alias 'staff': 'mallory' is neither an alias nor a local user" in result.stderr


# -- start-up and reload with a broken file -------------------------------------


def test_reload_refuses_a_looping_aliases_file_and_keeps_the_old_one(gateway_factory, shared: Path, caplog) -> None:
    gw = start(gateway_factory, shared, "sales: alice\n")
    policy_file = shared / "policy.toml"
    policy_file.write_text(
        POLICY.format(aliases=shared / "aliases", dot_forward="false")
        .replace("[server]\n", f'[server]\nqueue_dir = "{gw.policy.server.queue_dir}"\nvar_dir = "{gw.policy.server.var_dir}"\n')
        .replace("[local]\n", f'[local]\nmail_root = "{gw.policy.local.mail_root}"\n')
    )
    assert gw.app is not None
    gw.app.policy_path = policy_file
    (shared / "aliases").write_text("sales: alice\nsupport: helpdesk\nhelpdesk: support\n")
    with caplog.at_level(logging.ERROR):
        assert gw.call(gw.app.reload()) is False
    assert any(
        f"{shared / 'aliases'}:2: alias 'support': alias loop: support -> helpdesk -> support" in r.getMessage()
        for r in caplog.records
    )
    (shared / "aliases").write_text("sales: alice\nsupport: bob\n")
    assert gw.call(gw.app.reload()) is True
    send(gw, ["support@localhost"])
    assert wait_for(lambda: messages(gw, "bob"), timeout=10)


def test_gateway_run_refuses_to_start_on_a_broken_aliases_file(tmp_path: Path) -> None:
    (tmp_path / "aliases").write_text("sales: alice\nsales: bob\n")
    (tmp_path / "policy.toml").write_text(
        f'[server]\nqueue_dir = "{tmp_path / "queue"}"\nvar_dir = "{tmp_path / "var"}"\n'
        f'[[listeners]]\nname = "smtp"\nport = {free_port()}\ntls = "none"\n'
        f'[local]\ndomains = ["localhost"]\nusers = ["postmaster", "alice", "bob"]\naliases = "{tmp_path / "aliases"}"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "run", "--policy", str(tmp_path / "policy.toml")],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert result.returncode == 2
    assert f"{tmp_path / 'aliases'}:2: alias 'sales': defined twice (first at line 1)" in result.stderr


def test_sigkill_after_expansion_delivers_each_target_once(tmp_path: Path, shared: Path) -> None:
    """A crash while one target is being delivered: after the restart the others get no second copy."""
    started, release, out = shared / "started", shared / "release", shared / "out"
    program = script(
        shared, "slow.sh",
        f"if [ -f {release} ]; then cat >> {out}; exit 0; fi\necho $$ > {started}\nexec sleep 120\n",
    )
    mbox = shared / "staff.mbox"  # unlike Maildir, an mbox append done twice shows twice
    (shared / "aliases").write_text(f'staff: alice, bob, {mbox}, "|{program}"\n')
    port = free_port()
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(
        POLICY.format(aliases=shared / "aliases", dot_forward="false")
        .replace("[server]\n", f'[server]\nqueue_dir = "{tmp_path / "queue"}"\nvar_dir = "{tmp_path / "var"}"\n')
        .replace('tls = "none"\n', f'tls = "none"\nport = {port}\n', 1)
        .replace("[local]\n", f'[local]\nmail_root = "{tmp_path / "mail"}"\n')
    )

    def copies(user: str) -> int:
        new = tmp_path / "mail" / user / "Maildir" / "new"
        return len(list(new.iterdir())) if new.exists() else 0

    proc = start_gateway(policy_file, port)
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            assert client.sendmail("sender@example.org", ["staff@localhost"], MESSAGE) == {}
        (qid,) = QueueStore(tmp_path / "queue").ids()
        state = tmp_path / "queue" / "state" / qid

        def done_but_the_program() -> bool:
            if not (started.exists() and state.exists()):
                return False
            states = [r["state"] for r in json.loads(state.read_text())["recipients"]]
            return states.count("delivered") == 4  # staff (expanded), alice, bob, the mbox

        assert wait_for(done_but_the_program, timeout=20)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    os.kill(int(started.read_text()), signal.SIGKILL)  # the program outlives the gateway
    release.touch()
    proc = start_gateway(policy_file, port)
    try:
        assert wait_for(lambda: out.exists() and QueueStore(tmp_path / "queue").ids() == [], timeout=30)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert copies("alice") == 1 and copies("bob") == 1
    assert mbox.read_bytes().count(b"\nFrom sender@example.org ") + mbox.read_bytes().startswith(b"From ") == 1
    assert out.read_bytes().count(b"Subject: test") == 1


def test_gateway_check_and_reload_validate_the_aliases_file_of_the_policy(tmp_path: Path) -> None:
    (tmp_path / "aliases").write_text("abuse: alice\nlist: a\na: list2\nlist2: a\n")
    (tmp_path / "policy.toml").write_text(
        f'[server]\nvar_dir = "{tmp_path / "var"}"\n'
        f'[local]\ndomains = ["localhost"]\nusers = ["postmaster", "alice"]\naliases = "{tmp_path / "aliases"}"\n'
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    for command in ("check", "reload --policy"):
        result = subprocess.run(
            [sys.executable, "-m", "gateway.cli", *command.split(), str(tmp_path / "policy.toml")],
            capture_output=True, text=True, timeout=60, env=env,
        )
        assert result.returncode == 2
        assert f"{tmp_path / 'aliases'}:3: alias 'a': alias loop: a -> list2 -> a" in result.stderr
    (tmp_path / "aliases").write_text("abuse: alice\n")
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check", str(tmp_path / "policy.toml")],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert result.returncode == 0
    assert "neither" not in result.stdout
