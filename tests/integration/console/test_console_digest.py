"""Quarantine digests: the console's timer mails each user a digest through the gateway's
own queue into their real Maildir; its release link, followed in a browser, releases and
delivers the message once; the same link again, a changed one and an expired one do
nothing. ``gateway console digest --preview/--send`` does the same from the command line."""

from __future__ import annotations

import email
import email.policy
import re
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable

from selenium.webdriver.common.by import By

from gateway.console.digest import make_token
from gateway.testing import RunningGateway, running_gateway
from tests.conftest import wait_for
from tests.integration.console.conftest import PlainClient, click, console_url
from tests.integration.console.test_console_users import CHAIN, send, user_gateway, user_policy  # noqa: F401
from tests.integration.test_cli import gateway as gateway_cli

DIGEST = CHAIN.replace("users = true", 'users = true\ndigest = true\ndigest_interval = "1s"\ndigest_from = "quarantine@localhost"')


def mails(gw: RunningGateway, user: str) -> list[email.message.EmailMessage]:
    box = Path(gw.policy.local.mail_root) / user / "Maildir" / "new"
    found = [email.message_from_bytes(p.read_bytes(), policy=email.policy.default) for p in box.iterdir()] if box.is_dir() else []
    return sorted(found, key=lambda m: str(m["Subject"]))  # type: ignore[misc]


def digests(gw: RunningGateway, user: str) -> list[email.message.EmailMessage]:
    return [m for m in mails(gw, user) if str(m["Subject"]).startswith("Quarantine digest")]


def release_links(digest: email.message.EmailMessage) -> dict[str, str]:
    """Subject -> the path and query of its release link, from a digest's text."""
    text = digest.get_content().replace("\r\n", "\n")
    out = {}
    for block in text.split("\n\n"):
        subject = re.search(r"^Subject: (.*)$", block, re.M)
        link = re.search(r"^Release: (\S+)$", block, re.M)
        if subject and link:
            url = urllib.parse.urlsplit(link.group(1))
            out[subject.group(1).strip()] = f"{url.path}?{url.query}"
    return out


def outcome(browser: Any) -> str:
    return str(browser.find_element(By.ID, "digest").get_attribute("data-outcome"))


def test_the_digest_reaches_the_user_and_its_link_releases_the_message_once(
    user_gateway: Callable[..., RunningGateway], browser: Any,  # noqa: F811
) -> None:
    gw = user_gateway(chain=DIGEST)
    first = send(gw, ["alice@localhost"], "Invoice 4711")
    second = send(gw, ["alice@localhost", "bob@localhost"], "Lunch on Friday")
    bobs = send(gw, ["bob@localhost"], "For Bob only")
    # The timer's digest, delivered through the queue into each user's Maildir.
    assert wait_for(lambda: digests(gw, "alice") and digests(gw, "bob"), timeout=20)
    (digest,) = digests(gw, "alice")
    assert digest["From"] == "quarantine@localhost" and digest["To"] == "alice@localhost"
    assert digest["Subject"] == "Quarantine digest: 2 messages held for you"
    links = release_links(digest)
    assert set(links) == {"Invoice 4711", "Lunch on Friday"}
    assert "For Bob only" not in digest.get_content()
    assert set(release_links(digests(gw, "bob")[0])) == {"Lunch on Friday", "For Bob only"}
    key_file = Path(gw.policy.server.var_dir) / "console" / "digest.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    # Followed in a browser, without logging in: what it releases, then the release.
    browser.delete_all_cookies()
    browser.get(console_url(gw, links["Invoice 4711"]))
    assert outcome(browser) == "confirm" and "mallory@example.org" in browser.page_source
    assert first in gw.queue_ids("quarantine")  # the GET alone releases nothing
    click(browser, browser.find_element(By.ID, "release"))
    assert outcome(browser) == "released"
    assert wait_for(lambda: any(m["Subject"] == "Invoice 4711" for m in mails(gw, "alice")), timeout=15)
    assert first not in gw.queue_ids("quarantine")
    # The same link again: already released, nothing delivered twice.
    browser.get(console_url(gw, links["Invoice 4711"]))
    assert outcome(browser) == "already released"
    client = PlainClient(gw)
    token = urllib.parse.parse_qs(urllib.parse.urlsplit(links["Invoice 4711"]).query)["t"][0]
    status, _, page = client.request("/digest/release", {"t": token})
    assert status == 410 and "Already released" in page
    # A changed link (bob's message under alice's signature) and an expired one: refused.
    qid, expires, rest, mac = token.split(".")
    status, _, page = client.request("/digest/release", {"t": ".".join((bobs, expires, rest, mac))})
    assert status == 403 and "not valid" in page
    expired = make_token(key_file.read_bytes(), second, "alice@localhost", time.time() - 1)
    browser.get(console_url(gw, f"/digest/release?t={expired}"))
    assert outcome(browser) == "refused" and "expired" in browser.find_element(By.ID, "error").text
    status, _, _ = client.request("/digest/release", {"t": expired})
    assert status == 403
    assert bobs in gw.queue_ids("quarantine") and second in gw.queue_ids("quarantine")
    # Alice's link to the shared message releases it (to both), once.
    status, _, page = client.request("/digest/release", {"t": urllib.parse.parse_qs(
        urllib.parse.urlsplit(links["Lunch on Friday"]).query)["t"][0]})
    assert status == 200 and "Released" in page
    assert wait_for(lambda: any(m["Subject"] == "Lunch on Friday" for m in mails(gw, "bob")), timeout=15)
    # No second digest for messages already listed.
    time.sleep(2.5)
    assert len(digests(gw, "alice")) == 1


def test_gateway_console_digest_previews_and_sends_from_the_command_line(tmp_path: Path) -> None:
    workdir = tmp_path / "gw"
    workdir.mkdir()
    chain = CHAIN.replace("users = true", 'users = true\npublic_url = "https://console.test.example"')
    text = user_policy(workdir, chain=chain).replace(
        'hostname = "mx.test.example"',
        f'hostname = "mx.test.example"\nqueue_dir = "{workdir}/var/queue"\nvar_dir = "{workdir}/var"',
    ).replace("[local]\n", f'[local]\nmail_root = "{workdir}/mail"\n')
    (workdir / "policy.toml").write_text(text)
    context = running_gateway(text, workdir)
    gw = context.__enter__()
    try:
        send(gw, ["alice@localhost"], "Invoice 4711")
        preview = gateway_cli("console", "digest", "--preview", "--policy", str(workdir / "policy.toml"))
        assert preview.returncode == 0, preview.stderr
        assert "=== to <alice@localhost>: 1 message(s)" in preview.stdout and "Subject: Invoice 4711" in preview.stdout
        assert re.search(r"Release: https://console\.test\.example/digest/release\?t=\S+", preview.stdout)
        assert digests(gw, "alice") == []  # a preview sends nothing
        sent = gateway_cli("console", "digest", "--send", "--policy", str(workdir / "policy.toml"))
        assert sent.returncode == 0, sent.stderr
        assert re.match(r"queued \S+ to <alice@localhost>: 1 message\(s\)", sent.stdout)
        assert wait_for(lambda: len(digests(gw, "alice")) == 1, timeout=15)
        # Sent: the mark moved, nothing more is owed.
        again = gateway_cli("console", "digest", "--preview", "--policy", str(workdir / "policy.toml"))
        assert again.stdout.strip() == "no digest owed"
    finally:
        context.__exit__(None, None, None)
