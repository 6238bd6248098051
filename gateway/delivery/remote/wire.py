"""How an SMTP client writes what it sends: xtext (RFC 3461) and the message transparency
of DATA (RFC 5321 §4.5.2)."""

from __future__ import annotations

__all__ = ["dot_stuffed", "header_block", "xtext"]


def xtext(value: str) -> str:
    """RFC 3461 §4 xtext: ``+HH`` for ``+``, ``=``, controls, space and non-ASCII octets."""
    out = []
    for byte in value.encode("utf-8"):
        if 33 <= byte <= 126 and byte not in (43, 61):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


def dot_stuffed(message: bytes) -> bytes:
    """RFC 5321 §4.5.2 transparency, plus the terminating ``CRLF.CRLF``."""
    data = message.replace(b"\n.", b"\n..")
    if data.startswith(b"."):
        data = b"." + data
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


def header_block(message: bytes) -> bytes:
    """The header section of ``message`` (everything before the first empty line)."""
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[:end]
