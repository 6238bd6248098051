"""End users in the console: they log in with their mail password (the SMTP AUTH chain's
users file), see only quarantined mail addressed to them or their aliases, cannot open,
release or delete anyone else's by URL, and never see an admin page."""

from __future__ import annotations

import re
import smtplib
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from selenium.webdriver.common.by import By

from gateway.passwords import hash_password
from gateway.testing import RunningGateway, running_gateway
from tests.conftest import wait_for
from tests.integration.console.conftest import PlainClient, click, console_policy, console_url, log_in, page_text

ALICE_PASSWORD = "alice's mail password"
BOB_PASSWORD = "bob's mail password"

# A bare IP in EHLO scores 2.0 and [scoring] quarantines at 1.0: each message from such a
# client is quarantined. Users authenticate as SMTP AUTH does: auth_users_file.
CHAIN = """users = true

[auth]
users_file = "{users}"

[scoring]
quarantine = 1.0

[[plugins]]
name = "auth_users_file"
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


def user_policy(workdir: Path, extra: str = "", chain: str = CHAIN, **delivery: str) -> str:
    """The console test policy with end users on, mail passwords for alice and bob, and
    the aliases file ``a.smith: alice`` (hers alone) and ``team: alice, bob`` (a list);
    ``chain`` (``users`` in it is the users file) and ``extra`` follow ``[console]``."""
    users = workdir / "mail-users"
    users.write_text(f"alice:{hash_password(ALICE_PASSWORD)}\nbob:{hash_password(BOB_PASSWORD)}\n")
    aliases = workdir / "aliases"
    aliases.write_text("a.smith: alice\nteam: alice, bob\n")
    text = console_policy(workdir, chain.format(users=users) + extra, **delivery)
    return text.replace('users = ["postmaster", "alice", "bob"]',
                        f'users = ["postmaster", "alice", "bob"]\naliases = "{aliases}"')


@pytest.fixture
def user_gateway(tmp_path: Path) -> Iterator[Callable[..., RunningGateway]]:
    """``start(extra_toml="", chain=CHAIN, **delivery)``: a gateway with the console and end users."""
    started: list[Any] = []

    def start(extra: str = "", chain: str = CHAIN, **delivery: str) -> RunningGateway:
        workdir = tmp_path / f"gw{len(started)}"
        workdir.mkdir()
        context = running_gateway(user_policy(workdir, extra, chain, **delivery), workdir)
        gw = context.__enter__()
        started.append(context)
        assert gw.app is not None and gw.app.console is not None, "the console did not start"
        return gw

    yield start
    for context in reversed(started):
        context.__exit__(None, None, None)


def send(gw: RunningGateway, to: list[str], subject: str, sender: str = "mallory@example.org") -> str:
    """Send one message from a bare-IP HELO (quarantined); its queue id."""
    message = (f"From: {sender}\r\nTo: {', '.join(to)}\r\nSubject: {subject}\r\n\r\nHello.\r\n")
    before = set(gw.queue_ids("quarantine"))
    with smtplib.SMTP("127.0.0.1", gw.port, local_hostname="192.0.2.7", timeout=10) as client:
        client.sendmail(sender, to, message.encode())
    assert wait_for(lambda: len(set(gw.queue_ids("quarantine")) - before) == 1, timeout=10)
    (qid,) = set(gw.queue_ids("quarantine")) - before
    return qid


def listed(browser: Any) -> dict[str, str]:
    """Queue id -> the recipients shown, of the quarantine page's rows."""
    out = {}
    for row in browser.find_elements(By.CSS_SELECTOR, "#quarantine tbody tr[data-qid]"):
        out[row.get_attribute("data-qid")] = row.find_elements(By.TAG_NAME, "td")[2].text
    return out


def user_client(gw: RunningGateway, login: str, password: str) -> tuple[PlainClient, str]:
    """A plain client logged in as an end user, and its session's CSRF token."""
    client = PlainClient(gw)
    _, _, page = client.request("/login")
    token = re.search(r'name="csrf" value="([^"]+)"', page)
    assert token
    status, _, _ = client.request("/login", {"csrf": token.group(1), "login": login, "password": password})
    assert status == 303, status
    _, _, page = client.request("/quarantine")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page)
    assert csrf
    return client, csrf.group(1)


def test_a_user_sees_and_acts_on_only_their_own_quarantined_mail(
    user_gateway: Callable[..., RunningGateway], browser: Any,
) -> None:
    gw = user_gateway(poll_interval="1h")  # a release must wake the scheduler itself
    mine = send(gw, ["alice@localhost"], "For Alice")
    alias = send(gw, ["a.smith@localhost"], "For Alice by her alias")
    extension = send(gw, ["alice-news@localhost"], "For Alice's extension")
    shared = send(gw, ["alice@localhost", "bob@localhost"], "For both")
    bobs = send(gw, ["bob@localhost"], "For Bob only")
    team = send(gw, ["team@localhost"], "For the team list")
    # Alice logs in with her mail password: her messages, her recipients only, no queue.
    log_in(browser, gw, "alice", ALICE_PASSWORD)
    assert browser.current_url == console_url(gw, "/quarantine")
    assert browser.find_element(By.CSS_SELECTOR, "header .who").text == "alice"
    assert listed(browser) == {
        shared: "alice@localhost", extension: "alice-news@localhost",
        alias: "a.smith@localhost", mine: "alice@localhost",
    }
    assert "bob@" not in page_text(browser) and "For Bob only" not in page_text(browser)
    assert browser.find_elements(By.CSS_SELECTOR, "header nav a[href='/queue']") == []
    # Search stays within her messages.
    browser.get(console_url(gw, "/quarantine?field=subject&q=for"))
    assert set(listed(browser)) == {mine, alias, extension, shared}
    # Another's message by URL: as if it did not exist.
    browser.get(console_url(gw, f"/quarantine/{bobs}"))
    assert "no such message" in page_text(browser)
    browser.get(console_url(gw, f"/quarantine/{team}"))
    assert "no such message" in page_text(browser)
    browser.get(console_url(gw, "/queue"))
    assert "not allowed" in page_text(browser)
    client, csrf = user_client(gw, "alice", ALICE_PASSWORD)
    assert client.request(f"/quarantine/{bobs}")[0] == 404
    assert client.request(f"/quarantine/{bobs}/release", {"csrf": csrf})[0] == 404
    assert client.request(f"/quarantine/{bobs}/delete", {"csrf": csrf})[0] == 404
    assert client.request("/queue")[0] == 403
    assert client.request(f"/queue/{bobs}/delete", {"csrf": csrf})[0] == 403
    assert bobs in gw.queue_ids("quarantine") and team in gw.queue_ids("quarantine")
    # Her own message: previewed, released, delivered to her Maildir.
    browser.get(console_url(gw, f"/quarantine/{mine}"))
    assert browser.find_element(By.ID, "text").text == "Hello."
    click(browser, browser.find_element(By.ID, "release"))
    assert browser.find_element(By.ID, "notice").text == f"{mine}: released"
    new = Path(gw.policy.local.mail_root) / "alice" / "Maildir" / "new"
    assert wait_for(lambda: new.is_dir() and any(new.iterdir()), timeout=15)
    assert b"Subject: For Alice" in next(new.iterdir()).read_bytes()
    # Bob sees his two, with only his address, and not the list's.
    log_in(browser, gw, "bob", BOB_PASSWORD)
    assert listed(browser) == {bobs: "bob@localhost", shared: "bob@localhost"}
    # The admin still sees everything.
    log_in(browser, gw)
    assert set(listed(browser)) == {alias, extension, shared, bobs, team}


def test_a_wrong_mail_password_is_refused_and_user_logins_are_rate_limited(
    user_gateway: Callable[..., RunningGateway], browser: Any,
) -> None:
    gw = user_gateway()
    log_in(browser, gw, "alice", BOB_PASSWORD)
    assert browser.find_element(By.ID, "error").text == "Wrong login or password."
    log_in(browser, gw, "nobody", ALICE_PASSWORD)
    assert browser.find_element(By.ID, "error").text == "Wrong login or password."
    for _ in range(3):
        log_in(browser, gw, "alice", "guess")
    # The sixth try is refused, even with the right password.
    log_in(browser, gw, "alice", ALICE_PASSWORD)
    assert "Too many failed logins" in browser.find_element(By.ID, "error").text
    assert browser.get_cookie("__Host-console") is None


def test_without_users_on_only_admins_log_in(
    console_gateway: Callable[..., RunningGateway], browser: Any, tmp_path: Path,
) -> None:
    users = tmp_path / "mail-users"
    users.write_text(f"alice:{hash_password(ALICE_PASSWORD)}\n")
    gw = console_gateway(f'[auth]\nusers_file = "{users}"\n[[plugins]]\nname = "auth_users_file"\n')
    log_in(browser, gw, "alice", ALICE_PASSWORD)
    assert browser.find_element(By.ID, "error").text == "Wrong login or password."


def test_a_mail_login_named_in_admin_users_is_an_admin(user_gateway: Callable[..., RunningGateway]) -> None:
    """[console] admin_users: bob's mail password (checked as SMTP AUTH checks it, here the
    users file; Dovecot alike) opens an admin session: the queue page, everybody's mail.
    Alice, not named, stays an end user; a wrong password is no admin."""
    gw = user_gateway(chain='admin_users = ["bob"]\n' + CHAIN)
    alices = send(gw, ["alice@localhost"], "For Alice")
    bob, _ = user_client(gw, "bob", BOB_PASSWORD)
    status, _, page = bob.request("/queue")
    assert status == 200
    status, _, page = bob.request(f"/quarantine/{alices}")
    assert status == 200 and "For Alice" in page
    alice, _ = user_client(gw, "alice", ALICE_PASSWORD)
    assert alice.request("/queue")[0] == 403
    wrong = PlainClient(gw)
    _, _, page = wrong.request("/login")
    token = re.search(r'name="csrf" value="([^"]+)"', page)
    assert token
    status, _, _ = wrong.request("/login", {"csrf": token.group(1), "login": "bob", "password": "guess"})
    assert status == 401
