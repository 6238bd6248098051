"""The console's test kit: a gateway serving it, a real headless Chromium, a plain client.

Chromium and its driver are Debian's ``chromium`` and ``chromium-driver`` (installed by
``scripts/install-system-deps.sh``), driven by selenium through ``/usr/bin/chromedriver``:
nothing is downloaded at test time. Without them the tests fail, they are not skipped.
The browser starts once per test module. With ``CONSOLE_SCREENSHOTS=1`` the tests save
the screenshots the README shows into ``docs/images/``.
"""

from __future__ import annotations

import http.cookiejar
import os
import re
import shutil
import ssl
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from gateway.passwords import hash_password
from gateway.testing import RunningGateway, running_gateway

ROOT = Path(__file__).resolve().parents[3]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ADMIN, PASSWORD = "ops", "correct horse battery staple"

POLICY = """
[server]
hostname = "mx.test.example"

[[listeners]]
name = "smtp"
tls = "none"

[local]
domains = ["localhost"]
users = ["postmaster", "alice", "bob"]

[delivery]
retry_base = "{retry_base}"
retry_max = "{retry_max}"
poll_interval = "{poll_interval}"

[console]
enabled = true
port = 0
admins_file = "{admins}"
{extra}
"""


def console_policy(
    workdir: Path, extra: str = "", retry_base: str = "200ms", retry_max: str = "1s", poll_interval: str = "200ms",
) -> str:
    """The test policy with the console on a free port and the admin ``ops`` (``PASSWORD``)."""
    admins = workdir / "console-admins"
    admins.write_text(f"{ADMIN}:{hash_password(PASSWORD)}\n")
    return POLICY.format(admins=admins, extra=extra, retry_base=retry_base, retry_max=retry_max, poll_interval=poll_interval,
    )


@pytest.fixture
def console_gateway(tmp_path: Path) -> Iterator[Callable[..., RunningGateway]]:
    """Start a gateway with the console on a policy: ``start(extra_toml, specs=None, **delivery)``
    (``retry_base``, ``retry_max``, ``poll_interval``)."""
    started: list[Any] = []

    def start(extra: str = "", specs: Any = None, **delivery: str) -> RunningGateway:
        workdir = tmp_path / f"gw{len(started)}"
        workdir.mkdir()
        context = running_gateway(console_policy(workdir, extra, **delivery), workdir, specs=specs)
        gw = context.__enter__()
        started.append(context)
        assert gw.app is not None and gw.app.console is not None, "the console did not start"
        return gw

    yield start
    for context in reversed(started):
        context.__exit__(None, None, None)


def console_url(gw: RunningGateway, path: str = "/") -> str:
    assert gw.app is not None
    return f"https://127.0.0.1:{gw.app.console.port}{path}"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium through selenium and the system chromedriver, once per module."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for tool, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not tool.exists():
            pytest.fail(f"{tool} is missing: install Debian's {package} (scripts/install-system-deps.sh)")
    profile = tempfile.mkdtemp(prefix="console-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--ignore-certificate-errors", "--window-size=1280,900",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(driver: Any, name: str) -> None:
    """Save ``docs/images/<name>.png`` when CONSOLE_SCREENSHOTS=1 asks for it."""
    if os.environ.get("CONSOLE_SCREENSHOTS") == "1":
        (ROOT / "docs" / "images").mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ROOT / "docs" / "images" / f"{name}.png"))


def wait_until(driver: Any, check: Callable[[Any], Any], timeout: float = 15) -> Any:
    """Wait until ``check(driver)`` is true (a page loaded after a click)."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(check)


def page_text(driver: Any) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.TAG_NAME, "body").text)


def log_in(driver: Any, gw: RunningGateway, login: str = ADMIN, password: str = PASSWORD) -> None:
    """Fill and send the login form."""
    from selenium.webdriver.common.by import By

    driver.delete_all_cookies()
    driver.get(console_url(gw, "/login"))
    driver.find_element(By.ID, "login").send_keys(login)
    driver.find_element(By.ID, "password").send_keys(password)
    click(driver, driver.find_element(By.ID, "submit"))


def click(driver: Any, element: Any) -> None:
    """Click a button that sends a form, and wait for the next page."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions

    from selenium.common.exceptions import WebDriverException

    old = driver.find_element(By.TAG_NAME, "html")
    element.click()
    gone = expected_conditions.staleness_of(old)

    def is_gone(d: Any) -> bool:
        try:
            return bool(gone(d))
        except WebDriverException:  # mid-navigation: "Node ... does not belong to the document"
            return False  # ask again: once the old page is gone it is reported stale

    wait_until(driver, is_gone)
    wait_until(driver, lambda d: d.execute_script("return document.readyState") == "complete")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class PlainClient:
    """A plain HTTPS client (urllib), no browser: cookies kept, redirects not followed."""

    def __init__(self, gw: RunningGateway) -> None:
        self.gw = gw
        self.jar = http.cookiejar.CookieJar()
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=context), urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect,
        )
        self.bare = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), _NoRedirect)

    def request(
        self, path: str, form: dict[str, str] | None = None, *, cookie: str | None = None,
    ) -> tuple[int, dict[str, str], str]:
        """``(status, headers, body)`` of a GET, or of a POST of ``form``; ``cookie``: send
        this Cookie header instead of the jar's."""
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        request = urllib.request.Request(console_url(self.gw, path), data=data)
        if cookie is not None:
            request.add_unredirected_header("Cookie", cookie)
        try:
            with (self.opener if cookie is None else self.bare).open(request, timeout=20) as response:
                return response.status, dict(response.headers), response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read().decode()

    def log_in(self) -> str:
        """Log in as the test admin; the session's CSRF token (from the page's forms)."""
        _, _, page = self.request("/login")
        token = re.search(r'name="csrf" value="([^"]+)"', page)
        assert token
        status, headers, _ = self.request("/login", {"csrf": token.group(1), "login": ADMIN, "password": PASSWORD})
        assert status == 303, status
        _, _, page = self.request("/quarantine")
        token = re.search(r'name="csrf" value="([^"]+)"', page)
        assert token
        return token.group(1)
