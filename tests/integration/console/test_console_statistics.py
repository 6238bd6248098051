"""The statistics page in a real browser: after real mail (delivered, refused by a plugin,
refused as spam by the scoring step), its charts and tables show those counts, from the
counters the gateway keeps in its own index."""

from __future__ import annotations

import smtplib
from pathlib import Path
from typing import Any, Callable

import pytest
from selenium.webdriver.common.by import By

from gateway.testing import RunningGateway
from tests.conftest import wait_for
from tests.integration.console.conftest import PlainClient, console_url, log_in, screenshot

# A bare IP in HELO scores 2.0 (helo_checks) and [scoring] refuses from 1.0: that
# client's mail is refused as spam by "scoring".
CHAIN = """
[scoring]
reject = 1.0

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


def send(gw: RunningGateway, to: str, helo: str = "client.test.example") -> None:
    with smtplib.SMTP("127.0.0.1", gw.port, local_hostname=helo, timeout=10) as client:
        client.sendmail("carol@example.org", [to], f"To: {to}\r\nSubject: counted\r\n\r\nHello.\r\n".encode())


def table(browser: Any, chart: str) -> dict[str, str]:
    """Series -> figure of a chart's table."""
    return {
        row.get_attribute("data-series"): row.find_element(By.CSS_SELECTOR, "td.num").text
        for row in browser.find_elements(By.CSS_SELECTOR, f"#{chart}-table tbody tr[data-series]")
    }


def svg_total(browser: Any, chart: str, series: str) -> float:
    """The sum of a series' bars or points in the chart's SVG."""
    marks = browser.find_elements(By.CSS_SELECTOR, f"svg#{chart} [data-series='{series}'][data-value]")
    return sum(float(m.get_attribute("data-value")) for m in marks)


def test_the_statistics_page_counts_real_mail(console_gateway: Callable[..., RunningGateway], browser: Any) -> None:
    gw = console_gateway(CHAIN)
    assert gw.app is not None and gw.app.index is not None
    send(gw, "alice@localhost")
    send(gw, "bob@localhost")
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        send(gw, "nobody@localhost")
    with pytest.raises(smtplib.SMTPDataError):
        send(gw, "alice@localhost", helo="192.0.2.7")
    root = Path(gw.policy.local.mail_root)
    assert wait_for(lambda: all(any((root / u / "Maildir" / "new").glob("*")) for u in ("alice", "bob")
                                if (root / u / "Maildir" / "new").is_dir()) and not gw.queue_ids(), timeout=15)
    assert gw.app.index.flush()

    log_in(browser, gw)
    browser.get(console_url(gw, "/statistics?range=1h"))
    screenshot(browser, "console-statistics")
    traffic = table(browser, "chart-traffic")
    assert traffic["received"] == "2" and traffic["delivered"] == "2" and traffic["bounced"] == "0"
    assert svg_total(browser, "chart-traffic", "received") == 2
    assert table(browser, "chart-refusals") == {"rcpt_local_users": "1", "scoring": "1"}
    assert svg_total(browser, "chart-refusals", "rcpt_local_users") == 1
    assert svg_total(browser, "chart-refusals", "scoring") == 1
    assert table(browser, "chart-threats") == {"spam": "1", "virus": "0"}
    assert svg_total(browser, "chart-threats", "spam") == 1
    latency = browser.find_elements(By.CSS_SELECTOR, "svg#chart-latency [data-series='slowest'][data-value]")
    assert latency and all(float(m.get_attribute("data-value")) > 0 for m in latency)
    # The same figures over a day and over 30 days (hourly buckets, rolled up as written).
    for chosen in ("24h", "30d"):
        browser.get(console_url(gw, f"/statistics?range={chosen}"))
        assert table(browser, "chart-refusals") == {"rcpt_local_users": "1", "scoring": "1"}, chosen
        assert table(browser, "chart-traffic")["delivered"] == "2", chosen
    # The page has no script, and its charts are served inline by the console itself.
    assert not browser.find_elements(By.TAG_NAME, "script")


def test_the_statistics_page_is_for_admins_only(console_gateway: Callable[..., RunningGateway]) -> None:
    gw = console_gateway(CHAIN)
    client = PlainClient(gw)
    status, headers, _ = client.request("/statistics")
    assert status == 303 and headers["Location"] == "/login"
    client.log_in()
    status, _, page = client.request("/statistics?range=7d")
    assert status == 200 and "<svg" in page and "<script" not in page
