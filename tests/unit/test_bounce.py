"""Tests for gateway.delivery.bounce: DSNs as a mail client would read them back."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage, Message

from pathlib import Path

import pytest

from gateway.delivery.bounce import Kind, Notice, build_dsn, wants_notice
from gateway.delivery.types import Outcome
from gateway.model import Envelope, QueuedRecipient
from gateway.verdicts import Reply
from tests.streaming import big_message, file_content, no_whole_reads

MTA = "gw.example.com"
ARRIVED = 1_700_000_000.0
NOW = ARRIVED + 3600
USER_UNKNOWN = Reply(550, "5.1.1", "<bob@example.net>: Recipient address rejected: User unknown")
MAILBOX_FULL = Reply(552, "5.2.2", "Mailbox full")
TRY_LATER = Reply(451, "4.7.1", "Greylisted, try again later")
DELIVERED = Reply(250, "2.0.0", "Ok: queued as 4XyZ")

ORIGINAL = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: lunch\r\n"
    b"Message-ID: <lunch.1@example.org>\r\n"
    b"\r\n"
    b"SECRET-BODY-LINE shall we meet at noon?\r\n"
)


def _envelope(**kwargs: object) -> Envelope:
    env = Envelope(sender="alice@example.org", recipients=[], arrived=ARRIVED)
    for key, value in kwargs.items():
        setattr(env, key, value)
    return env


def _dsn(
    kind: Kind,
    items: list[tuple[QueuedRecipient, Outcome]],
    envelope: Envelope | None = None,
    original: bytes = ORIGINAL,
    **kwargs: object,
) -> Notice:
    return build_dsn(
        kind,
        envelope or _envelope(),
        items,
        original,
        reporting_mta=MTA,
        queue_id="4ABC123",
        now=NOW,
        **kwargs,  # type: ignore[arg-type]
    )


def _parse(notice: Notice) -> EmailMessage:
    msg = email.message_from_bytes(notice.message, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert not msg.defects
    return msg


def _parts(msg: EmailMessage) -> list[Message]:
    return list(msg.iter_parts())


def _status_blocks(msg: EmailMessage) -> list[Message]:
    """The per-message block, then one per recipient."""
    status = _parts(msg)[1]
    assert status.get_content_type() == "message/delivery-status"
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    return blocks


def _failed(address: str, reply: Reply = USER_UNKNOWN, remote: str = "mx.example.net[192.0.2.1]",
            **kwargs: object) -> tuple[QueuedRecipient, Outcome]:
    return QueuedRecipient(address, **kwargs), Outcome("failed", reply, remote)  # type: ignore[arg-type]


# --- wants_notice -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("notify", "failure", "delay", "success"),
    [
        ((), True, True, False),
        (("NEVER",), False, False, False),
        (("SUCCESS",), False, False, True),
        (("FAILURE",), True, False, False),
        (("DELAY",), False, True, False),
        (("SUCCESS", "FAILURE"), True, False, True),
        (("FAILURE", "DELAY"), True, True, False),
        (("SUCCESS", "FAILURE", "DELAY"), True, True, True),
    ],
)
def test_wants_notice_follows_notify(
    notify: tuple[str, ...], failure: bool, delay: bool, success: bool
) -> None:
    rcpt = QueuedRecipient("bob@example.net", notify=notify)
    assert wants_notice(rcpt, "failure") is failure
    assert wants_notice(rcpt, "delay") is delay
    assert wants_notice(rcpt, "success") is success


# --- failure notices ----------------------------------------------------------------


def test_failure_reports_every_recipient_in_one_dsn() -> None:
    items = [
        _failed("bob@example.net"),
        _failed("carol@example.net", MAILBOX_FULL, "mx2.example.net"),
    ]
    notice = _dsn("failure", items)
    assert notice.sender == ""
    assert notice.recipient == "alice@example.org"
    assert notice.body == "7BIT" and not notice.smtputf8
    assert b"\n" not in notice.message.replace(b"\r\n", b"")

    msg = _parse(notice)
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["From"].addresses[0].addr_spec == f"MAILER-DAEMON@{MTA}"
    assert msg["To"].addresses[0].addr_spec == "alice@example.org"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Message-ID"].endswith(f"@{MTA}>")
    assert msg["In-Reply-To"] == "<lunch.1@example.org>"
    assert msg["Date"].datetime.timestamp() == NOW

    parts = _parts(msg)
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "message/rfc822",
    ]
    text = parts[0].get_content()
    assert "<bob@example.net>" in text and "User unknown" in text
    assert "<carol@example.net>" in text and "Mailbox full" in text

    per_message, bob, carol = _status_blocks(msg)
    assert per_message["Reporting-MTA"] == f"dns; {MTA}"
    assert "Original-Envelope-Id" not in per_message
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == ARRIVED
    assert bob["Final-Recipient"] == "rfc822; bob@example.net"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx.example.net"
    assert bob["Diagnostic-Code"].startswith("smtp; 550 5.1.1 ")
    assert "Recipient address rejected: User unknown" in bob["Diagnostic-Code"]
    assert "Original-Recipient" not in bob and "Will-Retry-Until" not in bob
    assert carol["Final-Recipient"] == "rfc822; carol@example.net"
    assert carol["Status"] == "5.2.2"
    assert carol["Remote-MTA"] == "dns; mx2.example.net"
    assert "Mailbox full" in carol["Diagnostic-Code"]

    returned = parts[2].get_payload()[0]
    assert returned["Subject"] == "lunch"
    assert "SECRET-BODY-LINE" in returned.get_content()


def test_status_is_derived_from_the_code_when_the_reply_has_none() -> None:
    _, block = _status_blocks(_parse(_dsn("failure", [_failed("bob@example.net", Reply(554))])))
    assert block["Status"] == "5.0.0"
    assert block["Diagnostic-Code"] == "smtp; 554"


def test_local_failure_has_no_remote_mta() -> None:
    _, block = _status_blocks(_parse(_dsn("failure", [_failed("bob@example.net", remote="")])))
    assert "Remote-MTA" not in block


def test_expiry_reports_the_last_real_error_and_who_said_it() -> None:
    """After the queue lifetime the status is 4.4.7, but the diagnostic and the text keep
    the last real error: a remote host's reply with that host, a connection failure in
    our own words with no remote host blamed."""
    from gateway.delivery.notices import EXPIRED, expire_pending, recorded_outcome
    from gateway.model import RecipientState

    envelope = _envelope(recipients=[
        QueuedRecipient("bob@example.net", last_reply="451 4.3.0 mailbox locked, try later",
                        remote="mx.example.net"),
        QueuedRecipient("carol@example.org", last_reply="451 4.4.1 cannot connect to mx.example.org: Connection refused"),
        QueuedRecipient("dave@example.com"),  # never tried: held for a flush
    ])
    expire_pending(envelope, lambda address: address.endswith("@example.com"))
    assert all(r.state is RecipientState.FAILED and r.last_reply.endswith(EXPIRED) for r in envelope.recipients)
    items = [(r, recorded_outcome(r)) for r in envelope.recipients]
    msg = _parse(_dsn("failure", items, envelope, retry_until=ARRIVED + 5 * 86400))
    _, bob, carol, dave = _status_blocks(msg)
    for block in (bob, carol, dave):
        assert block["Action"] == "failed" and block["Status"] == "4.4.7"
    assert bob["Diagnostic-Code"] == "smtp; 451 4.3.0 mailbox locked, try later"
    assert bob["Remote-MTA"] == "dns; mx.example.net"
    assert carol["Diagnostic-Code"] == "smtp; 451 4.4.1 cannot connect to mx.example.org: Connection refused"
    assert "Remote-MTA" not in carol
    assert dave["Diagnostic-Code"] == "smtp; 451 4.4.7 held for a flush (ETRN) that never came"
    text = " ".join(_parts(msg)[0].get_content().split())
    assert "expired" not in bob["Diagnostic-Code"].lower()
    assert ("<bob@example.net>: delivery time expired: not delivered within 5 days. Last error: "
            "host mx.example.net said: 451 4.3.0 mailbox locked, try later") in text
    assert ("<carol@example.org>: delivery time expired: not delivered within 5 days. Last error "
            "(our own words: no remote host said it): 451 4.4.1 cannot connect to mx.example.org: "
            "Connection refused") in text
    assert "mx.example.net said: 554" not in text and "5.4.7" not in text


def test_orcpt_and_envid_are_reported() -> None:
    env = _envelope(envid="QQ314159")
    items = [_failed("bob@example.net", orcpt="rfc822;Bob@Example.NET")]
    per_message, bob = _status_blocks(_parse(_dsn("failure", items, env)))
    assert per_message["Original-Envelope-Id"] == "QQ314159"
    assert bob["Original-Recipient"] == "rfc822;Bob@Example.NET"


def test_long_diagnostic_is_folded_not_truncated() -> None:
    text = "policy rejection " + " ".join(f"word{i}" for i in range(200))
    notice = _dsn("failure", [_failed("bob@example.net", Reply(550, "5.7.1", text))])
    assert max(len(line) for line in notice.message.split(b"\r\n")) <= 998
    _, bob = _status_blocks(_parse(notice))
    assert bob["Diagnostic-Code"] == f"smtp; 550 5.7.1 {text}"


def test_to_overrides_the_sender_for_double_bounces() -> None:
    notice = _dsn("failure", [_failed("bob@example.net")], _envelope(sender=""), to="postmaster@gw.example.com")
    assert notice.recipient == "postmaster@gw.example.com"
    assert _parse(notice)["To"].addresses[0].addr_spec == "postmaster@gw.example.com"


def test_null_sender_without_to_is_refused() -> None:
    with pytest.raises(ValueError):
        _dsn("failure", [_failed("bob@example.net")], _envelope(sender=""))


# --- what is returned of the original -----------------------------------------------


def test_ret_hdrs_returns_only_the_headers() -> None:
    parts = _parts(_parse(_dsn("failure", [_failed("bob@example.net")], _envelope(ret="HDRS"))))
    assert parts[2].get_content_type() == "text/rfc822-headers"
    returned = parts[2].get_content()
    assert "Subject: lunch" in returned
    assert "SECRET-BODY-LINE" not in returned


def test_oversized_original_returns_only_the_headers() -> None:
    big = ORIGINAL + b"x" * 998 + b"\r\n"
    notice = _dsn("failure", [_failed("bob@example.net")], original=big, max_original=len(big) - 1)
    parts = _parts(_parse(notice))
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert "Message-ID: <lunch.1@example.org>" in parts[2].get_content()
    assert b"SECRET-BODY-LINE" not in notice.message


@pytest.mark.parametrize("ret", ["FULL", ""])
def test_large_original_on_disk_returns_its_headers_and_reads_no_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ret: str
) -> None:
    """A 6 MB queued message, even with RET=FULL: only its header block goes back, and
    only the head of the file is read (issue #17)."""
    message = big_message()
    with no_whole_reads(monkeypatch) as reads, file_content(tmp_path, message) as content:
        notice = _dsn("failure", [_failed("bob@example.net")], _envelope(ret=ret), original=content)
    assert reads == []
    parts = _parts(_parse(notice))
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert "Message-ID: <large.streaming@example.org>" in parts[2].get_content()
    assert len(notice.message) < 16 * 1024
    assert notice.message.count(b"<large.streaming@example.org>") == 3  # In-Reply-To, References, part 3


def test_small_original_on_disk_is_returned_whole(tmp_path: Path) -> None:
    with file_content(tmp_path, ORIGINAL) as content:
        notice = _dsn("failure", [_failed("bob@example.net")], original=content)
    parts = _parts(_parse(notice))
    assert parts[2].get_content_type() == "message/rfc822"
    assert b"SECRET-BODY-LINE" in notice.message


# --- delay and success notices ------------------------------------------------------


def test_delay_notice_says_delayed_and_until_when() -> None:
    until = ARRIVED + 5 * 86400
    items = [(QueuedRecipient("bob@example.net"), Outcome("deferred", TRY_LATER, "mx.example.net"))]
    msg = _parse(_dsn("delay", items, retry_until=until))
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    assert "WARNING ONLY" in _parts(msg)[0].get_content()
    _, bob = _status_blocks(msg)
    assert bob["Action"] == "delayed"
    assert bob["Status"] == "4.7.1"
    assert email.utils.parsedate_to_datetime(bob["Will-Retry-Until"]).timestamp() == until


def test_success_notice_says_delivered_and_returns_headers_only() -> None:
    items = [(QueuedRecipient("bob@localhost"), Outcome("delivered", DELIVERED))]
    msg = _parse(_dsn("success", items))
    assert msg["Subject"] == "Successful Mail Delivery Report"
    _, bob = _status_blocks(msg)
    assert bob["Action"] == "delivered"
    assert bob["Status"] == "2.0.0"
    assert _parts(msg)[2].get_content_type() == "text/rfc822-headers"


def test_success_notice_for_a_next_hop_without_dsn_says_relayed() -> None:
    # RFC 3464 §2.3.3: the next hop took the message but will not report further.
    items = [(QueuedRecipient("bob@example.net"), Outcome("delivered", DELIVERED, "mx.example.net"))]
    _, bob = _status_blocks(_parse(_dsn("success", items)))
    assert bob["Action"] == "relayed"
    assert bob["Remote-MTA"] == "dns; mx.example.net"


def test_success_notice_returns_full_message_with_ret_full() -> None:
    items = [(QueuedRecipient("bob@example.net"), Outcome("delivered", DELIVERED, "mx.example.net"))]
    parts = _parts(_parse(_dsn("success", items, _envelope(ret="FULL"))))
    assert parts[2].get_content_type() == "message/rfc822"


# --- hostile input and 8-bit --------------------------------------------------------


def test_header_injection_in_remote_texts_is_neutralised() -> None:
    reply = Reply(550, "5.1.1", "no such user\nX-Injected: reply")
    items = [_failed("bob@example.net\r\nX-Injected: rcpt", reply, "mx.example.net\r\nX-Injected: remote")]
    notice = _dsn("failure", items)
    assert b"\r\nX-Injected" not in notice.message
    assert b"\nX-Injected" not in notice.message
    msg = _parse(notice)
    _, bob = _status_blocks(msg)
    assert "X-Injected" not in bob
    assert bob["Remote-MTA"] == "dns; mx.example.net"
    assert "X-Injected: reply" in bob["Diagnostic-Code"]


def test_utf8_original_is_sent_8bitmime() -> None:
    original = ORIGINAL.replace(
        b"\r\n\r\n",
        b"\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n",
    ).replace(b"noon?", "midi, café?".encode())
    notice = _dsn("failure", [_failed("bob@example.net")], original=original)
    assert notice.body == "8BITMIME"
    assert not notice.smtputf8
    returned = _parts(_parse(notice))[2].get_payload()[0]
    assert "café" in returned.get_content()


def test_utf8_addresses_use_global_delivery_status() -> None:
    env = _envelope(sender="álice@exämple.org", smtputf8=True)
    notice = _dsn("failure", [_failed("bøb@exämple.net")], env)
    assert notice.smtputf8 and notice.body == "8BITMIME"
    assert "Content-Type: message/global-delivery-status".encode() in notice.message
    assert "Final-Recipient: utf-8; bøb@exämple.net\r\n".encode() in notice.message
    assert "Content-Type: message/global\r\n".encode() in notice.message
    msg = email.message_from_bytes(notice.message, policy=email.policy.default)
    assert [p.get_content_type() for p in msg.iter_parts()] == [
        "text/plain", "message/global-delivery-status", "message/global",
    ]
