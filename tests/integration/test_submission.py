"""Message submission end to end: swaks submits with AUTH to a real gateway over real TLS.

One gateway for the module, with a 587-style listener (STARTTLS required before AUTH, AUTH
before MAIL), a 465-style one (implicit TLS, RFC 8314) and a plain MX listener, running
the submission plugins: ``auth_lockout``, ``auth_users_file``, ``mail_sender_login``,
``rcpt_restrictions`` and ``queue_submission_cleanup``. Tests use their own logins (and,
for the per-address lock-out, their own loopback source address) so that lock-out
counters never leak from one test into another.
"""

from __future__ import annotations

import base64
import logging
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from gateway.passwords import hash_password
from gateway.testing import RunningGateway, running_gateway
from tests.conftest import RawClient

pytestmark = pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed (make test installs it)")

# swaks exit codes (see its manual): the stage the server refused.
SWAKS_OK = 0
SWAKS_MAIL_REFUSED = 23
SWAKS_RCPT_REFUSED = 24
SWAKS_MESSAGE_REFUSED = 26  # after the final dot
SWAKS_AUTH_FAILED = 28

PASSWORDS = {
    "alice": "alice-pw",
    "bob": "bob-pw",
    "intern": "intern-pw",
    "carol": "carol-pw",
    "dave": "dave-pw",
    "erin": "erin-pw",
}

SENDER_MAP = """\
# login: addresses it may send as
alice: alice@example.com, a.smith@example.com
bob: bob@example.com
intern: intern@example.com
carol: carol@example.com
dave: dave@example.com
erin: @example.com
"""

POLICY = """
[server]
hostname = "mx.test.example"

[[listeners]]
name = "mx"
address = "127.0.0.1"
port = 2525
tls = "starttls"
auth = false

[[listeners]]
name = "submission"
address = "127.0.0.1"
port = 2587
tls = "starttls"
require_tls = true
auth = true
require_auth = true

[[listeners]]
name = "submissions"
address = "127.0.0.1"
port = 2465
tls = "implicit"
require_tls = true
auth = true
require_auth = true

[auth]
users_file = "{users}"
max_failures = 3

[local]
domains = ["example.com"]
users = ["postmaster", "alice", "bob", "intern", "carol", "dave", "erin", "all-staff"]

[delivery]
enabled = false

[[plugins]]
name = "auth_lockout"
max_failures_per_ip = 4
max_failures_per_login = 3

[[plugins]]
name = "auth_users_file"

[[plugins]]
name = "mail_sender_login"
map_file = "{sender_map}"

[[plugins]]
name = "rcpt_restrictions"
[[plugins.restrict_senders]]
logins = ["intern"]
domains = ["partner.example.net"]
[[plugins.protect_recipients]]
recipients = ["all-staff@example.com"]
logins = ["alice"]

[[plugins]]
name = "rcpt_relay"

[[plugins]]
name = "rcpt_local_users"

[[plugins]]
name = "queue_submission_cleanup"
remove_received = true
hide_client = true

[[plugins]]
name = "queue_received_header"
"""

# What a mail program might hand over: no Date, no Message-ID, a Bcc, and a Received
# header its own side added (naming an internal address).
BARE_MESSAGE = (
    "Received: from laptop.internal (10.9.8.7) by relay.internal; Tue, 1 Dec 2026 10:00:00 +0000\r\n"
    "From: Alice <alice@example.com>\r\n"
    "To: Bob <bob@example.net>\r\n"
    "Bcc: secret-watcher@example.org\r\n"
    "Subject: submitted\r\n"
    "\r\n"
    "Hello from a mail program.\r\n"
)


@pytest.fixture(scope="module")
def submission(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    workdir = tmp_path_factory.mktemp("submission")
    users = workdir / "users"
    users.write_text("".join(f"{login}:{hash_password(pw, ln=4)}\n" for login, pw in PASSWORDS.items()))
    sender_map = workdir / "sender_logins"
    sender_map.write_text(SENDER_MAP)
    with running_gateway(POLICY.format(users=users, sender_map=sender_map), workdir) as gw:
        yield gw


def swaks(port: int, *args: str, data: Path | None = None) -> subprocess.CompletedProcess[str]:
    command = ["swaks", "--server", f"127.0.0.1:{port}", "--helo", "client.test.example", "--timeout", "20", *args]
    if data is not None:
        command += ["--data", str(data)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def submit(gw: RunningGateway, login: str, *args: str, password: str | None = None, mechanism: str = "PLAIN",
           implicit: bool = False, data: Path | None = None) -> subprocess.CompletedProcess[str]:
    """swaks with AUTH over STARTTLS on the 587-style listener (or implicit TLS on 465)."""
    tls = ["--tls-on-connect"] if implicit else ["--tls"]
    port = gw.listener_port("submissions" if implicit else "submission")
    auth = ["--auth", mechanism, "--auth-user", login, "--auth-password", password or PASSWORDS[login]]
    return swaks(port, *tls, *auth, *args, data=data)


def queued(gw: RunningGateway, result: subprocess.CompletedProcess[str]) -> bytes:
    """The queued message swaks was told about."""
    match = re.search(r"250 2\.0\.0 OK queued as (\S+)", result.stdout)
    assert match, result.stdout
    return gw.queue.read_message(match.group(1))


def headers(message: bytes) -> list[str]:
    head = message.split(b"\r\n\r\n", 1)[0].decode()
    return re.sub(r"\r\n[ \t]+", " ", head).split("\r\n")


def test_auth_plain_over_starttls_submits_and_cleans_up(submission, tmp_path) -> None:
    data = tmp_path / "bare.eml"
    data.write_text(BARE_MESSAGE, newline="")
    result = submit(submission, "alice", "--from", "alice@example.com", "--to", "bob@example.net", data=data)
    assert result.returncode == SWAKS_OK, result.stdout
    assert "235 2.7.0 Authentication successful" in result.stdout
    message = queued(submission, result)
    fields = headers(message)
    names = [f.split(":", 1)[0].lower() for f in fields]
    # Our Received header on top, without the client's HELO or address (hide_client) ...
    assert fields[0].startswith("Received: by mx.test.example with ESMTPSA id ")
    assert "127.0.0.1" not in message.decode() and "client.test.example" not in message.decode()
    # ... the client's own Received header and the Bcc gone, Date and Message-ID added.
    assert names.count("received") == 1 and "10.9.8.7" not in message.decode()
    assert "bcc" not in names and b"secret-watcher" not in message
    (date,) = [f for f in fields if f.lower().startswith("date:")]
    assert re.match(r"Date: \w{3}, \d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}$", date)
    (message_id,) = [f for f in fields if f.lower().startswith("message-id:")]
    assert re.match(r"Message-ID: <[^@<>]+@mx\.test\.example>$", message_id)
    assert b"\r\nSubject: submitted\r\n\r\nHello from a mail program.\r\n" in message


def test_auth_login_over_implicit_tls_keeps_what_the_client_set(submission) -> None:
    result = submit(
        submission, "bob", "--from", "bob@example.com", "--to", "alice@example.com",
        "--header", "Message-Id: <kept-1@client.example>", mechanism="LOGIN", implicit=True,
    )
    assert result.returncode == SWAKS_OK, result.stdout
    assert "334 VXNlcm5hbWU6" in result.stdout  # the LOGIN exchange: "Username:"
    message = queued(submission, result)
    fields = headers(message)
    assert [f for f in fields if f.lower().startswith("message-id:")] == ["Message-Id: <kept-1@client.example>"]
    assert len([f for f in fields if f.lower().startswith("date:")]) == 1  # swaks sent one


def test_wrong_password_is_refused(submission) -> None:
    result = submit(submission, "dave", "--local-interface", "127.0.0.3", "--from", "dave@example.com",
                    "--to", "bob@example.com", password="nope")
    assert result.returncode == SWAKS_AUTH_FAILED, result.stdout
    assert "535 5.7.8 Authentication credentials invalid" in result.stdout


def test_auth_before_starttls_is_refused(submission) -> None:
    client = RawClient(submission.listener_port("submission"))
    try:
        assert client.reply()[0] == 220
        code, lines = client.cmd("EHLO client.test.example")
        assert code == 250 and not any(line.startswith("AUTH") for line in lines)
        token = base64.b64encode(b"\0alice\0alice-pw").decode()
        code, text = client.cmd(f"AUTH PLAIN {token}")
        assert (code, text[0]) == (530, "5.7.0 Must issue a STARTTLS command first")
        code, text = client.cmd("MAIL FROM:<alice@example.com>")
        assert code == 530 and text[0].startswith("5.7.0")
    finally:
        client.close()


def test_mail_before_auth_is_refused(submission) -> None:
    port = submission.listener_port("submission")
    result = swaks(port, "--tls", "--from", "alice@example.com", "--to", "bob@example.com")
    assert result.returncode == SWAKS_MAIL_REFUSED, result.stdout
    assert "530 5.7.0 Authentication required" in result.stdout


def test_user_sending_as_someone_else_gets_553(submission, tmp_path) -> None:
    envelope = submit(submission, "alice", "--from", "bob@example.com", "--to", "dave@example.com")
    assert envelope.returncode == SWAKS_MAIL_REFUSED, envelope.stdout
    assert "553 5.7.1 Sender address not owned by user" in envelope.stdout
    # Her own envelope, but someone else in From: is refused after the data.
    header = submit(
        submission, "alice", "--from", "alice@example.com", "--to", "dave@example.com",
        "--header", "From: Bob <bob@example.com>",
    )
    assert header.returncode == SWAKS_MESSAGE_REFUSED, header.stdout
    assert "553 5.7.1 From: header address not owned by user" in header.stdout
    # An address extension and a second owned address pass; a whole domain covers all.
    ok = submit(submission, "alice", "--from", "alice+lists@example.com", "--to", "dave@example.com",
                "--header", "From: A. Smith <a.smith@example.com>")
    assert ok.returncode == SWAKS_OK, ok.stdout
    domain = submit(submission, "erin", "--from", "anything@example.com", "--to", "dave@example.com",
                    "--header", "From: <anything@example.com>", implicit=True)
    assert domain.returncode == SWAKS_OK, domain.stdout


def test_restricted_user_may_not_send_outside(submission) -> None:
    outside = submit(submission, "intern", "--from", "intern@example.com", "--to", "someone@example.net",
                     "--header", "From: <intern@example.com>")
    assert outside.returncode == SWAKS_RCPT_REFUSED, outside.stdout
    assert "550 5.7.1 Recipient domain not allowed for this sender" in outside.stdout
    inside = submit(submission, "intern", "--from", "intern@example.com", "--to", "bob@example.com",
                    "--header", "From: <intern@example.com>")
    assert inside.returncode == SWAKS_OK, inside.stdout
    partner = submit(submission, "intern", "--from", "intern@example.com", "--to", "x@partner.example.net",
                     "--header", "From: <intern@example.com>")
    assert partner.returncode == SWAKS_OK, partner.stdout
    # Unrestricted users still relay anywhere.
    other = submit(submission, "bob", "--from", "bob@example.com", "--to", "someone@example.net",
                   "--header", "From: <bob@example.com>")
    assert other.returncode == SWAKS_OK, other.stdout


def test_protected_recipient_accepts_only_listed_senders(submission) -> None:
    refused = submit(submission, "bob", "--from", "bob@example.com", "--to", "all-staff@example.com",
                     "--header", "From: <bob@example.com>")
    assert refused.returncode == SWAKS_RCPT_REFUSED, refused.stdout
    assert "550 5.7.1 Recipient accepts mail only from authorized senders" in refused.stdout
    accepted = submit(submission, "alice", "--from", "alice@example.com", "--to", "all-staff@example.com",
                      "--header", "From: <alice@example.com>")
    assert accepted.returncode == SWAKS_OK, accepted.stdout


def test_mail_from_outside_is_not_cleaned_up(submission, tmp_path) -> None:
    data = tmp_path / "bare.eml"
    sent = BARE_MESSAGE.replace("bob@example.net", "bob@example.com").encode()
    data.write_bytes(sent)
    result = swaks(submission.listener_port("mx"), "--from", "someone@example.net", "--to", "bob@example.com", data=data)
    assert result.returncode == SWAKS_OK, result.stdout
    message = queued(submission, result)
    # Exactly what was sent, below our own Received header (which names the client).
    first, rest = message.split(b"\r\n", 1)
    while rest[:1] in (b" ", b"\t"):
        rest = rest.split(b"\r\n", 1)[1]
    assert first.startswith(b"Received: from client.test.example ([127.0.0.1])")
    # (swaks ends the data with one more empty line before the dot.)
    assert rest in (sent, sent + b"\r\n")


def test_lockout_per_login_after_failures_even_with_the_right_password(submission) -> None:
    source = ("--local-interface", "127.0.0.5")  # 3 failures: below the per-address limit
    for _ in range(3):
        bad = submit(submission, "carol", *source, "--from", "carol@example.com", "--to", "bob@example.com",
                     password="guess")
        assert bad.returncode == SWAKS_AUTH_FAILED and "535 5.7.8" in bad.stdout, bad.stdout
    locked = submit(submission, "carol", *source, "--from", "carol@example.com", "--to", "bob@example.com")
    assert locked.returncode == SWAKS_AUTH_FAILED, locked.stdout
    # Answered 421 and dropped: no QUIT exchange follows (swaks' QUIT meets a closed connection).
    assert "421 4.7.0 Too many authentication failures" in locked.stdout, locked.stdout
    assert "221 " not in locked.stdout.split("421 4.7.0", 1)[1], locked.stdout
    # Locked by login: another client address does not help.
    elsewhere = submit(submission, "carol", "--local-interface", "127.0.0.7", "--from", "carol@example.com",
                       "--to", "bob@example.com", implicit=True)
    assert "421 4.7.0" in elsewhere.stdout, elsewhere.stdout
    # Other users are not affected.
    other = submit(submission, "bob", "--from", "bob@example.com", "--to", "alice@example.com")
    assert other.returncode == SWAKS_OK, other.stdout


def test_lockout_per_client_address(submission) -> None:
    source = ("--local-interface", "127.0.0.9")
    for n in range(4):
        bad = submit(submission, f"nobody{n}", *source, "--from", "x@example.com", "--to", "bob@example.com",
                     password="guess")
        assert "535 5.7.8" in bad.stdout, bad.stdout
    locked = submit(submission, "alice", *source, "--from", "alice@example.com", "--to", "bob@example.com")
    assert "421 4.7.0" in locked.stdout, locked.stdout
    fine = submit(submission, "alice", "--from", "alice@example.com", "--to", "bob@example.com")
    assert fine.returncode == SWAKS_OK, fine.stdout


def test_auth_failure_is_logged_with_login_and_address_never_the_password(submission, caplog) -> None:
    password = "Tr0ub4dor-never-logged"
    with caplog.at_level(logging.DEBUG):
        result = submit(submission, "alice", "--local-interface", "127.0.0.11", "--from", "alice@example.com",
                        "--to", "bob@example.com", password=password)
    assert "535 5.7.8" in result.stdout, result.stdout
    text = "\n".join(record.getMessage() for record in caplog.records)
    failures = [line for line in text.splitlines() if "auth failed" in line or "auth failure" in line]
    assert failures and all("login=alice" in line and "client=127.0.0.11" in line for line in failures)
    blob = base64.b64encode(f"\0alice\0{password}".encode()).decode()
    for secret in (password, blob, base64.b64encode(password.encode()).decode()):
        assert secret not in text
