"""A certificate authority made at test time, and an HTTPS server for MTA-STS policies.

    ca = TestCA(tmp_path)
    cert, key = ca.issue("mx1.test.example")                    # valid for a day
    old = ca.issue("mx1.test.example", expired=True)            # expired yesterday
    with PolicyServer(ca.issue("mta-sts.a.test.example")) as https:
        https.policies["a.test.example"] = "version: STSv1\\nmode: enforce\\n..."
        https.port, https.requests

:class:`PolicyServer` is Python's ``http.server`` with TLS in a thread on 127.0.0.1: it
answers ``GET /.well-known/mta-sts.txt`` with the policy of the domain in the ``Host``
header (``mta-sts.<domain>``), 404 without one; ``status`` and ``headers`` make it
answer otherwise (a redirect).
"""

from __future__ import annotations

import datetime
import http.server
import ssl
import threading
from pathlib import Path
from typing import Any

from tests.processes import free_port

__all__ = ["PolicyServer", "TestCA"]


class TestCA:
    """A CA key and certificate in ``directory`` (``ca.pem``), issuing server certificates."""

    __test__ = False

    def __init__(self, directory: Path, name: str = "Test CA") -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.timezone.utc)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self._cert = (
            x509.CertificateBuilder().subject_name(self._name).issuer_name(self._name)
            .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=30)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.ca_file = directory / f"{name.replace(' ', '-').lower()}.pem"
        self.ca_file.write_bytes(self._pem(self._cert))
        self._count = 0

    @staticmethod
    def _pem(cert: Any) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return bytes(cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, *names: str, expired: bool = False) -> tuple[Path, Path]:
        """A server certificate for ``names`` (and its key): paths ``(cert, key)``."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        now = datetime.datetime.now(datetime.timezone.utc)
        start, end = (now - datetime.timedelta(days=10), now - datetime.timedelta(days=1)) if expired else (
            now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self._name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self._count += 1
        cert_path = self.directory / f"server-{self._count}.pem"
        key_path = self.directory / f"server-{self._count}.key"
        cert_path.write_bytes(self._pem(cert))
        key_path.write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        return cert_path, key_path


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        owner = self.server.owner
        host = (self.headers.get("Host") or "").split(":")[0].lower()
        with owner.lock:
            owner.requests.append((host, self.path))
        domain = host.removeprefix("mta-sts.")
        policy = owner.policies.get(domain)
        status = owner.status or (200 if policy is not None and self.path == "/.well-known/mta-sts.txt" else 404)
        body = (policy or "not found\n").encode("utf-8") if status == 200 else b"no\n"
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        for name, value in owner.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


class _Server(http.server.ThreadingHTTPServer):
    owner: PolicyServer
    daemon_threads = True


class PolicyServer:
    """An HTTPS server for ``/.well-known/mta-sts.txt`` with the given ``(cert, key)``."""

    __test__ = False

    def __init__(self, certificate: tuple[Path, Path], host: str = "127.0.0.1") -> None:
        self.port = free_port(host)
        self.policies: dict[str, str] = {}
        self.status = 0  # not 0: answer this status to everything
        self.headers: dict[str, str] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(certificate[0]), str(certificate[1]))
        self._server = _Server((host, self.port), _Handler)
        self._server.owner = self
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, name="policy-https", daemon=True)

    def start(self) -> PolicyServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> PolicyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
