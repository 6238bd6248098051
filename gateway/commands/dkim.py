"""``gateway dkim keygen``: make a DKIM signing key and print its DNS record.

    gateway dkim keygen --domain example.org --selector 2026a --out /etc/gateway/dkim
    gateway dkim keygen --domain example.org --selector 2026e --algorithm ed25519 --out DIR

writes ``DIR/<domain>.<selector>.key`` (PEM, mode 0600, never overwriting a file; without
``--out`` in the current directory, as ``opendkim-genkey`` does; the path is printed) and
prints the TXT record to publish, in zone-file syntax, with the key split into strings of
at most 255 characters (RFC 1035 §3.3.14; RFC 6376 §3.6.2.2 joins them again)::

    2026a._domainkey.example.org. IN TXT "v=DKIM1; k=rsa; p=MIIBIjAN..." "...IDAQAB"

RSA keys are PKCS#1 PEM (readable by dkimpy and OpenDKIM), 2048 bits by default
(RFC 8301: at least 1024; more than 2048 rarely fits a DNS answer over UDP). Ed25519 keys
are PKCS#8 PEM; their record carries the bare 32-byte public key (RFC 8463 §4.2).
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import sys
from pathlib import Path
from typing import Any

__all__ = ["dns_record", "main", "register", "txt_strings"]

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")


def register(sub: Any) -> None:
    dkim = sub.add_parser("dkim", help="DKIM signing keys")
    actions = dkim.add_subparsers(dest="dkim_command", required=True, metavar="ACTION")
    keygen = actions.add_parser("keygen", help="make a signing key and print its DNS TXT record")
    keygen.add_argument("--domain", required=True, help="the signing domain (d=)")
    keygen.add_argument("--selector", required=True, help="the selector (s=)")
    keygen.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa", help="key type (default rsa)")
    keygen.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    keygen.add_argument(
        "--out", type=Path, default=Path("."),
        help="directory for the private key file (default: the current directory)",
    )
    keygen.set_defaults(func=main)


def txt_strings(text: str, size: int = 255) -> list[str]:
    """``text`` cut into character-strings of at most ``size`` octets (RFC 1035 §3.3.14)."""
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def dns_record(domain: str, selector: str, key_type: str, public: bytes) -> str:
    """The zone-file line publishing ``public`` (already DER or raw, not base64).

    :param domain: the signing domain
    :param selector: the selector
    :param key_type: ``rsa`` or ``ed25519`` (the ``k=`` tag)
    :param public: RSA: the DER SubjectPublicKeyInfo; Ed25519: the 32 raw bytes
    """
    value = f"v=DKIM1; k={key_type}; p={base64.b64encode(public).decode('ascii')}"
    strings = " ".join(f'"{part}"' for part in txt_strings(value))
    return f"{selector}._domainkey.{domain}. IN TXT {strings}"


def _make_key(algorithm: str, bits: int) -> tuple[bytes, bytes]:
    """(private key PEM, public key as the record wants it)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    none = serialization.NoEncryption()
    if algorithm == "ed25519":
        ed_key = ed25519.Ed25519PrivateKey.generate()
        pem = ed_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, none)
        raw = ed_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return pem, raw
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = rsa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, none)
    der = rsa_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, der


def _write_private(path: Path, data: bytes) -> None:
    # O_EXCL: never overwrite a key that may already be published; 0600 from the start.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def main(args: argparse.Namespace) -> int:
    domain = str(args.domain).strip().rstrip(".").lower()
    selector = str(args.selector).strip()
    if not all(_LABEL.match(label) for label in domain.split(".")) or "." not in domain:
        print(f"gateway: {args.domain!r} is not a domain name", file=sys.stderr)
        return 2
    if not all(_LABEL.match(label) for label in selector.split(".")):
        print(f"gateway: {args.selector!r} is not a valid selector", file=sys.stderr)
        return 2
    if args.algorithm == "rsa" and not 1024 <= args.bits <= 4096:
        print("gateway: --bits must be between 1024 and 4096 (RFC 8301)", file=sys.stderr)
        return 2
    out: Path = args.out
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = (out / f"{domain}.{selector}.key").absolute()
    pem, public = _make_key(args.algorithm, args.bits)
    try:
        _write_private(path, pem)
    except FileExistsError:
        print(f"gateway: {path} exists; not overwriting a key", file=sys.stderr)
        return 1
    print(dns_record(domain, selector, args.algorithm, public))
    print(f"gateway: private key written to {path}", file=sys.stderr)
    return 0
