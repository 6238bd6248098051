"""``mail_spf`` pieces without DNS: actions and replies, the header, skipped sessions."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from typing import Any

import pytest

import plugins.mail_spf as mail_spf
from gateway.address import Address
from gateway.authres import results as auth_results
from gateway.model import Message, Session, Transaction
from gateway.policy.model import DnsSettings
from gateway.verdicts import Action
from plugins._spf_dns import make_sync_resolver
from plugins.mail_spf import SPF_RESULT, Settings, SpfResult, apply, check_spf, received_spf


def result(outcome: str, **changes: Any) -> SpfResult:
    base = SpfResult(outcome, "mailfrom", "example.org", "joe@example.org", "192.0.2.1", "mta.example.net", "mx.test")
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize(
    ("outcome", "action", "code", "status"),
    [
        ("fail", Action.REJECT, 550, "5.7.23"),
        ("temperror", Action.TEMPFAIL, 451, "4.7.24"),
    ],
)
def test_default_refusals_use_rfc_7372_codes(outcome: str, action: Action, code: int, status: str) -> None:
    verdict = apply(Transaction(Address("joe", "example.org")), result(outcome), Settings())
    assert verdict is not None
    assert (verdict.action, verdict.reply.code, verdict.reply.status) == (action, code, status)


@pytest.mark.parametrize(
    ("outcome", "score"), [("softfail", 2.0), ("permerror", 1.0), ("pass", None), ("neutral", None), ("none", None)]
)
def test_default_non_refusals_score_or_do_nothing(outcome: str, score: float | None) -> None:
    txn = Transaction(Address("joe", "example.org"))
    assert apply(txn, result(outcome), Settings()) is None
    assert [r.score for r in txn.results] == ([] if score is None else [score])


def test_configured_actions_and_scores() -> None:
    settings = Settings(fail_action="score", fail_score=7.5, permerror_action="reject", neutral_action="tempfail")
    txn = Transaction(Address("joe", "example.org"))
    assert apply(txn, result("fail"), settings) is None
    assert [(r.plugin, r.score) for r in txn.results] == [("mail_spf", 7.5)]
    refused = apply(txn, result("permerror", problem="Void lookup limit of 2 exceeded"), settings)
    assert refused is not None and (refused.reply.code, refused.reply.status) == (550, "5.7.24")
    assert "Void lookup limit" in refused.reply.text
    deferred = apply(txn, result("neutral"), settings)
    assert deferred is not None and (deferred.reply.code, deferred.reply.status) == (451, "4.7.1")


def test_result_is_stashed_and_recorded_for_authentication_results() -> None:
    txn = Transaction(Address("joe", "example.org"))
    apply(txn, result("pass"), Settings())
    assert txn.stash[SPF_RESULT].result == "pass"
    (found,) = auth_results(txn, "spf")
    assert (found.result, found.prop("smtp.mailfrom")) == ("pass", "joe@example.org")
    helo_txn = Transaction(Address.null())
    apply(helo_txn, result("fail", identity="helo", sender=""), Settings(fail_action="ignore"))
    (found,) = auth_results(helo_txn, "spf")
    assert (found.result, found.prop("smtp.helo"), found.prop("smtp.mailfrom")) == ("fail", "mta.example.net", None)


def test_explanation_is_quoted_in_the_reply_unless_turned_off() -> None:
    explained = result("fail", explanation="See http://example.org/why?s=joe")
    verdict = apply(Transaction(Address("joe", "example.org")), explained, Settings())
    assert verdict is not None and verdict.reply.text.endswith(": See http://example.org/why?s=joe")
    quiet = apply(Transaction(Address("joe", "example.org")), explained, Settings(show_explanation=False))
    assert quiet is not None and "example.org/why" not in quiet.reply.text


def test_hostile_explanation_stays_one_short_reply_line() -> None:
    # exp= text is the sending domain's: macro-expanded, possibly with control characters.
    hostile = mail_spf._clean("line one\r\n250 OK fake\x00" + "x" * 1000)
    verdict = apply(Transaction(Address("joe", "example.org")), result("fail", explanation=hostile), Settings())
    assert verdict is not None
    assert len(verdict.reply.lines()) == 1
    assert len(verdict.reply.text) < 400


def test_received_spf_header_follows_rfc_7208_section_9_1() -> None:
    value = received_spf(result("pass", mechanism="ip4:192.0.2.0/24"))
    lines = value.split("\n")
    assert lines[0] == "pass (mx.test: domain of joe@example.org designates 192.0.2.1 as permitted sender)"
    assert lines[1:] == [
        "\treceiver=mx.test;",
        "\tclient-ip=192.0.2.1;",
        '\tenvelope-from="joe@example.org";',
        "\thelo=mta.example.net;",
        "\tidentity=mailfrom;",
        '\tmechanism="ip4:192.0.2.0/24";',
    ]


def test_received_spf_header_cannot_be_broken_by_client_or_dns_text() -> None:
    hostile = result(
        "permerror",
        sender='"a) (b\\" c"@example.org',
        client_ip="2001:db8::1",
        problem="bad\r\nX-Injected: yes",
    )
    value = received_spf(hostile)
    message = Message(b"Subject: x\r\n\r\nbody\r\n")
    message.prepend_header("Received-SPF", value)  # refuses bare CR/LF
    first = value.split("\n")[0]
    comment = first[first.index("(") + 1 : first.rindex(")")]
    assert "(" not in comment and ")" not in comment and "\\" not in comment
    assert '\tenvelope-from="\\"a) (b\\\\\\" c\\"@example.org";' in value.split("\n")
    assert '\tclient-ip="2001:db8::1";' in value.split("\n")
    # One header: its first line, continuation lines, then the message's own header.
    head = message.as_bytes().split(b"\r\n\r\n")[0].split(b"\r\n")
    assert head[0].startswith(b"Received-SPF: permerror (")
    assert all(line.startswith(b"\t") for line in head[1:-1])
    assert head[-1] == b"Subject: x"


def test_helo_identity_header_names_the_helo_domain() -> None:
    value = received_spf(result("none", identity="helo", sender="", domain="mta.example.net"))
    assert value.startswith("none (mx.test: domain of mta.example.net does not designate permitted sender hosts)")
    assert '\tenvelope-from="";' in value.split("\n")
    assert "\tidentity=helo;" in value.split("\n")


@pytest.mark.parametrize(
    ("client_ip", "sender", "helo"),
    [
        ("192.0.2.1", "", "[192.0.2.1]"),  # RFC 7208 §2.3: address literal HELO
        ("192.0.2.1", "", "localhost"),  # not a multi-label name (§4.3)
        ("192.0.2.1", "joe@a..example.org", "x"),  # empty label
        ("192.0.2.1", "joe@" + "a" * 64 + ".example.org", "x"),  # label over 63
        ("not-an-ip", "joe@example.org", "x"),
    ],
)
def test_uncheckable_identities_give_none_without_asking_dns(client_ip: str, sender: str, helo: str) -> None:
    # Port 9 (discard) never answers: a lookup would end in temperror, not none.
    resolver = make_sync_resolver(DnsSettings(nameservers=("127.0.0.1:9",), timeout=0.2))
    assert check_spf(resolver, client_ip, sender, helo, max_time=0.2).result == "none"


@pytest.mark.parametrize("who", ["relay", "auth"])
def test_relay_clients_and_authenticated_users_are_not_checked(who: str) -> None:
    session = Session("192.0.2.1", 1025, "smtp", helo="mta.example.net")
    if who == "relay":
        session.is_relay_client = True
    else:
        session.auth_login = "alice"
    txn = Transaction(Address("joe", "example.org"))
    hook = mail_spf.Plugin().gateway_mail(session, txn, txn.sender, None, Settings())  # type: ignore[arg-type]
    assert asyncio.run(hook) is None
    assert SPF_RESULT not in txn.stash


def test_queue_hook_adds_the_header_only_when_there_is_a_result() -> None:
    plugin = mail_spf.Plugin()
    txn = Transaction(Address("joe", "example.org"))
    message = Message(b"Subject: x\r\n\r\nbody\r\n")
    plugin.gateway_queue(txn, message, Settings())
    assert not message.is_modified
    txn.stash[SPF_RESULT] = result("softfail")
    plugin.gateway_queue(txn, message, Settings(add_header=False))
    assert not message.is_modified
    plugin.gateway_queue(txn, message, Settings())
    assert message.as_bytes().startswith(b"Received-SPF: softfail (")


def test_docstring_names_every_hook_and_setting() -> None:
    doc = inspect.getdoc(mail_spf) or ""
    hooks = [name for name in vars(mail_spf.Plugin) if name.startswith("gateway_")]
    names = hooks + [f.name for f in dataclasses.fields(Settings)]
    assert [n for n in names if f"``{n}``" not in doc] == []
    assert all(str(f.metadata.get("doc", "")).strip() for f in dataclasses.fields(Settings))
