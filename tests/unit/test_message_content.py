"""A message spooled to a file reads, parses and writes exactly as the same message in
memory (gateway/message.py over gateway/content.py), without holding its body."""

from __future__ import annotations

import asyncio
import os
import tempfile

import pytest

from gateway.content import Content
from gateway.message import Message

SAMPLES = [
    b"Subject: hi\r\nX-Spam: yes\r\nFrom: a@example.org\r\n\r\nbody line\r\n.dot\r\n",
    b"Subject: folded\r\n\tcontinued\r\nX-Spam: no\r\n\r\n",
    b"Subject: no blank line\r\nX-Spam: yes\r\n",
    b"\r\nno headers at all\r\n",
    b"Subject: x\r\nnot a header line\r\nmore\r\n",
    b"Subject: big\r\n\r\n" + b"0123456789" * 30000 + b"\r\n",
]


@pytest.fixture
def spooled():
    files = []

    def make(data: bytes, offset: int = 128) -> Message:
        fd, path = tempfile.mkstemp()
        os.unlink(path)
        os.pwrite(fd, b"#" * offset + data + b"trailer", 0)
        files.append(fd)
        return Message(Content.of_file(fd, [(offset, len(data))]))

    yield make
    for fd in files:
        os.close(fd)


def _modify(msg: Message) -> None:
    msg.prepend_header("Received", "from test\n\tby us")
    msg.remove_headers("X-Spam")


@pytest.mark.parametrize("data", SAMPLES)
@pytest.mark.parametrize("modify", ["none", "headers", "body", "both"])
def test_spooled_message_matches_memory(spooled, data: bytes, modify: str) -> None:
    mem, disk = Message(data), spooled(data)
    for msg in (mem, disk):
        if modify in ("headers", "both"):
            _modify(msg)
        if modify in ("body", "both"):
            msg.replace_body(b"new body\r\n")
    assert disk.is_spooled and not mem.is_spooled
    assert disk.size == mem.size == len(data)
    assert disk.header_names() == mem.header_names()
    assert disk.header_values("subject") == mem.header_values("subject")
    assert disk.body_offset == mem.body_offset
    assert disk.head == mem.head == data[: mem.body_offset]
    assert disk.body == mem.body
    assert disk.raw == data
    assert disk.as_bytes() == mem.as_bytes()
    assert disk.final_content().read() == mem.final_content().read() == mem.as_bytes()


def test_spooled_body_is_not_read_to_build_the_final_message(spooled) -> None:
    data = SAMPLES[-1]
    msg = spooled(data)
    msg.prepend_header("X-Added", "1")
    final = msg.final_content()
    assert not final.is_in_memory
    # Only the header block is in memory: the body is an extent of the file.
    assert sum(len(bytes(c)) for c in final.chunks(1 << 30)) == final.size
    assert final.size == len(data) + len(b"X-Added: 1\r\n")


def test_content_slices_chunks_streams_and_copies(spooled) -> None:
    data = bytes(range(256)) * 4000
    fd, path = tempfile.mkstemp()
    os.unlink(path)
    try:
        os.pwrite(fd, b"xx" + data, 0)
        content = Content.join(b"head:", Content.of_file(fd, [(2, len(data))]), b":tail")
        whole = b"head:" + data + b":tail"
        assert content.size == len(whole) and content.read() == whole
        assert content.slice(3, 70000).read() == whole[3:70000]
        assert content.read_at(len(whole) - 7, 100) == whole[-7:]
        pieces = list(content.chunks(4096))
        assert max(len(p) for p in pieces) <= 4096 and b"".join(bytes(p) for p in pieces) == whole

        async def collect() -> bytes:
            return b"".join([bytes(c) async for c in content.stream(10000)])

        assert asyncio.run(collect()) == whole
        out_fd, out_path = tempfile.mkstemp()
        try:
            content.write_to(out_fd)
            with open(out_path, "rb") as f:
                assert f.read() == whole
        finally:
            os.close(out_fd)
            os.unlink(out_path)
    finally:
        os.close(fd)


def test_a_file_shorter_than_its_extent_is_an_error() -> None:
    fd, path = tempfile.mkstemp()
    os.unlink(path)
    try:
        os.write(fd, b"short")
        with pytest.raises(OSError, match="early"):
            Content.of_file(fd, [(0, 100)]).read()
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("raw", "body", "expected"),
    [
        (b"A: 1\r\nX-Spam: y\r\n\r\nbody\r\n", None, b"Received: r\r\nA: 1\r\n\r\nbody\r\n"),
        (b"A: 1\r\nX-Spam: y\r\n", b"new\r\n", b"Received: r\r\nA: 1\r\n\r\nnew\r\n"),
        (b"A: 1\r\n\r\nold\r\n", b"new\r\n", b"Received: r\r\nA: 1\r\n\r\nnew\r\n"),
        (b"A: 1\r\n\r\nold\r\n", None, b"Received: r\r\nA: 1\r\n\r\nold\r\n"),
    ],
)
def test_the_final_message_in_memory_and_spooled(spooled, raw: bytes, body: bytes | None, expected: bytes) -> None:
    """Headers removed and prepended and a body replaced give exactly these octets, from
    memory and from a spool file; a blank line is added when a message without one gets
    a new body."""
    for msg in (Message(raw), spooled(raw)):
        msg.prepend_header("Received", "r")
        msg.remove_headers("X-Spam")
        if body is not None:
            msg.replace_body(body)
        assert msg.as_bytes() == expected
        assert msg.final_content().read() == expected
