"""The ``Received:`` trace header (RFC 5321 §4.4), added last, just before the queue.

Hook: ``gateway_queue``. Adds, above all other headers::

    Received: from <helo> ([<client ip>])
            by <our hostname> with <protocol> id <queue id>
            (using <TLS version> with cipher <cipher>)
            for <recipient>; <date>

The protocol is ``SMTP``/``ESMTP`` with ``S`` (TLS) and ``A`` (authenticated) suffixes,
``UTF8`` forms for SMTPUTF8 (RFC 3848, RFC 6531). The HELO name is client-supplied:
anything but letters, digits and ``.-_:[]`` is replaced, and it is cut to 64
characters, so it can never inject a header or break the syntax. ``for <...>`` names
the recipient only when there is exactly one (never disclose a Bcc list).

Settings: ``show_tls`` (default true), ``show_auth_login`` (default false: do not tell
recipients a user's login).

A plugin that sets :data:`HIDE_CLIENT` on the transaction's stash (``queue_submission_cleanup``
with ``hide_client``) gets a header without the ``from`` clause, as for locally submitted
mail (RFC 5322 §3.6.7 allows it): ``Received: by <our hostname> with ESMTPSA id ...``.
"""

from __future__ import annotations

import datetime
import email.utils
import re
import time
from dataclasses import dataclass, field

from gateway.context import Gateway
from gateway.hooks import hookimpl
from gateway.model import Message, Session, StashKey, Transaction

__all__ = ["HIDE_CLIENT", "Settings", "protocol_name", "received_header"]

#: Set to true by a plugin that wants the client's HELO name and address left out.
HIDE_CLIENT = StashKey[bool]("received.hide_client")

_UNSAFE = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")
# A recipient is named only in its plain dot-atom form (no quoting, no comments).
_PLAIN_ADDRESS = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\-]{1,64}@[A-Za-z0-9.\-\[\]:]{1,255}$")


@dataclass(frozen=True)
class Settings:
    """Settings of ``queue_received_header``."""

    show_tls: bool = field(default=True, metadata={"doc": "name the TLS version and cipher"})
    show_auth_login: bool = field(default=False, metadata={"doc": "name the authenticated login"})


def protocol_name(session: Session, txn: Transaction) -> str:
    """RFC 3848 / RFC 6531 ``with`` keyword for this session."""
    if not session.is_esmtp:
        return "SMTP"
    suffix = ("S" if session.has_tls else "") + ("A" if session.is_authenticated else "")
    return ("UTF8SMTP" if txn.params.smtputf8 else "ESMTP") + suffix


def _clean(text: str, limit: int = 64) -> str:
    return _UNSAFE.sub("_", text)[:limit] or "unknown"


_date_cache: tuple[int, str] = (-1, "")


def _date_now() -> str:
    """RFC 5322 date-time of now, in local time; formatted once per second."""
    global _date_cache
    second = int(time.time())
    if _date_cache[0] != second:
        _date_cache = (second, email.utils.format_datetime(datetime.datetime.fromtimestamp(second).astimezone()))
    return _date_cache[1]


def received_header(session: Session, txn: Transaction, hostname: str, settings: Settings) -> str:
    """The header value, folded with ``\\n\\t`` between clauses."""
    parts = []
    if not txn.stash.get(HIDE_CLIENT):
        parts.append(f"from {_clean(session.helo or 'unknown')} ([{session.peer_ip}])")
    parts.append(f"by {hostname} with {protocol_name(session, txn)} id {txn.queue_id}")
    if settings.show_tls and session.has_tls:
        parts.append(f"(using {_clean(session.tls_version or '')} with cipher {_clean(session.tls_cipher or '')})")
    if settings.show_auth_login and session.auth_login:
        parts.append(f"(authenticated as {_clean(session.auth_login)})")
    when = _date_now()
    rcpt = str(txn.recipients[0].address) if len(txn.recipients) == 1 else ""
    if rcpt and _PLAIN_ADDRESS.match(rcpt):
        parts.append(f"for <{rcpt}>; {when}")
    else:
        parts[-1] += f"; {when}"
    return "\n\t".join(parts)


@hookimpl
def gateway_queue(
    session: Session, txn: Transaction, message: Message, gateway: Gateway, settings: Settings
) -> None:
    message.prepend_header("Received", received_header(session, txn, gateway.hostname, settings))
