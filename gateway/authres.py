"""Authentication results (SPF, DKIM, ARC, DMARC) shared between plugins, and their header.

Each checking plugin appends an :class:`AuthResult` to ``txn.stash[AUTH_RESULTS]``
(use :func:`add_result`); DMARC reads the SPF, DKIM and ARC ones; the
``queue_authentication_results`` plugin writes them as one ``Authentication-Results:``
header (RFC 8601) with the policy's authserv-id, and ``queue_arc_seal`` writes them into
the ``ARC-Authentication-Results`` of its seal (RFC 8617).

A plugin that changes the message's content (a footer) says so with :func:`note_change`,
so that a sealer knows the message is no longer what its author signed.
:func:`count` bumps the ``gateway_auth_results_total`` metric.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gateway.model import StashKey, Transaction

__all__ = [
    "AUTH_RESULTS", "MESSAGE_CHANGES", "AuthResult", "add_result", "changes", "count", "note_change",
    "render", "results",
]


@dataclass(frozen=True, slots=True)
class AuthResult:
    """One method's verdict, e.g. ``spf=pass smtp.mailfrom=example.org``.

    :param method: ``spf``, ``dkim``, ``dmarc``, ``iprev`` ...
    :param result: the RFC 8601 result keyword (pass, fail, softfail, neutral, none,
        temperror, permerror, policy)
    :param reason: free text for the ``reason=`` clause
    :param properties: ``ptype.property`` and value pairs, e.g. ``("smtp.mailfrom", "a@b")``,
        ``("header.d", "example.org")``, ``("header.s", "sel1")``
    :param comment: a comment written after the result (RFC 8601 §2.2 allows CFWS there),
        e.g. the ARC sealer, which has no registered property
    """

    method: str
    result: str
    reason: str = ""
    properties: tuple[tuple[str, str], ...] = ()
    comment: str = ""

    def prop(self, name: str) -> str | None:
        return next((v for k, v in self.properties if k == name), None)


AUTH_RESULTS = StashKey[list[AuthResult]]("core.auth_results")
#: What plugins changed in the message's content (``"footer"`` ...), in order.
MESSAGE_CHANGES = StashKey[list[str]]("core.message_changes")

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


def note_change(txn: Transaction, what: str) -> None:
    """Record that a plugin changed the message's content (body or signed fields).

    :param txn: the transaction whose message changed
    :param what: a short name for the change, e.g. ``"footer"``
    """
    found = txn.stash.get(MESSAGE_CHANGES)
    if found is None:
        found = []
        txn.stash[MESSAGE_CHANGES] = found
    found.append(what)


def changes(txn: Transaction) -> list[str]:
    """The content changes recorded with :func:`note_change`, in order."""
    found: list[str] | None = txn.stash.get(MESSAGE_CHANGES)
    return list(found) if found else []


def count(counters: Any, method: str, result: str) -> None:
    """Bump ``gateway_auth_results{method, result}`` (nothing when ``counters`` is None).

    :param counters: ``gateway.counters`` (:class:`gateway.metrics.Counters`)
    :param method: ``arc``, ``dmarc`` ...
    :param result: the result, or an event such as ``arc_override``
    """
    table = getattr(counters, "auth_results", None)
    if table is not None:
        key = (method, result)
        table[key] = table.get(key, 0) + 1


_NOT_CTEXT = re.compile(r"[^\x21-\x27\x2a-\x5b\x5d-\x7e ]")


def _comment(text: str) -> str:
    # RFC 5322 §3.2.2 ctext: no parentheses, backslashes or controls, so no quoting is needed.
    return _NOT_CTEXT.sub("?", " ".join(text.split())[:200])


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
        if r.comment:
            clause += f" ({_comment(r.comment)})"
        if r.reason:
            clause += f" reason={_value(r.reason[:200])}"
        for key, value in r.properties:
            clause += f" {key}={_value(value[:256])}"
        parts.append(clause)
    return f"{authserv_id};\n\t" + ";\n\t".join(parts)
