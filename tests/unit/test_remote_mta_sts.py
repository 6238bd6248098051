"""gateway.delivery.remote.mta_sts: the TXT record, the policy text and MX patterns (RFC 8461)."""

from __future__ import annotations

import pytest

from gateway.delivery.remote.mta_sts import PolicyInvalid, mx_matches, parse_policy, parse_record


def test_the_record_gives_its_id() -> None:
    assert parse_record(["v=STSv1; id=20160831085700Z;"]) == "20160831085700Z"
    assert parse_record(["v=spf1 -all", "v=STSv1;id=abc ; ext=1"]) == "abc"
    assert parse_record(["v=STSv1 ; id=x1"]) == "x1"  # RFC 8461 §3.1 allows space before ";"
    with pytest.raises(PolicyInvalid):
        parse_record(["v=STSv10; id=1"])


@pytest.mark.parametrize(
    "texts",
    [
        [],
        ["v=spf1 -all"],
        ["v=STSv1; id=1;", "v=STSv1; id=2;"],  # RFC 8461 §3.1: not exactly one
        ["v=STSv1;"],  # no id
        ["v=STSv1; id=has-a-dash;"],
        ["v=STSv1; id=" + "a" * 33],
        ["v=STSv1; id"],
    ],
)
def test_a_bad_record_is_no_record(texts: list[str]) -> None:
    with pytest.raises(PolicyInvalid):
        parse_record(texts)


def test_the_policy_text_parses_with_lf_or_crlf() -> None:
    text = "version: STSv1\r\nmode: enforce\nmx: mail.example.com\r\nmx: *.Example.net.\nmax_age: 604800\nfuture: ok\n"
    policy = parse_policy(text, "id1", 1000.0)
    assert (policy.mode, policy.mx, policy.max_age, policy.expires) == (
        "enforce", ("mail.example.com", "*.example.net"), 604800, 605800.0
    )
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 0").mx == ()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "<html>not found</html>",
        "version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n",
        "version: STSv1\nmode: enforce\nmx: a.example\n",  # no max_age
        "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 31557601\n",
        "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n",
        "version: STSv1\nmode: testing\nmax_age: 1\n",  # no mx
        "version: STSv1\nmode: enforce\nmx: a..example\nmax_age: 1\n",
        "version: STSv1\nmode: enforce\nmx: *.*.example\nmax_age: 1\n",
    ],
)
def test_a_policy_that_does_not_parse_raises(text: str) -> None:
    with pytest.raises(PolicyInvalid):
        parse_policy(text)


@pytest.mark.parametrize(
    ("pattern", "host", "matches"),
    [
        ("mail.example.com", "mail.example.com", True),
        ("mail.example.com", "MAIL.Example.com.", True),
        ("mail.example.com", "mx.example.com", False),
        ("*.example.com", "mx1.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "a.b.example.com", False),  # RFC 8461 §4.1: one label only
        ("*.example.com", ".example.com", False),
    ],
)
def test_mx_patterns(pattern: str, host: str, matches: bool) -> None:
    assert mx_matches(pattern, host) is matches
