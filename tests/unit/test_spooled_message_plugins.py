"""Plugins that read a message spooled to disk read only what they need, and off the
event loop: connect_dnsbl reads the first body_scan_size octets, queue_footer the head
and the body (not the whole message besides), data_dkim_verify and data_arc_verify load
the message only in the thread pool.

The messages here are file-backed (gateway.message.Message over a Content of a file)
and made strict: our own Message subclasses that fail the test when a plugin loads them
in a way it should not."""

from __future__ import annotations

import asyncio
import os
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from gateway.address import Address
from gateway.content import Content
from gateway.dns import make_resolver
from gateway.message import Message
from gateway.model import Recipient, Session, Transaction
from gateway.policy import load_policy_text
from gateway.verdicts import Action
from plugins import connect_dnsbl, data_arc_verify, data_dkim_verify, queue_footer
from plugins.data_arc_verify import ARC_RESULT
from plugins.data_dkim_verify import DKIM_RESULTS
from tests.dnsserver import DnsTestServer, dns_settings


class NoWholeRead(Message):
    """Fails on any read of the whole message (``raw``, ``as_bytes``)."""

    __slots__ = ()

    @property
    def raw(self) -> bytes:
        raise AssertionError("the whole spooled message was read into memory (message.raw)")

    def as_bytes(self) -> bytes:
        raise AssertionError("the whole spooled message was read into memory (as_bytes)")


class NotOnTheLoop(Message):
    """Fails when the whole message is read on the event loop's thread (a disk read
    of the message's size there would stall every session)."""

    __slots__ = ()

    @property
    def raw(self) -> bytes:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return Message.raw.fget(self)  # type: ignore[attr-defined,no-any-return]
        raise AssertionError("message.raw was read on the event loop")


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Any]:
    fds: list[int] = []

    def make(data: bytes, cls: type[Message]) -> Message:
        path = tmp_path / f"spool{len(fds)}"
        path.write_bytes(b"#" * 100 + data + b"trailer")
        fds.append(os.open(path, os.O_RDONLY))
        message = cls(Content.of_file(fds[-1], [(100, len(data))]))
        assert message.is_spooled
        return message

    yield make
    for fd in fds:
        os.close(fd)


async def _in_thread(fn: Any, *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


def gateway(**more: Any) -> SimpleNamespace:
    policy = SimpleNamespace(dns=SimpleNamespace(timeout=1.0))
    return SimpleNamespace(run_in_thread=_in_thread, hostname="mx.test.example", counters=None, policy=policy, **more)


def session_and_txn() -> tuple[Session, Transaction]:
    session = Session(peer_ip="192.0.2.7", peer_port=4000, listener="smtp", helo="client.example")
    txn = Transaction(sender=Address("a", "example.org"), queue_id="Q1")
    txn.recipients.append(Recipient(Address("alice", "localhost")))
    return session, txn


HEAD = b"From: <a@example.org>\r\nTo: <alice@localhost>\r\nSubject: links\r\n"


def test_dnsbl_reads_only_the_first_body_scan_size_octets(spool) -> None:
    zone = "$TTL 300\ntest. IN SOA ns.test. hostmaster.test. 1 3600 600 86400 60\nevil.example.dbl.test. IN A 127.0.1.2\n"
    text = textwrap.dedent(
        """
        [[plugins]]
        name = "connect_dnsbl"
        body_scan_size = "64KB"
        [[plugins.zones]]
        zone = "dbl.test"
        type = "domain"
        targets = ["body"]
        """
    )
    settings = load_policy_text(text, source="t.toml", registry={"connect_dnsbl": connect_dnsbl.Settings}).plugins[0].settings
    body = b"See http://evil.example/ now\r\n" + b"filler line of text\r\n" * 200_000  # 4 MB
    message = spool(HEAD + b"\r\n" + body, NoWholeRead)
    session, txn = session_and_txn()
    with DnsTestServer(zone) as server:
        resolver = make_resolver(dns_settings(server.port))
        verdict = asyncio.run(connect_dnsbl.Plugin().gateway_data(session, txn, message, gateway(resolver=resolver),
                                                                  settings))
    assert verdict is not None and verdict.action is Action.REJECT
    assert "evil.example" in verdict.reply.text


def test_footer_reads_the_head_and_the_body_not_the_whole_message(spool) -> None:
    message = spool(HEAD + b"Content-Type: text/plain\r\n\r\n" + b"Hello.\r\n" * 1000, NoWholeRead)
    result = queue_footer.footer_message_in_thread(message, queue_footer.footer_texts(queue_footer.Settings(text="-- sent by us")))
    assert result is not None and result.body.endswith(b"-- sent by us\r\n")


def test_dkim_verify_loads_the_message_in_the_thread_pool(spool) -> None:
    message = spool(HEAD + b"DKIM-Signature: v=1; a=rsa-sha256\r\n\r\nbody\r\n",
                    NotOnTheLoop)
    session, txn = session_and_txn()
    asyncio.run(data_dkim_verify.gateway_data(session, txn, message, gateway(resolver=None),
                                              data_dkim_verify.Settings()))
    (found,) = txn.stash[DKIM_RESULTS]
    assert found.result == "neutral"  # a signature with syntax errors, read in the thread


def test_arc_verify_loads_the_message_in_the_thread_pool(spool) -> None:
    message = spool(HEAD + b"ARC-Seal: not a tag list\r\n\r\nbody\r\n", NotOnTheLoop)
    session, txn = session_and_txn()
    asyncio.run(data_arc_verify.gateway_data(session, txn, message, gateway(), data_arc_verify.Settings()))
    assert txn.stash[ARC_RESULT].result == "fail"
