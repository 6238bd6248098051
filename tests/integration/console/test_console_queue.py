"""The queue page in a real browser: filters by sender, recipient and state; hold,
release, retry and delete act on the queue as ``gateway queue`` does."""

from __future__ import annotations

import smtplib
from typing import Any, Callable

from selenium.webdriver.common.by import By

from gateway.testing import RunningGateway
from tests.conftest import wait_for
from tests.integration.console.conftest import click, console_url, log_in, page_text, screenshot
from tests.processes import free_port

# held.example waits for a flush (a route with hold = true); slow.example's smarthost
# does not answer, so its mail is deferred, and with retry_base = 1h (and no rescan of
# the queue for an hour) it stays so until someone acts: a release or a retry must wake
# the scheduler itself.
CHAIN = """
[relay]
domains = ["held.example", "slow.example"]

[[routes]]
domain = "held.example"
hold = true

[[routes]]
domain = "slow.example"
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


def send(gw: RunningGateway, sender: str, to: str, subject: str) -> None:
    message = f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n\r\nHello.\r\n"
    with smtplib.SMTP("127.0.0.1", gw.port, local_hostname="client.test.example", timeout=10) as client:
        client.sendmail(sender, [to], message.encode())


def listed(browser: Any) -> dict[str, str]:
    """Queue id -> state of the rows shown."""
    return {
        r.get_attribute("data-qid"): r.get_attribute("data-state")
        for r in browser.find_elements(By.CSS_SELECTOR, "#queue tbody tr[data-qid]")
    }


def act(browser: Any, gw: RunningGateway, qid: str, action: str) -> None:
    browser.get(console_url(gw, "/queue"))
    row = browser.find_element(By.CSS_SELECTOR, f"#queue tr[data-qid='{qid}']")
    click(browser, row.find_element(By.CSS_SELECTOR, f"button.{action}"))
    assert browser.find_element(By.ID, "notice").text == f"{qid}: {action}"


def test_an_admin_filters_holds_releases_retries_and_deletes_queued_mail(
    console_gateway: Callable[..., RunningGateway], browser: Any,
) -> None:
    gw = console_gateway(CHAIN.format(port=free_port()), retry_base="1h", retry_max="2h", poll_interval="1h")
    send(gw, "carol@example.org", "x@held.example", "Waiting for ETRN")
    send(gw, "dave@example.org", "y@slow.example", "Stuck")
    assert wait_for(lambda: len(gw.queue_ids()) == 2, timeout=10)
    held, slow = gw.queue_ids()
    assert wait_for(lambda: gw.queue.load(slow).attempts == 1, timeout=15)
    log_in(browser, gw)
    browser.get(console_url(gw, "/queue"))
    assert listed(browser) == {held: "held", slow: "deferred"}
    assert "(route)" in browser.find_element(By.CSS_SELECTOR, f"tr[data-qid='{held}'] .state").text
    assert "Stuck" in page_text(browser) and "y@slow.example" in page_text(browser)
    screenshot(browser, "console-queue")
    for query, expected in (("sender=carol", {held: "held"}), ("recipient=slow.example", {slow: "deferred"}),
                            ("state=deferred", {slow: "deferred"}), ("state=held", {held: "held"}),
                            ("state=pending", {}), ("sender=dave&recipient=held", {})):
        browser.get(console_url(gw, f"/queue?{query}"))
        assert listed(browser) == expected, query
    # The form's filters are kept on the page that answers them.
    browser.get(console_url(gw, "/queue?sender=dave&state=deferred"))
    assert browser.find_element(By.ID, "sender").get_attribute("value") == "dave"
    # Hold: the operator's hold, in the message's state file.
    act(browser, gw, slow, "hold")
    assert gw.queue.load(slow).held
    assert listed(browser)[slow] == "held"
    # Release: held no more, and tried at once (not an hour later).
    act(browser, gw, slow, "release")
    assert not gw.queue.load(slow).held
    assert wait_for(lambda: gw.queue.load(slow).attempts == 2, timeout=10)
    # Retry: tried again now.
    act(browser, gw, slow, "retry")
    assert wait_for(lambda: gw.queue.load(slow).attempts == 3, timeout=10)
    # Delete: gone for good; the held one stays.
    act(browser, gw, slow, "delete")
    assert gw.queue_ids() == [held]
    assert listed(browser) == {held: "held"}
