"""Archive copies (queue_archive) through real SMTP sessions, real Maildirs and a real peer.

127.0.0.2 is a relay client (outbound mail); 127.0.0.1 is "outside" (inbound mail).
"""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest

from gateway.policy import PolicyError
from gateway.verdicts import Reply, TemporaryFailure
from plugins.queue_archive import Settings, archive_addresses
from tests.conftest import wait_for
from tests.smtppeer import SmtpPeer


def policy(tmp: Path, peer_port: int, archive: str) -> str:
    for home in ("archive-in", "archive-out"):  # an assigned home must exist
        (tmp / home).mkdir(mode=0o700, exist_ok=True)
    return f"""
[server]
hostname = "mx.local.test.example"
[[listeners]]
name = "smtp"
tls = "none"
[local]
domains = ["local.test.example"]
users = ["postmaster", "alice", "archivein", "archiveout"]
[[local.assign]]
user = "archivein"
home = "{tmp / 'archive-in'}"
[[local.assign]]
user = "archiveout"
home = "{tmp / 'archive-out'}"
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
{archive}
[[plugins]]
name = "queue_received_header"
"""


def maildir(path: Path) -> list[bytes]:
    new = path / "Maildir" / "new"
    return [p.read_bytes() for p in sorted(new.glob("*"))] if new.exists() else []


def send(port: int, source: str, sender: str, rcpts: list[str], subject: str) -> None:
    message = (
        f"From: <{sender}>\r\nTo: <{rcpts[0]}>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject}@test.example>\r\n\r\nHello.\r\n"
    ).encode()
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test.example",
                      timeout=10, source_address=(source, 0)) as client:
        assert client.sendmail(sender, rcpts, message) == {}


def _after_local_trace(raw: bytes) -> bytes:
    """The message without the Return-Path and Delivered-To lines local delivery adds."""
    lines = raw.split(b"\r\n")
    while lines and lines[0].split(b":")[0] in (b"Return-Path", b"Delivered-To"):
        lines.pop(0)
    return b"\r\n".join(lines)


def test_inbound_and_outbound_copies_land_once_each_in_their_maildir(gateway_factory, tmp_path: Path) -> None:
    archive = """
[[plugins]]
name = "queue_archive"
id = "archive_in"
direction = "inbound"
always = ["archivein@local.test.example"]
[[plugins]]
name = "queue_archive"
id = "archive_out"
direction = "outbound"
always = ["archiveout@local.test.example"]
"""
    with SmtpPeer() as peer:
        gw = gateway_factory(policy(tmp_path, peer.port, archive))
        send(gw.port, "127.0.0.1", "someone@remote.example", ["alice@local.test.example"], "inbound-1")
        send(gw.port, "127.0.0.2", "alice@local.test.example", ["bob@peer.test.example"], "outbound-1")
        assert wait_for(lambda: len(peer.messages) == 1, timeout=15)
        assert wait_for(lambda: gw.queue_ids() == [], timeout=15)
        outbound = peer.messages[0].content
    alice = maildir(Path(gw.policy.local.mail_root) / "alice")
    archived_in = maildir(tmp_path / "archive-in")
    archived_out = maildir(tmp_path / "archive-out")
    assert len(alice) == 1 and len(archived_in) == 1 and len(archived_out) == 1
    # The copy is the message as queued: our Received header and all, byte for byte.
    assert _after_local_trace(archived_in[0]) == _after_local_trace(alice[0])
    assert b"Subject: inbound-1" in archived_in[0] and b"Received: from client.test.example" in archived_in[0]
    assert b"Subject: outbound-1" in archived_out[0]
    assert _after_local_trace(archived_out[0]).replace(b"\r\n", b"\n") == outbound.replace(b"\r\n", b"\n")
    # The copies travel with the null sender: the original sender never hears of them.
    assert archived_in[0].startswith(b"Return-Path: <>\r\n")


def test_a_failing_archive_neither_delays_nor_loses_the_original(gateway_factory, tmp_path: Path) -> None:
    archive = """
[[plugins]]
name = "queue_archive"
always = ["archive@peer.test.example"]
"""
    with SmtpPeer() as peer:
        peer.always_rcpt("archive@peer.test.example", "451 4.3.0 archive is down")
        gw = gateway_factory(policy(tmp_path, peer.port, archive))
        send(gw.port, "127.0.0.1", "someone@remote.example", ["alice@local.test.example"], "kept")
        alice = Path(gw.policy.local.mail_root) / "alice"
        assert wait_for(lambda: len(maildir(alice)) == 1, timeout=15)
        # The original is delivered and gone; the copy stays queued and is retried alone.
        assert wait_for(lambda: len(gw.queue_ids()) == 1, timeout=10)
        (qid,) = gw.queue_ids()
        assert wait_for(lambda: gw.queue.load(qid).attempts >= 2, timeout=15)
        item = gw.queue.load(qid)
        assert item.envelope.sender == ""
        assert [r.address for r in item.envelope.recipients] == ["archive@peer.test.example"]
        assert "451 4.3.0 archive is down" in item.envelope.recipients[0].last_reply
        assert peer.messages == []
    assert b"Subject: kept" in maildir(alice)[0]


def _failing_commits(gw, fails) -> None:
    """Fault injection into our own queue store (nothing external is mocked): the commits
    whose envelope ``fails(envelope)`` picks fail as a full disk would."""
    store = gw.app.queue
    real = store.commit

    async def commit(qid, envelope, message, **kwargs):
        if fails(envelope):
            raise TemporaryFailure(Reply(452, "4.3.1", "Insufficient system storage"))
        return await real(qid, envelope, message, **kwargs)

    store.commit = commit


ARCHIVE_LOCAL = """
[[plugins]]
name = "queue_archive"
always = ["archivein@local.test.example"]
"""


def test_a_copy_that_cannot_be_queued_costs_the_message_nothing(gateway_factory, tmp_path: Path) -> None:
    gw = gateway_factory(policy(tmp_path, 25, ARCHIVE_LOCAL))
    _failing_commits(gw, lambda envelope: envelope.sender == "")
    send(gw.port, "127.0.0.1", "someone@remote.example", ["alice@local.test.example"], "no-copy")
    alice = Path(gw.policy.local.mail_root) / "alice"
    assert wait_for(lambda: len(maildir(alice)) == 1, timeout=15)
    assert wait_for(lambda: gw.queue_ids() == [], timeout=10)
    assert maildir(tmp_path / "archive-in") == []


def test_a_message_refused_at_commit_takes_its_copy_back(gateway_factory, tmp_path: Path) -> None:
    gw = gateway_factory(policy(tmp_path, 25, ARCHIVE_LOCAL))
    _failing_commits(gw, lambda envelope: envelope.sender != "")
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(gw.port, "127.0.0.1", "someone@remote.example", ["alice@local.test.example"], "refused")
    assert refused.value.smtp_code == 452
    assert gw.queue_ids() == []  # the copy written beside it was removed before the 452
    # ... and so it is never delivered: the archive holds no copy of a refused message.
    assert not wait_for(lambda: maildir(tmp_path / "archive-in"), timeout=1)


def test_maps_pick_archive_addresses_by_address_then_domain() -> None:
    settings = Settings(
        always=["all@archive.example"],
        sender_map={"Boss@Corp.example": "boss@archive.example", "@corp.example": "corp@archive.example"},
        recipient_map={"@lists.example": "lists@archive.example", "ceo@corp.example": "all@archive.example"},
    )
    assert archive_addresses(settings, "boss@corp.example", ["x@lists.example", "y@lists.example"]) == [
        "all@archive.example", "boss@archive.example", "lists@archive.example",
    ]
    assert archive_addresses(settings, "clerk@corp.example", ["ceo@corp.example"]) == [
        "all@archive.example", "corp@archive.example",
    ]
    assert archive_addresses(Settings(), "a@b.example", ["c@d.example"]) == []


def test_a_bad_map_key_stops_startup(gateway_factory, tmp_path: Path) -> None:
    archive = """
[[plugins]]
name = "queue_archive"
sender_map = { "corp.example" = "corp@archive.example" }
"""
    with pytest.raises((ValueError, PolicyError), match="sender_map"):
        gateway_factory(policy(tmp_path, 25, archive))
