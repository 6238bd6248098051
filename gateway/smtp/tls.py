"""Server TLS: the context from the policy, and a self-signed certificate on first run."""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import logging
import os
import shutil
import ssl
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["TlsSetupError", "ensure_self_signed", "server_context"]

log = logging.getLogger(__name__)


class TlsSetupError(OSError):
    """The certificate and key cannot serve (unreadable, not PEM, or not a pair)."""


def _pair_problem(cert: Path, key: Path) -> str | None:
    """Why ``cert`` and ``key`` cannot serve together, or ``None`` when they can."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        return exc.reason or str(exc)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure_self_signed(directory: Path, hostname: str) -> tuple[Path, Path]:
    """Make ``cert.pem`` and ``key.pem`` in ``directory`` unless a matching pair is there.

    The certificate names ``hostname``, ``localhost`` and 127.0.0.1 and lasts a year:
    enough for opportunistic STARTTLS, which does not verify the peer.

    Several processes may ask at once (workers, two instances on one ``var_dir``): the
    first makes the pair under a lock (flock on the parent directory), the others find
    it. The pair is written into a fresh directory renamed into place, so no one ever
    sees a key without its certificate, or with another's. A pair here that does not
    match (left by an older version, or damaged) is ours to replace: it is moved aside
    to ``<directory>.bad-<time>-<pid>`` and a new one made, with a warning naming both
    files. (A pair the policy names in ``[tls]`` is never replaced:
    :func:`server_context` refuses it, naming both files.)
    """
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    if _pair_problem(cert_path, key_path) is None:
        return cert_path, key_path
    directory.parent.mkdir(parents=True, exist_ok=True)
    with _locked(directory.parent):
        problem = _pair_problem(cert_path, key_path)
        if problem is None:  # another process made it meanwhile
            return cert_path, key_path
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
        elif directory.exists():
            aside = directory.with_name(f"{directory.name}.bad-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
            log.warning(
                "the self-signed TLS pair %s and %s cannot serve (%s): moved to %s, making a new one",
                cert_path, key_path, problem, aside,
            )
            directory.rename(aside)
        _make_pair(directory, hostname)
    log.warning("made a self-signed TLS certificate in %s for %s", directory, hostname)
    return cert_path, key_path


def _make_pair(directory: Path, hostname: str) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

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
    fresh = Path(tempfile.mkdtemp(prefix=f".{directory.name}.new-", dir=directory.parent))
    try:
        os.chmod(fresh, 0o755)
        _write_synced(fresh / "key.pem", key_bytes, 0o600)
        _write_synced(fresh / "cert.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)
        _fsync_dir(fresh)
        fresh.rename(directory)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    _fsync_dir(directory.parent)


def _write_synced(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def server_context(tls: Any, var_dir: Path, hostname: str) -> ssl.SSLContext:
    """The server-side SSL context the policy's ``[tls]`` section describes.

    :raises TlsSetupError: the certificate and key cannot be read, are not PEM, or do
        not match (naming both files)
    """
    if tls.cert is not None and tls.key is not None:
        cert, key = Path(tls.cert), Path(tls.key)
    else:
        cert, key = ensure_self_signed(var_dir / "tls", hostname)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if tls.min_version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise TlsSetupError(f"TLS certificate {cert} and key {key} cannot serve: {exc.reason or exc}") from None
    except OSError as exc:
        raise TlsSetupError(f"TLS certificate {cert} and key {key} cannot be read: {exc}") from None
    ctx.verify_mode = ssl.CERT_NONE
    ctx.check_hostname = False
    return ctx
