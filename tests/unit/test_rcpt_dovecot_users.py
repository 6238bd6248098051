"""rcpt_dovecot_users' choices that need no Dovecot: which names, which domains."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest

from gateway.address import Address
from gateway.model import Recipient
from gateway.verdicts import Action
from plugins.rcpt_dovecot_users import Plugin, Settings, candidates, mail_location


def test_candidates_longest_first() -> None:
    assert candidates("mary-ann-news", "-", True) == ["mary-ann-news", "mary-ann", "mary"]
    assert candidates("alice", "-", True) == ["alice"]
    assert candidates("alice+tag", "+", True) == ["alice+tag", "alice"]
    assert candidates("-x", "-", True) == ["-x"]


def test_candidates_without_extensions() -> None:
    assert candidates("mary-ann-news", "-", False) == ["mary-ann-news"]
    assert candidates("mary-ann-news", "", True) == ["mary-ann-news"]


def test_candidates_are_bounded() -> None:
    assert len(candidates("a-b-c-d-e-f-g-h", "-", True)) == 4


def _judge(address: Address, **settings: object) -> object:
    gateway = SimpleNamespace(
        policy=SimpleNamespace(local=SimpleNamespace(domains=("local.example",), extension_delimiter="-"))
    )
    # Nothing listens here: any lookup would fail with a tempfail.
    config = Settings(address="/nonexistent/auth-userdb", **settings)  # type: ignore[arg-type]
    return asyncio.run(Plugin().gateway_rcpt(Recipient(address), gateway, config))  # type: ignore[arg-type]


def test_other_domains_get_no_opinion_without_a_lookup() -> None:
    assert _judge(Address("alice", "example.net")) is None
    assert _judge(Address("alice", "local.example"), domains=("other.example",)) is None


def test_postmaster_needs_no_lookup() -> None:
    verdict = _judge(Address("PostMaster", "local.example"))
    assert verdict is not None and verdict.action is Action.ACCEPT  # type: ignore[attr-defined]


def test_lookup_failure_follows_on_dovecot_error() -> None:
    verdict = _judge(Address("alice", "local.example"))
    assert verdict.action is Action.TEMPFAIL and verdict.reply.code == 451  # type: ignore[attr-defined]
    assert _judge(Address("alice", "local.example"), on_dovecot_error="continue") is None
    verdict = _judge(Address("alice", "local.example"), on_dovecot_error="accept")
    assert verdict.action is Action.ACCEPT  # type: ignore[attr-defined]


def test_mail_location_defaults_to_the_home() -> None:
    assert mail_location({"home": "/var/vmail/a"}) == (Path("/var/vmail/a"), None)
    assert mail_location({"home": "/var/vmail/a", "mail": "maildir:"}) == (Path("/var/vmail/a"), None)


def test_mail_location_follows_a_maildir_field() -> None:
    home = Path("/var/vmail/a")
    assert mail_location({"home": str(home), "mail": "maildir:~/Mail/inbox:LAYOUT=fs"}) == (home, home / "Mail/inbox")
    assert mail_location({"home": str(home), "mail": "MAILDIR:/srv/mail/a"}) == (home, Path("/srv/mail/a"))
    # No home: an absolute Maildir's parent serves.
    assert mail_location({"mail": "maildir:/srv/mail/a/Maildir"}) == (Path("/srv/mail/a"), Path("/srv/mail/a/Maildir"))


@pytest.mark.parametrize("fields", [
    {},  # no home, no Maildir
    {"home": "relative/home"},
    {"home": "/h", "mail": "mdbox:~/mdbox"},  # a format only Dovecot writes
    {"mail": "maildir:~/Maildir"},  # relative to a home not given
    {"home": "/h", "mail": "maildir:Maildir"},
])
def test_mail_location_refuses_what_cannot_be_delivered(fields: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        mail_location(fields)
