"""SMTP AUTH checked by a real Dovecot (auth_dovecot) over its auth-client socket."""

from __future__ import annotations

import base64
import logging
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from gateway.passwords import hash_password
from gateway.testing import running_gateway
from tests.conftest import MESSAGE, RawClient, no_verify_context, smtp
from tests.integration.dovecot._policy import dovecot_policy
from tests.integration.dovecot.conftest import BROKEN_USER, USERS

AUTH_OK = 235
AUTH_INVALID = (535, "5.7.8")
AUTH_TEMPFAIL = (454, "4.7.0")


def plain(login: str, password: str) -> str:
    return base64.b64encode(f"\0{login}\0{password}".encode()).decode()


def tls_client(port: int) -> RawClient:
    """A client past STARTTLS and the second EHLO, ready for AUTH."""
    c = RawClient(port)
    assert c.reply()[0] == 220
    c.cmd("EHLO client.test.example")
    assert c.cmd("STARTTLS")[0] == 220
    c.starttls()
    code, lines = c.cmd("EHLO client.test.example")
    assert code == 250 and any(line.startswith("AUTH") and "PLAIN" in line for line in lines)
    return c


def auth_plain(c: RawClient, login: str, password: str) -> tuple[int, str]:
    code, text = c.cmd(f"AUTH PLAIN {plain(login, password)}")
    return code, text[0].split(" ", 1)[0]


def test_right_password_authenticates_and_may_relay(gateway_factory, dovecot) -> None:
    gw = gateway_factory(dovecot_policy(dovecot.auth_socket, dovecot.userdb_socket))
    with smtp(gw.port) as client:
        client.starttls(context=no_verify_context())
        client.ehlo()
        assert client.login("alice@local.example", USERS["alice@local.example"])[0] == AUTH_OK
        # Authenticated, so relaying to another domain is allowed.
        assert client.sendmail("alice@local.example", ["someone@example.net"], MESSAGE) == {}
    stored = gw.queue.read_message(gw.queue_ids()[0])
    assert b"with ESMTPSA id" in stored


def test_the_session_carries_dovecots_name_for_the_user(gateway_factory, dovecot, caplog) -> None:
    """Dovecot lower-cases logins (its default auth_username_format %Lu) and answers
    with its own name for the user: that name, not the login as typed, is what the
    Received header (and sender checks) then see."""
    policy = dovecot_policy(dovecot.auth_socket, dovecot.userdb_socket).replace(
        'name = "queue_received_header"', 'name = "queue_received_header"\nshow_auth_login = true'
    )
    gw = gateway_factory(policy)
    caplog.set_level(logging.INFO, logger="gateway.smtp.handler")
    with smtp(gw.port) as client:
        client.starttls(context=no_verify_context())
        client.ehlo()
        assert client.login("ALICE@Local.Example", USERS["alice@local.example"])[0] == AUTH_OK
        assert client.sendmail("alice@local.example", ["someone@example.net"], MESSAGE) == {}
    stored = gw.queue.read_message(gw.queue_ids()[0])
    # (The header writes the login with "_" for "@", so it reads as no address.)
    assert b"(authenticated as alice_local.example)" in stored, stored.split(b"\r\n\r\n")[0]
    assert "login=ALICE@Local.Example as=alice@local.example by=auth_dovecot" in caplog.text


def test_sha512_crypt_password_with_spaces(gateway_factory, dovecot) -> None:
    gw = gateway_factory(dovecot_policy(dovecot.auth_socket, dovecot.userdb_socket))
    c = tls_client(gw.port)
    assert auth_plain(c, "bob@local.example", USERS["bob@local.example"])[0] == AUTH_OK
    c.close()


def test_auth_login_mechanism_over_tcp(gateway_factory, dovecot) -> None:
    gw = gateway_factory(dovecot_policy(dovecot.auth_tcp, dovecot.userdb_tcp))
    c = tls_client(gw.port)
    code, text = c.cmd("AUTH LOGIN")
    assert code == 334 and base64.b64decode(text[0]) == b"Username:"
    assert c.cmd(base64.b64encode(b"alice@local.example"))[0] == 334
    assert c.cmd(base64.b64encode(USERS["alice@local.example"].encode()))[0] == AUTH_OK
    c.close()


def test_wrong_password_and_unknown_user_are_refused(gateway_factory, dovecot, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    gw = gateway_factory(dovecot_policy(dovecot.auth_socket, dovecot.userdb_socket))
    c = tls_client(gw.port)
    assert auth_plain(c, "alice@local.example", "not-her-password") == AUTH_INVALID
    assert auth_plain(c, "nobody@local.example", "whatever-she-typed") == AUTH_INVALID
    # The session goes on, and the right password still works in it.
    assert auth_plain(c, "alice@local.example", USERS["alice@local.example"])[0] == AUTH_OK
    assert c.cmd("MAIL FROM:<alice@local.example>")[0] == 250
    c.close()
    assert "auth failed" in caplog.text and "auth ok" in caplog.text
    for secret in ("not-her-password", "whatever-she-typed", USERS["alice@local.example"]):
        assert secret not in caplog.text
        assert secret not in dovecot.log


def test_dovecot_sees_service_client_address_tls_and_session(gateway_factory, dovecot) -> None:
    gw = gateway_factory(dovecot_policy(dovecot.auth_socket, dovecot.userdb_socket))
    c = tls_client(gw.port)
    # A wrong password makes Dovecot go on to the checkpassword passdb, which notes the request.
    assert auth_plain(c, "carol", "carols-guess") == AUTH_INVALID
    c.close()
    seen = [line for line in dovecot.requests() if line.startswith("user=carol ")]
    assert seen, dovecot.requests()
    assert "service=smtp" in seen[-1]
    assert "rip=127.0.0.1" in seen[-1]
    assert "secured=secured" in seen[-1]
    assert "session=S" in seen[-1]
    assert "carols-guess" not in dovecot.log


def test_dovecot_database_failure_is_temporary(gateway_factory, dovecot) -> None:
    gw = gateway_factory(dovecot_policy(dovecot.auth_socket, dovecot.userdb_socket))
    c = tls_client(gw.port)
    # Dovecot's own backend fails for this user (FAIL ... temp): 454, not 535.
    assert auth_plain(c, BROKEN_USER, "anything") == AUTH_TEMPFAIL
    assert c.cmd("NOOP")[0] == 250
    c.close()


def test_dovecot_stopped_mid_test_gives_454_and_451(gateway_factory, private_dovecot) -> None:
    gw = gateway_factory(dovecot_policy(private_dovecot.auth_socket, private_dovecot.userdb_socket))
    c = tls_client(gw.port)
    assert auth_plain(c, "alice@local.example", USERS["alice@local.example"])[0] == AUTH_OK
    assert c.cmd("MAIL FROM:<alice@local.example>")[0] == 250
    assert c.cmd("RCPT TO:<alice@local.example>")[0] == 250
    private_dovecot.stop()
    # Dovecot is gone: a recipient not looked up yet cannot be checked (RFC 3463 X.4.3).
    code, text = c.cmd("RCPT TO:<bob@local.example>")
    assert (code, text[0].split(" ", 1)[0]) == (451, "4.4.3")
    # A user found a moment ago is still known from the cache.
    assert c.cmd("RCPT TO:<alice@local.example>")[0] == 250
    c.close()
    fresh = tls_client(gw.port)
    assert auth_plain(fresh, "alice@local.example", USERS["alice@local.example"]) == AUTH_TEMPFAIL
    # A temporary failure never authenticates: relaying is still refused.
    assert fresh.cmd("MAIL FROM:<alice@local.example>")[0] == 250
    assert fresh.cmd("RCPT TO:<someone@example.net>")[0] == 550
    fresh.close()


def test_hung_dovecot_gives_454_after_answer_timeout(gateway_factory, private_dovecot) -> None:
    policy = dovecot_policy(
        private_dovecot.auth_socket, private_dovecot.userdb_socket,
        auth_extra='answer_timeout = "1s"', rcpt_extra='answer_timeout = "1s"',
    )
    gw = gateway_factory(policy)
    # Freeze Dovecot's auth process: connections are still accepted, nothing answers.
    pid = private_dovecot.auth_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        c = tls_client(gw.port)
        assert auth_plain(c, "alice@local.example", USERS["alice@local.example"]) == AUTH_TEMPFAIL
        assert c.cmd("MAIL FROM:<sender@example.org>")[0] == 250
        code, text = c.cmd("RCPT TO:<alice@local.example>")
        assert (code, text[0].split(" ", 1)[0]) == (451, "4.4.3")
        c.close()
    finally:
        os.kill(pid, signal.SIGCONT)


def test_continue_asks_the_next_backend_when_dovecot_is_down(gateway_factory, tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text(f"dave:{hash_password('d4ve', ln=4)}\n")
    missing = str(tmp_path / "no-dovecot-here")
    # auth_users_file comes after auth_dovecot: it is the fallback.
    policy = dovecot_policy(
        missing, missing,
        auth_extra='on_dovecot_error = "continue"',
        after_auth='\n[[plugins]]\nname = "auth_users_file"\n',
        auth=f'users_file = "{users}"\nmax_failures = 5',
    )
    gw = gateway_factory(policy)
    c = tls_client(gw.port)
    # Dovecot cannot answer: the users file decides, and a login it does not know is refused.
    assert auth_plain(c, "alice@local.example", USERS["alice@local.example"]) == AUTH_INVALID
    assert auth_plain(c, "dave", "d4ve")[0] == AUTH_OK
    c.close()


@pytest.mark.parametrize(
    ("address", "problem"),
    [("127.0.0.1", "no port"), ("127.0.0.1:99999", "bad port")],
)
def test_unusable_address_stops_start_up(tmp_path: Path, address: str, problem: str) -> None:
    with pytest.raises(Exception, match=f"auth_dovecot.*{problem}"):
        with running_gateway(dovecot_policy(address, "/run/none"), tmp_path):
            pass


def test_timeouts_longer_than_the_entry_stop_start_up(tmp_path: Path, dovecot) -> None:
    policy = dovecot_policy(
        dovecot.auth_socket, dovecot.userdb_socket, auth_extra='answer_timeout = "30s"'
    )
    with pytest.raises(Exception, match="connect_timeout \\+ answer_timeout"):
        with running_gateway(policy, tmp_path):
            pass


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_swaks_auth_on_starttls(gateway_factory, dovecot, mechanism: str) -> None:
    gw = gateway_factory(dovecot_policy(dovecot.auth_socket, dovecot.userdb_socket))
    result = subprocess.run(
        [
            "swaks", "--server", f"127.0.0.1:{gw.port}", "--helo", "client.test.example",
            "--from", "bob@local.example", "--to", "someone@example.net", "--tls",
            "--auth", mechanism, "--auth-user", "bob@local.example",
            "--auth-password", USERS["bob@local.example"],
        ],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout
    assert "235 " in result.stdout
    assert len(gw.queue_ids()) == 1
