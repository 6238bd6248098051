"""gateway.delivery.remote.wire: dot-stuffing and the MAIL facts of a message handed over
in chunks give what the whole message gives (issue #17: a large message is sent from
its file, a chunk at a time)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.content import CHUNK
from gateway.delivery.remote.wire import DotStuffer, dot_stuffed, header_block, outgoing
from tests.streaming import big_message, file_content, no_whole_reads, reference_dot_stuffed

# Octets that make the cases: line ends, dots, and a non-ASCII one.
_TEXT = st.binary(max_size=60).map(lambda b: bytes(b"\r\n.a\xc3"[x % 5] for x in b))


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


@given(_TEXT, st.lists(st.integers(min_value=0, max_value=10_000), max_size=8))
def test_stuffing_in_any_pieces_is_the_whole_message_stuffed(message: bytes, cuts: list[int]) -> None:
    stuffer = DotStuffer()
    pieces = [stuffer.feed(p) for p in _split(message, cuts)]
    assert b"".join(pieces) + stuffer.end() == reference_dot_stuffed(message)
    assert dot_stuffed(message) == reference_dot_stuffed(message)


def test_a_dot_at_the_start_of_a_chunk_is_stuffed() -> None:
    """The line after a chunk that ended in CRLF: unstuffed, '.\\r\\n' there would end
    the DATA early and the rest would be read as commands."""
    stuffer = DotStuffer()
    sent = stuffer.feed(b"Subject: x\r\n\r\nfirst\r\n") + stuffer.feed(b".\r\nrest\r\n") + stuffer.end()
    assert sent == b"Subject: x\r\n\r\nfirst\r\n..\r\nrest\r\n.\r\n"


@given(_TEXT, st.lists(st.integers(min_value=0, max_value=10_000), max_size=8))
def test_scan_in_pieces_agrees_with_the_whole_message(message: bytes, cuts: list[int]) -> None:
    from gateway.delivery.remote import wire

    is_8bit, is_header_ascii = wire._scan(_split(message, cuts))
    assert is_8bit == (not message.isascii())
    assert is_header_ascii == header_block(message).isascii()


def test_outgoing_reads_a_message_on_disk_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    message = big_message()
    # The only 8-bit octet, in the header block after a chunk boundary's worth of headers.
    head = b"X-Long: " + b"a" * (CHUNK + 10) + b"\r\nSubject: caf\xc3\xa9\r\n\r\n"
    with no_whole_reads(monkeypatch) as reads, file_content(tmp_path, message) as plain:
        got = asyncio.run(outgoing(plain))
        assert (got.size, got.is_8bit, got.is_header_ascii) == (len(message), False, True)
        with file_content(tmp_path, head + message) as eight:
            got = asyncio.run(outgoing(eight))
            assert (got.is_8bit, got.is_header_ascii) == (True, False)
    assert reads == []
