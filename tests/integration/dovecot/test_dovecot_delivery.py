"""Recipients known only to Dovecot are delivered, not bounced (issue #15, item 4).

``rcpt_dovecot_users`` accepts at RCPT the users of Dovecot's userdb; local delivery
must then deliver to them (into the home the userdb gives) instead of bouncing them
for not being in ``[local] users``. A real gateway process, a real Dovecot, real SMTP
and real Maildirs. The sender, alice@localhost, is a ``[local]`` user that Dovecot
does not know: a bounce would land in her Maildir under the gateway's mail root.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import smtplib
from pathlib import Path
from typing import Any, Iterator

import pytest

from gateway.queue import QueueStore
from plugins._dovecot import lookup_user
from tests.conftest import MESSAGE, RawClient, wait_for
from tests.integration.dovecot.conftest import OTHER_UID, Dovecot, start_dovecot
from tests.processes import free_port, start_gateway, stop_gateway, write_policy

SENDER = "alice@localhost"


def _policy(tmp: Path, port: int, userdb: str, rcpt_extra: str = "") -> Path:
    # Short retries, so a deferred recipient is tried again within the test.
    return write_policy(tmp, port, plugins=(), extra=f"""
[delivery]
retry_base = "200ms"
retry_max = "1s"
poll_interval = "200ms"

[[plugins]]
name = "rcpt_relay"

[[plugins]]
name = "rcpt_dovecot_users"
address = "{userdb}"
{rcpt_extra}

[[plugins]]
name = "rcpt_local_users"

[[plugins]]
name = "queue_received_header"
""")


def _maildir(path: Path) -> list[bytes]:
    new = path / "new"
    return [p.read_bytes() for p in sorted(new.glob("*"))] if new.is_dir() else []


def _log(tmp: Path) -> str:
    """The end of the gateway's log, for a failed assertion."""
    return (tmp / "gateway.log").read_text(errors="replace")[-3000:]


def _bounces(tmp: Path) -> list[bytes]:
    return _maildir(tmp / "mail" / "alice" / "Maildir")


@pytest.fixture
def gateway_process(tmp_path: Path) -> Iterator[Any]:
    """Start the gateway as its own process on a policy; stopped at the end."""
    procs = []

    def start(userdb: str, rcpt_extra: str = "") -> int:
        port = free_port()
        with open(tmp_path / "gateway.log", "ab") as log:
            procs.append(start_gateway(_policy(tmp_path, port, userdb, rcpt_extra), port, stderr=log))
        return port

    yield start
    for proc in procs:
        assert stop_gateway(proc) == 0


def test_dovecot_users_are_delivered_into_their_homes(tmp_path, dovecot: Dovecot, gateway_process) -> None:
    port = gateway_process(dovecot.userdb_socket)
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        refused = client.sendmail(
            SENDER, ["dan@localhost", "dan-lists@localhost", "erin@localhost", "fred@localhost"], MESSAGE,
        )
    assert refused == {}
    store = QueueStore(tmp_path / "queue")
    assert wait_for(lambda: store.ids() == [], timeout=60), _log(tmp_path)
    # dan: no mail= field, the default mailbox <home>/Maildir/; his extension too.
    copies = _maildir(dovecot.home("dan@localhost") / "Maildir")
    assert len(copies) == 2
    assert {c.split(b"\r\n")[1] for c in copies} == {
        b"Delivered-To: dan@localhost", b"Delivered-To: dan-lists@localhost",
    }
    assert all(c.startswith(b"Return-Path: <alice@localhost>\r\n") and c.endswith(MESSAGE) for c in copies)
    # erin: her userdb entry's mail=maildir:~/mail/inbox.
    (copy,) = _maildir(dovecot.home("erin@localhost") / "mail" / "inbox")
    assert b"Delivered-To: erin@localhost\r\n" in copy
    # fred: the home the gateway made, and his message, belong to his uid/gid.
    fred = dovecot.home("fred@localhost")
    (copy,) = _maildir(fred / "Maildir")
    assert b"Delivered-To: fred@localhost\r\n" in copy
    if os.geteuid() == 0:
        (message,) = (fred / "Maildir" / "new").iterdir()
        for path in (fred, fred / "Maildir", message):
            info = path.stat()
            assert (info.st_uid, info.st_gid) == (OTHER_UID, OTHER_UID), path
    assert _bounces(tmp_path) == []


def _send_with_dovecot_stopped_after_rcpt(port: int, daemon: Dovecot, rcpt: str) -> None:
    """RCPT while Dovecot answers; then Dovecot goes away before the message is queued."""
    c = RawClient(port, timeout=30)
    assert c.reply()[0] == 220
    assert c.cmd("HELO client.test.example")[0] == 250
    assert c.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
    assert c.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
    daemon.stop()
    assert c.cmd("DATA")[0] == 354
    assert c.cmd(MESSAGE + b".")[0] == 250
    c.close()


def _recipient_state(store: QueueStore) -> dict[str, Any] | None:
    ids = store.ids()
    state = store.read_state(ids[0]) if len(ids) == 1 else None
    return state["recipients"][0] if state else None


def test_dovecot_down_at_delivery_defers_then_delivers(tmp_path, private_dovecot: Dovecot, gateway_process) -> None:
    # No cache: delivery must ask Dovecot again, and find it gone.
    port = gateway_process(private_dovecot.userdb_socket, 'cache_ttl = "0s"')
    _send_with_dovecot_stopped_after_rcpt(port, private_dovecot, "dan@localhost")
    store = QueueStore(tmp_path / "queue")

    def deferred_twice() -> bool:
        rcpt = _recipient_state(store)
        return bool(rcpt and rcpt.get("attempts", 0) >= 2)

    assert wait_for(deferred_twice, timeout=60), _recipient_state(store)
    rcpt = _recipient_state(store)
    assert rcpt is not None and rcpt["state"] == "pending"
    assert rcpt["last_reply"].startswith("451 4.4.3")
    assert _bounces(tmp_path) == []
    # Dovecot is back: the next retry delivers, still without a bounce.
    again = start_dovecot(private_dovecot.root)
    try:
        assert wait_for(lambda: store.ids() == [], timeout=60), _recipient_state(store)
    finally:
        again.stop()
    assert len(_maildir(private_dovecot.home("dan@localhost") / "Maildir")) == 1
    assert _bounces(tmp_path) == []


def test_user_removed_from_dovecot_after_rcpt_bounces(tmp_path, private_dovecot: Dovecot, gateway_process) -> None:
    port = gateway_process(private_dovecot.userdb_socket, 'cache_ttl = "0s"\nnegative_ttl = "0s"')
    c = RawClient(port, timeout=30)
    assert c.reply()[0] == 220
    assert c.cmd("HELO client.test.example")[0] == 250
    assert c.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
    assert c.cmd("RCPT TO:<dan@localhost>")[0] == 250
    users = private_dovecot.root / "users"
    users.write_text("".join(line + "\n" for line in users.read_text().splitlines() if not line.startswith("dan@")))
    # Dovecot looks at its passwd-file again at most once a second: wait until it has.
    socket = private_dovecot.userdb_socket
    assert wait_for(lambda: asyncio.run(lookup_user(socket, "dan@localhost")) is None, timeout=30)
    assert c.cmd("DATA")[0] == 354
    assert c.cmd(MESSAGE + b".")[0] == 250
    c.close()
    assert wait_for(lambda: _bounces(tmp_path), timeout=60)
    (raw,) = _bounces(tmp_path)
    report = email.message_from_bytes(raw, policy=email.policy.default)
    assert "dan@localhost" in raw.decode(errors="replace")
    assert b"5.1.1" in raw, report
    assert not private_dovecot.home("dan@localhost").exists()
