"""Reading rspamd's ``/checkv2`` answer and applying what it asks to the message.

Used by ``data_rspamd``. The answer is JSON (rspamd's "protocol v2")::

    {"action": "add header", "score": 7.1, "required_score": 15.0,
     "symbols": {"R_SPF_FAIL": {"score": 1.0, ...}, ...},
     "subject": "***SPAM*** hello",
     "milter": {"add_headers": {"X-Spamd-Result": {"value": "...", "order": 0}},
                "remove_headers": {"X-Spam": 0}}}

Everything in it came over the network from a daemon that parsed a hostile message, so
it is checked for type and size before use, and header text is made safe for
:meth:`gateway.model.Message.prepend_header`.
"""

from __future__ import annotations

import email.header
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from gateway.model import Message
from plugins._scanner import ScannerError

__all__ = ["RspamdReply", "apply_milter_headers", "parse_checkv2", "rewrite_subject"]

log = logging.getLogger("plugins.data_rspamd")

_HEADER_NAME = re.compile(r"^[!-9;-~]{1,76}$")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_MAX_VALUE = 900  # RFC 5322 §2.1.1: 998 octets a line, with room for the name
_MAX_MILTER_HEADERS = 30


@dataclass(frozen=True, slots=True)
class RspamdReply:
    """The parts of rspamd's answer the plugin uses."""

    action: str
    score: float
    required: float
    symbols: tuple[str, ...] = ()
    subject: str | None = None
    milter: dict[str, Any] = field(default_factory=dict)


def parse_checkv2(body: bytes) -> RspamdReply:
    """Parse a ``/checkv2`` answer.

    :param body: the JSON body
    :raises ScannerError: not JSON, an ``error`` answer, or fields of the wrong type
    """
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ScannerError(f"rspamd's answer is not JSON: {body[:80]!r}") from None
    if not isinstance(data, dict):
        raise ScannerError("rspamd's answer is not a JSON object")
    if "error" in data and "action" not in data:
        raise ScannerError(f"rspamd error: {str(data['error'])[:120]}")
    action, score, required = data.get("action"), data.get("score"), data.get("required_score")
    if not isinstance(action, str) or not isinstance(score, (int, float)) or isinstance(score, bool):
        raise ScannerError("rspamd's answer lacks action or score")
    if not isinstance(required, (int, float)) or isinstance(required, bool):
        required = 0.0
    symbols = data.get("symbols")
    names = tuple(sorted(symbols)) if isinstance(symbols, dict) else ()
    subject = data.get("subject")
    milter = data.get("milter")
    return RspamdReply(
        action=action.strip().lower(),
        score=float(score),
        required=float(required),
        symbols=names,
        subject=subject if isinstance(subject, str) else None,
        milter=milter if isinstance(milter, dict) else {},
    )


def _safe_value(text: str) -> str:
    """A header value as prepend_header accepts it: folded lines start with whitespace."""
    text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", ""))[:_MAX_VALUE]
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
        return ""
    return "\n".join([lines[0].strip()] + ["\t" + line.strip() for line in lines[1:]])


def _encode(text: str) -> str:
    """Non-ASCII header text as RFC 2047 encoded words (no SMTPUTF8 assumed)."""
    if text.isascii():
        return text
    return email.header.Header(text, "utf-8").encode(linesep="\n")


def rewrite_subject(message: Message, proposed: str | None, prefix: str) -> None:
    """Replace the Subject with rspamd's proposal, or ``prefix`` + the old one.

    :param message: the message
    :param proposed: the ``subject`` of rspamd's answer, if any
    :param prefix: the fallback marker (``[SPAM]``)
    """
    old = message.header_values("Subject")
    if proposed:
        new = proposed
    else:
        decoded = str(email.header.make_header(email.header.decode_header(old[0]))) if old else ""
        new = f"{prefix} {decoded}".strip()
    value = _safe_value(_encode(_safe_value(new).replace("\n\t", " ")))
    if not value:
        return
    message.remove_headers("Subject")
    message.prepend_header("Subject", value)


def _milter_values(spec: Any) -> list[str]:
    """The values of one ``add_headers`` entry: a string, ``{value, order}`` or a list of them."""
    items = spec if isinstance(spec, list) else [spec]
    out = []
    for item in items:
        if isinstance(item, dict):
            item = item.get("value")
        if isinstance(item, str):
            out.append(item)
    return out


def apply_milter_headers(message: Message, milter: dict[str, Any]) -> None:
    """Apply rspamd's ``milter.remove_headers`` then ``milter.add_headers``.

    Removal touches only headers the client sent; a bad header name is skipped with a
    WARNING.

    :param message: the message
    :param milter: the ``milter`` object of the answer
    """
    remove = milter.get("remove_headers")
    if isinstance(remove, dict):
        for name in list(remove)[:_MAX_MILTER_HEADERS]:
            if isinstance(name, str) and _HEADER_NAME.match(name):
                message.remove_headers(name)
    add = milter.get("add_headers")
    if not isinstance(add, dict):
        return
    for name, spec in list(add.items())[:_MAX_MILTER_HEADERS]:
        if not (isinstance(name, str) and _HEADER_NAME.match(name)):
            log.warning("data_rspamd: skipping milter header with a bad name %r", str(name)[:40])
            continue
        for value in _milter_values(spec)[:5]:
            safe = _safe_value(_encode(value))
            if safe:
                message.prepend_header(name, safe)
