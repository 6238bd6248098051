"""Message tracking in a real browser: real mail through a real gateway (delivered to a
Maildir, refused by a plugin, deferred by a real SMTP peer then delivered), each found
by a search and told from connection to removal on its page; and with ``workers = 2``
every process writes the one index."""

from __future__ import annotations

import smtplib
import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable

import pytest
from selenium.webdriver.common.by import By

from gateway.testing import RunningGateway
from gateway.tracking import SqliteIndex
from tests.conftest import wait_for
from tests.integration.console.conftest import console_url, log_in, page_text, screenshot
from tests.processes import free_port, start_gateway, stop_gateway, write_policy
from tests.smtppeer import SmtpPeer

CHAIN = """
[relay]
domains = ["peer.example"]

[[routes]]
domain = "peer.example"
host = "127.0.0.1"
port = {port}
tls = "none"

[[plugins]]
name = "rcpt_relay"
[[plugins]]
name = "rcpt_local_users"
[[plugins]]
name = "queue_received_header"
"""


def send(gw: RunningGateway, sender: str, to: str, message_id: str) -> str:
    """One message in its own session; the queue id from the 250 reply."""
    message = f"From: {sender}\r\nTo: {to}\r\nMessage-ID: {message_id}\r\nSubject: tracked\r\n\r\nHello.\r\n"
    with smtplib.SMTP("127.0.0.1", gw.port, local_hostname="client.test.example", timeout=10) as client:
        client.ehlo()
        client.mail(sender)
        code, _ = client.rcpt(to)
        assert code == 250
        code, reply = client.data(message.encode())
        assert code == 250
    return reply.decode().rsplit(" ", 1)[-1]


def rows(browser: Any) -> dict[str, str]:
    """key -> state of the rows shown."""
    return {
        r.get_attribute("data-key"): r.get_attribute("data-state")
        for r in browser.find_elements(By.CSS_SELECTOR, "#tracking tbody tr[data-key]")
    }


def story(browser: Any) -> list[dict[str, str]]:
    return [
        {name: r.get_attribute(f"data-{name}") or "" for name in ("kind", "plugin", "status", "recipient")}
        | {"text": r.text}
        for r in browser.find_elements(By.CSS_SELECTOR, "#story tbody tr")
    ]


def search(browser: Any, gw: RunningGateway, query: str) -> dict[str, str]:
    browser.get(console_url(gw, f"/tracking?{query}"))
    return rows(browser)


def open_only(browser: Any, gw: RunningGateway, query: str) -> str:
    found = search(browser, gw, query)
    assert len(found) == 1, (query, found)
    key = next(iter(found))
    browser.find_element(By.CSS_SELECTOR, f"#tracking tr[data-key='{key}'] td a").click()
    assert wait_for(lambda: browser.find_elements(By.ID, "story"), timeout=10)
    return key


def test_an_admin_finds_each_message_and_reads_its_story(
    console_gateway: Callable[..., RunningGateway], browser: Any,
) -> None:
    with SmtpPeer() as peer:
        gw = console_gateway(CHAIN.format(port=peer.port))
        assert gw.app is not None and gw.app.index is not None
        # Delivered into alice's Maildir.
        local = send(gw, "carol@example.org", "alice@localhost", "<tracked-1@example.org>")
        # Refused by a plugin: rcpt_local_users knows no nobody@localhost.
        with smtplib.SMTP("127.0.0.1", gw.port, local_hostname="client.test.example", timeout=10) as client:
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                client.sendmail("mallory@example.org", ["nobody@localhost"], b"Subject: no\r\n\r\nx\r\n")
        # Deferred by the peer's 451, then delivered at the retry.
        peer.script_rcpt("bob@peer.example", "451 4.2.0 try later")
        remote = send(gw, "dave@example.org", "bob@peer.example", "<tracked-2@example.org>")
        # Refused for good by the peer: a bounce goes back to alice.
        peer.always_rcpt("eve@peer.example", "550 5.1.1 no such user")
        bounced = send(gw, "alice@localhost", "eve@peer.example", "<tracked-3@example.org>")
        assert wait_for(lambda: len(peer.messages) == 1, timeout=20)
        mailbox = Path(gw.policy.local.mail_root) / "alice" / "Maildir" / "new"
        assert wait_for(lambda: mailbox.is_dir() and len(list(mailbox.iterdir())) == 2, timeout=20)
        assert wait_for(lambda: not gw.queue_ids(), timeout=10)
        assert gw.app.index.flush()

        log_in(browser, gw)
        # By Message-ID: the local one, delivered; its page tells the whole story.
        assert open_only(browser, gw, "message_id=tracked-1") == local
        assert browser.find_element(By.ID, "state").text == "delivered"
        assert browser.find_element(By.ID, "message-id").text == "<tracked-1@example.org>"
        steps = story(browser)
        kinds = [s["kind"] for s in steps]
        # One Maildir delivery: delivered at once, before the reply (so before the
        # session ends), never queued.
        assert kinds[:3] == ["connect", "helo", "mail"] and kinds[-1] == "disconnect", kinds
        assert kinds.index("queued") < kinds.index("delivery") < kinds.index("at_once")
        assert "never queued" in steps[kinds.index("at_once")]["text"]
        assert {"kind": "rcpt", "plugin": "rcpt_local_users", "status": "accepted", "recipient": "alice@localhost"} in [
            {k: s[k] for k in ("kind", "plugin", "status", "recipient")} for s in steps]
        (delivery,) = [s for s in steps if s["kind"] == "delivery"]
        assert delivery["status"] == "delivered" and "local" in delivery["text"]
        assert "client 127.0.0.1" in page_text(browser) and "client.test.example" in page_text(browser)

        # By recipient: the refused one, and the plugin that refused it, with its reply.
        open_only(browser, gw, "recipient=nobody%40localhost")
        assert browser.find_element(By.ID, "state").text == "refused"
        assert "rcpt_local_users" in browser.find_element(By.ID, "outcome").text
        (verdict,) = [s for s in story(browser) if s["kind"] == "verdict"]
        assert (verdict["plugin"], verdict["status"], verdict["recipient"]) == ("rcpt_local_users", "rcpt reject", "nobody@localhost")
        assert "550 5.1.1" in verdict["text"]

        # By queue id: the remote one, deferred by the peer then delivered: two attempts.
        assert open_only(browser, gw, f"qid={remote}") == remote
        screenshot(browser, "console-tracking-message")
        attempts = [s for s in story(browser) if s["kind"] == "delivery"]
        assert [a["status"] for a in attempts] == ["deferred", "delivered"]
        assert "451 4.2.0 try later" in attempts[0]["text"] and "127.0.0.1" in attempts[1]["text"]
        assert browser.find_element(By.ID, "state").text == "delivered"

        # The bounced one: the peer's 550, the notice, and the notice's own story.
        assert open_only(browser, gw, "message_id=tracked-3") == bounced
        assert browser.find_element(By.ID, "state").text == "bounced"
        steps = story(browser)
        (failed,) = [s for s in steps if s["kind"] == "delivery"]
        assert failed["status"] == "failed" and "550 5.1.1 no such user" in failed["text"]
        (notice,) = [s for s in steps if s["kind"] == "dsn"]
        assert notice["status"] == "failure" and notice["recipient"] == "alice@localhost"
        browser.find_element(By.CSS_SELECTOR, "#story tr[data-kind='dsn'] a").click()
        assert wait_for(lambda: browser.find_element(By.ID, "key").text != bounced, timeout=10)
        assert browser.find_element(By.ID, "state").text == "delivered"
        assert "generated" in browser.find_element(By.ID, "outcome").text
        assert [s["kind"] for s in story(browser)][0] == "generated"

        # By sender, and a time range that ends before any of it: nothing.
        assert search(browser, gw, "sender=dave%40example.org") == {remote: "delivered"}
        assert search(browser, gw, "sender=example.org&range=all&until=2001-01-01") == {}
        found = search(browser, gw, "range=1h")
        assert found[local] == "delivered" and found[remote] == "delivered" and "refused" in found.values()
        screenshot(browser, "console-tracking")


def test_with_two_workers_every_process_writes_the_one_index(tmp_path: Path) -> None:
    port = free_port()
    policy = write_policy(tmp_path, port, workers=2, extra=f"""
[console]
enabled = true
port = {free_port()}
admins_file = "{tmp_path / 'admins'}"
""")
    (tmp_path / "admins").write_text("")
    with open(tmp_path / "gateway.log", "w") as log_file:
        proc = start_gateway(policy, port, stderr=log_file)
    try:
        errors: list[Exception] = []

        def sender(n: int) -> None:
            try:
                for i in range(10):
                    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                        client.sendmail("a@example.org", ["alice@localhost"], f"Subject: {n}-{i}\r\n\r\nx\r\n".encode())
            except Exception as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=sender, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
    finally:
        assert stop_gateway(proc) == 0  # every writer writes what it holds as it stops
    db = sqlite3.connect(tmp_path / "var" / "console" / "index.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    queued = db.execute("SELECT key, session FROM messages WHERE outcome = 'queued'").fetchall()
    assert len(queued) == 60
    # Sessions are named S<pid>-<n>: both processes served some, and wrote them.
    assert len({session.split("-")[0] for _, session in queued}) == 2
    found, total = SqliteIndex(tmp_path / "var" / "console" / "index.sqlite").search(limit=100)
    assert total == 60 and {row["state"] for row in found} == {"delivered"}
    received = db.execute("SELECT sum(value) FROM counters WHERE period = 60 AND name = 'received'").fetchone()[0]
    assert received == 60
