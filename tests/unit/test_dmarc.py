"""DMARC building blocks: records, organisational domains, alignment, the author domain."""

from __future__ import annotations

import pytest

from gateway.address import Address
from gateway.authres import AuthResult, add_result
from gateway.model import Message, Transaction
from plugins._dmarc_record import DmarcRecord, parse_record
from plugins._mailauth import author_domain, is_aligned, normalize_domain, organizational_domain
from plugins.data_dmarc import evaluate


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"v=DMARC1; p=reject", DmarcRecord("reject")),
        (b"v=DMARC1;p=quarantine;sp=none;adkim=s;aspf=s;pct=20", DmarcRecord("quarantine", "none", "s", "s", 20)),
        (b"v=DMARC1; p=NONE; pct=250", DmarcRecord("none", pct=100)),
        (b"v=DMARC1; p=reject; pct=x; adkim=q", DmarcRecord("reject")),
        (b"v=DMARC1; p=reject; p=none", DmarcRecord("reject")),  # the first of a repeated tag
        # §6.6.3 step 6: a bad p= with a report address acts as p=none, without one as no record.
        (b"v=DMARC1; p=bogus; rua=mailto:r@example.org", DmarcRecord("none", rua=("mailto:r@example.org",))),
        (b"v=DMARC1; p=reject; sp=bogus; rua=mailto:r@example.org", DmarcRecord("none", rua=("mailto:r@example.org",))),
        (
            b"v=DMARC1; p=reject; rua=mailto:a@example.org!10m, mailto:b@example.net; fo=1; ruf=mailto:f@example.org",
            DmarcRecord(
                "reject", rua=("mailto:a@example.org!10m", "mailto:b@example.net"), fo="1", ruf=("mailto:f@example.org",)
            ),
        ),
        (b"v=DMARC1; p=bogus", None),
        (b"v=DMARC1", None),
        (b"p=reject; v=DMARC1", None),  # v= must come first
        (b"v=dmarc1; p=reject", None),
        (b"v=spf1 -all", None),
        (b"v=DMARC1; p=reject\xff", None),
    ],
)
def test_parse_record(text: bytes, expected: DmarcRecord | None) -> None:
    assert parse_record(text) == expected


@pytest.mark.parametrize(
    ("domain", "org"),
    [
        ("example.org", "example.org"),
        ("a.b.example.org", "example.org"),
        ("mail.example.co.uk", "example.co.uk"),
        ("example.co.uk", "example.co.uk"),
        ("co.uk", "co.uk"),
        ("x.y.example.com.au", "example.com.au"),
        ("org", "org"),
    ],
)
def test_organizational_domain(domain: str, org: str) -> None:
    assert organizational_domain(domain) == org


def test_extra_public_suffixes() -> None:
    assert organizational_domain("a.shop.gen.xx") == "gen.xx"
    assert organizational_domain("a.shop.gen.xx", ["gen.xx"]) == "shop.gen.xx"
    assert organizational_domain("a.shop.gen.xx", ["shop.gen.xx", "gen.xx"]) == "a.shop.gen.xx"


def test_alignment_modes() -> None:
    assert is_aligned("example.org", "EXAMPLE.org.", "s")
    assert not is_aligned("mail.example.org", "example.org", "s")
    assert is_aligned("mail.example.org", "news.example.org", "r")
    assert not is_aligned("example.net", "example.org", "r")
    # Two registrations under a listed multi-label suffix are not one organisation.
    assert not is_aligned("alice.co.uk", "bob.co.uk", "r")


def message(*froms: str) -> Message:
    head = "".join(f"From: {value}\r\n" for value in froms)
    return Message((head + "Subject: x\r\n\r\nbody\r\n").encode())


@pytest.mark.parametrize(
    ("froms", "expected"),
    [
        (("Alice <alice@Example.ORG>",), ("example.org", "")),
        (('"bob@evil.example" <bob@example.org>',), ("example.org", "")),
        (("=?utf-8?q?Alice?= <alice@xn--bcher-kva.example>",), ("xn--bcher-kva.example", "")),
        ((), (None, "no From header")),
        (("a@example.org", "b@example.org"), (None, "several From headers")),
        (("a@example.org, b@example.net",), (None, "several From addresses")),
        (("undisclosed-recipients:;",), (None, "no From address")),
        (("alice@localhost",), (None, "From address has no valid domain")),
        (("alice@exa_mple.org",), (None, "From address has no valid domain")),
    ],
)
def test_author_domain(froms: tuple[str, ...], expected: tuple[str | None, str]) -> None:
    assert author_domain(message(*froms)) == expected


def test_normalize_domain() -> None:
    assert normalize_domain(" Example.ORG. ") == "example.org"
    assert normalize_domain("bücher.example") == "xn--bcher-kva.example"
    assert normalize_domain("-bad.example") is None
    assert normalize_domain("a" * 64 + ".example") is None


def txn_with(*found: AuthResult) -> Transaction:
    txn = Transaction(sender=Address("bounce", "example.net"))
    for result in found:
        add_result(txn, result)
    return txn


def test_evaluate_needs_an_aligned_pass() -> None:
    relaxed = DmarcRecord("reject")
    strict = DmarcRecord("reject", adkim="s", aspf="s")
    spf = AuthResult("spf", "pass", properties=(("smtp.mailfrom", "bounce@mail.example.org"),))
    dkim_other = AuthResult("dkim", "pass", properties=(("header.d", "example.net"),))
    dkim_fail = AuthResult("dkim", "fail", properties=(("header.d", "example.org"),))
    assert evaluate(txn_with(spf), "example.org", relaxed, ())[0] == "pass"
    assert evaluate(txn_with(spf), "example.org", strict, ())[0] == "fail"
    assert evaluate(txn_with(dkim_other, dkim_fail), "example.org", relaxed, ())[0] == "fail"
    helo = AuthResult("spf", "pass", properties=(("smtp.helo", "mx.example.org"),))
    assert evaluate(txn_with(helo), "example.org", relaxed, ())[0] == "pass"


def test_evaluate_temperror_only_without_a_pass() -> None:
    record = DmarcRecord("reject")
    temp = AuthResult("dkim", "temperror", properties=(("header.d", "example.org"),))
    unaligned_temp = AuthResult("dkim", "temperror", properties=(("header.d", "example.net"),))
    good = AuthResult("dkim", "pass", properties=(("header.d", "example.org"),))
    assert evaluate(txn_with(temp), "example.org", record, ())[0] == "temperror"
    assert evaluate(txn_with(unaligned_temp), "example.org", record, ())[0] == "fail"
    assert evaluate(txn_with(temp, good), "example.org", record, ())[0] == "pass"
