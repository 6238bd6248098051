"""Authentication results (SPF, DKIM, DMARC) shared between plugins, and their header.

Each checking plugin appends an :class:`AuthResult` to ``txn.stash[AUTH_RESULTS]``
(use :func:`add_result`); DMARC reads the SPF and DKIM ones; the
``queue_authentication_results`` plugin writes them as one ``Authentication-Results:``
header (RFC 8601) with the policy's authserv-id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.model import StashKey, Transaction

__all__ = ["AUTH_RESULTS", "AuthResult", "add_result", "render", "results"]


@dataclass(frozen=True, slots=True)
class AuthResult:
    """One method's verdict, e.g. ``spf=pass smtp.mailfrom=example.org``.

    :param method: ``spf``, ``dkim``, ``dmarc``, ``iprev`` ...
    :param result: the RFC 8601 result keyword (pass, fail, softfail, neutral, none,
        temperror, permerror, policy)
    :param reason: free text for the ``reason=`` clause
    :param properties: ``ptype.property`` and value pairs, e.g. ``("smtp.mailfrom", "a@b")``,
        ``("header.d", "example.org")``, ``("header.s", "sel1")``
    """

    method: str
    result: str
    reason: str = ""
    properties: tuple[tuple[str, str], ...] = ()

    def prop(self, name: str) -> str | None:
        return next((v for k, v in self.properties if k == name), None)


AUTH_RESULTS = StashKey[list[AuthResult]]("core.auth_results")

_VALUE_OK = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`{|}~@/=]+$")


def add_result(txn: Transaction, result: AuthResult) -> None:
    """Record ``result`` on the transaction, in arrival order."""
    existing = txn.stash.get(AUTH_RESULTS)
    if existing is None:
        existing = []
        txn.stash[AUTH_RESULTS] = existing
    existing.append(result)


def results(txn: Transaction, method: str | None = None) -> list[AuthResult]:
    """The recorded results, all or of one method."""
    found = txn.stash.get(AUTH_RESULTS) or []
    return [r for r in found if method is None or r.method == method]


def _value(text: str) -> str:
    text = text.replace("\r", " ").replace("\n", " ")
    if _VALUE_OK.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(authserv_id: str, found: list[AuthResult]) -> str:
    """The ``Authentication-Results`` header value (RFC 8601 §2.2), folded per result."""
    if not found:
        return f"{authserv_id}; none"
    parts = []
    for r in found:
        clause = f"{r.method}={r.result}"
        if r.reason:
            clause += f" reason={_value(r.reason[:200])}"
        for key, value in r.properties:
            clause += f" {key}={_value(value[:256])}"
        parts.append(clause)
    return f"{authserv_id};\n\t" + ";\n\t".join(parts)
