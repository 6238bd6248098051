"""Strict parsing of SMTP paths and ESMTP parameters (RFC 5321 §4.1.2, RFC 6531).

The wire is parsed once, here, into :class:`Address` objects; every later part of the
gateway works on those, never on the raw command text.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

__all__ = ["Address", "AddressError", "parse_params", "parse_path"]

# RFC 5321 §4.1.2
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_DOT_STRING = re.compile(rf"^[{_ATEXT}]+(\.[{_ATEXT}]+)*$")
# qtextSMTP = %d32-33 / %d35-91 / %d93-126 ; quoted-pairSMTP = "\" %d32-126
_QUOTED_STRING = re.compile(r'^"([\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"$')
_SUB_DOMAIN = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?$")
_ESMTP_KEYWORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")
# esmtp-value = 1*(%d33-60 / %d62-126)
_ESMTP_VALUE = re.compile(r"^[\x21-\x3c\x3e-\x7e]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# RFC 5321 §4.5.3.1
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256


class AddressError(ValueError):
    """The path or parameter text is not valid RFC 5321 syntax."""


@dataclass(frozen=True, slots=True)
class Address:
    """A mailbox (``local@domain``), the null path (``<>``) or bare ``postmaster``.

    ``domain`` keeps the client's spelling; :attr:`domain_key` is the lower-cased form
    used for comparisons. The local part is case-preserving, as RFC 5321 requires.
    """

    local: str
    domain: str

    @classmethod
    def null(cls) -> Address:
        return cls("", "")

    @property
    def is_null(self) -> bool:
        return not self.local and not self.domain

    @property
    def domain_key(self) -> str:
        return self.domain.lower().rstrip(".")

    @property
    def local_key(self) -> str:
        return self.local.lower()

    @property
    def is_postmaster(self) -> bool:
        return self.local_key == "postmaster"

    @property
    def is_ascii(self) -> bool:
        return str(self).isascii()

    def __str__(self) -> str:
        if self.is_null:
            return ""
        if not self.domain:
            return self.local
        return f"{self.local}@{self.domain}"

    def bracketed(self) -> str:
        return f"<{self}>"

    @classmethod
    def parse(cls, text: str, *, utf8: bool = True) -> Address:
        """Parse a plain ``local@domain`` (no brackets)."""
        return _parse_mailbox(text, utf8=utf8)


def _check_domain(domain: str, utf8: bool) -> None:
    if not domain:
        raise AddressError("empty domain")
    if len(domain.encode("utf-8")) > MAX_DOMAIN:
        raise AddressError("domain too long")
    if domain.startswith("["):
        if not domain.endswith("]"):
            raise AddressError("unterminated address literal")
        _check_address_literal(domain[1:-1])
        return
    labels = domain.split(".")
    for label in labels:
        if utf8 and not label.isascii():
            # RFC 6531: U-labels are allowed; they must still be valid IDNA.
            try:
                label.encode("idna")
            except UnicodeError as exc:
                raise AddressError(f"invalid internationalised label {label!r}") from exc
            continue
        if not _SUB_DOMAIN.match(label) or len(label) > 63:
            raise AddressError(f"invalid domain label {label!r}")


def _check_address_literal(text: str) -> None:
    import ipaddress

    if text.lower().startswith("ipv6:"):
        try:
            ipaddress.IPv6Address(text[5:])
        except ValueError as exc:
            raise AddressError("invalid IPv6 address literal") from exc
        return
    try:
        ipaddress.IPv4Address(text)
    except ValueError as exc:
        raise AddressError("invalid address literal") from exc


def _split_local(text: str) -> tuple[str, str]:
    """Split at the ``@`` that ends the local part (a quoted one may contain ``@``)."""
    if text.startswith('"'):
        i = 1
        while i < len(text):
            if text[i] == "\\":
                i += 2
                continue
            if text[i] == '"':
                break
            i += 1
        else:
            raise AddressError("unterminated quoted local part")
        end = i + 1
        if end >= len(text) or text[end] != "@":
            raise AddressError("missing domain")
        return text[:end], text[end + 1 :]
    local, at, domain = text.rpartition("@")
    if not at:
        raise AddressError("missing domain")
    return local, domain


def _parse_mailbox(text: str, *, utf8: bool) -> Address:
    if _CONTROL.search(text):
        raise AddressError("control character in address")
    return _parse_checked_mailbox(text, utf8)


@functools.lru_cache(maxsize=4096)
def _parse_checked_mailbox(text: str, utf8: bool) -> Address:
    """:func:`_parse_mailbox` of a text without control characters.

    Remembered (addresses are immutable): the same senders and recipients come back,
    and a message's addresses are parsed again after the queue (delivery, routing).
    A text that fails raises again each time."""
    if not utf8 and not text.isascii():
        raise AddressError("non-ASCII address without SMTPUTF8")
    local, domain = _split_local(text)
    if not local:
        raise AddressError("empty local part")
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise AddressError("local part too long")
    if local.startswith('"'):
        if not _QUOTED_STRING.match(local) and not (utf8 and _quoted_utf8_ok(local)):
            raise AddressError("invalid quoted local part")
    elif not _DOT_STRING.match(local) and not (utf8 and _dot_utf8_ok(local)):
        raise AddressError("invalid local part")
    _check_domain(domain, utf8)
    return Address(local, domain)


def _dot_utf8_ok(local: str) -> bool:
    # RFC 6531 §3.3: atext also includes UTF8-non-ascii.
    ascii_form = "".join("a" if ord(c) > 127 else c for c in local)
    return bool(_DOT_STRING.match(ascii_form))


def _quoted_utf8_ok(local: str) -> bool:
    ascii_form = "".join("a" if ord(c) > 127 else c for c in local)
    return bool(_QUOTED_STRING.match(ascii_form))


def parse_path(text: str, *, allow_null: bool, allow_postmaster: bool, utf8: bool) -> tuple[Address, str]:
    """Parse ``<path> [params]`` as it follows ``MAIL FROM:`` or ``RCPT TO:``.

    :param text: the argument after the colon, leading spaces allowed
    :param allow_null: ``<>`` is valid (reverse-path)
    :param allow_postmaster: ``<postmaster>`` without domain is valid (RCPT only)
    :param utf8: the transaction uses SMTPUTF8, so UTF-8 is allowed
    :returns: the address and the remaining parameter text
    :raises AddressError: on any syntax error
    """
    text = text.lstrip(" ")
    if not text.startswith("<"):
        raise AddressError("path must be enclosed in angle brackets")
    end = _closing_bracket(text)
    inner, rest = text[1:end], text[end + 1 :]
    if rest and not rest.startswith(" "):
        raise AddressError("garbage after path")
    if len(inner.encode("utf-8")) + 2 > MAX_PATH:
        raise AddressError("path too long")
    if _CONTROL.search(inner):  # _parse_mailbox need not look again
        raise AddressError("control character in address")
    if not inner:
        if not allow_null:
            raise AddressError("null path not allowed here")
        return Address.null(), rest.strip(" ")
    # RFC 5321 §3.6.1 / §4.1.2: a source route (A-d-l) is accepted and ignored.
    if inner.startswith("@"):
        route, colon, inner = inner.partition(":")
        if not colon:
            raise AddressError("malformed source route")
        for hop in route.split(","):
            if not hop.startswith("@"):
                raise AddressError("malformed source route")
            _check_domain(hop[1:], utf8)
    if allow_postmaster and inner.lower() == "postmaster":
        return Address(inner, ""), rest.strip(" ")
    return _parse_checked_mailbox(inner, utf8), rest.strip(" ")


def _closing_bracket(text: str) -> int:
    """Index of the ``>`` closing the path, honouring quoted local parts."""
    end = text.find(">")
    if end > 0 and '"' not in text[:end]:  # nothing quoted before it: the first one closes
        if "<" in text[1:end]:
            raise AddressError("nested angle bracket")
        return end
    return _closing_bracket_quoted(text)


def _closing_bracket_quoted(text: str) -> int:
    # Character by character: a quoted local part may hold ">" and "<".
    in_quote = False
    i = 1
    while i < len(text):
        c = text[i]
        if in_quote:
            if c == "\\":
                i += 2
                continue
            if c == '"':
                in_quote = False
        elif c == '"':
            in_quote = True
        elif c == ">":
            return i
        elif c == "<":
            raise AddressError("nested angle bracket")
        i += 1
    raise AddressError("unterminated angle bracket")


def parse_params(text: str) -> dict[str, str | None]:
    """Parse ESMTP parameters (``KEY=value KEY2``) into an upper-cased dict.

    :raises AddressError: on a malformed or repeated parameter
    """
    params: dict[str, str | None] = {}
    for item in text.split(" "):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not _ESMTP_KEYWORD.match(key):
            raise AddressError(f"malformed parameter {key[:32]!r}")
        if eq and not _ESMTP_VALUE.match(value):
            raise AddressError(f"malformed value for {key.upper()}")
        key = key.upper()
        if key in params:
            raise AddressError(f"duplicate parameter {key}")
        params[key] = value if eq else None
    return params


def decode_xtext(value: str) -> str:
    """Decode RFC 3461 §4 xtext (``+HH`` escapes), as in ENVID and ORCPT."""
    out = []
    i = 0
    while i < len(value):
        c = value[i]
        if c == "+":
            hexpart = value[i + 1 : i + 3]
            if len(hexpart) != 2 or not all(ch in "0123456789ABCDEF" for ch in hexpart):
                raise AddressError("malformed xtext")
            out.append(chr(int(hexpart, 16)))
            i += 3
            continue
        out.append(c)
        i += 1
    return "".join(out)
