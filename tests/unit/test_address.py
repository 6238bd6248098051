"""RFC 5321 path and parameter parsing."""

from typing import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import address
from gateway.address import Address, AddressError, decode_xtext, parse_params, parse_path


def rcpt(text: str, utf8: bool = False) -> Address:
    return parse_path(text, allow_null=False, allow_postmaster=True, utf8=utf8)[0]


def mail(text: str, utf8: bool = False) -> Address:
    return parse_path(text, allow_null=True, allow_postmaster=False, utf8=utf8)[0]


@pytest.mark.parametrize(
    "text, local, domain",
    [
        ("<user@example.org>", "user", "example.org"),
        ("<first.last+tag@sub.example.org>", "first.last+tag", "sub.example.org"),
        ('<"john doe"@example.org>', '"john doe"', "example.org"),
        ('<"user@other"@example.org>', '"user@other"', "example.org"),
        ("<user@[192.0.2.1]>", "user", "[192.0.2.1]"),
        ("<user@[IPv6:2001:db8::1]>", "user", "[IPv6:2001:db8::1]"),
        ("<@relay.example:user@example.org>", "user", "example.org"),
        ("<@a.example,@b.example:user@example.org>", "user", "example.org"),
    ],
)
def test_valid_paths(text: str, local: str, domain: str) -> None:
    address = rcpt(text)
    assert (address.local, address.domain) == (local, domain)


@pytest.mark.parametrize(
    "text",
    [
        "<user@example.org",          # unterminated bracket
        "user@example.org",           # no brackets
        "<user@exa\x00mple.org>",     # NUL
        "<us\x01er@example.org>",     # control character
        "<user@example.org>junk",     # garbage after path
        "<user>",                     # no domain
        "<@example.org>",             # no local part
        "<user@-bad.example>",        # label starts with hyphen
        "<user@exa_mple.org>",        # underscore in domain
        "<us..er@example.org>",       # empty atom
        "<user@[300.1.1.1]>",         # invalid literal
        "<user@[192.0.2.1>",          # unterminated literal
        "<a<b@example.org>",          # nested bracket
        '<"unterminated@example.org>',
        "<>",                         # null path is not a recipient
        "<" + "a" * 65 + "@example.org>",  # local part over 64 octets
        "<@relay.example user@example.org>",  # malformed source route
    ],
)
def test_invalid_paths(text: str) -> None:
    with pytest.raises(AddressError):
        rcpt(text)


def test_postmaster_without_domain_only_for_rcpt() -> None:
    assert rcpt("<Postmaster>").is_postmaster
    with pytest.raises(AddressError):
        mail("<postmaster>")


def test_null_reverse_path() -> None:
    assert mail("<>").is_null
    assert str(mail("<>")) == ""


def test_utf8_needs_smtputf8() -> None:
    with pytest.raises(AddressError):
        rcpt("<jösé@example.org>", utf8=False)
    address = rcpt("<jösé@exämple.org>", utf8=True)
    assert address.local == "jösé" and not address.is_ascii


def test_params() -> None:
    _, rest = parse_path("<a@example.org> SIZE=100 body=8BITMIME SMTPUTF8", allow_null=True, allow_postmaster=False, utf8=False)
    assert parse_params(rest) == {"SIZE": "100", "BODY": "8BITMIME", "SMTPUTF8": None}
    with pytest.raises(AddressError):
        parse_params("SIZE=1 SIZE=2")
    with pytest.raises(AddressError):
        parse_params("=x")
    with pytest.raises(AddressError):
        parse_params("KEY=va=lue")


def test_xtext() -> None:
    assert decode_xtext("rfc822;user+40example.org") == "rfc822;user@example.org"
    with pytest.raises(AddressError):
        decode_xtext("bad+4")


def test_domain_key_is_lowercase() -> None:
    assert rcpt("<User@Example.ORG>").domain_key == "example.org"
    assert rcpt("<User@Example.ORG>").local == "User"


def _outcome(find: Callable[[str], int], text: str) -> object:
    try:
        return find(text)
    except AddressError as exc:
        return str(exc)


@given(st.text(alphabet='<>"\\ab@. :', max_size=30).map(lambda t: "<" + t))
def test_the_closing_bracket_found_without_a_quote_is_the_one_the_full_scan_finds(text: str) -> None:
    assert _outcome(address._closing_bracket, text) == _outcome(address._closing_bracket_quoted, text)


def test_a_remembered_address_is_the_same_and_a_bad_one_fails_every_time() -> None:
    assert rcpt("<User@Example.org>", utf8=True) == Address.parse("User@Example.org") == Address("User", "Example.org")
    for _ in range(2):
        with pytest.raises(AddressError):
            rcpt("<bad..dots@example.org>")
