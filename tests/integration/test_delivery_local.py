"""End to end: SMTP in, queue, scheduler, local delivery into real Maildirs; retries and bounces."""

from __future__ import annotations

import email
import email.policy
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.conftest import MESSAGE, send_for_reply, smtp, spy_commits, wait_for
from tests.localmail import LOCAL_POLICY, dot_qmail, home, maildir, messages

POLICY = LOCAL_POLICY


def send(gw, sender: str, rcpts: list[str], data: bytes = MESSAGE) -> None:
    with smtp(gw.port) as client:
        assert client.sendmail(sender, rcpts, data) == {}


def test_delivers_into_the_users_maildir_and_leaves_the_queue(gateway_factory) -> None:
    gw = gateway_factory(POLICY)
    send(gw, "sender@example.org", ["alice@localhost", "bob@localhost"])
    assert wait_for(lambda: messages(gw, "alice") and messages(gw, "bob"), timeout=10)
    (data,) = messages(gw, "alice")
    assert data.startswith(b"Return-Path: <sender@example.org>\r\nDelivered-To: alice@localhost\r\nReceived: from ")
    assert data.endswith(MESSAGE)
    assert wait_for(lambda: gw.queue_ids() == [], timeout=5)


def _record_bookkeeping(gw) -> tuple[list[tuple[str, list[str], list[bool]]], list[str]]:
    """Spy on the store: (qid, recipient states, notified flags) per state write, and
    the qids removed (the real methods still run)."""
    store = gw.app.queue
    update_state, delete = store.update_state, store.delete
    writes: list[tuple[str, list[str], list[bool]]] = []
    removals: list[str] = []

    def recording_update(qid, envelope, **fields):
        writes.append((qid, [r.state.value for r in envelope.recipients], [r.notified for r in envelope.recipients]))
        return update_state(qid, envelope, **fields)

    async def recording_delete(qid, area="msg", **kwargs):
        removals.append(qid)
        return await delete(qid, area, **kwargs)

    store.update_state, store.delete = recording_update, recording_delete
    return writes, removals


def test_a_delivered_message_is_removed_without_a_state_write(gateway_factory) -> None:
    # Each state write costs two flushes: a message whose every recipient is delivered
    # and owed no notice is not written at all; its removal is the record. (Queued:
    # with at_once, a message for one Maildir would not be queued at all.)
    gw = gateway_factory(POLICY.replace("[delivery]\n", "[delivery]\nat_once = false\n"))
    writes, removals = _record_bookkeeping(gw)
    send(gw, "sender@example.org", ["alice@localhost"])
    assert wait_for(lambda: messages(gw, "alice"), timeout=10)
    assert wait_for(lambda: gw.queue_ids() == [], timeout=5)
    assert writes == [] and len(removals) == 1


def test_groups_finishing_together_remove_the_message_once(gateway_factory) -> None:
    # alice and bob are two routes delivered in parallel: whichever group finishes last
    # removes the message (the other records its result or shares that removal).
    # (Queued: with at_once, two plain Maildirs are delivered before the reply.)
    gw = gateway_factory(POLICY.replace("[delivery]\n", "[delivery]\nat_once = false\n"))
    writes, removals = _record_bookkeeping(gw)
    for _ in range(5):
        send(gw, "sender@example.org", ["alice@localhost", "bob@localhost"])
    assert wait_for(lambda: len(messages(gw, "alice")) == 5 and len(messages(gw, "bob")) == 5, timeout=15)
    assert wait_for(lambda: gw.queue_ids() == [], timeout=5)
    assert len(removals) == len(set(removals)) == 5
    # Only the group that finishes first writes its results: at most one write a message.
    # (The spy reads the shared envelope on the writer thread, so the states it sees may
    # already include the other group's result: count writes, not what they show.)
    written = [qid for qid, _, _ in writes]
    assert len(written) == len(set(written)) <= 5
    assert len(messages(gw, "alice")) == 5 and len(messages(gw, "bob")) == 5


def test_a_success_notice_is_recorded_before_the_message_goes(gateway_factory) -> None:
    gw = gateway_factory(POLICY)
    writes, removals = _record_bookkeeping(gw)
    with smtp(gw.port) as client:
        assert client.sendmail("bob@localhost", ["alice@localhost"], MESSAGE, rcpt_options=["NOTIFY=SUCCESS"]) == {}
    assert wait_for(lambda: messages(gw, "alice") and messages(gw, "bob"), timeout=10)
    assert wait_for(lambda: gw.queue_ids() == [], timeout=5)
    dsn = email.message_from_bytes(messages(gw, "bob")[0].split(b"\r\n", 2)[2], policy=email.policy.default)
    assert dsn.get_payload()[1].get_payload()[1]["Action"] == "delivered"
    original = {qid for qid, _, _ in writes}
    assert len(original) == 1  # the notice itself (null sender) owes nothing: no write
    assert writes[-1][1:] == (["delivered"], [True])  # the notice is recorded as sent
    assert len(removals) == 2 and original < set(removals)


def test_program_exit_100_bounces_to_the_sender_as_a_dsn(gateway_factory) -> None:
    gw = gateway_factory(POLICY)
    dot_qmail(gw, "alice", ".qmail-fail", "|echo 'no such list here'; exit 100\n")
    send(gw, "bob@localhost", ["alice-fail@localhost"])
    assert wait_for(lambda: messages(gw, "bob"), timeout=10)
    (raw,) = messages(gw, "bob")
    dsn = email.message_from_bytes(raw.split(b"\r\n", 2)[2], policy=email.policy.default)
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    assert dsn["To"] == "bob@localhost" and "MAILER-DAEMON" in dsn["From"]
    status = dsn.get_payload()[1]
    fields = status.get_payload()[1]
    assert fields["Action"] == "failed"
    assert fields["Status"].startswith("5.")
    assert "alice-fail@localhost" in fields["Final-Recipient"]
    assert "no such list here" in fields["Diagnostic-Code"]
    assert wait_for(lambda: gw.queue_ids() == [], timeout=5)


def test_temporary_failure_is_retried_until_delivered(gateway_factory) -> None:
    gw = gateway_factory(POLICY)
    # Programs never run as root: as root they run as nobody, so the marker lives in a
    # directory anyone may reach and write (pytest's tmp_path is private to root).
    shared = Path(tempfile.mkdtemp(prefix="gateway-test-"))
    shared.chmod(0o777)
    marker = shared / "marker"
    dot_qmail(gw, "alice", ".qmail-flaky", f"|test -f {marker} || {{ touch {marker}; exit 111; }}\n./Maildir/\n")
    send(gw, "sender@example.org", ["alice-flaky@localhost"])
    assert wait_for(lambda: messages(gw, "alice"), timeout=10)
    assert marker.exists()
    assert len(messages(gw, "alice")) == 1
    shutil.rmtree(shared)


def test_forward_line_queues_a_copy_for_the_target(gateway_factory) -> None:
    gw = gateway_factory(POLICY)
    dot_qmail(gw, "alice", ".qmail", "&bob@localhost\n./Maildir/\n")
    send(gw, "sender@example.org", ["alice@localhost"])
    assert wait_for(lambda: messages(gw, "bob") and messages(gw, "alice"), timeout=10)
    (forwarded,) = messages(gw, "bob")
    assert b"Delivered-To: alice@localhost\r\n" in forwarded
    assert forwarded.startswith(b"Return-Path: <sender@example.org>\r\nDelivered-To: bob@localhost\r\n")


def test_forwarding_loop_is_detected_and_bounced(gateway_factory) -> None:
    gw = gateway_factory(POLICY)
    dot_qmail(gw, "alice", ".qmail", "&bob@localhost\n")
    dot_qmail(gw, "bob", ".qmail", "&alice@localhost\n")
    send(gw, "postmaster@localhost", ["alice@localhost"])
    assert wait_for(lambda: messages(gw, "postmaster"), timeout=15)
    report = messages(gw, "postmaster")[0]
    assert b"5.4.6" in report


def test_failed_bounce_goes_to_the_postmaster_once(gateway_factory) -> None:
    gw = gateway_factory(POLICY)
    dot_qmail(gw, "alice", ".qmail-fail", "|exit 100\n")
    dot_qmail(gw, "postmaster", ".qmail", "./Maildir/\n")
    send(gw, "", ["alice-fail@localhost"])
    assert wait_for(lambda: messages(gw, "postmaster"), timeout=10)
    (raw,) = messages(gw, "postmaster")
    assert b"Delivered-To: postmaster@localhost" in raw
    assert b"alice-fail@localhost" in raw
    assert wait_for(lambda: gw.queue_ids() == [], timeout=5)


def test_unknown_local_user_injected_past_smtp_bounces(gateway_factory) -> None:
    gw = gateway_factory(POLICY)
    dot_qmail(gw, "alice", ".qmail", "&ghost@localhost\n")
    send(gw, "bob@localhost", ["alice@localhost"])
    assert wait_for(lambda: messages(gw, "bob"), timeout=10)
    assert b"5.1.1" in messages(gw, "bob")[0]


# -- delivery at once ([delivery] at_once, docs/queue.md) ----------------------------------


def test_a_plain_maildir_message_is_in_the_maildir_before_the_reply_and_never_queued(
    gateway_factory, caplog: pytest.LogCaptureFixture
) -> None:
    gw = gateway_factory(POLICY)
    committed = spy_commits(gw)
    with caplog.at_level("INFO", logger="gateway"):
        reply = send_for_reply(gw, "sender@example.org", ["alice@localhost"])
        (data,) = messages(gw, "alice")  # no waiting: it was there before the 250
    qid = reply.rsplit(" ", 1)[1]
    assert reply.startswith("2.0.0 OK delivered as ")
    assert data.startswith(b"Return-Path: <sender@example.org>\r\nDelivered-To: alice@localhost\r\n")
    assert data.endswith(MESSAGE)
    # The queued first attempt's name: a retry of the queue path would find this copy.
    (name,) = [p.name for p in (maildir(gw, "alice") / "new").iterdir()]
    assert f".Q{qid}R0L0." in name
    assert committed == [] and gw.queue_ids() == []
    assert not list((maildir(gw, "alice") / "tmp").iterdir())
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("queued from=<sender@example.org>") and "area=direct" in line for line in lines)
    assert any(line.startswith("delivery to=<alice@localhost> status=delivered relay=local") for line in lines)
    assert "done: delivered at once, never queued" in lines


AT_ONCE_OFF = POLICY.replace('[delivery]\n', '[delivery]\nat_once = false\n')


@pytest.mark.parametrize("case", ["instruction file", "success notice", "switched off"])
def test_mail_that_needs_the_queue_goes_through_it(gateway_factory, case: str) -> None:
    gw = gateway_factory(AT_ONCE_OFF if case == "switched off" else POLICY)
    committed = spy_commits(gw)
    rcpts, options = ["alice@localhost"], ()
    if case == "instruction file":
        dot_qmail(gw, "alice", ".qmail", "./Maildir/\n")
    elif case == "success notice":
        options = ("NOTIFY=SUCCESS",)
    reply = send_for_reply(gw, "sender@example.org", rcpts, rcpt_options=options)
    assert reply.startswith("2.0.0 OK queued as ")
    assert committed == [reply.rsplit(" ", 1)[1]]
    assert wait_for(lambda: all(messages(gw, r.split("@")[0]) for r in rcpts), timeout=10)
    assert wait_for(lambda: gw.queue_ids() == [], timeout=5)


def test_several_local_recipients_are_each_in_their_maildir_before_the_reply(gateway_factory) -> None:
    gw = gateway_factory(POLICY)
    committed = spy_commits(gw)
    reply = send_for_reply(gw, "sender@example.org", ["alice@localhost", "bob@localhost"])
    assert reply.startswith("2.0.0 OK delivered as ")
    assert len(messages(gw, "alice")) == len(messages(gw, "bob")) == 1  # no waiting
    assert committed == [] and gw.queue_ids() == []


def test_a_message_delivered_at_once_to_some_recipients_is_queued_for_the_rest_only(
    gateway_factory, caplog: pytest.LogCaptureFixture
) -> None:
    """alice's Maildir has it before the reply; bob's instruction file needs the queue.
    The first queued attempt records alice's delivery (never made again) and delivers
    bob's."""
    gw = gateway_factory(POLICY)
    dot_qmail(gw, "bob", ".qmail", "./Maildir/\n")
    committed = spy_commits(gw)
    with caplog.at_level("INFO", logger="gateway"):
        reply = send_for_reply(gw, "sender@example.org", ["alice@localhost", "bob@localhost"])
        assert reply.startswith("2.0.0 OK queued as ") and committed == [reply.rsplit(" ", 1)[1]]
        assert len(messages(gw, "alice")) == 1  # before the reply
        assert wait_for(lambda: messages(gw, "bob"), timeout=10)
        assert wait_for(lambda: gw.queue_ids() == [], timeout=5)
    assert len(messages(gw, "alice")) == len(messages(gw, "bob")) == 1
    lines = [r.getMessage() for r in caplog.records]
    queued = next(i for i, line in enumerate(lines) if line.startswith("queued from=<sender@"))
    delivered = [i for i, line in enumerate(lines) if line.startswith("delivery to=") and "status=delivered" in line]
    assert len(delivered) == 2 and all(i > queued for i in delivered)
    # alice's Maildir was written once: at once, not again by the queued attempt.
    assert len([line for line in lines if line.startswith("local delivery to=alice@localhost ")]) == 1


def test_a_maildir_that_fails_sends_the_message_to_the_queue_and_loses_nothing(gateway_factory) -> None:
    gw = gateway_factory(POLICY)
    (home(gw, "alice") / "Maildir").write_text("not a directory\n")
    committed = spy_commits(gw)
    reply = send_for_reply(gw, "sender@example.org", ["alice@localhost"])
    qid = reply.rsplit(" ", 1)[1]
    assert reply.startswith("2.0.0 OK queued as ") and committed == [qid]
    assert wait_for(lambda: gw.queue_ids() == [qid], timeout=5)
    (home(gw, "alice") / "Maildir").unlink()  # the mailbox is fixed: a retry delivers it, once
    assert wait_for(lambda: messages(gw, "alice"), timeout=10)
    assert wait_for(lambda: gw.queue_ids() == [], timeout=5)
    assert len(messages(gw, "alice")) == 1


def test_a_delivery_at_once_writes_what_the_queued_attempt_writes(gateway_factory) -> None:
    """Same headers and octets either way, with a VERP sender too (the Maildir file
    name, made of the queue id, differs)."""
    verp = '[[plugins]]\nname = "mail_verp"\nsenders = ["@example.org"]\n'
    written = []
    for text in (POLICY + verp, AT_ONCE_OFF + verp):
        gw = gateway_factory(text)
        reply = send_for_reply(gw, "news@example.org", ["alice@localhost"])
        assert wait_for(lambda: messages(gw, "alice"), timeout=10)
        (data,) = messages(gw, "alice")
        written.append((reply.split(" as ")[0], re.sub(rb" id [0-9A-F]+\r\n", b" id QID\r\n", re.sub(rb"\d\d:\d\d:\d\d", b"T", data))))
    (at_once, direct), (queued, via_queue) = written
    assert (at_once, queued) == ("2.0.0 OK delivered", "2.0.0 OK queued")
    assert direct == via_queue
