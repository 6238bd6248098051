"""Relaying at once (``[delivery] at_once``, ``at_once_wait``; docs/queue.md): a message
for one relayed recipient goes to the next hop while its client waits, and is never
queued when the next hop takes it; anything else goes through the queue as before.

The next hop is a real SMTP server on loopback (tests/smtppeer.py), scripted to refuse,
to stall before the final dot, or to take long over its reply to it.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.conftest import MESSAGE, send_for_reply, spy_commits, wait_for
from tests.smtppeer import SmtpPeer

POLICY = """
[server]
hostname = "relay.test.example"
[[listeners]]
name = "smtp"
tls = "none"
[local]
domains = ["relay.test.example"]
users = ["postmaster", "alice"]
[relay]
clients = ["127.0.0.0/8"]
[delivery]
retry_base = "200ms"
retry_max = "500ms"
poll_interval = "200ms"
{delivery}
[[routes]]
domain = "peer.test.example"
host = "127.0.0.1"
port = {port}
tls = "none"
{route}
[[plugins]]
name = "rcpt_relay"
[[plugins]]
name = "rcpt_local_users"
[[plugins]]
name = "queue_received_header"
"""

ALICE = "alice@relay.test.example"
BOB = "bob@peer.test.example"


def relay_policy(peer: SmtpPeer, delivery: str = "", route: str = "") -> str:
    return POLICY.format(port=peer.port, delivery=delivery, route=route)


def inbox(gw, user: str) -> list[bytes]:
    new = Path(gw.policy.local.mail_root) / user / "Maildir" / "new"
    return [p.read_bytes() for p in sorted(new.glob("*"))] if new.exists() else []


def test_a_relayed_message_is_at_the_next_hop_before_the_reply_and_never_queued(
    gateway_factory, caplog: pytest.LogCaptureFixture
) -> None:
    with SmtpPeer() as peer:
        gw = gateway_factory(relay_policy(peer))
        committed = spy_commits(gw)
        with caplog.at_level("INFO", logger="gateway"):
            reply = send_for_reply(gw, ALICE, [BOB])
            (received,) = peer.messages  # no waiting: the next hop had it before the 250
    assert reply.startswith("2.0.0 OK delivered as ")
    assert received.mail_from == "alice@relay.test.example" and received.rcpt_tos == [BOB]
    assert received.content.startswith(b"Received: from ") and received.content.endswith(MESSAGE)
    assert committed == [] and gw.queue_ids() == []
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("queued from=<alice@relay.test.example>") and "area=direct" in line for line in lines)
    assert any(line.startswith(f"delivery to=<{BOB}> status=delivered relay=127.0.0.1") for line in lines)
    assert "done: delivered at once, never queued" in lines


def test_a_slow_reply_to_the_final_dot_is_waited_for_not_cut_off(gateway_factory) -> None:
    """Past the dot the host may have the message: cutting it off then could deliver it
    twice (once now, once from the queue), so the client waits for the answer."""
    with SmtpPeer(delay=1.5) as peer:
        gw = gateway_factory(relay_policy(peer, 'at_once_wait = "300ms"'))
        committed = spy_commits(gw)
        started = time.monotonic()
        reply = send_for_reply(gw, ALICE, [BOB])
        assert time.monotonic() - started >= 1.5
        assert reply.startswith("2.0.0 OK delivered as ")
        assert len(peer.messages) == 1 and committed == []


def test_a_host_stalling_before_the_dot_gets_the_message_queued_and_delivered_once(
    gateway_factory, caplog: pytest.LogCaptureFixture
) -> None:
    with SmtpPeer(rcpt_delay=2.0) as peer:
        gw = gateway_factory(relay_policy(peer, 'at_once_wait = "300ms"'))
        committed = spy_commits(gw)
        started = time.monotonic()
        with caplog.at_level("INFO", logger="gateway"):
            reply = send_for_reply(gw, ALICE, [BOB])
        elapsed = time.monotonic() - started
        qid = reply.rsplit(" ", 1)[1]
        # Answered at the wait's end, not at the stalled host's: queued, and so durable.
        assert elapsed < 1.8 and reply.startswith("2.0.0 OK queued as ") and committed == [qid]
        # The cut-off transaction delivered nothing; the queued attempt delivers it once.
        assert wait_for(lambda: len(peer.messages) == 1, timeout=15)
        assert wait_for(lambda: gw.queue_ids() == [], timeout=5)
        time.sleep(0.5)
        assert len(peer.messages) == 1 and peer.connections >= 2
    lines = [r.getMessage() for r in caplog.records]
    assert f"not delivered at once to=<{BOB}>: no final dot within 0.3s; queuing it" in lines


@pytest.mark.parametrize("code", ["451 4.2.0 greylisted, try later", "550 5.1.1 bob is unknown here"])
def test_a_host_answering_at_once_without_taking_it_was_the_first_attempt(
    gateway_factory, caplog: pytest.LogCaptureFixture, code: str
) -> None:
    """The message is queued and its first queued attempt records the answer as its own,
    without asking the host again: a 4xx is retried after the back-off (and then taken),
    a 5xx bounces."""
    with SmtpPeer() as peer:
        if code.startswith("4"):
            peer.script_rcpt(BOB, code)
        else:
            peer.always_rcpt(BOB, code)
        gw = gateway_factory(relay_policy(peer))
        committed = spy_commits(gw)
        with caplog.at_level("INFO", logger="gateway"):
            reply = send_for_reply(gw, ALICE, [BOB])
            assert reply.startswith("2.0.0 OK queued as ") and committed == [reply.rsplit(" ", 1)[1]]
            if code.startswith("4"):
                assert wait_for(lambda: len(peer.messages) == 1, timeout=15)
            else:
                assert wait_for(lambda: inbox(gw, "alice"), timeout=15)
                assert b"bob is unknown here" in inbox(gw, "alice")[0] and peer.messages == []
            assert wait_for(lambda: gw.queue_ids() == [], timeout=5)
    lines = [r.getMessage() for r in caplog.records]
    host_attempts = [line for line in lines if line.startswith("remote to 127.0.0.1[")]
    statuses = [line.split()[2] for line in lines if line.startswith(f"delivery to=<{BOB}>")]
    if code.startswith("4"):
        assert len(host_attempts) == 2 and statuses == ["status=deferred", "status=delivered"]
    else:
        assert len(host_attempts) == 1 and statuses == ["status=failed"]
    queued = next(i for i, line in enumerate(lines) if line.startswith("queued from=<alice@"))
    assert queued < next(i for i, line in enumerate(lines) if line.startswith(f"delivery to=<{BOB}>"))


CAROL = "carol@peer.test.example"


def test_recipients_sharing_the_next_hop_go_in_one_transaction_at_once(gateway_factory) -> None:
    with SmtpPeer() as peer:
        gw = gateway_factory(relay_policy(peer))
        committed = spy_commits(gw)
        reply = send_for_reply(gw, ALICE, [BOB, CAROL])
        assert reply.startswith("2.0.0 OK delivered as ")
        (received,) = peer.messages
        assert received.rcpt_tos == [BOB, CAROL] and committed == [] and gw.queue_ids() == []


def test_a_relay_taken_for_some_recipients_is_queued_for_the_others_only(
    gateway_factory, caplog: pytest.LogCaptureFixture
) -> None:
    """bob's delivery at once is recorded by the first queued attempt (never sent
    again); carol's 550 bounces."""
    with SmtpPeer() as peer:
        peer.always_rcpt(CAROL, "550 5.1.1 carol is unknown here")
        gw = gateway_factory(relay_policy(peer))
        with caplog.at_level("INFO", logger="gateway"):
            reply = send_for_reply(gw, ALICE, [BOB, CAROL])
            assert reply.startswith("2.0.0 OK queued as ")
            assert wait_for(lambda: inbox(gw, "alice"), timeout=15)
            assert wait_for(lambda: gw.queue_ids() == [], timeout=5)
            time.sleep(0.3)
        (received,) = peer.messages
        assert received.rcpt_tos == [BOB]
    assert b"carol is unknown here" in inbox(gw, "alice")[0]
    lines = [r.getMessage() for r in caplog.records]
    outcomes = [line.split()[1:3] for line in lines if line.startswith("delivery to=") and "@peer." in line]
    assert outcomes == [[f"to=<{BOB}>", "status=delivered"], [f"to=<{CAROL}>", "status=failed"]]
    assert len([line for line in lines if line.startswith("remote to 127.0.0.1[")]) == 1


@pytest.mark.parametrize("case", ["two destinations", "success notice", "wait 0", "held route"])
def test_relayed_mail_that_needs_the_queue_goes_through_it(gateway_factory, case: str) -> None:
    with SmtpPeer() as peer, SmtpPeer() as other:
        delivery = 'at_once_wait = "0s"' if case == "wait 0" else ""
        route = "hold = true" if case == "held route" else ""
        route += f'\n[[routes]]\ndomain = "other.test.example"\nhost = "127.0.0.1"\nport = {other.port}\ntls = "none"\n'
        gw = gateway_factory(relay_policy(peer, delivery, route))
        committed = spy_commits(gw)
        rcpts, options = [BOB], ()
        if case == "two destinations":
            rcpts = [BOB, "dan@other.test.example"]
        elif case == "success notice":
            options = ("NOTIFY=SUCCESS",)
        reply = send_for_reply(gw, ALICE, rcpts, rcpt_options=options)
        qid = reply.rsplit(" ", 1)[1]
        assert reply.startswith("2.0.0 OK queued as ") and committed == [qid]
        if case == "held route":  # kept until a flush
            time.sleep(0.5)
            assert peer.messages == [] and gw.queue_ids() == [qid]
            return
        assert wait_for(lambda: len(peer.messages) == 1, timeout=15)
        assert peer.messages[0].rcpt_tos == [BOB]
        if case == "two destinations":
            assert wait_for(lambda: len(other.messages) == 1, timeout=15)
        assert wait_for(lambda: gw.queue_ids() == [], timeout=5)


def test_a_relay_at_once_sends_what_the_queued_attempt_sends(gateway_factory) -> None:
    """Same envelope and octets either way (the trace header's time and queue id aside)."""
    sent = []
    for delivery in ("", 'at_once_wait = "0s"'):
        with SmtpPeer() as peer:
            gw = gateway_factory(relay_policy(peer, delivery))
            reply = send_for_reply(gw, ALICE, [BOB])
            assert wait_for(lambda: len(peer.messages) == 1, timeout=15)
            (received,) = peer.messages
        content = re.sub(rb" id [0-9A-F]+", b" id QID", re.sub(rb"\d\d:\d\d:\d\d", b"T", received.content))
        sent.append((reply.split(" as ")[0], received.mail_from, received.rcpt_tos, content))
    (at_once, *direct), (queued, *via_queue) = sent
    assert (at_once, queued) == ("2.0.0 OK delivered", "2.0.0 OK queued")
    assert direct == via_queue
