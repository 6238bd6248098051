"""DANE for SMTP (RFC 7672, RFC 6698): does the certificate a host presented match its TLSA records?

:class:`TlsaRecord` is one TLSA record; :func:`check_chain` decides whether the chain a
server presented (leaf first, DER) is authenticated by a DNSSEC-validated TLSA RRset:

- DANE-EE(3): the leaf certificate (selector 0) or its public key (selector 1) matches.
  No name check and no expiry check (RFC 7672 §3.1.1): the key is what DNSSEC vouches for.
- DANE-TA(2): some certificate of the presented chain matches, the leaf chains up to it
  (each certificate signed by the next), the certificates below it are within their
  validity period, and the leaf names the MX host or the domain (RFC 7672 §3.1.2, §3.2).
- PKIX-TA(0) and PKIX-EE(1) are unusable for SMTP (RFC 7672 §3.1.3), as are unknown
  selectors and matching types; they never match.

The verdict is ``success`` or an RFC 8460 result type (``tlsa-invalid``: no usable record
matches; ``certificate-host-mismatch``: the chain leads to a DANE-TA but the leaf does not
name the host; ``certificate-expired``), so TLS reports can reuse it.

:func:`presented_chain` reads the chain off a live TLS connection (the handshake itself
verifies nothing: the TLSA records are the trust anchors).
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from gateway.delivery.remote.failures import TlsResult

__all__ = ["DaneCheck", "TlsaRecord", "check_chain", "matches_name", "presented_chain"]

log = logging.getLogger(__name__)

#: RFC 7218 acronyms, for logs and ``gateway tls check``
USAGES = {0: "PKIX-TA", 1: "PKIX-EE", 2: "DANE-TA", 3: "DANE-EE"}
SELECTORS = {0: "Cert", 1: "SPKI"}
MATCHING = {0: "Full", 1: "SHA2-256", 2: "SHA2-512"}
_DIGEST_SIZES = {1: 32, 2: 64}


@dataclass(frozen=True, slots=True)
class TlsaRecord:
    """One TLSA record (RFC 6698 §2.1): certificate usage, selector, matching type, data."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    @classmethod
    def from_rdata(cls, rdata: Any) -> TlsaRecord:
        """From a dnspython ``TLSA`` rdata."""
        return cls(int(rdata.usage), int(rdata.selector), int(rdata.mtype), bytes(rdata.cert))

    @property
    def is_usable(self) -> bool:
        """Usable for SMTP (RFC 7672 §3.1.3): DANE-TA or DANE-EE, a known selector and
        matching type, and a digest of the right length."""
        if self.usage not in (2, 3) or self.selector not in SELECTORS or self.mtype not in MATCHING:
            return False
        size = _DIGEST_SIZES.get(self.mtype)
        return bool(self.data) and (size is None or len(self.data) == size)

    def matches(self, cert: x509.Certificate) -> bool:
        """Whether ``cert`` (its whole DER form, or its SPKI, as the selector says) matches."""
        if self.selector == 0:
            selected = cert.public_bytes(serialization.Encoding.DER)
        else:
            selected = cert.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        if self.mtype == 0:
            return selected == self.data
        digest = hashlib.sha256 if self.mtype == 1 else hashlib.sha512
        return digest(selected).digest() == self.data

    def __str__(self) -> str:
        hexdata = self.data.hex()
        shown = hexdata if len(hexdata) <= 64 else hexdata[:64] + "…"
        name = f"{USAGES.get(self.usage, '?')} {SELECTORS.get(self.selector, '?')} {MATCHING.get(self.mtype, '?')}"
        return f"{self.usage} {self.selector} {self.mtype} {shown} ({name})"


@dataclass(frozen=True, slots=True)
class DaneCheck:
    """What :func:`check_chain` found: ``success`` or an RFC 8460 result type, and why."""

    result: TlsResult | Literal["success"]
    detail: str

    @property
    def is_success(self) -> bool:
        return self.result == "success"


def presented_chain(ssl_object: Any) -> list[bytes]:
    """The certificates the server sent, leaf first, in DER (unverified).

    ``get_unverified_chain`` is public from Python 3.13 and on the private ``_sslobj``
    before; without either only the leaf is known (enough for DANE-EE).
    """
    getter = getattr(ssl_object, "get_unverified_chain", None)
    if getter is None:
        getter = getattr(getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)
    if getter is not None:
        chain = getter() or []
        return [c if isinstance(c, bytes) else bytes(c.public_bytes(ssl._ssl.ENCODING_DER)) for c in chain]  # type: ignore[attr-defined]
    leaf = ssl_object.getpeercert(binary_form=True)
    return [leaf] if leaf else []


def matches_name(cert: x509.Certificate, names: Iterable[str]) -> bool:
    """Whether ``cert`` names one of ``names`` (DNS subjectAltName, else the CN; a
    wildcard stands for exactly one whole left-most label, RFC 6125 §6.4.3)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        presented = [str(n) for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        presented = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    wanted = {n.lower().rstrip(".") for n in names if n}
    for pattern in (p.lower().rstrip(".") for p in presented):
        if pattern in wanted:
            return True
        if pattern.startswith("*.") and "*" not in pattern[2:]:
            suffix = pattern[1:]
            if any(n.endswith(suffix) and "." not in n[: -len(suffix)] and n[: -len(suffix)] for n in wanted):
                return True
    return False


def _is_current(cert: x509.Certificate, now: datetime.datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature) as exc:
        log.debug("DANE-TA: %s is not issued by %s: %s", cert.subject, issuer.subject, exc)
        return False
    return True


def check_chain(
    chain: Sequence[bytes],
    records: Sequence[TlsaRecord],
    names: Sequence[str],
    *,
    now: datetime.datetime | None = None,
) -> DaneCheck:
    """Whether the presented ``chain`` (leaf first, DER) is authenticated by ``records``.

    :param records: the host's DNSSEC-validated TLSA RRset (unusable ones are ignored)
    :param names: the reference identifiers for DANE-TA: the MX host name, the domain
    :param now: the time for DANE-TA's validity check (default: now)
    """
    usable = [r for r in records if r.is_usable]
    if not usable:
        return DaneCheck("tlsa-invalid", "no usable TLSA record (only PKIX usages or unknown types)")
    try:
        certs = [x509.load_der_x509_certificate(der) for der in chain]
    except ValueError as exc:
        return DaneCheck("validation-failure", f"unreadable certificate in the presented chain: {exc}")
    if not certs:
        return DaneCheck("validation-failure", "no certificate presented")
    leaf = certs[0]
    if any(r.usage == 3 and r.matches(leaf) for r in usable):
        return DaneCheck("success", "DANE-EE")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    trust_anchors = [r for r in usable if r.usage == 2]
    problem = DaneCheck(
        "tlsa-invalid", f"the certificate matches none of the {len(usable)} usable TLSA record(s)"
    )
    for depth in range(1, len(certs)) if trust_anchors else ():
        if not any(r.matches(certs[depth]) for r in trust_anchors):
            continue
        # RFC 7672 §3.1.2: the leaf must chain to the trust anchor the DNS names.
        if not all(_signed_by(certs[i], certs[i + 1]) for i in range(depth)):
            problem = DaneCheck("tlsa-invalid", f"the chain does not lead to the DANE-TA certificate at depth {depth}")
            continue
        if not all(_is_current(certs[i], now) for i in range(depth)):
            return DaneCheck("certificate-expired", "a certificate below the DANE-TA trust anchor is not valid now")
        if not matches_name(leaf, names):
            return DaneCheck(
                "certificate-host-mismatch",
                f"the certificate chains to the DANE-TA trust anchor but names none of {', '.join(names)}",
            )
        return DaneCheck("success", f"DANE-TA at depth {depth}")
    return problem
