"""The quarantine pages in a real browser: a message the chain quarantined is found,
previewed as text, released and delivered; hostile HTML runs nothing and loads nothing."""

from __future__ import annotations

import http.server
import smtplib
import threading
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from selenium.webdriver.common.by import By

from gateway.testing import RunningGateway
from tests.conftest import wait_for
from tests.integration.console.conftest import PlainClient, click, console_url, log_in, page_text, screenshot

# A bare IP in EHLO scores 2.0 (helo_checks, bare_ip = "score"), and [scoring] quarantines
# at 1.0: each message from such a client is quarantined by the chain itself.
CHAIN = """
[scoring]
quarantine = 1.0

[[plugins]]
name = "helo_checks"
bare_ip = "score"
[[plugins]]
name = "rcpt_relay"
[[plugins]]
name = "rcpt_local_users"
[[plugins]]
name = "queue_received_header"
"""


def send(gw: RunningGateway, to: str, subject: str, body: str, *, html: str | None = None) -> None:
    """Send one message from a client whose HELO is a bare IP (so it is quarantined)."""
    if html is None:
        content = f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n"
    else:
        content = f"Content-Type: text/html; charset=utf-8\r\n\r\n{html}\r\n"
    message = (f"From: Mallory <mallory@example.org>\r\nTo: {to}\r\nSubject: {subject}\r\n"
               f"Message-ID: <{zlib.crc32(subject.encode())}@example.org>\r\nMIME-Version: 1.0\r\n{content}")
    with smtplib.SMTP("127.0.0.1", gw.port, local_hostname="192.0.2.7", timeout=10) as client:
        client.sendmail("mallory@example.org", [to], message.encode())


def maildir(gw: RunningGateway, user: str) -> Path:
    return Path(gw.policy.local.mail_root) / user / "Maildir" / "new"


def rows(browser: Any) -> list[Any]:
    return list(browser.find_elements(By.CSS_SELECTOR, "#quarantine tbody tr[data-qid]"))


def test_an_admin_finds_previews_releases_and_deletes_quarantined_mail(
    console_gateway: Callable[..., RunningGateway], browser: Any,
) -> None:
    gw = console_gateway(CHAIN, poll_interval="1h")  # a release must wake the scheduler itself
    send(gw, "alice@localhost", "Invoice 4711", "Please pay invoice 4711 by Friday.")
    send(gw, "bob@localhost", "Cheap watches", "Buy now.")
    assert wait_for(lambda: len(gw.queue_ids("quarantine")) == 2, timeout=10)
    first, second = gw.queue_ids("quarantine")
    log_in(browser, gw)
    assert browser.current_url == console_url(gw, "/quarantine")
    listed = rows(browser)
    assert [r.get_attribute("data-qid") for r in listed] == [second, first]  # newest first
    cells = [c.text for c in listed[1].find_elements(By.TAG_NAME, "td")]
    assert cells[1:5] == ["mallory@example.org", "alice@localhost", "Invoice 4711", cells[4]]
    assert "score" in cells[4] or cells[4]  # the reason the chain gave
    screenshot(browser, "console-quarantine")
    # Search by subject, by recipient, by sender.
    for field, needle, expected in (("subject", "invoice", [first]), ("recipient", "bob@", [second]),
                                    ("sender", "mallory", [second, first]), ("sender", "nobody", [])):
        browser.get(console_url(gw, f"/quarantine?field={field}&q={needle}"))
        assert [r.get_attribute("data-qid") for r in rows(browser)] == expected, (field, needle)
    # The preview: envelope, reason, headers and the text.
    browser.get(console_url(gw, "/quarantine?field=subject&q=invoice"))
    click(browser, rows(browser)[0].find_element(By.LINK_TEXT, "Invoice 4711"))
    assert browser.current_url == console_url(gw, f"/quarantine/{first}")
    assert browser.find_element(By.ID, "text").text == "Please pay invoice 4711 by Friday."
    assert browser.find_element(By.ID, "source").text == "text/plain"
    assert browser.find_element(By.ID, "reason").text
    screenshot(browser, "console-message")
    # Release: it leaves the quarantine and is delivered, as gateway quarantine release does.
    click(browser, browser.find_element(By.ID, "release"))
    assert browser.find_element(By.ID, "notice").text == f"{first}: released"
    assert [r.get_attribute("data-qid") for r in rows(browser)] == [second]
    assert wait_for(lambda: maildir(gw, "alice").is_dir() and any(maildir(gw, "alice").iterdir()), timeout=15)
    (delivered,) = maildir(gw, "alice").iterdir()
    assert b"Subject: Invoice 4711" in delivered.read_bytes()
    assert wait_for(lambda: gw.queue_ids() == [], timeout=10)
    # Delete: gone for good, never delivered.
    click(browser, rows(browser)[0].find_element(By.CSS_SELECTOR, "button.delete"))
    assert browser.find_element(By.ID, "notice").text == f"{second}: deleted"
    assert gw.queue_ids("quarantine") == [] and gw.queue_ids() == []
    assert not maildir(gw, "bob").exists()
    assert "Nothing in the quarantine" in page_text(browser)
    # A message that is not there: 404, not a crash.
    browser.get(console_url(gw, f"/quarantine/{second}"))
    assert "no such message" in page_text(browser)


class _Recorder(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        self.requests.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def remote_host() -> Iterator[tuple[int, list[str]]]:
    """A loopback HTTP server standing for the tracker a message points at: its port and
    the paths it was asked for."""
    recorded: list[str] = []
    handler = type("Recorder", (_Recorder,), {"requests": recorded})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], recorded
    finally:
        server.shutdown()
        server.server_close()


def test_hostile_html_shows_no_script_and_loads_nothing_remote(
    console_gateway: Callable[..., RunningGateway], browser: Any, remote_host: tuple[int, list[str]],
) -> None:
    port, recorded = remote_host
    tracker = f"http://127.0.0.1:{port}"
    html = (
        f'<html><head><title>t</title><link rel="stylesheet" href="{tracker}/style.css">'
        f'<script src="{tracker}/evil.js"></script><style>body {{ background: url({tracker}/bg.png) }}</style></head>'
        f'<body onload="document.title=\'pwned-onload\'"><p>Dear customer,</p>'
        f'<script>document.title = "pwned"; new Image().src = "{tracker}/from-script";</script>'
        f'<img src="{tracker}/pixel.png" onerror="document.title=\'pwned-onerror\'">'
        f'<iframe src="{tracker}/frame"></iframe>'
        f'<p>your <b>account</b> is <a href="{tracker}/phish">locked</a>.</p></body></html>'
    )
    gw = console_gateway(CHAIN)
    send(gw, "alice@localhost", "Account locked", "", html=html)
    assert wait_for(lambda: len(gw.queue_ids("quarantine")) == 1, timeout=10)
    (qid,) = gw.queue_ids("quarantine")
    log_in(browser, gw)
    browser.get(console_url(gw, f"/quarantine/{qid}"))
    # Nothing of the message became an element: no script, image, frame, link or style.
    for tag in ("script", "img", "iframe", "object", "embed"):
        assert browser.find_elements(By.TAG_NAME, tag) == [], tag
    assert browser.find_elements(By.CSS_SELECTOR, f"[src*='{port}'], [href*='{port}']") == []
    assert "pwned" not in browser.title
    assert browser.find_element(By.ID, "source").text == "text/html, shown as text"
    assert browser.find_element(By.ID, "text").text == "Dear customer,\n\nyour account is locked."
    # The list page shows the subject as text too; and no request left for the tracker.
    browser.get(console_url(gw, "/quarantine"))
    assert "pwned" not in browser.title
    assert recorded == []
    # The raw markup, fetched without a browser, is escaped wherever it appears.
    client = PlainClient(gw)
    client.log_in()
    _, _, page = client.request(f"/quarantine/{qid}")
    assert "<script" not in page and tracker not in page
