"""Security: SMTP smuggling and STARTTLS command injection (RFC 3207 §4.2).

A message whose text holds a bare-LF or bare-CR "end of data" must never split into
two messages here, nor be passed on where a lenient server could split it.
"""

from __future__ import annotations

import pytest

SMUGGLE_VARIANTS = [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\n", b"\r\n.\r", b"\r.\r", b"\n.\r"]


@pytest.mark.parametrize("marker", SMUGGLE_VARIANTS, ids=repr)
def test_smuggled_second_message_is_never_queued(gateway, raw, marker: bytes) -> None:
    c = raw()
    c.cmd("EHLO client.test.example")
    c.cmd("MAIL FROM:<a@example.org>")
    c.cmd("RCPT TO:<alice@localhost>")
    assert c.cmd("DATA")[0] == 354
    c.send(
        b"Subject: innocent\r\n\r\nhello" + marker
        + b"MAIL FROM:<admin@example.org>\r\nRCPT TO:<bob@localhost>\r\nDATA\r\n"
        + b"Subject: smuggled\r\n\r\nevil\r\n.\r\n"
    )
    code, text = c.reply()
    assert code == 554 and text[0].startswith("5.5.2")
    # No smuggled command got a reply of its own: the next reply answers our NOOP.
    assert c.cmd("NOOP")[0] == 250
    assert gateway.queue_ids() == []


def test_clean_message_after_a_refused_one_is_accepted(gateway, raw) -> None:
    c = raw()
    c.cmd("EHLO client.test.example")
    c.cmd("MAIL FROM:<a@example.org>")
    c.cmd("RCPT TO:<alice@localhost>")
    c.cmd("DATA")
    assert c.cmd(b"Subject: a\r\n\r\nbare\nlf\r\n.")[0] == 554
    c.cmd("MAIL FROM:<a@example.org>")
    c.cmd("RCPT TO:<alice@localhost>")
    c.cmd("DATA")
    assert c.cmd(b"Subject: b\r\n\r\nclean\r\n.")[0] == 250
    assert len(gateway.queue_ids()) == 1


def test_starttls_discards_pipelined_plaintext(gateway, raw) -> None:
    c = raw()
    c.cmd("EHLO client.test.example")
    # An attacker on the path appends commands to the STARTTLS packet.
    c.send(b"STARTTLS\r\nMAIL FROM:<mitm@example.org>\r\nRCPT TO:<alice@localhost>\r\n")
    assert c.reply()[0] == 220
    c.starttls()
    # The injected commands were dropped: the session is reset, so MAIL needs EHLO.
    code, text = c.cmd("MAIL FROM:<a@example.org>")
    assert code == 503
    code, lines = c.cmd("EHLO client.test.example")
    assert code == 250 and "AUTH PLAIN LOGIN" in lines and "STARTTLS" not in lines
    assert c.cmd("RCPT TO:<alice@localhost>")[0] == 503


def test_starttls_twice_is_refused(gateway, raw) -> None:
    c = raw()
    c.cmd("EHLO client.test.example")
    assert c.cmd("STARTTLS")[0] == 220
    c.starttls()
    c.cmd("EHLO client.test.example")
    assert c.cmd("STARTTLS")[0] == 503
