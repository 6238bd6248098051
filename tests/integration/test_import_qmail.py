"""``gateway import-qmail`` as a qmail operator uses it: convert, check, run.

The sample installation in tests/fixtures/qmail has several rcpthosts (one in
morercpthosts), locals, virtualdomains (a user prefix and a vpopmail-style domain prefix),
smtproutes with a ``:host:port`` default route, per-domain routes with ports, an ``[ip]``
route, a ``.suffix`` route and an empty (MX) route, users/assign with ``=`` and ``+``
lines and the ``+:alias`` catch-all, databytes, the concurrencies and a few files with no
equivalent (badmailfrom, plusdomain, defaultdomain).
"""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.app import registry
from gateway.delivery.router import route_for
from gateway.delivery.types import LocalRoute, MxRoute, SmarthostRoute
from gateway.hooks import discover_plugins
from gateway.policy import Policy, load_policy
from gateway.testing import running_gateway
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "qmail"


def gateway(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, timeout=60, env=env
    )


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The sample converted by the real command: (policy file, standard error)."""
    out = tmp_path_factory.mktemp("import") / "policy.toml"
    result = gateway("import-qmail", str(FIXTURE), "-o", str(out))
    assert result.returncode == 0, result.stderr
    return out, result.stderr


@pytest.fixture(scope="module")
def policy(converted: tuple[Path, str]) -> Policy:
    return load_policy(converted[0], registry=registry(discover_plugins()))


def test_gateway_check_accepts_the_converted_policy(converted: tuple[Path, str]) -> None:
    result = gateway("check", str(converted[0]))
    assert result.returncode == 0, result.stderr
    assert "rcpt_relay -> rcpt_local_users -> queue_received_header" in result.stdout


def test_the_header_says_what_it_was_made_from(converted: tuple[Path, str]) -> None:
    text = converted[0].read_text()
    header = text[: text.index("[server]")]
    assert "gateway import-qmail" in header
    assert str(FIXTURE / "control") in header
    assert str(FIXTURE / "users" / "assign") in header
    assert "smtproutes" in header and "virtualdomains" in header


def test_the_control_directory_itself_gives_the_same_policy(converted: tuple[Path, str]) -> None:
    result = gateway("import-qmail", str(FIXTURE / "control"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == converted[0].read_text()


def test_what_has_no_equivalent_is_a_comment_and_a_warning(converted: tuple[Path, str]) -> None:
    text, stderr = converted[0].read_text(), converted[1]
    not_converted = text[text.index("# ---- Not converted") :]
    for original in ("spammer@bad.example", "@junk.example", "+:alias:7790:2108:/var/qmail/alias:-::"):
        assert f"#     {original}\n" in not_converted
    for name in ("badmailfrom", "plusdomain", "defaultdomain"):
        assert re.search(rf"^warning: .*control/{name}: not converted", stderr, re.M), stderr
    assert re.search(r"^warning: .*users/assign:7: not converted: a catch-all", stderr, re.M)
    # Where the policy accepts more than qmail-smtpd did, the operator is told.
    assert "localhost is local but not in rcpthosts" in stderr
    assert "set [relay] clients" in stderr


def test_routing_matches_what_qmail_did(policy: Policy) -> None:
    # locals: the user, and user-ext to the same user (the +joe- line).
    assert route_for("joe@example.com", policy) == LocalRoute("joe", "", "example.com")
    assert route_for("Mary-Lists@mx.example.com", policy) == LocalRoute("mary", "lists", "mx.example.com")
    # virtualdomains: the prefix is the user, the local part the extension.
    assert route_for("bob@example.net", policy) == LocalRoute("joe", "bob", "example.net")
    assert route_for("info@vhost.example", policy) == LocalRoute("vhost.example", "info", "vhost.example")
    # smtproutes: per-domain with port, [ip] for subdomains, empty relay = MX, default route.
    assert route_for("a@backup.example.de", policy) == SmarthostRoute("mail.example.de", 2525, "opportunistic")
    assert route_for("a@shop.partners.example", policy) == SmarthostRoute("[192.0.2.25]", 25, "opportunistic")
    assert route_for("a@internal.example.com", policy) == MxRoute("internal.example.com")
    smarthost = SmarthostRoute("smarthost.isp.example", 587, "opportunistic")
    assert route_for("someone@elsewhere.example", policy) == smarthost
    # qmail's ".partners.example" did not cover partners.example itself: the default route.
    assert route_for("a@partners.example", policy) == smarthost


def test_homes_ids_limits_and_concurrency(policy: Policy) -> None:
    homes = {a.user: (a.home, a.uid, a.gid) for a in policy.local.assign}
    assert homes["joe"] == (Path("/home/joe"), 1001, 1001)
    assert homes["vhost.example"] == (Path("/home/vpopmail/domains/vhost.example"), 89, 89)
    assert policy.server.hostname == "mx.example.com"
    assert policy.limits.max_message_size == 10485760
    assert policy.limits.idle_timeout == 600
    assert policy.delivery.remote_concurrency == 40
    assert policy.delivery.local_concurrency == 5
    assert policy.delivery.queue_lifetime == 4 * 86400
    assert policy.delivery.helo == "mx.example.com"
    assert policy.relay.domains == ("backup.example.de", ".partners.example")


def test_a_smtp_session_on_the_converted_policy(converted: tuple[Path, str], tmp_path: Path) -> None:
    text = converted[0].read_text()
    # Run it here: loopback, directories under tmp_path (running_gateway picks a free port),
    # and no delivery behind the queue (the homes are the sample's, not this machine's).
    text = text.replace('address = "0.0.0.0"', 'address = "127.0.0.1"')
    text = re.sub(r'^(queue_dir|var_dir|mail_root) = "/var/[^"]*"', r'\1 = "\1"', text, flags=re.M)
    text = text.replace("[delivery]\n", "[delivery]\nenabled = false\n")
    with running_gateway(text, tmp_path) as gw:
        with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as client:
            client.ehlo("client.example")
            assert client.esmtp_features["size"] == "10485760"  # databytes
            assert client.mail("sender@elsewhere.example")[0] == 250
            assert client.rcpt("joe@example.com")[0] == 250  # locals + assign
            assert client.rcpt("bob@example.net")[0] == 250  # virtualdomains
            assert client.rcpt("x@backup.example.de")[0] == 250  # rcpthosts: we are its MX
            code, text_reply = client.rcpt("victim@not-ours.example")
            assert (code, text_reply[:5]) == (550, b"5.7.1")  # not in rcpthosts: relay denied
            code, text_reply = client.rcpt("nobody@example.com")
            assert (code, text_reply[:5]) == (550, b"5.1.1")
            code, _ = client.data(b"Subject: hello\r\n\r\nfrom a qmail migration\r\n")
            assert code == 250
        assert len(gw.queue_ids()) == 1


def test_mail_lands_in_the_homes_users_assign_gave(converted: tuple[Path, str], tmp_path: Path) -> None:
    """Local and vpopmail-style virtual delivery with the converted policy, homes moved here."""
    joe, vhost = tmp_path / "home" / "joe", tmp_path / "vpopmail" / "vhost.example"
    for home in (joe, vhost):
        home.mkdir(parents=True, mode=0o755)
    # qmail-local would read .qmail-info in the domain's home for info@vhost.example.
    (vhost / ".qmail-info").write_text("./info/\n")
    (vhost / ".qmail-info").chmod(0o644)
    text = converted[0].read_text()
    text = text.replace('address = "0.0.0.0"', 'address = "127.0.0.1"')
    text = re.sub(r'^(queue_dir|var_dir|mail_root) = "/var/[^"]*"', r'\1 = "\1"', text, flags=re.M)
    text = text.replace('"/home/joe"', f'"{joe}"').replace('"/home/vpopmail/domains/vhost.example"', f'"{vhost}"')
    with running_gateway(text, tmp_path / "gw") as gw:
        with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as client:
            client.sendmail("sender@elsewhere.example", ["joe@example.com", "info@vhost.example"],
                            b"Subject: moved\r\n\r\nhello\r\n")
        assert wait_for(lambda: gw.queue_ids() == [], timeout=15)
    [joe_copy] = list((joe / "Maildir" / "new").iterdir())
    assert b"Delivered-To: joe@example.com" in joe_copy.read_bytes()
    [info_copy] = list((vhost / "info" / "new").iterdir())
    assert b"Delivered-To: info@vhost.example" in info_copy.read_bytes()


# -- malformed input: file and line -----------------------------------------------------


@pytest.fixture
def qmail(tmp_path: Path) -> Path:
    root = tmp_path / "qmail"
    shutil.copytree(FIXTURE, root)
    return root


@pytest.mark.parametrize(
    ("name", "content", "line", "message"),
    [
        ("control/databytes", "10M\n", 1, "expected a number"),
        ("control/smtproutes", ":smarthost.example\nexample.org smarthost.example\n", 2, "expected domain:relay"),
        ("control/smtproutes", "example.org:relay.example:25x\n", 1, "bad port"),
        ("control/virtualdomains", "example.net:joe\nexample.org\n", 2, "expected domain:prefix"),
        ("control/rcpthosts", "example.com\nexa mple.org\n", 2, "not a domain name"),
        ("users/assign", "=joe:joe:1001:1001:/home/joe:::\n+joe-:joe:1001:1001:/home/joe\n.\n", 2, "expected 7 fields"),
        ("users/assign", "=joe:joe:joe:1001:/home/joe:::\n.\n", 1, "uid must be a number"),
        ("users/assign", "=joe:joe:1001:1001:home/joe:::\n.\n", 1, "absolute path"),
        ("users/assign", "joe:joe:1001:1001:/home/joe:::\n.\n", 1, "expected a line starting with"),
    ],
)
def test_malformed_lines_are_named_by_file_and_line(
    qmail: Path, name: str, content: str, line: int, message: str
) -> None:
    from gateway.migrate.qmail import QmailFormatError, convert

    (qmail / name).write_text(content)
    with pytest.raises(QmailFormatError) as caught:
        convert(qmail)
    assert str(caught.value).startswith(f"{qmail / name}:{line}: ")
    assert message in str(caught.value)


def test_the_command_reports_a_malformed_file_and_writes_nothing(qmail: Path, tmp_path: Path) -> None:
    (qmail / "control" / "concurrencyremote").write_text("forty\n")
    out = tmp_path / "policy.toml"
    result = gateway("import-qmail", str(qmail), "-o", str(out))
    assert result.returncode == 2
    assert f"{qmail / 'control' / 'concurrencyremote'}:1: concurrencyremote: expected a number" in result.stderr
    assert not out.exists()


def test_a_directory_without_me_is_refused(tmp_path: Path) -> None:
    result = gateway("import-qmail", str(tmp_path))
    assert result.returncode == 2
    assert "no control/me" in result.stderr


def test_help_says_what_is_read_and_what_is_not() -> None:
    result = gateway("import-qmail", "--help")
    assert result.returncode == 0
    for text in ("/var/qmail/control", "users/assign", "smtproutes", "Not converted", "[relay] clients"):
        assert text in result.stdout
