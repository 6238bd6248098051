"""Helpers for the tests of streamed delivery (issue #17): a large message with the lines
that streaming gets wrong placed at chunk boundaries, a file-backed
:class:`~gateway.content.Content` of it, the whole-message reference forms delivery
must produce, and a guard that fails a test when a large message on disk is read whole
into memory."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.content import CHUNK, Content

__all__ = [
    "HEADER", "WHOLE_READ_LIMIT", "big_message", "file_content", "no_whole_reads", "reference_dot_stuffed",
    "reference_mboxrd",
]

HEADER = (
    b"From: <sender@example.org>\r\nTo: <alice@localhost>\r\nSubject: large\r\n"
    b"Message-ID: <large.streaming@example.org>\r\n\r\n"
)

#: The most of a message on disk a delivery may read at once: a header block's head
#: (gateway.message reads up to 1 MiB to find its end); the messages here are larger.
WHOLE_READ_LIMIT = 1024 * 1024

# Lines placed at message offsets around chunk boundaries (Content.chunks and stream hand
# out CHUNK octets at a time from the start of a file part): what each one checks.
_SPECIALS: dict[int, bytes] = {
    1 * CHUNK: b".a dot starts a chunk, after a chunk that ended in CRLF\r\n",
    2 * CHUNK - 9: b"cr split\r\n",  # its CR ends a chunk, its LF starts the next ...
    2 * CHUNK + 1: b".dot right after that LF\r\n",  # ... and a dot follows
    3 * CHUNK: b"From a separator at the start of a chunk\r\n",
    4 * CHUNK - 2: b"From split after 'Fr'\r\n",
    5 * CHUNK - 3: b">>From quoted, split after '>>F'\r\n",
    6 * CHUNK - 1: b".\r\n",  # a lone dot whose CRLF is in the next chunk
    7 * CHUNK: b".\r\n",  # a lone dot at the start of a chunk: the end of DATA if unstuffed
    8 * CHUNK - 5: b"From \r\n",  # the whole 'From ' ends a chunk
    9 * CHUNK - 1: b">From split after one '>'\r\n",
    10 * CHUNK - 4: b"From  ends with CR\r",  # no LF: the CR must stay
    10 * CHUNK + 15: b"\n..two dots\r\n",
}


def _fill(out: bytearray, to: int, number: int) -> int:
    """Ordinary lines (80 octets at most, CRLF) until ``out`` is ``to`` octets long."""
    while len(out) < to:
        gap = to - len(out)
        n = gap if gap <= 80 else (80 if gap - 80 >= 16 else 60)
        line = b"line %08d, From the middle. dots.. " % number
        out += (line * 3)[: n - 2] + b"\r\n"
        number += 1
    return number


def big_message(size: int = 6 * 1024 * 1024) -> bytes:
    """A message of ``size`` octets (CRLF, at least 11 chunks) with every line of
    ``_SPECIALS`` at its offset, and a last line without its line end."""
    assert size > 11 * CHUNK
    out = bytearray(HEADER)
    number = 0
    for offset, line in sorted(_SPECIALS.items()):
        number = _fill(out, offset, number)
        assert len(out) == offset
        out += line
    tail = b"no line end at the end"
    _fill(out, size - len(tail), number)
    out += tail
    return bytes(out)


@contextlib.contextmanager
def file_content(directory: Path, message: bytes, *, lead: bytes = b"GWQ? some header\n") -> Iterator[Content]:
    """Write ``message`` into a file after ``lead`` (as a queue file holds it after its
    header) and yield a Content of that extent; the file is closed afterwards."""
    path = directory / f"message-{len(message)}"
    path.write_bytes(lead + message)
    fd = os.open(path, os.O_RDONLY)
    try:
        yield Content.of_file(fd, [(len(lead), len(message))])
    finally:
        os.close(fd)


@contextlib.contextmanager
def no_whole_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Make :meth:`Content.read` of more than :data:`WHOLE_READ_LIMIT` octets on disk
    fail (and record its size), for any Content, however it was made (joined, sliced)."""
    reads: list[int] = []
    real = Content.read

    def read(self: Content) -> bytes:
        if not self.is_in_memory and self.size > WHOLE_READ_LIMIT:
            reads.append(self.size)
            raise AssertionError(f"a {self.size}-octet message on disk was read whole into memory")
        return real(self)

    monkeypatch.setattr(Content, "read", read)
    yield reads


def reference_mboxrd(message: bytes) -> bytes:
    """mboxrd quoting as the whole-message implementation did it (before streaming)."""
    text = message.replace(b"\r\n", b"\n")
    text = re.sub(rb"^(>*From )", rb">\1", text, flags=re.MULTILINE)
    if not text.endswith(b"\n"):
        text += b"\n"
    return text + b"\n"


def reference_dot_stuffed(message: bytes) -> bytes:
    """RFC 5321 §4.5.2 as the whole-message implementation did it (before streaming)."""
    data = message.replace(b"\n.", b"\n..")
    if data.startswith(b"."):
        data = b"." + data
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"
