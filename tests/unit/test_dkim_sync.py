"""plugins/_dkim_sync.py: signing, reading and verifying signatures, loading keys.

Keys are made at test time with ``cryptography``; what the gateway signs is checked with
``dkim.verify`` (dkimpy's own verifier) handed the key record directly.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from plugins._dkim_sync import (
    SignatureInfo,
    load_key_in_thread,
    parse_signatures_in_thread,
    sign_in_thread,
    verify_in_thread,
)

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: hello\r\n"
    b"Date: Tue, 25 Nov 2026 10:00:00 +0000\r\n"
    b"Received: from somewhere\r\n"
    b"\r\n"
    b"Body text.\r\n"
)
HEADERS = ("from", "to", "subject", "date", "cc")
NONE = serialization.NoEncryption()


@pytest.fixture(scope="module")
def rsa_key() -> tuple[bytes, bytes]:
    """(PKCS#8 PEM private key, key record)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, NONE)
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


@pytest.fixture(scope="module")
def ed_key() -> tuple[bytes, bytes]:
    """(the bare base64 seed dkimpy's dknewkey writes, key record)."""
    key = ed25519.Ed25519PrivateKey.generate()
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, NONE)
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(seed) + b"\n", b"v=DKIM1; k=ed25519; p=" + base64.b64encode(public)


def signed(message: bytes, value: str) -> bytes:
    return b"DKIM-Signature: " + value.replace("\n", "\r\n").encode() + b"\r\n" + message


def sign(tmp_path: Path, key: bytes, algorithm: str, message: bytes = MESSAGE) -> bytes:
    path = tmp_path / "key"
    path.write_bytes(key)
    loaded = load_key_in_thread(path, algorithm)
    return signed(message, sign_in_thread(message, "example.org", "sel", loaded, algorithm, HEADERS, ("from",)))


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_signature_verifies_with_dkimpy_and_with_us(tmp_path, rsa_key, ed_key, kind) -> None:
    (key, record), algorithm = (rsa_key, "rsa-sha256") if kind == "rsa" else (ed_key, "ed25519-sha256")
    message = sign(tmp_path, key, algorithm)
    assert dkim.verify(message, dnsfunc=lambda name, timeout=5: record)
    infos, total = parse_signatures_in_thread(message, 5)
    assert total == 1
    assert infos == [SignatureInfo(0, "example.org", "sel", "@example.org", algorithm, infos[0].b_prefix)]
    assert infos[0].key_name == "sel._domainkey.example.org" and len(infos[0].b_prefix) == 8
    assert verify_in_thread(message, {0: (algorithm, record)}, 1024) == {0: ("pass", "")}


def test_only_present_fields_are_signed_and_from_twice(tmp_path, rsa_key) -> None:
    message = sign(tmp_path, rsa_key[0], "rsa-sha256")
    tags = dict(p.strip().partition("=")[::2] for p in message.split(b"\r\n\r\n")[0].decode().split(";"))
    assert [h.strip() for h in tags["h"].replace("\r\n", "").split(":")] == ["from", "to", "subject", "date", "from"]
    assert tags["c"] == "relaxed/relaxed"


def test_tampering_fails(tmp_path, rsa_key) -> None:
    message = sign(tmp_path, rsa_key[0], "rsa-sha256")
    record = rsa_key[1]
    body = message.replace(b"Body text.", b"Body text!")
    header = message.replace(b"Subject: hello", b"Subject: HELLO there")
    # Relaxed canonicalisation tolerates whitespace and case of field names only.
    refolded = message.replace(b"Subject: hello", b"SUBJECT:   hello")
    assert verify_in_thread(body, {0: ("rsa-sha256", record)}, 1024) == {0: ("fail", "body hash did not verify")}
    assert verify_in_thread(header, {0: ("rsa-sha256", record)}, 1024) == {0: ("fail", "signature did not verify")}
    assert verify_in_thread(refolded, {0: ("rsa-sha256", record)}, 1024) == {0: ("pass", "")}


def test_key_problems_are_permerror(tmp_path, rsa_key, ed_key) -> None:
    message = sign(tmp_path, rsa_key[0], "rsa-sha256")
    assert verify_in_thread(message, {0: ("rsa-sha256", b"v=DKIM1; k=rsa; p=")}, 1024) == {0: ("permerror", "key revoked")}
    result, reason = verify_in_thread(message, {0: ("rsa-sha256", b"v=DKIM1; k=rsa; p=bm90IGEga2V5")}, 1024)[0]
    assert result == "permerror" and reason.startswith("key record:")
    # RFC 6376 §6.1.2: the key type must suit the signature's algorithm.
    result, reason = verify_in_thread(message, {0: ("rsa-sha256", ed_key[1])}, 1024)[0]
    assert (result, reason) == ("permerror", "inappropriate key algorithm (ed25519 key for rsa-sha256)")
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    der = small.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    small_pem = small.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, NONE)
    message = sign(tmp_path, small_pem, "rsa-sha256")
    record = b"v=DKIM1; p=" + base64.b64encode(der)
    assert verify_in_thread(message, {0: ("rsa-sha256", record)}, 1024) == {0: ("pass", "")}
    assert verify_in_thread(message, {0: ("rsa-sha256", record)}, 2048)[0][0] == "permerror"


def test_bad_signatures_are_reported_not_raised() -> None:
    garbage = b"DKIM-Signature: this is not a tag list\r\n" + MESSAGE
    missing = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=sel; h=to; bh=AAAA; b=AAAA\r\n" + MESSAGE
    no_from = missing.replace(b"h=to", b"h=to:subject")
    infos, _ = parse_signatures_in_thread(garbage, 5)
    assert infos[0].error.startswith("signature syntax")
    infos, _ = parse_signatures_in_thread(no_from, 5)
    assert infos[0].error == "From header not signed" and infos[0].domain == "example.org"
    assert parse_signatures_in_thread(MESSAGE, 5) == ([], 0)


def test_signature_count_is_bounded(tmp_path, rsa_key) -> None:
    message = MESSAGE
    for _ in range(4):
        message = sign(tmp_path, rsa_key[0], "rsa-sha256", message)
    infos, total = parse_signatures_in_thread(message, 2)
    assert total == 4 and [i.index for i in infos] == [0, 1]


def test_key_loading(tmp_path, rsa_key, ed_key) -> None:
    path = tmp_path / "key"
    path.write_bytes(rsa_key[0])  # PKCS#8 becomes PKCS#1 for dkimpy
    assert load_key_in_thread(path, "rsa-sha256").startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    with pytest.raises(ValueError, match="not an Ed25519"):
        load_key_in_thread(path, "ed25519-sha256")
    path.write_bytes(ed_key[0])
    assert load_key_in_thread(path, "ed25519-sha256") == ed_key[0].strip()
    pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, NONE
    )
    path.write_bytes(pem)
    assert len(base64.b64decode(load_key_in_thread(path, "ed25519-sha256"))) == 32
    if shutil.which("openssl"):  # cryptography refuses to make keys under 1024 bits
        subprocess.run(["openssl", "genrsa", "-out", str(path), "768"], check=True, capture_output=True)
        with pytest.raises(ValueError, match="at least 1024"):
            load_key_in_thread(path, "rsa-sha256")
