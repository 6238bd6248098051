"""The console's door: its listener, logins (rate-limited), sessions and CSRF tokens,
in a real browser (headless Chromium) and with a plain HTTP client."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

from selenium.webdriver.common.by import By

from gateway.testing import RunningGateway
from tests.integration.console.conftest import (
    ADMIN, PASSWORD, PlainClient, click, console_url, log_in, page_text, screenshot,
)


def test_a_page_without_a_session_goes_to_the_login_page(
    console_gateway: Callable[..., RunningGateway], browser: Any,
) -> None:
    gw = console_gateway()
    browser.delete_all_cookies()
    for path in ("/", "/quarantine", "/queue"):
        browser.get(console_url(gw, path))
        assert browser.current_url == console_url(gw, "/login"), path
        assert browser.find_element(By.ID, "login-form")
    screenshot(browser, "console-login")
    client = PlainClient(gw)
    for path in ("/quarantine", "/queue", "/quarantine/ABC123"):
        status, headers, _ = client.request(path)
        assert (status, headers["Location"]) == (303, "/login"), path
    # A POST without a session does nothing and says so.
    assert client.request("/queue/ABC123/delete", {"csrf": "x"})[0] == 403


def test_the_admin_logs_in_with_a_secure_session_cookie_and_out_again(
    console_gateway: Callable[..., RunningGateway], browser: Any,
) -> None:
    gw = console_gateway()
    log_in(browser, gw)
    assert browser.current_url == console_url(gw, "/quarantine")
    assert browser.find_element(By.CSS_SELECTOR, "header .who").text == ADMIN
    cookie = browser.get_cookie("__Host-console")
    assert cookie is not None
    assert (cookie["httpOnly"], cookie["secure"], cookie["sameSite"], cookie["path"]) == (True, True, "Strict", "/")
    assert len(cookie["value"]) >= 40
    click(browser, browser.find_element(By.CSS_SELECTOR, "header .logout button"))
    assert browser.current_url == console_url(gw, "/login")
    # The session is over on the server: the old cookie opens nothing.
    browser.add_cookie({"name": "__Host-console", "value": cookie["value"], "path": "/", "secure": True})
    browser.get(console_url(gw, "/queue"))
    assert browser.current_url == console_url(gw, "/login")


def test_a_wrong_password_is_refused_and_the_sixth_try_is_rate_limited(
    console_gateway: Callable[..., RunningGateway], browser: Any,
) -> None:
    gw = console_gateway()
    for _ in range(5):
        log_in(browser, gw, password="wrong")
        assert browser.find_element(By.ID, "error").text == "Wrong login or password."
        assert browser.get_cookie("__Host-console") is None
    # The sixth try is refused before the password is looked at, even the right one.
    log_in(browser, gw)
    assert "Too many failed logins" in browser.find_element(By.ID, "error").text
    assert browser.get_cookie("__Host-console") is None
    browser.get(console_url(gw, "/quarantine"))
    assert browser.current_url == console_url(gw, "/login")
    client = PlainClient(gw)
    _, _, page = client.request("/login")
    token = re.search(r'name="csrf" value="([^"]+)"', page)
    assert token
    status, headers, _ = client.request("/login", {"csrf": token.group(1), "login": ADMIN, "password": PASSWORD})
    assert status == 429 and int(headers["Retry-After"]) > 0


def test_a_post_without_its_csrf_token_is_refused(
    console_gateway: Callable[..., RunningGateway], browser: Any,
) -> None:
    gw = console_gateway()
    # A plain client with a valid session: no token, a wrong one: 403; the right one works.
    client = PlainClient(gw)
    token = client.log_in()
    assert client.request("/logout", {})[0] == 403
    assert client.request("/logout", {"csrf": token[:-1] + ("A" if token[-1] != "A" else "B")})[0] == 403
    assert client.request("/quarantine")[0] == 200  # still logged in
    # The login form itself needs its token.
    fresh = PlainClient(gw)
    fresh.request("/login")
    assert fresh.request("/login", {"login": ADMIN, "password": PASSWORD})[0] == 403
    # In the browser: a form whose token was taken out.
    log_in(browser, gw)
    browser.execute_script("document.querySelector('header .logout input[name=csrf]').remove()")
    click(browser, browser.find_element(By.CSS_SELECTOR, "header .logout button"))
    assert "missing or wrong CSRF token" in page_text(browser)
    browser.get(console_url(gw, "/quarantine"))
    assert browser.current_url == console_url(gw, "/quarantine")  # the logout did not happen
    assert client.request("/logout", {"csrf": token})[0] == 303


def test_every_page_checks_the_sessions_scope(console_gateway: Callable[..., RunningGateway]) -> None:
    """An end user's session gets no admin page, and no message that is not theirs."""
    gw = console_gateway()
    assert gw.app is not None
    console = gw.app.console

    async def user_session() -> tuple[str, str]:
        token, session = console.sessions.create("alice", "user")
        return token, session.csrf

    token, csrf = gw.call(user_session())
    client = PlainClient(gw)
    assert client.request("/queue", cookie=f"__Host-console={token}")[0] == 403
    assert client.request("/quarantine/ABC123", cookie=f"__Host-console={token}")[0] == 404
    assert client.request("/queue/ABC123/delete", {"csrf": csrf}, cookie=f"__Host-console={token}")[0] == 403


def test_every_page_forbids_scripts_and_remote_content(console_gateway: Callable[..., RunningGateway]) -> None:
    gw = console_gateway()
    client = PlainClient(gw)
    client.log_in()
    for path in ("/login", "/quarantine", "/queue", "/static/console.css"):
        _, headers, _ = client.request(path)
        assert "default-src 'none'" in headers["Content-Security-Policy"], path
        assert "script-src" not in headers["Content-Security-Policy"]
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["Cache-Control"] == "no-store"


def test_the_embedded_default_serves_the_console_with_a_first_start_password(tmp_path: Path) -> None:
    """`make run`: the console on loopback, its address logged, the admin password in a
    0600 file under var/console (never in the log), and it logs in."""
    import dataclasses

    from gateway.app import GatewayApp, registry
    from gateway.hooks import discover_plugins
    from gateway.policy import load_policy
    from gateway.testing import RunningGateway as Running

    specs = discover_plugins()
    policy = load_policy(None, registry=registry(specs))
    assert policy.console.enabled and policy.console.address == "127.0.0.1"
    server = dataclasses.replace(policy.server, queue_dir=tmp_path / "var/queue", var_dir=tmp_path / "var")
    local = dataclasses.replace(policy.local, mail_root=tmp_path / "var/mail")
    listeners = tuple(dataclasses.replace(l, port=0) for l in policy.listeners)
    console = dataclasses.replace(policy.console, port=0)
    policy = dataclasses.replace(policy, server=server, local=local, listeners=listeners, console=console)
    gw = Running(policy, specs).start()
    try:
        secret = tmp_path / "var" / "console" / "initial-password"
        assert secret.stat().st_mode & 0o777 == 0o600
        password = secret.read_text().strip()
        assert len(password) >= 16
        admins = (tmp_path / "var" / "console" / "admins").read_text()
        assert "admin:$scrypt$" in admins and password not in admins
        client = PlainClient(gw)
        _, _, page = client.request("/login")
        token = re.search(r'name="csrf" value="([^"]+)"', page)
        assert token
        status, _, _ = client.request("/login", {"csrf": token.group(1), "login": "admin", "password": password})
        assert status == 303
        assert client.request("/queue")[0] == 200
    finally:
        gw.stop()
    assert isinstance(gw.app, GatewayApp)
    # A second start keeps the admins file and makes no new password.
    secret.unlink()
    gw = Running(policy, specs).start()
    gw.stop()
    assert not secret.exists()


def test_gateway_run_logs_the_console_address(tmp_path: Path) -> None:
    """The address is printed at start-up (the log on standard error); not the password."""
    from tests.processes import free_port, start_gateway, stop_gateway, write_policy

    port, console_port = free_port(), free_port()
    policy = write_policy(tmp_path, port, extra=f"[console]\nenabled = true\nport = {console_port}\n")
    log = tmp_path / "gateway.log"
    with log.open("w") as stderr:
        proc = start_gateway(policy, port, stderr=stderr)
        assert stop_gateway(proc) == 0
    text = log.read_text()
    assert f"console on https://127.0.0.1:{console_port}/" in text
    password = (tmp_path / "var" / "console" / "initial-password").read_text().strip()
    assert password not in text
    assert str(tmp_path / "var" / "console" / "initial-password") in text
