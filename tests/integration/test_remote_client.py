"""gateway.delivery.remote.client against real SMTP servers on loopback.

The peers are aiosmtpd (tests/smtppeer.py, scriptable), Postfix's smtp-sink when
installed, and a few raw asyncio servers for what no real server does on purpose
(insisting on pipelining, never answering).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator

import pytest

from gateway.delivery.remote.client import HostFailure, SmtpConnection, xtext
from gateway.delivery.types import Outcome
from gateway.model import Envelope, QueuedRecipient
from gateway.verdicts import PermanentFailure
from tests.smtppeer import SmtpPeer, free_port

HELO = "gw.test.example"
MESSAGE = b"From: a@src.example\r\nTo: b@dst.example\r\nSubject: test\r\n\r\nHello.\r\n"

SINK = shutil.which("smtp-sink", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/usr/libexec/postfix")


def envelope(**kwargs) -> Envelope:  # type: ignore[no-untyped-def]
    kwargs.setdefault("sender", "a@src.example")
    return Envelope(recipients=[], **kwargs)


def rcpts(*addresses: str) -> list[QueuedRecipient]:
    return [QueuedRecipient(a) for a in addresses]


async def session(port: int, host: str = "127.0.0.1", **kwargs) -> SmtpConnection:  # type: ignore[no-untyped-def]
    conn = SmtpConnection(helo_name=HELO, remote_name="peer.test.example", command_timeout=5, data_timeout=5, **kwargs)
    await conn.connect(host, port, timeout=5)
    await conn.ehlo()
    return conn


def send(port: int, env: Envelope, recipients: list[QueuedRecipient], message: bytes = MESSAGE) -> dict[str, Outcome]:
    async def main() -> dict[str, Outcome]:
        conn = await session(port)
        try:
            return await conn.send(env, recipients, message)
        finally:
            await conn.quit()

    return asyncio.run(main())


@pytest.fixture
def peer() -> Iterator[SmtpPeer]:
    with SmtpPeer() as peer:
        yield peer


def statuses(outcomes: dict[str, Outcome]) -> dict[str, tuple[str, int]]:
    return {a: (o.status, o.reply.code) for a, o in outcomes.items()}


# -- transactions ------------------------------------------------------------------------


def test_several_recipients_one_transaction(peer: SmtpPeer) -> None:
    got = send(peer.port, envelope(), rcpts("b@dst.example", "c@dst.example", "d@dst.example"))
    assert {s for s, _ in statuses(got).values()} == {"delivered"}
    assert got["b@dst.example"].remote == "peer.test.example"
    assert got["b@dst.example"].reply.status == "2.0.0"
    [msg] = peer.messages
    assert msg.rcpt_tos == ["b@dst.example", "c@dst.example", "d@dst.example"]
    assert msg.mail_options == [f"SIZE={len(MESSAGE)}"]
    assert msg.content == MESSAGE
    assert msg.helo == HELO


def test_one_recipient_refused_others_delivered(peer: SmtpPeer) -> None:
    peer.always_rcpt("bad@dst.example", "550 5.1.1 <bad@dst.example>: no such user")
    got = send(peer.port, envelope(), rcpts("b@dst.example", "bad@dst.example", "c@dst.example"))
    assert statuses(got) == {
        "b@dst.example": ("delivered", 250),
        "bad@dst.example": ("failed", 550),
        "c@dst.example": ("delivered", 250),
    }
    bad = got["bad@dst.example"]
    assert bad.reply.status == "5.1.1" and "no such user" in bad.reply.text  # bounces quote it
    assert bad.diagnostic == "smtp; 550 5.1.1 <bad@dst.example>: no such user"
    assert peer.messages[0].rcpt_tos == ["b@dst.example", "c@dst.example"]


def test_temporary_then_success(peer: SmtpPeer) -> None:
    peer.script_rcpt("b@dst.example", "451 4.2.0 greylisted, come back later")
    first = send(peer.port, envelope(), rcpts("b@dst.example"))
    assert statuses(first) == {"b@dst.example": ("deferred", 451)}
    assert peer.messages == []  # no recipient accepted: no DATA at all
    second = send(peer.port, envelope(), rcpts("b@dst.example"))
    assert statuses(second) == {"b@dst.example": ("delivered", 250)}
    assert len(peer.messages) == 1


def test_final_reply_applies_to_every_accepted_recipient(peer: SmtpPeer) -> None:
    peer.script("eom", "554 5.7.1 message refused: spam")
    got = send(peer.port, envelope(), rcpts("b@dst.example", "c@dst.example"))
    assert statuses(got) == {"b@dst.example": ("failed", 554), "c@dst.example": ("failed", 554)}
    peer.script("data", "451 4.3.0 not now")
    got = send(peer.port, envelope(), rcpts("b@dst.example"))
    assert statuses(got) == {"b@dst.example": ("deferred", 451)}


def test_mail_refused_applies_to_all(peer: SmtpPeer) -> None:
    peer.script("mail", "553 5.7.1 sender refused")
    got = send(peer.port, envelope(), rcpts("b@dst.example", "c@dst.example"))
    assert statuses(got) == {"b@dst.example": ("failed", 553), "c@dst.example": ("failed", 553)}


def test_421_mid_transaction_defers_everyone_open(peer: SmtpPeer) -> None:
    async def main() -> tuple[dict[str, Outcome], SmtpConnection]:
        conn = await session(peer.port)
        got = await conn.send(envelope(), rcpts("b@dst.example", "c@dst.example"), MESSAGE)
        return got, conn

    peer.script_rcpt("c@dst.example", "421 4.3.2 shutting down")
    got, conn = asyncio.run(main())
    assert statuses(got) == {"b@dst.example": ("deferred", 421), "c@dst.example": ("deferred", 421)}
    assert conn.is_throttled and not conn.is_usable
    assert peer.messages == []


def test_dot_stuffing_round_trip(peer: SmtpPeer) -> None:
    message = b".leading dot\r\nHeader: x\r\n\r\n.\r\n..\r\n.x\r\nmiddle . dot\r\n...\r\nno final newline"
    send(peer.port, envelope(), rcpts("b@dst.example"), message)
    assert peer.messages[0].content == message + b"\r\n"


def test_rset_and_reuse(peer: SmtpPeer) -> None:
    async def main() -> None:
        conn = await session(peer.port)
        for n in range(3):
            got = await conn.send(envelope(), rcpts(f"r{n}@dst.example"), MESSAGE)
            assert got[f"r{n}@dst.example"].status == "delivered"
            assert (await conn.rset()).code == 250
        assert conn.is_usable and conn.transactions == 3
        await conn.quit()

    asyncio.run(main())
    assert peer.connections == 1 and len(peer.messages) == 3


# -- extensions -----------------------------------------------------------------------


def test_8bit_to_a_7bit_server_is_refused() -> None:
    body = "Subject: caf\u00e9\r\n\r\nna\u00efve\r\n".encode()
    with SmtpPeer(eightbitmime=False) as seven:
        got = send(seven.port, envelope(body="8BITMIME"), rcpts("b@dst.example"), body)
        assert statuses(got) == {"b@dst.example": ("failed", 554)}
        assert got["b@dst.example"].reply.status == "5.6.3"
        assert seven.messages == []
        # Declared 8BITMIME but really 7-bit: fine, and no BODY parameter for this server.
        assert send(seven.port, envelope(body="8BITMIME"), rcpts("b@dst.example"))["b@dst.example"].status == "delivered"
        assert seven.messages[0].mail_options == [f"SIZE={len(MESSAGE)}"]
    with SmtpPeer() as eight:
        got = send(eight.port, envelope(body="8BITMIME"), rcpts("b@dst.example"), body)
        assert got["b@dst.example"].status == "delivered"
        assert "BODY=8BITMIME" in eight.messages[0].mail_options
        assert eight.messages[0].content == body


def test_size_limit_refused_before_sending() -> None:
    with SmtpPeer(size_limit=len(MESSAGE) - 1) as small:
        got = send(small.port, envelope(), rcpts("b@dst.example"))
        assert statuses(got) == {"b@dst.example": ("failed", 552)}
        assert got["b@dst.example"].reply.status == "5.3.4"
        assert small.messages == []


def test_smtputf8() -> None:
    utf8 = rcpts("j\u00f8rn@dst.example")
    with SmtpPeer(smtputf8=False) as plain:
        got = send(plain.port, envelope(smtputf8=True), utf8)
        assert (got["j\u00f8rn@dst.example"].reply.code, got["j\u00f8rn@dst.example"].reply.status) == (553, "5.6.7")
        # Flagged SMTPUTF8 but all ASCII: nothing needs it, so it goes.
        assert send(plain.port, envelope(smtputf8=True), rcpts("b@dst.example"))["b@dst.example"].status == "delivered"
    with SmtpPeer(smtputf8=True) as capable:
        got = send(capable.port, envelope(smtputf8=True), utf8)
        assert got["j\u00f8rn@dst.example"].status == "delivered"
        assert "SMTPUTF8" in capable.messages[0].mail_options
        assert capable.messages[0].rcpt_tos == ["j\u00f8rn@dst.example"]


def test_dsn_parameters_only_when_offered() -> None:
    env = envelope(ret="HDRS", envid="q1+x=y z")
    recipients = [
        QueuedRecipient("b@dst.example", orcpt="rfc822;B+1@dst.example", notify=("SUCCESS", "DELAY")),
        QueuedRecipient("c@dst.example", notify=("NEVER",)),
    ]
    with SmtpPeer(dsn=False) as plain:  # aiosmtpd answers 555 to parameters it does not know
        assert {o.status for o in send(plain.port, env, recipients).values()} == {"delivered"}
        assert plain.messages[0].mail_options == [f"SIZE={len(MESSAGE)}"]
        assert plain.messages[0].rcpt_options == [[], []]
    with SmtpPeer(dsn=True) as dsn:
        assert {o.status for o in send(dsn.port, env, recipients).values()} == {"delivered"}
        msg = dsn.messages[0]
        assert msg.mail_options == [f"SIZE={len(MESSAGE)}", "RET=HDRS", "ENVID=q1+2Bx+3Dy+20z"]
        assert msg.rcpt_options == [["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;B+2B1@dst.example"], ["NOTIFY=NEVER"]]


def test_xtext() -> None:
    assert xtext("plain") == "plain"
    assert xtext("a+b=c d\u00e9") == "a+2Bb+3Dc+20d+C3+A9"


def test_ehlo_refused_falls_back_to_helo(peer: SmtpPeer) -> None:
    peer.script("ehlo", "502 5.5.1 EHLO not implemented")
    peer.always_rcpt("bad@dst.example", "550 5.1.1 unknown")
    got = send(peer.port, envelope(ret="FULL"), rcpts("b@dst.example", "bad@dst.example"))  # no pipelining now
    assert statuses(got) == {"b@dst.example": ("delivered", 250), "bad@dst.example": ("failed", 550)}
    assert peer.messages[0].mail_options == []  # HELO: no extensions, so no parameters


# -- session failures -------------------------------------------------------------------


def test_greeting_refused_is_a_host_failure(peer: SmtpPeer) -> None:
    peer.script("greeting", "554 5.7.1 no service for you")

    async def main() -> None:
        conn = SmtpConnection(helo_name=HELO, remote_name="peer.test.example")
        with pytest.raises(HostFailure) as info:
            await conn.connect("127.0.0.1", peer.port, timeout=5)
        assert info.value.reply.is_temporary and info.value.reply.status == "4.7.1"
        assert info.value.remote_reply is not None and info.value.remote_reply.code == 554

    asyncio.run(main())


def test_greeting_naming_us_is_a_loop() -> None:
    with SmtpPeer(hostname=HELO) as us:

        async def main() -> None:
            conn = SmtpConnection(helo_name=HELO, remote_name="mx.dst.example")
            with pytest.raises(PermanentFailure) as info:
                await conn.connect("127.0.0.1", us.port, timeout=5)
            assert (info.value.reply.code, info.value.reply.status) == (554, "5.4.6")

        asyncio.run(main())


def test_connection_refused_and_silent_server_time_out() -> None:
    port = free_port()

    async def main() -> None:
        conn = SmtpConnection(helo_name=HELO, remote_name="nobody")
        with pytest.raises(HostFailure) as info:
            await conn.connect("127.0.0.1", port, timeout=2)
        assert info.value.reply.status == "4.4.1"

        hung_up = asyncio.Event()

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()  # never greets
            writer.close()
            await writer.wait_closed()
            hung_up.set()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        silent_port = server.sockets[0].getsockname()[1]
        started = time.monotonic()
        with pytest.raises(HostFailure) as info:
            await SmtpConnection(helo_name=HELO, remote_name="mute").connect("127.0.0.1", silent_port, timeout=0.3)
        assert time.monotonic() - started < 2 and info.value.reply.status == "4.4.2"
        await asyncio.wait_for(hung_up.wait(), 2)  # the client really closed its end
        server.close()
        await server.wait_closed()

    asyncio.run(main())


async def _against(handler, run):  # type: ignore[no-untyped-def]
    """Run ``run(port)`` against a raw asyncio server calling ``handler`` per connection."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        return await run(port)
    finally:
        server.close()
        await server.wait_closed()


async def _greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"220 strict.example ESMTP\r\n")
    await reader.readline()
    writer.write(b"250-strict.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n")


def test_pipelining_sends_mail_rcpts_and_data_together() -> None:
    """A server that answers nothing until MAIL, both RCPTs and DATA are in: the whole
    envelope is one write (RFC 2920 §3.1), so the message needs two round trips, not four."""
    done = asyncio.Event()

    async def strict(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _greet(reader, writer)
        batch = [await asyncio.wait_for(reader.readline(), 1) for _ in range(4)]
        assert [line.split(b":")[0] for line in batch] == [b"MAIL FROM", b"RCPT TO", b"RCPT TO", b"DATA\r\n"]
        writer.write(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 nope\r\n354 go\r\n")
        while await reader.readline() != b".\r\n":
            pass
        writer.write(b"250 2.0.0 queued as X\r\n")
        await reader.readline()
        writer.write(b"221 bye\r\n")
        writer.close()
        await writer.wait_closed()
        done.set()

    async def run(port: int) -> dict[str, Outcome]:
        conn = await session(port)
        got = await conn.send(envelope(), rcpts("b@dst.example", "x@dst.example"), MESSAGE)
        await conn.quit()
        await asyncio.wait_for(done.wait(), 2)
        return got

    got = asyncio.run(_against(strict, run))
    assert statuses(got) == {"b@dst.example": ("delivered", 250), "x@dst.example": ("failed", 550)}
    assert got["b@dst.example"].reply.text == "queued as X"


def test_pipelined_data_taken_with_no_recipient_gets_an_empty_message() -> None:
    """Every RCPT refused but the server says 354 to the pipelined DATA anyway: the
    client ends the data at once (a lone dot), sends no message text, and the
    recipients keep their refusals."""
    seen: list[bytes] = []

    async def lax(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _greet(reader, writer)
        for _ in range(3):
            seen.append(await asyncio.wait_for(reader.readline(), 1))
        writer.write(b"250 2.1.0 ok\r\n550 5.1.1 nope\r\n354 go ahead anyway\r\n")
        seen.append(await asyncio.wait_for(reader.readline(), 1))
        writer.write(b"554 5.5.1 no valid recipients\r\n")
        while line := await reader.readline():
            seen.append(line)
            writer.write(b"250 ok\r\n" if line.startswith(b"RSET") else b"221 bye\r\n")
        writer.close()

    async def run(port: int) -> dict[str, Outcome]:
        conn = await session(port)
        got = await conn.send(envelope(), rcpts("x@dst.example"), MESSAGE)
        await conn.quit()
        return got

    got = asyncio.run(_against(lax, run))
    assert statuses(got) == {"x@dst.example": ("failed", 550)}
    assert seen[3] == b".\r\n" and b"Hello." not in b"".join(seen)


def test_hang_up_at_pipelined_data_with_no_recipient_keeps_the_refusals() -> None:
    """A server may close instead of answering a DATA that has no recipient: the
    recipients are refused (550), not deferred as if the host had failed."""

    async def closer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _greet(reader, writer)
        for _ in range(4):
            await asyncio.wait_for(reader.readline(), 1)
        writer.write(b"250 2.1.0 ok\r\n550 5.1.1 nope\r\n550 5.1.1 nor this\r\n")
        await writer.drain()
        writer.close()

    async def run(port: int) -> dict[str, Outcome]:
        conn = await session(port)
        got = await conn.send(envelope(), rcpts("x@dst.example", "y@dst.example"), MESSAGE)
        await conn.quit()
        return got

    got = asyncio.run(_against(closer, run))
    assert statuses(got) == {"x@dst.example": ("failed", 550), "y@dst.example": ("failed", 550)}


# -- Postfix smtp-sink ------------------------------------------------------------------------


@pytest.fixture
def sink() -> Iterator[int]:
    if SINK is None:
        pytest.skip("Postfix smtp-sink is not installed")
    port = free_port()
    proc = subprocess.Popen([SINK, "-u", "root", "-c", f"127.0.0.1:{port}", "100"], stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                with socket.create_connection(("127.0.0.1", port), 0.1):
                    break
            except OSError:
                time.sleep(0.01)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=5)


def test_smtp_sink_pipelined_delivery(sink: int) -> None:
    async def main() -> tuple[dict[str, Outcome], SmtpConnection]:
        conn = await session(sink)
        got = await conn.send(envelope(body="8BITMIME"), rcpts("b@dst.example", "c@dst.example"), MESSAGE)
        await conn.quit()
        return got, conn

    got, conn = asyncio.run(main())
    assert conn.has_extension("PIPELINING") and not conn.has_extension("STARTTLS")
    assert {o.status for o in got.values()} == {"delivered"}


def test_smtp_sink_refuses_starttls(sink: int) -> None:
    async def main() -> None:
        conn = await session(sink)
        context = ssl.create_default_context()
        with pytest.raises(HostFailure):
            await conn.starttls(context, "localhost", timeout=2)
        await conn.close()

    asyncio.run(main())


def test_control_characters_never_reach_the_wire(peer: SmtpPeer) -> None:
    got = send(peer.port, envelope(), rcpts("b@dst.example\r\nRCPT TO:<evil@x.example>"))
    assert {(o.status, o.reply.code) for o in got.values()} == {("failed", 501)}
    assert peer.messages == []
