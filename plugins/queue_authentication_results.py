"""The ``Authentication-Results:`` header (RFC 8601) for the SPF, DKIM and DMARC results.

Hook: ``gateway_queue``. First removes every ``Authentication-Results`` field that
claims our authserv-id: it arrived with the message, so someone outside forged it to make
a filter or a mail reader downstream trust a result we never gave (RFC 8601 §5: a border
MTA MUST remove them). Fields of other authserv-ids are left alone. Then adds one field
above the others with every result the plugins recorded through :mod:`gateway.authres`
(``mail_spf``, ``data_dkim_verify``, ``data_dmarc``), in the order they were recorded::

    Authentication-Results: mx.example.net;
            spf=pass smtp.mailfrom=alice@example.org;
            dkim=pass header.d=example.org header.s=sel1 header.b=AbCdEfGh;
            dmarc=pass header.from=example.org policy.dmarc=reject

Place it before ``queue_received_header`` so our ``Received:`` stays the topmost field
(and before ``queue_dkim_sign``, which does not sign it anyway).

Settings: ``authserv_id`` (default empty: the gateway's hostname), ``add_when_empty``
(default false: without any result, add no header rather than ``<id>; none``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from gateway.authres import render, results
from gateway.context import Gateway
from gateway.hooks import hookimpl
from gateway.model import Message, Transaction

__all__ = ["Settings", "authserv_id_of"]

log = logging.getLogger("plugins.queue_authentication_results")

HEADER = "Authentication-Results"
_COMMENT = re.compile(r"\((?:[^()\\]|\\.)*\)")


@dataclass(frozen=True)
class Settings:
    """Settings of ``queue_authentication_results``."""

    authserv_id: str = field(default="", metadata={"doc": "our authserv-id; empty: the gateway's hostname"})
    add_when_empty: bool = field(
        default=False, metadata={"doc": "add '<id>; none' when no plugin recorded a result"}
    )


def authserv_id_of(value: str) -> str:
    """The authserv-id an ``Authentication-Results`` value claims (RFC 8601 §2.2).

    Comments (nested ones too) are dropped, then the id is what precedes the first
    ``;`` or the optional version number.

    :param value: the field's value, possibly folded
    """
    text = value
    for _ in range(8):  # nested comments: strip the innermost each round
        stripped = _COMMENT.sub(" ", text)
        if stripped == text:
            break
        text = stripped
    head = text.split(";", 1)[0].split()
    return head[0].strip('"').lower() if head else ""


@hookimpl
def gateway_queue(txn: Transaction, message: Message, gateway: Gateway, settings: Settings) -> None:
    ours = settings.authserv_id or gateway.hostname or gateway.policy.server.effective_hostname()
    removed = message.remove_headers(HEADER, lambda value: authserv_id_of(value) == ours.lower())
    if removed:
        log.info("txn=%s removed %d forged %s field(s) claiming %s", txn.id, removed, HEADER, ours)
    found = results(txn)
    if found or settings.add_when_empty:
        message.prepend_header(HEADER, render(ours, found))
    return None
