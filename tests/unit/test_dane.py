"""gateway.delivery.remote.dane: TLSA records against presented chains (RFC 7672 §3, RFC 6698)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.delivery.remote.dane import TlsaRecord, check_chain, matches_name
from tests.testca import TestCA

HOST = "mx1.example.net"


def der(path: Path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(serialization.Encoding.DER)


def spki(path: Path) -> bytes:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def digest(data: bytes, mtype: int) -> bytes:
    return data if mtype == 0 else hashlib.sha256(data).digest() if mtype == 1 else hashlib.sha512(data).digest()


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "ca")


@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("mtype", [0, 1, 2])
def test_dane_ee_matches_each_selector_and_matching_type(ca: TestCA, selector: int, mtype: int) -> None:
    leaf, _ = ca.issue("unrelated.example", expired=True)  # no name or expiry check for DANE-EE
    selected = der(leaf) if selector == 0 else spki(leaf)
    record = TlsaRecord(3, selector, mtype, digest(selected, mtype))
    assert check_chain([der(leaf)], [record], [HOST]).is_success
    wrong = TlsaRecord(3, selector, mtype, digest(selected + b"x", mtype))
    assert check_chain([der(leaf)], [wrong], [HOST]).result == "tlsa-invalid"


@pytest.mark.parametrize("usage", [0, 1])
def test_pkix_usages_are_unusable_for_smtp(ca: TestCA, usage: int) -> None:
    leaf, _ = ca.issue(HOST)
    record = TlsaRecord(usage, 0, 1, hashlib.sha256(der(leaf)).digest())
    assert not record.is_usable
    check = check_chain([der(leaf), der(ca.ca_file)], [record], [HOST])
    assert check.result == "tlsa-invalid" and "no usable" in check.detail


def test_a_digest_of_the_wrong_length_is_unusable() -> None:
    assert not TlsaRecord(3, 1, 1, b"\x00" * 31).is_usable
    assert not TlsaRecord(3, 1, 2, b"\x00" * 32).is_usable


def test_dane_ta_needs_the_chain_the_name_and_current_certificates(ca: TestCA, tmp_path: Path) -> None:
    ta = TlsaRecord(2, 0, 1, hashlib.sha256(der(ca.ca_file)).digest())
    good, _ = ca.issue(HOST)
    assert check_chain([der(good), der(ca.ca_file)], [ta], [HOST, "example.net"]).detail == "DANE-TA at depth 1"
    # The next-hop domain is a reference identifier too (RFC 7672 §3.2.2).
    domain_cert, _ = ca.issue("example.net")
    assert check_chain([der(domain_cert), der(ca.ca_file)], [ta], [HOST, "example.net"]).is_success
    wrong_name, _ = ca.issue("mx2.example.org")
    assert check_chain([der(wrong_name), der(ca.ca_file)], [ta], [HOST]).result == "certificate-host-mismatch"
    expired, _ = ca.issue(HOST, expired=True)
    assert check_chain([der(expired), der(ca.ca_file)], [ta], [HOST]).result == "certificate-expired"
    # A leaf from another CA, presented next to the trusted CA's certificate, does not chain to it.
    stranger, _ = TestCA(tmp_path / "other", "Other").issue(HOST)
    assert check_chain([der(stranger), der(ca.ca_file)], [ta], [HOST]).result == "tlsa-invalid"
    # Without the trust anchor in the chain there is nothing to match.
    assert check_chain([der(good)], [ta], [HOST]).result == "tlsa-invalid"


def test_dane_ta_by_the_ca_key(ca: TestCA) -> None:
    ta = TlsaRecord(2, 1, 2, hashlib.sha512(spki(ca.ca_file)).digest())
    leaf, _ = ca.issue(HOST)
    assert check_chain([der(leaf), der(ca.ca_file)], [ta], [HOST]).is_success


def test_wildcards_stand_for_one_left_most_label(ca: TestCA) -> None:
    cert = x509.load_pem_x509_certificate(ca.issue("*.example.net")[0].read_bytes())
    assert matches_name(cert, [HOST])
    assert not matches_name(cert, ["a.mx1.example.net"])
    assert not matches_name(cert, ["example.net"])


def test_start_up_logs_dane_only_without_believed_dnssec(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import asyncio
    import logging

    from gateway.app import check_transport_security
    from gateway.policy import load_policy

    path = tmp_path / "policy.toml"
    path.write_text('[dns]\nnameservers = ["192.0.2.53"]\n\n[delivery]\ndane = "dane-only"\n')
    with caplog.at_level(logging.WARNING, logger="gateway.app"):
        asyncio.run(check_transport_security(load_policy(str(path), registry={})))
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "mail to those MX hosts waits in the queue (4.7.5)" in caplog.records[0].getMessage()
    caplog.clear()
    path.write_text('[dns]\nnameservers = ["127.0.0.1"]\n\n[delivery]\ndane = "dane-only"\n')
    with caplog.at_level(logging.WARNING, logger="gateway.app"):
        asyncio.run(check_transport_security(load_policy(str(path), registry={})))
    assert caplog.records == []
