"""MAIL FROM and RCPT TO parameters: from the parsed dict to typed objects.

Pure functions: each returns the typed parameters, or the reply that refuses them and
whether that reply counts against the session's error budget.
"""

from __future__ import annotations

from gateway.address import AddressError, decode_xtext
from gateway.delivery.verp import DEFAULT_DELIMITERS, check_delimiters
from gateway.model import MailParams, RcptParams
from gateway.verdicts import Reply

__all__ = ["Refusal", "mail_params", "rcpt_params"]

R_BAD_PARAM = Reply(555, "5.5.4", "Unsupported MAIL or RCPT parameter")
_NOTIFY = frozenset({"SUCCESS", "FAILURE", "DELAY"})


class Refusal(Exception):
    """A parameter refused with ``reply``; ``bad`` when it is a syntax error."""

    def __init__(self, reply: Reply, bad: bool = True) -> None:
        super().__init__(reply.text)
        self.reply = reply
        self.bad = bad


def mail_params(
    params: dict[str, str | None], *, esmtp: bool, max_size: int, allow_verp: bool = False
) -> MailParams:
    """SIZE (RFC 1870), BODY (RFC 6152), SMTPUTF8 (RFC 6531), RET and ENVID (RFC 3461),
    and Postfix's ``XVERP`` (our default delimiters ``-=``) / ``XVERP=+=`` when ``allow_verp``
    (our own users only).

    :raises Refusal: an unknown or malformed parameter, or a declared size over ``max_size``
    """
    if params and not esmtp:
        raise Refusal(Reply(501, "5.5.4", "Parameters need EHLO"))
    mp = MailParams()
    for key, value in params.items():
        if key == "SIZE" and value is not None and value.isdigit() and len(value) < 20:
            mp.size = int(value)
            if mp.size > max_size:
                raise Refusal(Reply(552, "5.3.4", "Message size exceeds fixed maximum message size"), bad=False)
        elif key == "BODY" and value is not None and value.upper() in ("7BIT", "8BITMIME"):
            mp.body = value.upper()
        elif key == "SMTPUTF8" and value is None:
            mp.smtputf8 = True
        elif key == "RET" and value is not None and value.upper() in ("FULL", "HDRS"):
            mp.ret = value.upper()
        elif key == "ENVID" and value is not None and len(value) <= 100:
            try:
                mp.envid = decode_xtext(value)
            except AddressError:
                raise Refusal(Reply(501, "5.5.4", "Malformed ENVID")) from None
        elif key == "XVERP" and allow_verp:
            try:
                mp.verp = DEFAULT_DELIMITERS if value is None else check_delimiters(value)
            except ValueError:
                raise Refusal(Reply(501, "5.5.4", f"Invalid XVERP parameter (two of {'-=+'!r})")) from None
        elif key in ("SIZE", "BODY", "SMTPUTF8", "RET", "ENVID"):
            raise Refusal(Reply(501, "5.5.4", f"Invalid {key} parameter"))
        else:
            raise Refusal(R_BAD_PARAM, bad=False)
    return mp


def rcpt_params(params: dict[str, str | None]) -> RcptParams:
    """NOTIFY and ORCPT (RFC 3461 §4).

    :raises Refusal: an unknown or malformed parameter
    """
    rp = RcptParams()
    for key, value in params.items():
        if key == "NOTIFY" and value:
            items = tuple(v.upper() for v in value.split(","))
            if items == ("NEVER",) or (items and set(items) <= _NOTIFY and len(set(items)) == len(items)):
                rp.notify = items
                continue
            raise Refusal(Reply(501, "5.5.4", "Invalid NOTIFY parameter"))
        if key == "ORCPT" and value and ";" in value:
            addr_type, _, xtext = value.partition(";")
            try:
                rp.orcpt = f"{addr_type};{decode_xtext(xtext)}"
            except AddressError:
                raise Refusal(Reply(501, "5.5.4", "Malformed ORCPT")) from None
            continue
        if key in ("NOTIFY", "ORCPT"):
            raise Refusal(Reply(501, "5.5.4", f"Invalid {key} parameter"))
        raise Refusal(R_BAD_PARAM, bad=False)
    return rp
