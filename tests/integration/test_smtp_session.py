"""Real SMTP sessions over TCP: acceptance into the queue, RFC 5321 strictness, limits."""

from __future__ import annotations

import logging
import smtplib
import time

import pytest

from gateway.logreport import LogReport
from tests.conftest import BASE_POLICY, MESSAGE, RawClient, smtp, wait_for


def test_accepts_mail_for_postmaster_into_the_queue_whole(gateway) -> None:
    with smtp(gateway.port) as client:
        client.ehlo()
        refused = client.sendmail("sender@example.org", ["postmaster@localhost"], MESSAGE)
        assert refused == {}
        code, text = client.noop()
        assert code == 250
    ids = gateway.queue_ids()
    assert len(ids) == 1
    stored = gateway.queue.read_message(ids[0])
    item = gateway.queue.load(ids[0])
    # Our Received header is first, then the message exactly as sent.
    assert stored.startswith(b"Received: from client.test.example ([127.0.0.1])")
    assert f"id {ids[0]}".encode() in stored.split(b"\r\n\r\n", 1)[0]
    assert stored.endswith(MESSAGE)
    assert item.envelope.sender == "sender@example.org"
    assert [r.address for r in item.envelope.recipients] == ["postmaster@localhost"]
    assert item.envelope.client_ip == "127.0.0.1"


def test_reply_names_the_queue_id(gateway, raw) -> None:
    c = raw()
    assert c.cmd("EHLO client.test.example")[0] == 250
    assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
    assert c.cmd("RCPT TO:<alice@localhost>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    code, text = c.cmd(b"Subject: x\r\n\r\nhi\r\n.")
    assert code == 250
    assert text[0].startswith("2.0.0 OK queued as ")
    qid = text[0].rsplit(" ", 1)[1]
    assert gateway.queue_ids() == [qid]


def test_ehlo_advertises_extensions(gateway, raw) -> None:
    c = raw()
    code, lines = c.cmd("EHLO client.test.example")
    assert code == 250
    assert lines[0] == "mx.test.example"
    for ext in ("PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "DSN", "STARTTLS"):
        assert ext in lines
    assert f"SIZE {25 * 1024 * 1024}" in lines
    # AUTH is only offered after TLS.
    assert not any(l.startswith("AUTH") for l in lines)


def test_commands_out_of_order_get_503(gateway, raw) -> None:
    c = raw()
    assert c.cmd("MAIL FROM:<a@example.org>")[0] == 503
    assert c.cmd("EHLO client.test.example")[0] == 250
    assert c.cmd("RCPT TO:<alice@localhost>")[0] == 503
    assert c.cmd("DATA")[0] == 503
    assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
    assert c.cmd("MAIL FROM:<a@example.org>")[0] == 503
    # No valid recipient yet: DATA is refused, the session goes on.
    assert c.cmd("DATA")[0] == 554
    assert c.cmd("NOOP")[0] == 250


@pytest.mark.parametrize(
    "command, code",
    [
        ("MAIL FROM:<a@example.org", 501),
        ("MAIL FROM:a@example.org", 501),
        ("MAIL FROM:<a\x01b@example.org>", 501),
        ("MAIL FROM:<a@exa mple.org>", 501),
        ("MAIL TO:<a@example.org>", 501),
        ("MAIL FROM:<a@example.org> FOO=BAR", 555),
        ("MAIL FROM:<a@example.org> SIZE=abc", 501),
    ],
)
def test_malformed_mail_gets_5xx_and_session_goes_on(gateway, raw, command, code) -> None:
    c = raw()
    c.cmd("EHLO client.test.example")
    assert c.cmd(command)[0] == code
    assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250


def test_nul_in_address_gets_501(gateway, raw) -> None:
    c = raw()
    c.cmd("EHLO client.test.example")
    assert c.cmd(b"MAIL FROM:<a\x00b@example.org>")[0] == 501
    c.cmd("MAIL FROM:<a@example.org>")
    assert c.cmd(b"RCPT TO:<alice\x00@localhost>")[0] == 501
    assert c.cmd("RCPT TO:<alice@localhost")[0] == 501
    assert c.cmd("RCPT TO:<alice@localhost>")[0] == 250


def test_postmaster_without_domain_is_accepted(gateway, raw) -> None:
    c = raw()
    c.cmd("HELO client.test.example")
    c.cmd("MAIL FROM:<>")
    assert c.cmd("RCPT TO:<Postmaster>")[0] == 250


def test_unknown_local_user_is_refused_at_rcpt(gateway, raw) -> None:
    c = raw()
    c.cmd("EHLO client.test.example")
    c.cmd("MAIL FROM:<a@example.org>")
    code, text = c.cmd("RCPT TO:<nobody@localhost>")
    assert code == 550 and text[0].startswith("5.1.1")


def test_too_many_recipients_get_452(gateway_factory) -> None:
    gw = gateway_factory(BASE_POLICY + "\n[limits]\nmax_recipients = 2\n")
    c = RawClient(gw.port)
    c.reply()
    c.cmd("EHLO client.test.example")
    c.cmd("MAIL FROM:<a@example.org>")
    assert c.cmd("RCPT TO:<alice@localhost>")[0] == 250
    assert c.cmd("RCPT TO:<bob@localhost>")[0] == 250
    code, text = c.cmd("RCPT TO:<postmaster@localhost>")
    assert code == 452 and text[0].startswith("4.5.3")
    assert c.cmd("DATA")[0] == 354
    assert c.cmd(b"Subject: x\r\n\r\n.")[0] == 250
    c.close()
    item = gw.queue.load(gw.queue_ids()[0])
    assert len(item.envelope.recipients) == 2


def test_run_of_bad_commands_ends_with_421(gateway_factory) -> None:
    gw = gateway_factory(BASE_POLICY + "\n[limits]\nmax_bad_commands = 3\n")
    c = RawClient(gw.port)
    c.reply()
    assert c.cmd("FOO")[0] == 500
    assert c.cmd("BAR")[0] == 500
    c.send(b"BAZ\r\n")
    assert c.reply()[0] == 500
    assert c.reply()[0] == 421
    assert c.is_closed()
    c.close()


def test_pipelined_commands_are_answered_in_order(gateway, raw) -> None:
    c = raw()
    c.cmd("EHLO client.test.example")
    c.send(
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<alice@localhost>\r\nRCPT TO:<nobody@localhost>\r\n"
        b"RCPT TO:<bob@localhost>\r\nDATA\r\n"
    )
    assert [c.reply()[0] for _ in range(5)] == [250, 250, 550, 250, 354]
    c.send(b"Subject: p\r\n\r\nx\r\n.\r\nQUIT\r\n")
    assert c.reply()[0] == 250
    assert c.reply()[0] == 221
    item = gateway.queue.load(gateway.queue_ids()[0])
    assert [r.address for r in item.envelope.recipients] == ["alice@localhost", "bob@localhost"]


def test_declared_size_over_limit_gets_552(gateway_factory) -> None:
    gw = gateway_factory(BASE_POLICY + '\n[limits]\nmax_message_size = "10KB"\n')
    with smtp(gw.port) as client:
        client.ehlo()
        code, _ = client.mail("a@example.org", ["SIZE=20000"])
        assert code == 552
        code, _ = client.mail("a@example.org", ["SIZE=2000"])
        assert code == 250
        client.rcpt("alice@localhost")
        code, text = client.data(b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 200)
        assert code == 552 and text.startswith(b"5.3.4")
        # The session goes on after the refusal.
        assert client.noop()[0] == 250
    assert gw.queue_ids() == []


def test_idle_timeout_gets_421(gateway_factory) -> None:
    gw = gateway_factory(BASE_POLICY + '\n[limits]\nidle_timeout = "300ms"\n')
    c = RawClient(gw.port)
    c.reply()
    code, text = c.reply()
    assert code == 421 and text[0].startswith("4.4.2")
    assert c.is_closed()
    c.close()


def test_idle_timeout_comes_after_busy_commands_and_in_the_middle_of_data(gateway_factory) -> None:
    # The per-session timer is set once and moved on by each read: commands sent well
    # inside the limit never trip it, and a client that goes quiet in the middle of the
    # message (data_timeout) still gets its 421 and loses the message.
    gw = gateway_factory(BASE_POLICY + '\n[limits]\nidle_timeout = "400ms"\ndata_timeout = "400ms"\n')
    c = RawClient(gw.port)
    c.reply()
    for _ in range(6):
        time.sleep(0.15)
        c.send(b"NOOP\r\n")
        assert c.reply()[0] == 250
    c.send(b"EHLO client.example\r\n")
    assert c.reply()[0] == 250
    c.send(b"MAIL FROM:<a@example.org>\r\n")
    assert c.reply()[0] == 250
    c.send(b"RCPT TO:<postmaster@localhost>\r\n")
    assert c.reply()[0] == 250
    c.send(b"DATA\r\n")
    assert c.reply()[0] == 354
    c.send(b"Subject: half\r\n\r\nand then silence")
    started = time.monotonic()
    code, text = c.reply()
    assert code == 421 and text[0].startswith("4.4.2")
    assert 0.3 <= time.monotonic() - started < 3
    assert c.is_closed()
    c.close()
    assert gw.queue_ids() == []


def test_session_deadline_stops_a_dribbling_client(gateway_factory) -> None:
    gw = gateway_factory(BASE_POLICY + '\n[limits]\nsession_timeout = "1s"\nidle_timeout = "10s"\n')
    c = RawClient(gw.port)
    c.reply()
    started = time.monotonic()
    closed = False
    # One byte every 100 ms never trips the idle timer; the session deadline must.
    for byte in b"NOOP" * 20:
        try:
            c.send(bytes([byte]))
        except OSError:
            closed = True
            break
        time.sleep(0.1)
        if time.monotonic() - started > 1.5:
            break
    code, text = c.reply()
    assert code == 421 and "time limit" in text[0]
    assert c.is_closed()
    c.close()


def test_connections_per_ip_are_limited(gateway_factory) -> None:
    # Loopback is exempt by default (test_connection_limits_exempt.py): not here.
    gw = gateway_factory(BASE_POLICY + "\n[limits]\nmax_connections_per_ip = 2\nper_ip_exempt_networks = []\n")
    first, second = RawClient(gw.port), RawClient(gw.port)
    assert first.reply()[0] == 220 and second.reply()[0] == 220
    third = RawClient(gw.port)
    code, text = third.reply()
    assert code == 421 and text[0].startswith("4.7.0")
    first.cmd("QUIT")
    first.close()
    # A slot is free again once the first session ended.
    assert wait_for(lambda: _greets(gw.port))
    for c in (second, third):
        c.close()


def _greets(port: int) -> bool:
    c = RawClient(port)
    try:
        return c.reply()[0] == 220
    finally:
        c.close()


def test_smtputf8_addresses(gateway, raw) -> None:
    c = raw()
    c.cmd("EHLO client.test.example")
    assert c.cmd("MAIL FROM:<jösé@example.org>".encode())[0] == 553
    assert c.cmd("MAIL FROM:<jösé@example.org> SMTPUTF8".encode())[0] == 250
    assert c.cmd("RCPT TO:<alice@localhost>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    code, _ = c.cmd("Subject: ünïcode\r\n\r\nhé\r\n.".encode())
    assert code == 250
    item = gateway.queue.load(gateway.queue_ids()[0])
    assert item.envelope.sender == "jösé@example.org" and item.envelope.smtputf8


def test_dsn_parameters_are_kept_in_the_envelope(gateway, raw) -> None:
    c = raw()
    c.cmd("EHLO client.test.example")
    assert c.cmd("MAIL FROM:<a@example.org> RET=HDRS ENVID=abc+2Bdef")[0] == 250
    assert c.cmd("RCPT TO:<alice@localhost> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;alice+40localhost")[0] == 250
    assert c.cmd("RCPT TO:<bob@localhost> NOTIFY=NEVER,SUCCESS")[0] == 501
    c.cmd("DATA")
    assert c.cmd(b"Subject: dsn\r\n\r\n.")[0] == 250
    env = gateway.queue.load(gateway.queue_ids()[0]).envelope
    assert env.ret == "HDRS" and env.envid == "abc+def"
    assert env.recipients[0].notify == ("SUCCESS", "FAILURE")
    assert env.recipients[0].orcpt == "rfc822;alice@localhost"


def test_client_values_never_reach_a_header_unsanitised(gateway, raw) -> None:
    c = raw()
    assert c.cmd("EHLO evil(host);x=<y>")[0] == 250
    c.cmd("MAIL FROM:<a@example.org>")
    c.cmd("RCPT TO:<alice@localhost>")
    c.cmd("DATA")
    assert c.cmd(b"Subject: x\r\n\r\n.")[0] == 250
    stored = gateway.queue.read_message(gateway.queue_ids()[0])
    received = stored.split(b"\r\n\t")[0]
    assert received == b"Received: from evil_host__x__y_ ([127.0.0.1])"


def test_rset_clears_the_transaction(gateway, raw) -> None:
    c = raw()
    c.cmd("EHLO client.test.example")
    c.cmd("MAIL FROM:<a@example.org>")
    c.cmd("RCPT TO:<alice@localhost>")
    assert c.cmd("RSET")[0] == 250
    assert c.cmd("DATA")[0] == 503
    assert c.cmd("VRFY alice")[0] == 252
    assert c.cmd("QUIT")[0] == 221
    assert c.is_closed()


def _session_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gateway.smtp.handler"]


def test_an_accepted_message_is_logged_once_per_event_its_arrival_in_the_queued_line(
    gateway, raw, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        c = raw()
        assert c.cmd("HELO client.test.example")[0] == 250
        assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
        assert c.cmd("RCPT TO:<alice@localhost>")[0] == 250
        assert c.cmd("RCPT TO:<bob@localhost>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        assert c.cmd(b"Subject: x\r\n\r\nhi\r\n.")[0] == 250
        assert c.cmd("QUIT")[0] == 221
        assert wait_for(lambda: any(line.startswith("disconnect ") for line in _session_lines(caplog)))
    lines = _session_lines(caplog)
    assert [line.split(" ", 1)[0] for line in lines] == [
        "connect", "helo", "mail", "rcpt", "rcpt", "queued", "disconnect"
    ]
    size = len(b"Subject: x\r\n\r\nhi\r\n")
    assert lines[5] == f"queued from=<a@example.org> to=<alice@localhost>,<bob@localhost> rcpts=2 size={size} area=msg score=0.0"
    # gateway report still reads it: one message received, its sender and size.
    report = LogReport()
    report.feed(f"2026-12-05 12:00:00,000 gateway[1] INFO gateway.smtp.handler session=S1 queue=Q1 {lines[5]}")
    assert report.summary()["messages"] == {
        "received": 1, "bytes": size, "quarantined": 0, "generated": 0, "in_queue_at_end": 1,
    }


def test_a_message_refused_after_data_is_logged_with_its_arrival_before_the_refusal(
    gateway_factory, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = gateway_factory(BASE_POLICY + "\n[scoring]\nreject = 0.0\n")
    with caplog.at_level(logging.INFO), smtp(gateway.port) as client:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail("a@example.org", ["alice@localhost"], MESSAGE)
        assert refused.value.smtp_code == 550
    lines = _session_lines(caplog)
    data = [line for line in lines if line.startswith("data ")]
    assert data[0] == f"data from=<a@example.org> rcpts=1 size={len(MESSAGE)}"
    assert data[1].startswith("data reject by=scoring reply='550 5.7.1 Message rejected as spam'")
    assert not any(line.startswith("queued ") for line in lines)
