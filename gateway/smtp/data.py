"""Reading the DATA phase: end-of-data detection, limits, smuggling defence.

Only ``CRLF . CRLF`` ends the message (RFC 5321 §4.1.1.4). Any bare CR or bare LF in
the message is refused as a whole (RFC 5321 §2.3.8 allows neither), so that a
sequence such as ``LF . LF``, which a more lenient server further down the line
might take for the end of data, can never carry a second, smuggled message through
us (the "SMTP smuggling" attacks, CVE-2023-51764/51765/51766).

The message is read in large chunks, not line by line, and the checks are done once
on the whole buffer with C-speed byte operations. Past the spool threshold the message
is no longer held: each stretch of whole lines is checked, unstuffed and appended to a
spool file in the queue (:class:`~gateway.queue.spool.Spool`) as it arrives, so memory
stays bounded whatever the message's size.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from dataclasses import dataclass
from typing import Callable

from gateway.queue.spool import Spool
from gateway.verdicts import Reply
from gateway.watchdog import Watchdog

__all__ = ["DataResult", "read_data"]

_TERMINATOR = b"\r\n.\r\n"
_CHUNK = 256 * 1024
_SPOOL_CHUNK = 32 * 1024  # reads once a message is being spooled

REPLY_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
REPLY_BARE_NEWLINE = Reply(
    554, "5.5.2", "Message contains bare CR or LF characters (RFC 5321 section 2.3.8)"
)
REPLY_LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long (RFC 5321 section 4.5.3.1.6)")
REPLY_DISK_FULL = Reply(452, "4.3.1", "Insufficient system storage, try again later")
REPLY_SPOOL_ERROR = Reply(451, "4.3.0", "Queue write failed, try again later")

log = logging.getLogger(__name__)


@dataclass(slots=True)
class DataResult:
    """The outcome of one DATA phase: the message (in memory, or in ``spool``), or the
    reply refusing it (any spool is then already closed and removed)."""

    raw: bytes | None
    error: Reply | None
    received_octets: int
    spool: Spool | None = None


def _push_back(reader: asyncio.StreamReader, data: bytes | bytearray) -> None:
    """Return bytes read past the end of data (pipelined commands) to the reader."""
    if data:
        buffer: bytearray = reader._buffer  # type: ignore[attr-defined]
        buffer[:0] = data


class _Spooling(Exception):
    """The message outgrew the spool threshold: go on with :func:`_read_spooled`."""

    def __init__(self, buf: bytearray, received: int) -> None:
        self.buf = buf
        self.received = received


async def _read_until_end(
    reader: asyncio.StreamReader, max_size: int, timeout: float, watchdog: Watchdog,
    spool_threshold: int | None = None,
) -> tuple[bytearray | None, int]:
    """Read up to the end-of-data marker; returns the dot-stuffed body (ending in CRLF,
    or empty) or ``None`` if it grew past ``max_size``, plus the octets received.

    :raises _Spooling: with what was read so far, once past ``spool_threshold`` octets
    """
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
        del chunk  # not held through the next read
        if not overflow and scan_from < 3 and buf[:3] == b".\r\n":  # "." alone: no message
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
        if spool_threshold is not None and not overflow and len(buf) > max(spool_threshold, 2):
            raise _Spooling(buf, received)
        if overflow or len(buf) > max_size + max_size // 32 + 1024:
            # Past the limit: keep only a tail long enough to find the terminator.
            overflow = True
            del buf[:-4]
            scan_from = len(buf)
            continue
        scan_from = len(buf)


async def read_data(
    reader: asyncio.StreamReader, *, max_size: int, max_line_length: int, timeout: float,
    watchdog: Watchdog | None = None, spool_threshold: int | None = None,
    new_spool: Callable[[], Spool] | None = None,
) -> DataResult:
    """Read one message after the 354 reply.

    :param reader: the session's stream, positioned after the DATA command
    :param max_size: largest message accepted, in octets after dot-unstuffing
    :param max_line_length: longest line accepted including CRLF (0: no limit)
    :param timeout: longest wait for the next chunk (RFC 5321 §4.5.3.2.5: 3 min)
    :param watchdog: the session's (one is made for this call otherwise)
    :param spool_threshold: past this many octets the message goes to a spool file
        from ``new_spool`` as it arrives instead of being held in memory
    :param new_spool: makes that file (required with ``spool_threshold``)
    :returns: the dot-unstuffed message, or the reply that refuses it; the whole
        message is always consumed first, so the session can go on; a spooled message
        is in the result's ``spool`` (the caller closes it)
    :raises TimeoutError: the client went quiet
    :raises ConnectionResetError: the client hung up mid-message
    """
    dog = watchdog or Watchdog()
    if new_spool is None:
        spool_threshold = None
    try:
        try:
            body, received = await _read_until_end(reader, max_size, timeout, dog, spool_threshold)
        except _Spooling as more:
            assert new_spool is not None
            return await _read_spooled(
                reader, more.buf, more.received, new_spool(),
                _Checker(max_size, max_line_length), timeout, dog,
            )
    finally:
        if dog is not watchdog:  # made for this call
            dog.close()
    if body is None:
        return DataResult(None, REPLY_TOO_BIG, received)
    # The whole message is one stretch of the checks a spooled one gets a stretch at a time.
    checker = _Checker(max_size, max_line_length)
    raw = checker.feed(bytes(body))
    if checker.error is not None:
        return DataResult(None, checker.error, received)
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


class _Checker:
    """What :func:`read_data` checks on a message, on the whole of it or a stretch at a
    time (spooled): bare CR or LF (RFC 5321 §2.3.8), dot-unstuffing (§4.5.2), line length
    counting the CRLF (§4.5.3.1.6) and size. Each stretch fed must not end in the CR of a
    CRLF (it ends before one, or after its LF)."""

    __slots__ = ("max_size", "max_content", "at_line_start", "line_length", "size", "error")

    def __init__(self, max_size: int, max_line_length: int) -> None:
        self.max_size = max_size
        self.max_content = max_line_length - 2 if max_line_length else 0
        self.at_line_start = True
        self.line_length = 0  # octets of the line not yet ended, unstuffed
        self.size = 0
        self.error: Reply | None = None

    def feed(self, stretch: bytes) -> bytes:
        """The stretch, unstuffed, or ``b""`` once the message is refused."""
        if self.error is not None or not stretch:
            return b""
        crlf = stretch.count(b"\r\n")
        if stretch.count(b"\n") != crlf or stretch.count(b"\r") != crlf:
            self.error = REPLY_BARE_NEWLINE
            return b""
        data = stretch.replace(b"\r\n.", b"\r\n")  # the same object when there is no dot
        if self.at_line_start and data[:1] == b".":
            data = data[1:]
        if self.max_content:
            first_end = data.find(b"\r\n")
            if first_end < 0:  # the line goes on
                self.line_length += len(data)
                is_too_long = self.line_length > self.max_content
            else:
                is_too_long = self.line_length + first_end > self.max_content or _has_long_line(
                    data, self.max_content
                )
                self.line_length = len(data) - data.rfind(b"\r\n") - 2
            if is_too_long:
                self.error = REPLY_LINE_TOO_LONG
                return b""
        self.at_line_start = stretch[-2:] == b"\r\n"  # as sent: "\r\n." | ".x" is mid-line
        self.size += len(data)
        if self.size > self.max_size:
            self.error = REPLY_TOO_BIG
            return b""
        return data


async def _read_spooled(
    reader: asyncio.StreamReader, buf: bytearray, received: int, spool: Spool,
    checker: _Checker, timeout: float, watchdog: Watchdog,
) -> DataResult:
    """Go on reading after :class:`_Spooling`: check each stretch and append it to the
    spool, keeping only the last few octets (where the end marker may begin) in memory.
    The whole message is consumed even once it is refused; a refused message's spool is
    removed, and so is the spool of a session that ends (or is cancelled) mid-DATA.

    Memory per session stays near two reads of :data:`_SPOOL_CHUNK`: what was read is
    dropped before the write it feeds is awaited (a session waiting on the disk holds
    only the stretch being written), and reads are small, so that a few hundred large
    messages arriving at once cost tens of megabytes, not hundreds."""
    data = bytes(buf)
    buf.clear()  # the caller's (held by its exception) is not kept through the message
    try:
        while True:
            idx = data.find(_TERMINATOR)
            if idx >= 0:
                _push_back(reader, data[idx + 5 :])
                received -= len(data) - (idx + 5)
                stretch, data = data[: idx + 2], b""
                await _append(spool, checker, stretch)
                break
            # The end marker is 5 octets: one that begins before the last 4 would have
            # been found. Never cut between the CR and LF of a line end.
            cut = len(data) - 4
            if cut > 0 and data[cut - 1] == 13:
                cut -= 1
            if cut > 0:
                stretch, data = data[:cut], data[cut:]
                await _append(spool, checker, stretch)
                del stretch
            chunk = await watchdog.wait(reader.read(_SPOOL_CHUNK), timeout)
            if not chunk:
                raise ConnectionResetError("connection closed during DATA")
            received += len(chunk)
            data += chunk
            del chunk
    except BaseException:
        spool.close()
        raise
    if checker.error is not None:
        spool.close()
        return DataResult(None, checker.error, received)
    return DataResult(None, None, received, spool)


async def _append(spool: Spool, checker: _Checker, stretch: bytes) -> None:
    data = checker.feed(stretch)
    del stretch  # the same object when nothing was unstuffed; else not needed again
    if not data:
        return
    try:
        await spool.write(data)
    except OSError as exc:  # keep reading to the end, then refuse
        is_full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        log.error("spool write failed qid=%s: %s", spool.qid, exc)
        checker.error = REPLY_DISK_FULL if is_full else REPLY_SPOOL_ERROR
