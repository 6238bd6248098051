"""What can go wrong in a remote SMTP session, as exceptions the agent acts on.

:class:`HostFailure` means "this host failed, try the next"; :class:`TlsFailure` is the
TLS kind of it and says which (:data:`TlsResult`, the RFC 8460 result types, so the
outcome of a transport policy can be counted and later reported); :class:`StaleConnection`
is a pooled connection that died while idle. :func:`as_temporary` turns a host's 5xx
greeting into the 4xx its recipients get.
"""

from __future__ import annotations

import ssl
from typing import Literal

from gateway.verdicts import Reply, TemporaryFailure

__all__ = ["HostFailure", "StaleConnection", "TlsFailure", "TlsResult", "as_temporary", "tls_result_of"]

_MAX_TEXT = 1000

#: RFC 8460 §4.3.1 and §4.3.2.1 result types of a TLS negotiation failure
TlsResult = Literal[
    "starttls-not-supported",
    "certificate-host-mismatch",
    "certificate-expired",
    "certificate-not-trusted",
    "validation-failure",
    "tlsa-invalid",  # DANE: no usable TLSA record matches the certificate
    "dnssec-invalid",  # DANE: the TLSA lookup failed (bogus)
    "dane-required",  # DANE: dane-only, and no DNSSEC-valid TLSA records
]

# OpenSSL X509_V_ERR_* codes (x509_vfy.h) sorted into the RFC 8460 result types.
_EXPIRED = {10}  # CERT_HAS_EXPIRED
_HOST_MISMATCH = {62, 63, 64}  # HOSTNAME_MISMATCH, EMAIL_MISMATCH, IP_ADDRESS_MISMATCH
_NOT_TRUSTED = {2, 18, 19, 20, 21, 27}  # no issuer, self-signed, untrusted chain, CERT_UNTRUSTED


class HostFailure(TemporaryFailure):
    """The session with this host failed; the next host may work.

    ``reply`` is temporary (what recipients get if no host works); ``remote_reply`` is
    what the host said, if it said anything.
    """

    def __init__(self, reply: Reply, remote_reply: Reply | None = None) -> None:
        super().__init__(reply)
        self.remote_reply = remote_reply


class TlsFailure(HostFailure):
    """STARTTLS was refused or not offered, or the TLS handshake (or certificate check) failed.

    ``result`` says which, as an RFC 8460 result type.
    """

    def __init__(
        self, reply: Reply, remote_reply: Reply | None = None, *, result: TlsResult = "validation-failure"
    ) -> None:
        super().__init__(reply, remote_reply)
        self.result: TlsResult = result


class StaleConnection(Exception):
    """A pooled connection failed its RSET: it died while idle and nothing of this
    transaction reached the server; deliver on a new connection instead."""


def tls_result_of(exc: BaseException) -> TlsResult:
    """The RFC 8460 result type of a failed TLS handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        if code in _EXPIRED:
            return "certificate-expired"
        if code in _HOST_MISMATCH:
            return "certificate-host-mismatch"
        if code in _NOT_TRUSTED:
            return "certificate-not-trusted"
    if isinstance(exc, ssl.CertificateError) and "match" in str(exc):
        return "certificate-host-mismatch"
    return "validation-failure"


def as_temporary(reply: Reply, remote: str = "") -> Reply:
    """``reply`` as a 4xx for deferring (a 5xx greeting is a host problem, not a bounce)."""
    if reply.is_temporary:
        return reply
    status = "4" + reply.status[1:] if reply.status else "4.4.0"
    said = f"{remote} said: " if remote else ""
    return Reply(451, status, f"{said}{reply.code} {reply.text}"[:_MAX_TEXT])
