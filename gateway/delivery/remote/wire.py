"""How an SMTP client writes what it sends: MAIL and RCPT with the parameters the server's
extensions allow, xtext (RFC 3461) and the message transparency of DATA (RFC 5321
§4.5.2), for a message handed over whole or in chunks.

A queued message may be a file on disk (:class:`~gateway.content.Content`): what the
client must know before MAIL (is it 8-bit, is its header section ASCII) is learned in
one pass over its chunks (:func:`outgoing`), and the dot-stuffing carries its state from
one chunk to the next (:class:`DotStuffer`), so no step holds the whole message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gateway.content import CHUNK, Content
from gateway.model import Envelope, QueuedRecipient

__all__ = [
    "DotStuffer", "Outgoing", "dot_stuffed", "header_block", "mail_command", "outgoing", "rcpt_command", "xtext",
]

_HEADER_END = b"\r\n\r\n"


def xtext(value: str) -> str:
    """RFC 3461 §4 xtext: ``+HH`` for ``+``, ``=``, controls, space and non-ASCII octets."""
    out = []
    for byte in value.encode("utf-8"):
        if 33 <= byte <= 126 and byte not in (43, 61):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


def mail_command(envelope: Envelope, message: Outgoing, extensions: Mapping[str, str]) -> str:
    """``MAIL FROM:<...>`` with the parameters ``extensions`` (the server's EHLO
    keywords, upper case) allow."""
    params = []
    if "SIZE" in extensions:
        params.append(f"SIZE={message.size}")
    if "8BITMIME" in extensions and (message.is_8bit or envelope.body.upper() == "8BITMIME"):
        params.append("BODY=8BITMIME")
    if envelope.smtputf8 and "SMTPUTF8" in extensions:
        params.append("SMTPUTF8")
    if "DSN" in extensions:  # RFC 3461 §4.3, §4.4
        if envelope.ret and envelope.ret.upper() in ("FULL", "HDRS"):
            params.append(f"RET={envelope.ret.upper()}")
        if envelope.envid:
            params.append(f"ENVID={xtext(envelope.envid)}")
    return " ".join([f"MAIL FROM:<{envelope.sender}>", *params])


def rcpt_command(rcpt: QueuedRecipient, extensions: Mapping[str, str]) -> str:
    """``RCPT TO:<...>`` with the DSN parameters, when the server has DSN."""
    params = []
    if "DSN" in extensions:  # RFC 3461 §4.1, §4.2
        if rcpt.notify:
            params.append("NOTIFY=" + ",".join(n.upper() for n in rcpt.notify))
        if rcpt.orcpt and ";" in rcpt.orcpt:
            addr_type, _, original = rcpt.orcpt.partition(";")
            params.append(f"ORCPT={addr_type};{xtext(original)}")
    return " ".join([f"RCPT TO:<{rcpt.address}>", *params])


class DotStuffer:
    """RFC 5321 §4.5.2 transparency for a message handed over in chunks.

    A ``.`` that starts a line is doubled, also when the line starts a chunk (the
    previous chunk ended in LF); :meth:`end` adds a missing final CRLF and the
    terminating ``.CRLF``.
    """

    __slots__ = ("_at_line_start", "_tail")

    def __init__(self) -> None:
        self._at_line_start = True  # the first octet starts a line
        self._tail = b""  # the last two octets handed out, for end()

    def feed(self, chunk: bytes | memoryview) -> bytes:
        """``chunk`` stuffed (a copy; nothing is held back)."""
        data = bytes(chunk)
        if not data:
            return data
        out = data.replace(b"\n.", b"\n..")
        if self._at_line_start and out.startswith(b"."):
            out = b"." + out
        self._at_line_start = out.endswith(b"\n")
        self._tail = (self._tail + out[-2:])[-2:]
        return out

    def end(self) -> bytes:
        """What ends the DATA: a CRLF if the message did not end in one, then ``.CRLF``."""
        if self._tail and self._tail != b"\r\n":
            return b"\r\n.\r\n"
        return b".\r\n"


def dot_stuffed(message: bytes) -> bytes:
    """RFC 5321 §4.5.2 transparency, plus the terminating ``CRLF.CRLF``."""
    stuffer = DotStuffer()
    return stuffer.feed(message) + stuffer.end()


def header_block(message: bytes) -> bytes:
    """The header section of ``message`` (everything before the first empty line)."""
    end = message.find(_HEADER_END)
    return message if end < 0 else message[:end]


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message ready for :meth:`SmtpConnection.send`, with what MAIL needs to know.

    :ivar content: the message, CRLF line ends, not dot-stuffed
    :ivar is_8bit: some octet is not ASCII (RFC 6152: BODY=8BITMIME, or refusal)
    :ivar is_header_ascii: the header section is ASCII (RFC 6531: else SMTPUTF8 needed)
    """

    content: Content
    is_8bit: bool
    is_header_ascii: bool

    @property
    def size(self) -> int:
        return self.content.size


def _scan(chunks: Iterable[bytes | memoryview]) -> tuple[bool, bool]:
    """(is 8-bit, is the header section ASCII) in one pass, stopping as soon as both are
    known. The header section ends at the first empty line, even across chunks."""
    is_8bit = False
    header_ascii: bool | None = None
    carry = b""  # the last 3 octets seen, while the header section's end is not found
    for chunk in chunks:
        data = bytes(chunk)
        if header_ascii is None:
            seen = carry + data
            end = seen.find(_HEADER_END)
            if end >= 0:
                header_ascii = seen[:end].isascii()
            elif not seen.isascii():
                header_ascii = False
            carry = seen[-3:]
        if not is_8bit and not data.isascii():
            is_8bit = True
        if is_8bit and header_ascii is not None:
            break
    return is_8bit, True if header_ascii is None else header_ascii


async def outgoing(message: bytes | Content | Outgoing) -> Outgoing:
    """The :class:`Outgoing` form of ``message``: a message on disk is read through once,
    in chunks, on a thread (8-bit octets may be anywhere in it)."""
    if isinstance(message, Outgoing):
        return message
    if isinstance(message, bytes):  # the common case, one pass each
        is_8bit = not message.isascii()
        return Outgoing(Content.of_bytes(message), is_8bit, not is_8bit or header_block(message).isascii())
    content = message
    if content.is_in_memory:
        is_8bit, is_header_ascii = _scan(content.chunks(CHUNK))
    else:
        is_8bit, is_header_ascii = await asyncio.to_thread(_scan, content.chunks(CHUNK))
    return Outgoing(content, is_8bit, is_header_ascii)
