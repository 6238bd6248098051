"""DKIM signing with a site's key: the blocking dkimpy work, run only in a thread
(``gateway.run_in_thread`` or ``asyncio.to_thread``).

:func:`load_key_in_thread` reads a private key file, :func:`sign_in_thread` signs a
message with it. ``queue_dkim_sign`` and ``queue_arc_seal`` use them (through
``plugins._dkim_sync``), and so does the reports' signer
(:func:`gateway.reports.make_signer`).
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

__all__ = ["MIN_SIGNING_BITS", "load_key_in_thread", "sign_in_thread"]

# dkimpy logs what it refuses at ERROR level; the caller reports it.
_QUIET = logging.getLogger("gateway.dkim_sync.dkimpy")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False

# RFC 8301 §3.2: signers MUST use RSA keys of at least 1024 bits.
MIN_SIGNING_BITS = 1024


def load_key_in_thread(path: Path, algorithm: str) -> bytes:
    """Read a private key file into the form dkimpy signs with.

    RSA: a PEM key (PKCS#1 or PKCS#8), handed on as PKCS#1 PEM. Ed25519: a PKCS#8 PEM
    key, or the bare base64 32-byte seed that dkimpy's ``dknewkey`` writes, handed on as
    that base64 seed (RFC 8463).

    :param path: the key file
    :param algorithm: ``rsa-sha256`` or ``ed25519-sha256``
    :raises ValueError: the file holds no such key, or an RSA key under 1024 bits
    """
    data = path.read_bytes()
    if algorithm == "ed25519-sha256":
        if b"-----BEGIN" not in data:
            seed = base64.b64decode(data.strip(), validate=True)
            if len(seed) != 32:
                raise ValueError(f"{path}: not an Ed25519 key (expected 32 bytes, got {len(seed)})")
            return base64.b64encode(seed)
        ed_key = serialization.load_pem_private_key(data, password=None)
        if not isinstance(ed_key, ed25519.Ed25519PrivateKey):
            raise ValueError(f"{path}: not an Ed25519 private key")
        raw = ed_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return base64.b64encode(raw)
    rsa_key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(rsa_key, rsa.RSAPrivateKey):
        raise ValueError(f"{path}: not an RSA private key")
    if rsa_key.key_size < MIN_SIGNING_BITS:
        raise ValueError(f"{path}: RSA key of {rsa_key.key_size} bits; at least {MIN_SIGNING_BITS} needed")
    return rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )


def sign_in_thread(
    message: bytes,
    domain: str,
    selector: str,
    key: bytes,
    algorithm: str,
    headers: tuple[str, ...],
    oversign: tuple[str, ...],
) -> str:
    """Sign ``message`` (relaxed/relaxed) and return the DKIM-Signature field's value.

    Only fields of ``headers`` present in the message are signed (each instance); those
    of ``oversign`` present are listed once more, so that another instance added later
    breaks the signature (RFC 6376 §8.15).

    :param message: the final message bytes
    :param domain: the ``d=`` domain
    :param selector: the ``s=`` selector
    :param key: the key as :func:`load_key_in_thread` returns it
    :param algorithm: ``rsa-sha256`` or ``ed25519-sha256``
    :param headers: the field names to sign (lower case)
    :param oversign: the field names to sign one extra time (lower case)
    :returns: the value with ``\\n``-folded continuation lines, ready for ``prepend_header``
    :raises dkim.DKIMException: dkimpy refused to sign (no From field, say)
    """
    signer = dkim.DKIM(message, logger=_QUIET)
    present = [name.decode("ascii", "replace").lower() for name, _ in signer.headers]
    wanted = set(headers)
    include = [name for name in present if name in wanted]
    include += [name for name in oversign if name in present]
    field: bytes = signer.sign(
        selector.encode("ascii"),
        domain.encode("ascii"),
        key,
        signature_algorithm=algorithm.encode("ascii"),
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[name.encode("ascii") for name in include],
    )
    value = field.decode("ascii").partition(":")[2].strip()
    # Relaxed header canonicalisation (RFC 6376 §3.4.2) makes the folding immaterial.
    return value.replace("\r\n", "\n")
