"""VERP through real SMTP sessions: XVERP from a relay client, VERP by policy, and
``gateway inject -V``; a real peer that refuses one subscriber, and the bounce landing
in the list's real Maildir at that subscriber's VERP address.

127.0.0.2 is a relay client; 127.0.0.1 is "outside".
"""

from __future__ import annotations

import email
import email.policy
import os
import smtplib
import subprocess
import sys
from pathlib import Path

from tests.conftest import wait_for
from tests.smtppeer import SmtpPeer

ROOT = Path(__file__).resolve().parents[2]
LIST = "list@lists.test.example"
BOB, CAROL = "bob@peer.test.example", "carol@peer.test.example"
MESSAGE = (
    b"From: The List <list@lists.test.example>\r\nTo: list@lists.test.example\r\n"
    b"Subject: issue 42\r\nMessage-ID: <issue-42@lists.test.example>\r\n\r\nNews.\r\n"
)


def policy(base: Path, peer_port: int, extra: str = "") -> str:
    return f"""
[server]
hostname = "lists.test.example"
queue_dir = "{base / 'queue'}"
var_dir = "{base / 'var'}"
[[listeners]]
name = "smtp"
tls = "none"
[local]
domains = ["lists.test.example"]
users = ["postmaster", "list"]
mail_root = "{base / 'mail'}"
[relay]
clients = ["127.0.0.2/32"]
[delivery]
retry_base = "200ms"
retry_max = "500ms"
poll_interval = "200ms"
[[routes]]
domain = "peer.test.example"
host = "127.0.0.1"
port = {peer_port}
tls = "none"
[[plugins]]
name = "rcpt_relay"
[[plugins]]
name = "rcpt_local_users"
{extra}
[[plugins]]
name = "queue_received_header"
"""


def list_home(base: Path) -> Path:
    """The list's home: every list-anything@ address lands in its Maildir (.qmail-default).

    The policy keeps the default extension delimiter (-) and the VERP delimiters are the
    default ones: the bounces to the list's VERP addresses must arrive with no setting changed.
    """
    home = base / "mail" / "list"
    home.mkdir(parents=True, mode=0o700)
    (home / ".qmail-default").write_text("./Maildir/\n")
    os.chmod(home / ".qmail-default", 0o600)
    return home


def maildir(home: Path) -> list[bytes]:
    new = home / "Maildir" / "new"
    return [p.read_bytes() for p in sorted(new.glob("*"))] if new.exists() else []


def client(port: int, source: str) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", port, local_hostname="client.test.example", timeout=10, source_address=(source, 0))


def dsn_fields(raw: bytes) -> list[email.message.Message]:
    dsn = email.message_from_bytes(raw, policy=email.policy.default)
    assert dsn.get_content_type() == "multipart/report"
    return list(dsn.get_payload()[1].get_payload())[1:]


def test_xverp_list_mail_bounce_names_the_failing_subscriber(gateway_factory, tmp_path: Path) -> None:
    home = list_home(tmp_path)
    with SmtpPeer(dsn=True) as peer:
        peer.always_rcpt(CAROL, "550 5.1.1 carol: no such user")
        gw = gateway_factory(policy(tmp_path, peer.port))
        with client(gw.port, "127.0.0.2") as smtp:
            smtp.ehlo()
            assert smtp.has_extn("xverp")
            assert smtp.sendmail(LIST, [BOB, CAROL], MESSAGE, mail_options=["XVERP"]) == {}
        assert wait_for(lambda: len(maildir(home)) == 1, timeout=15)
        assert wait_for(lambda: gw.queue_ids() == [], timeout=10)
        # Bob's copy went out in its own transaction, from Bob's own return path.
        (delivered,) = peer.messages
        assert delivered.mail_from == "list-bob=peer.test.example@lists.test.example"
        assert delivered.rcpt_tos == [BOB]
    (bounce,) = maildir(home)
    assert bounce.startswith(
        b"Return-Path: <>\r\nDelivered-To: list-carol=peer.test.example@lists.test.example\r\n"
    )
    parsed = email.message_from_bytes(bounce, policy=email.policy.default)
    assert parsed["To"].addresses[0].addr_spec == "list-carol=peer.test.example@lists.test.example"
    (fields,) = dsn_fields(bounce)
    assert fields["Final-Recipient"] == "rfc822; carol@peer.test.example"
    assert fields["Action"] == "failed" and fields["Status"] == "5.1.1"
    assert b"bob@peer.test.example" not in bounce.split(b"Undelivered Message")[0]


def test_xverp_is_neither_offered_nor_accepted_from_outside(gateway_factory, tmp_path: Path) -> None:
    gw = gateway_factory(policy(tmp_path, 25))
    with client(gw.port, "127.0.0.1") as smtp:
        smtp.ehlo()
        assert not smtp.has_extn("xverp")
        code, text = smtp.mail(LIST, ["XVERP"])
        assert (code, text[:5]) == (555, b"5.5.4")
        assert smtp.mail(LIST)[0] == 250  # the session goes on
    with client(gw.port, "127.0.0.2") as smtp:
        smtp.ehlo()
        assert smtp.mail(LIST, ["XVERP=ab"])[0] == 501


def test_policy_verp_for_list_senders_and_inject_v(gateway_factory, tmp_path: Path) -> None:
    verp = '[[plugins]]\nname = "mail_verp"\nsenders = ["@lists.test.example"]\n'
    with SmtpPeer() as peer:
        text = policy(tmp_path, peer.port, verp)
        gw = gateway_factory(text)
        with client(gw.port, "127.0.0.2") as smtp:
            assert smtp.sendmail(LIST, [BOB, CAROL], MESSAGE) == {}
        assert wait_for(lambda: len(peer.messages) == 2, timeout=15)
        assert sorted((m.mail_from, tuple(m.rcpt_tos)) for m in peer.messages) == [
            ("list-bob=peer.test.example@lists.test.example", (BOB,)),
            ("list-carol=peer.test.example@lists.test.example", (CAROL,)),
        ]
        # gateway inject -V with Postfix's delimiters, into the running gateway's queue.
        (tmp_path / "policy.toml").write_text(text)
        done = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "inject", "-p", str(tmp_path / "policy.toml"),
             "--verp=+=", "-f", "news-return@lists.test.example", BOB],
            input=MESSAGE, capture_output=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        assert done.returncode == 0, done.stderr
        assert wait_for(lambda: len(peer.messages) == 3, timeout=15)
        assert peer.messages[2].mail_from == "news-return+bob=peer.test.example@lists.test.example"
        # sendmail -XV (Postfix's spelling), default delimiters.
        done = subprocess.run(
            [sys.executable, "-m", "gateway.sendmail", "-C", str(tmp_path / "policy.toml"),
             "-XV", "-f", "digest@lists.test.example", "-i", CAROL],
            input=MESSAGE, capture_output=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        assert done.returncode == 0, done.stderr
        assert wait_for(lambda: len(peer.messages) == 4, timeout=15)
        assert peer.messages[3].mail_from == "digest-carol=peer.test.example@lists.test.example"
