"""plugins/mail_sender_login.py: the sender map file, ownership rules, and the hooks."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from gateway.address import Address
from gateway.model import Message, Session, Transaction
from gateway.verdicts import Action
from plugins.mail_sender_login import (
    REPLY_ENVELOPE,
    REPLY_HEADER,
    Plugin,
    SenderMapError,
    Settings,
    header_addresses,
    read_sender_map,
)

MAP = """\
# login: addresses
alice: alice@example.com, Alice.Smith@Example.COM   # case does not matter
bob:   bob@example.com @example.org
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sender_logins"
    path.write_text(text)
    return path


def test_reads_logins_addresses_and_domains(tmp_path: Path) -> None:
    senders = read_sender_map(write(tmp_path, MAP))
    assert senders.owns("alice", "alice.smith@example.com", "+")
    assert senders.owns("alice", "ALICE@example.com", "+")
    assert senders.owns("alice", "alice+news@example.com", "+")
    assert not senders.owns("alice", "alice+news@example.com", "")
    assert not senders.owns("alice", "bob@example.com", "+")
    assert senders.owns("bob", "anyone@EXAMPLE.org", "+")
    assert not senders.owns("bob", "anyone@sub.example.org", "+")
    assert not senders.owns("mallory", "alice@example.com", "+")  # not in the map: owns nothing
    assert senders.owned_by_anyone("Alice@example.com", "+")
    assert senders.owned_by_anyone("x@example.org", "+")
    assert not senders.owned_by_anyone("x@example.net", "+")


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("alice: alice@example.com\nbob bob@example.com\n", 2, "expected 'login: address, @domain, ...'"),
        ("\n\nalice: alice@\n", 3, "'alice@' is not an address or @domain"),
        ("alice: example.com\n", 1, "'example.com' is not an address or @domain"),
        ("alice:\n", 1, "login 'alice' has no addresses"),
        ("alice: a@example.com\n# x\nalice: b@example.com\n", 3, "login 'alice' already listed at line 1"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(SenderMapError) as info:
        read_sender_map(path)
    assert str(info.value) == f"{path}:{line}: {message}"


def test_header_addresses() -> None:
    assert header_addresses(Message(b"From: A <a@example.com>, b@example.org\r\n\r\nx")) == [
        "a@example.com", "b@example.org",
    ]
    assert header_addresses(Message(b"Subject: none\r\n\r\nx")) == []
    assert header_addresses(Message(b"From: just a name\r\n\r\nx")) is None


@pytest.fixture
def gateway() -> Iterator[Any]:
    with ThreadPoolExecutor(2) as executor:

        async def run_in_thread(fn: Any, *args: Any) -> Any:
            return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

        yield SimpleNamespace(run_in_thread=run_in_thread)


def session(login: str | None = None, relay: bool = False) -> Session:
    s = Session(peer_ip="192.0.2.1", peer_port=1234, listener="submission", auth_login=login)
    s.is_relay_client = relay
    return s


def mail(plugin: Plugin, sess: Session, sender: str, gateway: Any, settings: Settings) -> Any:
    address = Address.null() if not sender else Address(*sender.split("@"))
    return asyncio.run(plugin.gateway_mail(sess, address, gateway, settings))


def test_envelope_sender_checks(tmp_path: Path, gateway: Any) -> None:
    settings = Settings(map_file=write(tmp_path, MAP))
    plugin = Plugin()
    asyncio.run(plugin.gateway_startup(gateway, settings))
    assert mail(plugin, session("alice"), "alice@example.com", gateway, settings) is None
    verdict = mail(plugin, session("alice"), "bob@example.com", gateway, settings)
    assert verdict.action is Action.REJECT and verdict.reply == REPLY_ENVELOPE
    assert (verdict.reply.code, verdict.reply.status) == (553, "5.7.1")
    assert mail(plugin, session("alice"), "", gateway, settings) is None  # bounces pass
    # Unauthenticated sessions: only with unauthenticated_mismatch, relay clients exempt.
    assert mail(plugin, session(), "alice@example.com", gateway, settings) is None
    strict = Settings(map_file=settings.map_file, unauthenticated_mismatch=True)
    verdict = mail(plugin, session(), "alice@example.com", gateway, strict)
    assert verdict.action is Action.REJECT and verdict.reply.code == 553
    assert mail(plugin, session(), "someone@example.net", gateway, strict) is None
    assert mail(plugin, session(relay=True), "alice@example.com", gateway, strict) is None


def test_header_from_check(tmp_path: Path, gateway: Any) -> None:
    settings = Settings(map_file=write(tmp_path, MAP))
    plugin = Plugin()
    asyncio.run(plugin.gateway_startup(gateway, settings))
    txn = Transaction(sender=Address("alice", "example.com"))

    def data(raw: bytes, login: str | None = "alice", s: Settings = settings) -> Any:
        return asyncio.run(plugin.gateway_data(session(login), txn, Message(raw), gateway, s))

    assert data(b"From: Alice <alice@example.com>\r\n\r\nhi") is None
    verdict = data(b"From: Bob <bob@example.com>\r\n\r\nhi")
    assert verdict.reply == REPLY_HEADER
    assert data(b"From: Alice <alice@example.com>, <bob@example.com>\r\n\r\nhi").reply == REPLY_HEADER
    assert data(b"From: undisclosed\r\n\r\nhi").reply == REPLY_HEADER
    assert data(b"From: Bob <bob@example.com>\r\n\r\nhi", login=None) is None
    off = Settings(map_file=settings.map_file, check_header_from=False)
    assert data(b"From: Bob <bob@example.com>\r\n\r\nhi", s=off) is None


def test_startup_refuses_a_broken_map_and_later_breakage_keeps_the_old_one(tmp_path: Path, gateway: Any) -> None:
    path = write(tmp_path, "alice alice@example.com\n")
    settings = Settings(map_file=path)
    plugin = Plugin()
    with pytest.raises(SenderMapError, match=f"{path}:1:"):
        asyncio.run(plugin.gateway_startup(gateway, settings))
    missing = Settings(map_file=tmp_path / "absent")
    with pytest.raises(SenderMapError, match="cannot read the sender map"):
        asyncio.run(plugin.gateway_startup(gateway, missing))
    path.write_text(MAP)
    asyncio.run(plugin.gateway_startup(gateway, settings))
    path.write_text("broken\n")
    os.utime(path, (1, 1))  # a new modification time, whatever the clock's resolution
    assert mail(plugin, session("alice"), "alice@example.com", gateway, settings) is None
    path.write_text(MAP.replace("alice@example.com,", ""))
    os.utime(path, (2, 2))
    assert mail(plugin, session("alice"), "alice@example.com", gateway, settings) is not None
