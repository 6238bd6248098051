"""plugins/helo_checks.py: the syntax rules, and the hook on model objects."""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.model import Session
from gateway.verdicts import Action
from plugins import helo_checks
from plugins.helo_checks import (
    HELO_FAILED,
    REPLIES,
    Settings,
    is_bare_ip,
    is_valid_domain,
    parse_address_literal,
)


@pytest.mark.parametrize(
    "name",
    [
        "mail.example.com",
        "MX1.Example.ORG",
        "a-b.c-d.example",
        "x.example",
        "1mail.example",
        "xn--mnchen-3ya.example",
        "münchen.example",
        "a" * 63 + ".example",
    ],
)
def test_valid_domains(name: str) -> None:
    assert is_valid_domain(name)


@pytest.mark.parametrize(
    "name",
    [
        "localhost",  # no dot: not fully qualified
        "-mail.example",
        "mail-.example",
        "mail..example",
        ".example",
        "mail.example.",  # RFC 5321 Domain has no trailing dot
        "under_score.example",
        "mail.example.123",  # all-numeric top label
        "a" * 64 + ".example",
        ("a" * 60 + ".") * 5 + "example",  # over 253 characters
        "mail@example.com",
        "[192.0.2.1]",
    ],
)
def test_invalid_domains(name: str) -> None:
    assert not is_valid_domain(name)


def test_dotless_name_passes_without_require_dot() -> None:
    assert is_valid_domain("mailhost", require_dot=False)
    assert not is_valid_domain("-mailhost", require_dot=False)


@pytest.mark.parametrize(
    ("literal", "address"),
    [
        ("[192.0.2.1]", "192.0.2.1"),
        ("[IPv6:2001:db8::1]", "2001:db8::1"),
        ("[ipv6:2001:DB8::1]", "2001:db8::1"),
        ("[IPv6:::ffff:192.0.2.1]", "::ffff:192.0.2.1"),
    ],
)
def test_address_literals(literal: str, address: str) -> None:
    assert parse_address_literal(literal) == ipaddress.ip_address(address)


@pytest.mark.parametrize(
    "literal",
    ["192.0.2.1", "[192.0.2.256]", "[2001:db8::1]", "[IPv6:192.0.2.1]", "[x-tag:abc]", "[]", "[192.0.2.1"],
)
def test_not_address_literals(literal: str) -> None:
    assert parse_address_literal(literal) is None


@pytest.mark.parametrize("name", ["192.0.2.1", "2001:db8::1", "::1"])
def test_bare_ips(name: str) -> None:
    assert is_bare_ip(name)


@pytest.mark.parametrize("name", ["[192.0.2.1]", "mail.example", "1.2.3", "192.0.2.1.example"])
def test_not_bare_ips(name: str) -> None:
    assert not is_bare_ip(name)


# The hook, on model objects ---------------------------------------------------------

GATEWAY: Any = SimpleNamespace(
    hostname="mx.test.example",
    policy=SimpleNamespace(local=SimpleNamespace(domains=("localhost", "local.example"))),
    resolver=None,
)


def session(peer: str = "198.51.100.7", local: str = "203.0.113.25", **kwargs: Any) -> Session:
    return Session(peer_ip=peer, peer_port=40000, listener="smtp", local_ip=local, **kwargs)


def helo(name: str, settings: Settings = Settings(), sess: Session | None = None) -> tuple[Any, Session]:
    sess = sess or session()
    verdict = asyncio.run(helo_checks.gateway_helo(sess, name, GATEWAY, settings))
    return verdict, sess


@pytest.mark.parametrize(
    ("name", "check"),
    [
        ("192.0.2.1", "bare_ip"),
        ("localhost", "invalid_name"),
        ("bad_name.example", "invalid_name"),
        ("mx.test.example", "claims_us"),
        ("MX.Test.Example", "claims_us"),
        ("local.example", "claims_us"),
        ("[203.0.113.25]", "claims_us"),
        ("[192.0.2.1]", "literal_mismatch"),
        ("[IPv6:2001:db8::1]", "literal_mismatch"),
    ],
)
def test_each_check_refuses_with_its_reply(name: str, check: str) -> None:
    verdict, sess = helo(name)
    assert verdict is not None and verdict.action is Action.REJECT
    assert verdict.reply == REPLIES[check]
    assert sess.stash[HELO_FAILED][0] == check


@pytest.mark.parametrize("name", ["client.example.org", "[198.51.100.7]"])
def test_good_names_pass(name: str) -> None:
    verdict, sess = helo(name)
    assert verdict is None
    assert sess.stash[HELO_FAILED] == ()


def test_ipv4_mapped_client_matches_its_ipv4_literal() -> None:
    verdict, _ = helo("[198.51.100.7]", sess=session(peer="::ffff:198.51.100.7"))
    assert verdict is None


def test_relay_client_and_authenticated_session_are_not_checked() -> None:
    assert helo("localhost", sess=session(is_relay_client=True))[0] is None
    assert helo("mx.test.example", sess=session(auth_login="alice"))[0] is None


def test_off_turns_one_check_off() -> None:
    assert helo("192.0.2.1", Settings(bare_ip="off"))[0] is None  # not judged as a name either
    assert helo("[192.0.2.1]", Settings(literal_mismatch="off"))[0] is None
    assert helo("mx.test.example", Settings(claims_us="off"))[0] is None
    assert helo("localhost", Settings(invalid_name="off"))[0] is None


def test_score_adds_once_per_check_and_session() -> None:
    settings = replace(Settings(), invalid_name="score", score=3.0)
    verdict, sess = helo("localhost", settings)
    assert verdict is None
    helo("localhost", settings, sess)  # the EHLO again, e.g. after STARTTLS
    assert [(r.plugin, r.score) for r in sess.results] == [("helo_checks", 3.0)]


def test_a_reject_wins_over_a_score() -> None:
    settings = Settings(claims_us="score")
    # A client on our own address (a local connection): claims us, scored only.
    verdict, sess = helo("[203.0.113.25]", settings, session(peer="203.0.113.25"))
    assert verdict is None and sess.stash[HELO_FAILED] == ("claims_us",)
    assert len(sess.results) == 1
    # From elsewhere the literal is also not the client's: that check rejects, nothing scored.
    verdict, sess = helo("[203.0.113.25]", settings)
    assert verdict is not None and verdict.reply == REPLIES["literal_mismatch"]
    assert sess.stash[HELO_FAILED] == ("claims_us", "literal_mismatch")
    assert len(sess.results) == 0
