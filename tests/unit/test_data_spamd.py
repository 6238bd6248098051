"""Tests for plugins.data_spamd and the shared spam headers and thresholds."""

from __future__ import annotations

import pytest

from gateway.model import Message
from gateway.verdicts import Action
from plugins import data_spamd
from plugins._scanner import ScannerError, SpamResult, spam_headers, threshold_verdict
from plugins.data_spamd import parse_spamd_response
from tests.unit import test_hookspecs as rules

OK_HEAD = b"SPAMD/1.1 0 EX_OK\r\nContent-length: 26\r\nSpam: True ; 1004.2 / 5.0\r\n\r\n"


def test_parse_symbols_answer() -> None:
    result = parse_spamd_response(OK_HEAD, b"GTUBE,NO_RECEIVED,NO_RELAYS")
    assert result == SpamResult(1004.2, 5.0, ("GTUBE", "NO_RECEIVED", "NO_RELAYS"), True)


def test_parse_ham_answer_with_negative_score() -> None:
    head = b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; -1.9 / 5.0\r\n\r\n"
    result = parse_spamd_response(head, b"")
    assert (result.score, result.required, result.tests, result.is_spam) == (-1.9, 5.0, (), False)


@pytest.mark.parametrize(
    "head",
    [
        b"SPAMD/1.0 76 Bad header line: BOGUS SPAMC/1.5\r\n",
        b"SPAMD/1.1 0 EX_OK\r\nContent-length: 0\r\n\r\n",
        b"SPAMD/1.1 0 EX_OK\r\nSpam: maybe ; x / y\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\n",
    ],
)
def test_errors_and_nonsense_are_scanner_failures(head: bytes) -> None:
    with pytest.raises(ScannerError):
        parse_spamd_response(head, b"")


def test_spam_headers_replace_the_clients_and_fold_long_test_lists() -> None:
    message = Message(b"X-Spam-Status: No\r\nX-Spam-Flag: NO\r\nSubject: hi\r\n\r\nbody\r\n")
    tests = tuple(f"RULE_NUMBER_{i}" for i in range(30)) + ("bad name\r\nX-Injected: 1",)
    spam_headers(message, SpamResult(7.26, 5.0, tests, True))
    data = message.as_bytes()
    assert b"X-Spam-Status: No" not in data and b"X-Spam-Flag: NO" not in data
    assert b"X-Injected" not in data
    final = Message(data)
    assert final.header_values("X-Spam-Flag") == ["YES"]
    assert final.header_values("X-Spam-Score") == ["7.3"]
    (status,) = final.header_values("X-Spam-Status")
    assert status.startswith("Yes, score=7.3 required=5.0 tests=RULE_NUMBER_0,") and "RULE_NUMBER_29" in status
    assert all(len(line) <= 78 for line in data.split(b"\r\n"))


@pytest.mark.parametrize(
    "score, action",
    [(4.9, None), (5.0, Action.QUARANTINE), (9.9, Action.QUARANTINE), (10.0, Action.REJECT)],
)
def test_thresholds(score: float, action: Action | None) -> None:
    verdict = threshold_verdict(score, 5.0, 10.0, "spamd")
    assert (verdict.action if verdict else None) is action
    if verdict is not None and action is Action.REJECT:
        assert (verdict.reply.code, verdict.reply.status) == (550, "5.7.1")


def test_thresholds_off_by_default() -> None:
    assert threshold_verdict(10_000.0, None, None, "spamd") is None


def test_follows_the_stock_plugin_rules() -> None:
    rules.test_stock_plugin_has_a_module_docstring(data_spamd.NAME)
    rules.test_stock_plugin_settings_are_a_documented_frozen_dataclass(data_spamd.NAME)
    rules.test_stock_plugin_implements_only_hookspecs(data_spamd.NAME)
