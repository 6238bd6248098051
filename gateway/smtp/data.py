"""Reading the DATA phase: end-of-data detection, limits, smuggling defence.

Only ``CRLF . CRLF`` ends the message (RFC 5321 §4.1.1.4). Any bare CR or bare LF in
the message is refused as a whole (RFC 5321 §2.3.8 allows neither), so that a
sequence such as ``LF . LF``, which a more lenient server further down the line
might take for the end of data, can never carry a second, smuggled message through
us (the "SMTP smuggling" attacks, CVE-2023-51764/51765/51766).

The message is read in large chunks, not line by line, and the checks are done once
on the whole buffer with C-speed byte operations.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from gateway.verdicts import Reply
from gateway.watchdog import Watchdog

__all__ = ["DataResult", "read_data"]

_TERMINATOR = b"\r\n.\r\n"
_CHUNK = 256 * 1024

REPLY_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
REPLY_BARE_NEWLINE = Reply(
    554, "5.5.2", "Message contains bare CR or LF characters (RFC 5321 section 2.3.8)"
)
REPLY_LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long (RFC 5321 section 4.5.3.1.6)")


@dataclass(slots=True)
class DataResult:
    """The outcome of one DATA phase: the message, or the reply refusing it."""

    raw: bytes | None
    error: Reply | None
    received_octets: int


def _push_back(reader: asyncio.StreamReader, data: bytes | bytearray) -> None:
    """Return bytes read past the end of data (pipelined commands) to the reader."""
    if data:
        buffer: bytearray = reader._buffer  # type: ignore[attr-defined]
        buffer[:0] = data


async def _read_until_end(
    reader: asyncio.StreamReader, max_size: int, timeout: float, watchdog: Watchdog
) -> tuple[bytearray | None, int]:
    """Read up to the end-of-data marker; returns the dot-stuffed body (ending in CRLF,
    or empty) or ``None`` if it grew past ``max_size``, plus the octets received."""
    buf = bytearray()
    received = 0
    overflow = False
    scan_from = 0
    while True:
        chunk = await watchdog.wait(reader.read(_CHUNK), timeout)
        if not chunk:
            raise ConnectionResetError("connection closed during DATA")
        received += len(chunk)
        buf += chunk
        if not overflow and scan_from == 0 and buf[:3] == b".\r\n":
            _push_back(reader, buf[3:])
            return bytearray(), received - len(buf) + 3
        idx = buf.find(_TERMINATOR, max(0, scan_from - 4))
        if idx >= 0:
            _push_back(reader, buf[idx + 5 :])
            received -= len(buf) - (idx + 5)
            if overflow:
                return None, received
            del buf[idx + 2 :]
            return buf, received
        if overflow or len(buf) > max_size + max_size // 32 + 1024:
            # Past the limit: keep only a tail long enough to find the terminator.
            overflow = True
            del buf[:-4]
            scan_from = len(buf)
            continue
        scan_from = len(buf)


async def read_data(
    reader: asyncio.StreamReader, *, max_size: int, max_line_length: int, timeout: float,
    watchdog: Watchdog | None = None,
) -> DataResult:
    """Read one message after the 354 reply.

    :param reader: the session's stream, positioned after the DATA command
    :param max_size: largest message accepted, in octets after dot-unstuffing
    :param max_line_length: longest line accepted including CRLF (0: no limit)
    :param timeout: longest wait for the next chunk (RFC 5321 §4.5.3.2.5: 3 min)
    :param watchdog: the session's (one is made for this call otherwise)
    :returns: the dot-unstuffed message, or the reply that refuses it; the whole
        message is always consumed first, so the session can go on
    :raises TimeoutError: the client went quiet
    :raises ConnectionResetError: the client hung up mid-message
    """
    dog = watchdog or Watchdog()
    try:
        body, received = await _read_until_end(reader, max_size, timeout, dog)
    finally:
        if dog is not watchdog:  # made for this call
            dog.close()
    if body is None:
        return DataResult(None, REPLY_TOO_BIG, received)
    crlf = body.count(b"\r\n")
    if body.count(b"\n") != crlf or body.count(b"\r") != crlf:
        return DataResult(None, REPLY_BARE_NEWLINE, received)
    # RFC 5321 §4.5.2: delete the leading period of every line that starts with one.
    raw = bytes(body).replace(b"\r\n.", b"\r\n")
    if raw[:1] == b".":
        raw = raw[1:]
    # The limit counts the CRLF (RFC 5321 §4.5.3.1.6: 1000 octets).
    if max_line_length and _has_long_line(raw, max_line_length - 2):
        return DataResult(None, REPLY_LINE_TOO_LONG, received)
    if len(raw) > max_size:
        return DataResult(None, REPLY_TOO_BIG, received)
    return DataResult(raw, None, received)


#: Lines are measured by splitting at CRLF, in windows of this many octets (or twice the
#: limit, if larger) so that a large message never becomes one list of all its lines.
#: Splitting costs about 0.7 ms for 500 KiB, against 4.6 ms for a line-anchored pattern,
#: which steps through every octet (a third of the CPU of a 500 KiB delivery).
_WINDOW = 64 * 1024


def _has_long_line(body: bytes, max_content: int) -> bool:
    """True if some line holds more than ``max_content`` octets before its CRLF."""
    size = len(body)
    if size <= max_content:
        return False
    window = max(_WINDOW, 2 * (max_content + 2))
    start = 0
    while size - start > window:
        end = body.rfind(b"\r\n", start, start + window)
        if end == -1:  # no line end in a window longer than the limit
            return True
        if max(map(len, body[start:end].split(b"\r\n"))) > max_content:
            return True
        start = end + 2
    return max(map(len, body[start:].split(b"\r\n"))) > max_content
