"""Server TLS: the context from the policy, and a self-signed certificate on first run."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import ssl
from pathlib import Path
from typing import Any

__all__ = ["ensure_self_signed", "server_context"]

log = logging.getLogger(__name__)


def ensure_self_signed(directory: Path, hostname: str) -> tuple[Path, Path]:
    """Make ``cert.pem`` and ``key.pem`` in ``directory`` unless both exist.

    The certificate names ``hostname``, ``localhost`` and 127.0.0.1 and lasts a year:
    enough for opportunistic STARTTLS, which does not verify the peer.
    """
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64] or "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    alt_names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    if hostname and hostname != "localhost":
        alt_names.insert(0, x509.DNSName(hostname))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp_key = key_path.with_suffix(".tmp")
    fd = os.open(tmp_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)
    tmp_key.replace(key_path)
    tmp_cert = cert_path.with_suffix(".tmp")
    tmp_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tmp_cert.replace(cert_path)
    log.warning("made a self-signed TLS certificate in %s for %s", directory, hostname)
    return cert_path, key_path


def server_context(tls: Any, var_dir: Path, hostname: str) -> ssl.SSLContext:
    """The server-side SSL context the policy's ``[tls]`` section describes.

    :raises OSError: a configured certificate or key cannot be read
    :raises ssl.SSLError: they do not match or are not PEM
    """
    if tls.cert is not None and tls.key is not None:
        cert, key = Path(tls.cert), Path(tls.key)
    else:
        cert, key = ensure_self_signed(var_dir / "tls", hostname)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if tls.min_version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.verify_mode = ssl.CERT_NONE
    ctx.check_hostname = False
    return ctx
