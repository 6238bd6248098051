"""Per-user allow and block lists: a user edits them in the console (a real browser), and
real SMTP sessions honour them: a blocked sender is refused for that user only, and an
allowed sender's spam (GTUBE, scored by a real spamd) reaches the user's Maildir instead
of the quarantine."""

from __future__ import annotations

import smtplib
from pathlib import Path
from typing import Any, Callable

from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from gateway.testing import RunningGateway
from tests.conftest import wait_for
from tests.integration.console.conftest import click, console_url, log_in
from tests.integration.console.test_console_users import ALICE_PASSWORD, user_client, user_gateway  # noqa: F401
from tests.integration.scanners.conftest import GTUBE, Spamd, spamd_daemon  # noqa: F401

# spamd's score counts in [scoring] (GTUBE scores about 1000: quarantined at 5); the
# lists' plugins around the recipient and data plugins, as the default chain has them.
CHAIN = """users = true

[auth]
users_file = "{users}"

[scoring]
quarantine = 5.0

[[plugins]]
name = "auth_users_file"
[[plugins]]
name = "rcpt_relay"
[[plugins]]
name = "rcpt_user_lists"
[[plugins]]
name = "rcpt_local_users"
[[plugins]]
name = "data_spamd"
address = "{spamd}"
scoring_weight = 1.0
[[plugins]]
name = "data_user_lists"
[[plugins]]
name = "queue_received_header"
"""


def chain(spamd: str = "127.0.0.1:9") -> str:
    return CHAIN.replace("{spamd}", spamd)


def send(gw: RunningGateway, sender: str, to: list[str], subject: str, body: str = "Hello.") -> dict[str, Any]:
    """One message through a real SMTP session; the recipients refused (smtplib's dict)."""
    message = f"From: {sender}\r\nTo: {', '.join(to)}\r\nSubject: {subject}\r\n\r\n{body}\r\n"
    with smtplib.SMTP("127.0.0.1", gw.port, local_hostname="mail.example.org", timeout=60) as client:
        try:
            return dict(client.sendmail(sender, to, message.encode()))
        except smtplib.SMTPRecipientsRefused as exc:
            return dict(exc.recipients)


def maildir(gw: RunningGateway, user: str) -> Path:
    return Path(gw.policy.local.mail_root) / user / "Maildir" / "new"


def delivered(gw: RunningGateway, user: str) -> list[bytes]:
    box = maildir(gw, user)
    return [p.read_bytes() for p in box.iterdir()] if box.is_dir() else []


def add_entry(browser: Any, entry: str, kind: str) -> None:
    browser.find_element(By.ID, "entry").send_keys(entry)
    Select(browser.find_element(By.ID, "list")).select_by_value(kind)
    click(browser, browser.find_element(By.ID, "add-entry"))


def entries(browser: Any, kind: str) -> list[str]:
    return [r.get_attribute("data-entry") for r in browser.find_elements(By.CSS_SELECTOR, f"#{kind} tr[data-entry]")]


def test_a_sender_on_a_users_block_list_is_refused_for_that_user(
    user_gateway: Callable[..., RunningGateway], browser: Any,  # noqa: F811
) -> None:
    # on_error = continue: spamd is not there, the message passes unscanned.
    gw = user_gateway(chain=chain().replace('scoring_weight = 1.0', 'scoring_weight = 1.0\non_scanner_error = "continue"'))
    log_in(browser, gw, "alice", ALICE_PASSWORD)
    click(browser, browser.find_element(By.CSS_SELECTOR, "header nav a[href='/lists']"))
    assert browser.current_url == console_url(gw, "/lists")
    add_entry(browser, "@Spam.Example", "block")
    assert browser.find_element(By.ID, "notice").text == "Added."
    assert entries(browser, "block") == ["@spam.example"]
    # Not an address or domain: said so, nothing stored.
    add_entry(browser, "not an address", "block")
    assert "neither an address" in browser.find_element(By.ID, "error").text
    assert entries(browser, "block") == ["@spam.example"]
    # The block list at work: refused for alice (and her alias), bob still gets it.
    refused = send(gw, "offers@news.spam.example", ["alice@localhost", "a.smith@localhost", "bob@localhost"], "Offer")
    assert {r: code for r, (code, _) in refused.items()} == {"alice@localhost": 550, "a.smith@localhost": 550}
    assert b"5.7.1 Sender blocked by the recipient" in refused["alice@localhost"][1]
    assert wait_for(lambda: len(delivered(gw, "bob")) == 1, timeout=15)
    assert delivered(gw, "alice") == []
    # A POST without the session's CSRF token changes nothing.
    client, csrf = user_client(gw, "alice", ALICE_PASSWORD)
    assert client.request("/lists/remove", {"list": "block", "entry": "@spam.example"})[0] == 403
    assert send(gw, "offers@spam.example", ["alice@localhost"], "Again")  # still refused
    # Removed in the browser: mail from there reaches her again.
    click(browser, browser.find_element(By.CSS_SELECTOR, "#block tr[data-entry='@spam.example'] button"))
    assert entries(browser, "block") == []
    assert send(gw, "offers@spam.example", ["alice@localhost"], "Welcome back") == {}
    assert wait_for(lambda: len(delivered(gw, "alice")) == 1, timeout=15)
    # Admins have no lists page.
    assert client.request("/lists")[0] == 200
    log_in(browser, gw)
    browser.get(console_url(gw, "/lists"))
    assert "not allowed" in browser.find_element(By.TAG_NAME, "body").text


def test_an_allowed_senders_spam_reaches_the_user_instead_of_the_quarantine(
    user_gateway: Callable[..., RunningGateway], browser: Any, spamd_daemon: Spamd,  # noqa: F811
) -> None:
    gw = user_gateway(chain=chain(spamd_daemon.address))
    gtube = GTUBE.decode()
    log_in(browser, gw, "alice", ALICE_PASSWORD)
    browser.get(console_url(gw, "/lists"))
    add_entry(browser, "friend@example.org", "allow")
    assert entries(browser, "allow") == ["friend@example.org"]
    # To alice: spamd scores it ~1000, and still it is delivered, not quarantined.
    assert send(gw, "friend@example.org", ["alice@localhost"], "Forwarded joke", gtube) == {}
    assert wait_for(lambda: len(delivered(gw, "alice")) == 1, timeout=30)
    (message,) = delivered(gw, "alice")
    assert b"Subject: Forwarded joke" in message and b"X-Spam-Status: Yes" in message
    assert gw.queue_ids("quarantine") == []
    # The same to bob, who allows nobody: quarantined.
    assert send(gw, "friend@example.org", ["bob@localhost"], "Forwarded joke", gtube) == {}
    assert wait_for(lambda: len(gw.queue_ids("quarantine")) == 1, timeout=30)
    # To both at once: bob is asked to come back in a transaction of his own (452),
    # so alice's copy is not held for bob's sake, nor bob's released for hers.
    refused = send(gw, "friend@example.org", ["alice@localhost", "bob@localhost"], "Both", gtube)
    assert list(refused) == ["bob@localhost"] and refused["bob@localhost"][0] == 452
    assert wait_for(lambda: len(delivered(gw, "alice")) == 2, timeout=30)
    # Another sender at the same domain is not on her list: quarantined.
    assert send(gw, "stranger@example.org", ["alice@localhost"], "Spam", gtube) == {}
    assert wait_for(lambda: len(gw.queue_ids("quarantine")) == 2, timeout=30)
    assert len(delivered(gw, "alice")) == 2
