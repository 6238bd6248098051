"""Recipients checked against a real Dovecot's userdb (rcpt_dovecot_users)."""

from __future__ import annotations

import pytest

from tests.conftest import RawClient
from tests.integration.dovecot._policy import dovecot_policy
from tests.integration.dovecot.conftest import BROKEN_USER

ACCEPTED = (250, "2.1.5")
UNKNOWN = (550, "5.1.1")
LOOKUP_FAILED = (451, "4.4.3")


def rcpt(c: RawClient, address: str) -> tuple[int, str]:
    code, text = c.cmd(f"RCPT TO:<{address}>")
    return code, text[0].split(" ", 1)[0]


def open_transaction(port: int) -> RawClient:
    c = RawClient(port)
    assert c.reply()[0] == 220
    assert c.cmd("EHLO client.test.example")[0] == 250
    assert c.cmd("MAIL FROM:<sender@example.org>")[0] == 250
    return c


@pytest.mark.parametrize("over", ["unix", "tcp"])
def test_known_user_accepted_unknown_refused(gateway_factory, dovecot, over: str) -> None:
    userdb = dovecot.userdb_socket if over == "unix" else dovecot.userdb_tcp
    gw = gateway_factory(dovecot_policy(dovecot.auth_socket, userdb))
    c = open_transaction(gw.port)
    assert rcpt(c, "alice@local.example") == ACCEPTED
    assert rcpt(c, "Alice@LOCAL.example") == ACCEPTED  # Dovecot lower-cases user names
    assert rcpt(c, "nobody@local.example") == UNKNOWN
    assert rcpt(c, "postmaster@local.example") == ACCEPTED
    # A domain that is not local is not this plugin's business: relay control refuses it.
    assert rcpt(c, "someone@example.net")[0] == 550
    assert c.cmd("DATA")[0] == 354
    assert c.cmd(b"Subject: hi\r\n\r\nhello\r\n.")[0] == 250
    c.close()
    assert len(gw.queue_ids()) == 1


def test_extensions_use_the_longest_known_user(gateway_factory, dovecot) -> None:
    gw = gateway_factory(dovecot_policy(dovecot.auth_socket, dovecot.userdb_socket))
    c = open_transaction(gw.port)
    assert rcpt(c, "alice-lists@local.example") == ACCEPTED
    assert rcpt(c, "mary-ann-news@local.example") == ACCEPTED
    assert rcpt(c, "nobody-lists@local.example") == UNKNOWN
    c.close()


def test_extensions_can_be_turned_off(gateway_factory, dovecot) -> None:
    policy = dovecot_policy(dovecot.auth_socket, dovecot.userdb_socket, rcpt_extra="allow_extensions = false")
    gw = gateway_factory(policy)
    c = open_transaction(gw.port)
    assert rcpt(c, "alice-lists@local.example") == UNKNOWN
    assert rcpt(c, "mary-ann@local.example") == ACCEPTED
    c.close()


def test_local_part_lookup_for_system_users(gateway_factory, dovecot) -> None:
    policy = dovecot_policy(
        dovecot.auth_socket, dovecot.userdb_socket, rcpt_extra='lookup = "local_part"\ndomains = ["localhost"]'
    )
    gw = gateway_factory(policy)
    c = open_transaction(gw.port)
    assert rcpt(c, "carol@localhost") == ACCEPTED
    assert rcpt(c, "alice@localhost") == UNKNOWN
    # local.example is not in this entry's domains: nobody vouches for it (default deny).
    assert rcpt(c, "alice@local.example") == (550, "5.7.1")
    c.close()


def test_userdb_failure_is_temporary(gateway_factory, dovecot) -> None:
    gw = gateway_factory(dovecot_policy(dovecot.auth_socket, dovecot.userdb_socket))
    c = open_transaction(gw.port)
    # Dovecot's own userdb fails for this user (FAIL): the sender must retry.
    assert rcpt(c, BROKEN_USER) == LOOKUP_FAILED
    assert rcpt(c, "alice@local.example") == ACCEPTED
    c.close()


def test_fail_open_accepts_when_dovecot_cannot_answer(gateway_factory, dovecot, tmp_path) -> None:
    policy = dovecot_policy(
        dovecot.auth_socket, str(tmp_path / "no-dovecot-here"), rcpt_extra='on_dovecot_error = "accept"'
    )
    gw = gateway_factory(policy)
    c = open_transaction(gw.port)
    assert rcpt(c, "anyone@local.example") == ACCEPTED
    c.close()


def test_nothing_listening_gives_451(gateway_factory, dovecot, tmp_path) -> None:
    gw = gateway_factory(dovecot_policy(dovecot.auth_socket, str(tmp_path / "no-dovecot-here")))
    c = open_transaction(gw.port)
    assert rcpt(c, "alice@local.example") == LOOKUP_FAILED
    assert rcpt(c, "postmaster@local.example") == ACCEPTED  # needs no lookup
    c.close()
