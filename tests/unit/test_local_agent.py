"""Unit tests for gateway.delivery.local.agent: default delivery, .qmail processing,
extensions, loops, forwards, programs and privileges, end to end on real files."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import pytest

from gateway.content import Content
from gateway.delivery.local import LOOP_REPLY, NO_MAILBOX, LocalDeliveryAgent
from gateway.delivery.local.agent import program_environment
from gateway.delivery.types import LocalRoute, Outcome
from gateway.model import Envelope, QueuedRecipient
from gateway.policy.model import LocalAssign, LocalSettings, Policy
from gateway.verdicts import TemporaryFailure

MESSAGE = b"Subject: hello\r\nFrom: a@example.org\r\n\r\nFrom the body\r\nsecret body text\r\n"
SENDER = "sender@example.org"
DOMAIN = "local.example"
NOBODY = 65534
IS_ROOT = os.geteuid() == 0
REQUIRES_ROOT = pytest.mark.skipif(not IS_ROOT, reason="needs root")


class Forwards:
    """Records forward() calls; optionally fails."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.calls: list[tuple[str, list[str], bytes]] = []
        self.error = error

    async def __call__(self, sender: str, addresses: list[str], message: Content) -> None:
        self.calls.append((sender, addresses, message.read()))
        if self.error is not None:
            raise self.error


@pytest.fixture()
def mail_root(tmp_path: Path) -> Path:
    return tmp_path / "mail"


@pytest.fixture()
def shared() -> Iterator[Path]:
    """A directory any uid may write (programs run as nobody when the tests run as root)."""
    path = Path(tempfile.mkdtemp(prefix="gw-local-test-"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def _policy(mail_root: Path, **local: Any) -> Policy:
    settings = LocalSettings(
        domains=(DOMAIN,), users=("alice", "bob"), mail_root=mail_root, program_timeout=10.0
    )
    return Policy(source="test", local=replace(settings, **local))


def _deliver(
    policy: Policy,
    user: str = "alice",
    extension: str = "",
    *,
    message: bytes = MESSAGE,
    forwards: Forwards | None = None,
    sender: str = SENDER,
) -> Outcome:
    local = f"{user}-{extension}" if extension else user
    recipient = f"{local}@{DOMAIN}"
    envelope = Envelope(sender=sender, recipients=[QueuedRecipient(recipient)])
    agent = LocalDeliveryAgent(
        policy, hostname="mx.test", forward=forwards or Forwards(), run_in_thread=asyncio.to_thread
    )
    route = LocalRoute(user=user, extension=extension, domain=DOMAIN)
    return asyncio.run(agent.deliver(envelope, recipient, route, message))


def _home(mail_root: Path, user: str = "alice", dotqmail: dict[str, str] | None = None) -> Path:
    home = mail_root / user
    home.mkdir(parents=True, mode=0o700)
    for name, text in (dotqmail or {}).items():
        (home / name).write_text(text)
        (home / name).chmod(0o600)
    return home


def _maildir_messages(maildir: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((maildir / "new").iterdir())]


def _delivered(recipient: str = f"alice@{DOMAIN}") -> bytes:
    return f"Return-Path: <{SENDER}>\r\nDelivered-To: {recipient}\r\n".encode() + MESSAGE


def test_default_maildir_creates_home(mail_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.delivery.local")
    outcome = _deliver(_policy(mail_root))
    assert outcome.status == "delivered"
    assert (outcome.reply.code, outcome.reply.status) == (250, "2.0.0")
    assert outcome.reply.text == "delivered to ./Maildir/"
    home = mail_root / "alice"
    assert home.stat().st_mode & 0o777 == 0o700
    assert _maildir_messages(home / "Maildir") == [_delivered()]
    records = [r for r in caplog.records if r.name == "gateway.delivery.local"]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    assert "secret body text" not in caplog.text


@pytest.mark.parametrize("mailbox", ["maildir", "mbox"])
def test_default_mailbox_is_one_thread_hand_over(mail_root: Path, mailbox: str) -> None:
    """The home, the .qmail lookup and the default mailbox go to the pool as one call:
    each hand-over waits for a pool thread and then for the event loop (issue #16)."""
    calls: list[str] = []

    async def run_in_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(getattr(fn, "__name__", repr(fn)))
        return await asyncio.to_thread(fn, *args, **kwargs)

    envelope = Envelope(sender=SENDER, recipients=[QueuedRecipient(f"alice@{DOMAIN}")])
    agent = LocalDeliveryAgent(
        _policy(mail_root, mailbox=mailbox), hostname="mx.test", forward=Forwards(), run_in_thread=run_in_thread
    )
    route = LocalRoute(user="alice", extension="", domain=DOMAIN)
    outcome = asyncio.run(agent.deliver(envelope, f"alice@{DOMAIN}", route, MESSAGE))
    assert outcome.status == "delivered"
    assert len(calls) == 1, calls


def test_default_mbox(mail_root: Path) -> None:
    outcome = _deliver(_policy(mail_root, mailbox="mbox"))
    assert outcome.status == "delivered"
    data = (mail_root / "alice" / "mbox").read_bytes()
    assert data.startswith(f"From {SENDER} ".encode())
    assert f"\nReturn-Path: <{SENDER}>\nDelivered-To: alice@{DOMAIN}\n".encode() in data
    assert b"\n>From the body\n" in data


def test_null_sender_return_path(mail_root: Path) -> None:
    assert _deliver(_policy(mail_root), sender="").status == "delivered"
    (got,) = _maildir_messages(mail_root / "alice" / "Maildir")
    assert got.startswith(b"Return-Path: <>\r\n")


def test_dotqmail_two_mailboxes_and_program(mail_root: Path, shared: Path) -> None:
    home = _home(
        mail_root,
        dotqmail={
            ".qmail": f"# mine\n./Maildir/\n./mbox\n|cat > {shared}/stdin; id -u > {shared}/uid\n"
        },
    )
    outcome = _deliver(_policy(mail_root))
    assert outcome.status == "delivered", outcome
    assert outcome.reply.text == "delivered to ./Maildir/, ./mbox, program"
    assert _maildir_messages(home / "Maildir") == [_delivered()]
    assert b"secret body text" in (home / "mbox").read_bytes()
    assert (shared / "stdin").read_bytes() == _delivered()
    if IS_ROOT:
        # Never root: the policy's program_user (nobody).
        assert (shared / "uid").read_text().strip() == str(NOBODY)


def test_extension_with_default_file_and_environment(mail_root: Path, shared: Path) -> None:
    fields = "SENDER RECIPIENT USER HOME HOST HOST2 LOCAL EXT EXT2 EXT3 DEFAULT DTLINE RPLINE"
    printf = " ".join(f'"${name}"' for name in fields.split())
    home = _home(
        mail_root,
        dotqmail={".qmail-list-default": f"|printf '%s|' {printf} > {shared}/env\n./list/\n"},
    )
    outcome = _deliver(_policy(mail_root), extension="list-sub-x")
    assert outcome.status == "delivered", outcome
    values = (shared / "env").read_text().split("|")
    recipient = f"alice-list-sub-x@{DOMAIN}"
    assert values[:-1] == [
        SENDER, recipient, "alice", str(home), DOMAIN, "local", "alice-list-sub-x",
        "list-sub-x", "sub-x", "x", "sub-x",
        f"Delivered-To: {recipient}\n", f"Return-Path: <{SENDER}>\n",
    ]
    assert _maildir_messages(home / "list") == [_delivered(recipient)]


def test_program_environment_helper() -> None:
    env = program_environment(
        sender="", recipient="a-b@mx.example.com", user="a", home=Path("/h"), local="a-b",
        domain="mx.example.com", extension="b", delimiter="-", default=None, when=0.0,
    )
    assert (env["HOST2"], env["HOST3"], env["HOST4"]) == ("mx.example", "mx", "")
    assert (env["EXT"], env["EXT2"]) == ("b", "")
    assert "DEFAULT" not in env
    assert env["UFLINE"] == "From MAILER-DAEMON Thu Jan  1 00:00:00 1970\n"
    assert env["RPLINE"] == "Return-Path: <>\n"


def test_unknown_extension(mail_root: Path) -> None:
    _home(mail_root)
    outcome = _deliver(_policy(mail_root), extension="nosuch")
    assert outcome == Outcome("failed", NO_MAILBOX)


def test_extension_without_dot_files_goes_to_default(mail_root: Path) -> None:
    outcome = _deliver(_policy(mail_root, dot_files=False), extension="nosuch")
    assert outcome.status == "delivered"
    assert len(_maildir_messages(mail_root / "alice" / "Maildir")) == 1


def test_loop_detection(mail_root: Path) -> None:
    looping = b"Received: x\r\nDelivered-To: ALICE@Local.Example\r\n" + MESSAGE
    outcome = _deliver(_policy(mail_root), message=looping)
    assert outcome == Outcome("failed", LOOP_REPLY)
    assert (outcome.reply.code, outcome.reply.status) == (554, "5.4.6")
    assert not (mail_root / "alice" / "Maildir").exists()
    # Another recipient's Delivered-To is no loop.
    other = b"Delivered-To: bob@local.example\r\n" + MESSAGE
    assert _deliver(_policy(mail_root), message=other).status == "delivered"


def test_forward(mail_root: Path) -> None:
    home = _home(
        mail_root,
        dotqmail={".qmail": "&bob@example.org\n./Maildir/\ncarol@example.net\n"},
    )
    forwards = Forwards()
    outcome = _deliver(_policy(mail_root), forwards=forwards)
    assert outcome.status == "delivered"
    forwarded = f"Delivered-To: alice@{DOMAIN}\r\n".encode() + MESSAGE
    assert forwards.calls == [(SENDER, ["bob@example.org", "carol@example.net"], forwarded)]
    assert _maildir_messages(home / "Maildir") == [_delivered()]


def test_forward_failure_defers(mail_root: Path) -> None:
    _home(mail_root, dotqmail={".qmail": "bob@example.org\n"})
    outcome = _deliver(_policy(mail_root), forwards=Forwards(TemporaryFailure("queue is full")))
    assert outcome.status == "deferred"
    assert outcome.reply.text == "queue is full"


def test_unexpected_error_defers(mail_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    _home(mail_root, dotqmail={".qmail": "bob@example.org\n"})
    outcome = _deliver(_policy(mail_root), forwards=Forwards(RuntimeError("boom")))
    assert (outcome.status, outcome.reply.code) == ("deferred", 451)
    assert "boom" in caplog.text  # logged with the traceback


def test_exit_99_stops_processing(mail_root: Path) -> None:
    home = _home(mail_root, dotqmail={".qmail": "|exit 99\n./Maildir/\nbob@example.org\n"})
    forwards = Forwards()
    outcome = _deliver(_policy(mail_root), forwards=forwards)
    assert outcome.status == "delivered"
    assert not (home / "Maildir").exists()
    assert forwards.calls == []


@pytest.mark.parametrize(("code", "status"), [(100, "failed"), (111, "deferred"), (3, "deferred")])
def test_program_failure_decides(mail_root: Path, code: int, status: str) -> None:
    home = _home(mail_root, dotqmail={".qmail": f"|echo nope; exit {code}\n./after/\n"})
    outcome = _deliver(_policy(mail_root))
    assert outcome.status == status
    assert outcome.reply.text == "nope"
    assert not (home / "after").exists()


def test_unsafe_dotqmail(mail_root: Path) -> None:
    home = _home(mail_root, dotqmail={".qmail": "./Maildir/\n"})
    (home / ".qmail").chmod(0o666)
    outcome = _deliver(_policy(mail_root))
    assert (outcome.status, outcome.reply.status) == ("deferred", "4.7.0")


def test_bad_user_name(mail_root: Path) -> None:
    outcome = _deliver(_policy(mail_root), user="..")
    assert (outcome.status, outcome.reply.status) == ("failed", "5.1.1")


def test_assigned_home_must_exist(tmp_path: Path) -> None:
    policy = _policy(tmp_path / "mail", assign=(LocalAssign(user="bob", home=tmp_path / "gone"),))
    outcome = _deliver(policy, user="bob")
    assert outcome.status == "deferred"


@REQUIRES_ROOT
def test_program_never_runs_as_root(mail_root: Path) -> None:
    _home(mail_root, dotqmail={".qmail": "|true\n"})
    outcome = _deliver(_policy(mail_root, program_user="root"))
    assert (outcome.status, outcome.reply.status) == ("deferred", "4.7.0")


@REQUIRES_ROOT
def test_assigned_user_is_confined_to_home(tmp_path: Path, shared: Path) -> None:
    home = tmp_path / "bob"
    home.mkdir(mode=0o700)
    os.chown(home, NOBODY, NOBODY)
    outside = tmp_path / "outside"
    outside.mkdir()
    policy = _policy(
        tmp_path / "mail",
        assign=(LocalAssign(user="bob", home=home, uid=NOBODY, gid=NOBODY),),
    )
    # Default delivery: the files belong to the user.
    assert _deliver(policy, user="bob").status == "delivered"
    (name,) = os.listdir(home / "Maildir" / "new")
    info = (home / "Maildir" / "new" / name).stat()
    assert (info.st_uid, info.st_gid) == (NOBODY, NOBODY)
    # A path outside the home, or a symlink out of it, is refused.
    (home / ".qmail").write_text(f"{outside}/\n")
    (home / ".qmail").chmod(0o600)
    outcome = _deliver(policy, user="bob")
    assert (outcome.status, outcome.reply.status) == ("deferred", "4.7.0")
    (home / "link").symlink_to(outside)
    (home / ".qmail").write_text("./link/Maildir/\n")
    assert _deliver(policy, user="bob").status == "deferred"
    assert list(outside.iterdir()) == []
    # Programs run as the assigned uid.
    (home / ".qmail").write_text(f"|id -u > {shared}/uid\n")
    assert _deliver(policy, user="bob").status == "delivered"
    assert (shared / "uid").read_text().strip() == str(NOBODY)
