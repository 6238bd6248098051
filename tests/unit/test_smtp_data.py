"""The DATA reader: end of data, dot-unstuffing, limits, smuggling defence."""

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.smtp.data import REPLY_BARE_NEWLINE, REPLY_LINE_TOO_LONG, REPLY_TOO_BIG, _has_long_line, read_data


def feed(chunks: list[bytes], **kwargs: int):
    async def go():
        reader = asyncio.StreamReader(limit=2**20)
        for chunk in chunks:
            reader.feed_data(chunk)
        reader.feed_eof()
        result = await read_data(
            reader,
            max_size=kwargs.get("max_size", 10_000),
            max_line_length=kwargs.get("max_line_length", 1000),
            timeout=5,
        )
        rest = await reader.read()
        return result, rest

    return asyncio.run(go())


def test_plain_message_and_pipelined_rest() -> None:
    result, rest = feed([b"Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n"])
    assert result.raw == b"Subject: hi\r\n\r\nbody\r\n"
    assert result.error is None
    assert rest == b"QUIT\r\n"


def test_empty_message() -> None:
    result, rest = feed([b".\r\nQUIT\r\n"])
    assert result.raw == b""
    assert rest == b"QUIT\r\n"


def test_terminator_split_across_chunks() -> None:
    result, rest = feed([b"a: b\r\n\r\nx\r", b"\n.", b"\r", b"\nNOOP\r\n"])
    assert result.raw == b"a: b\r\n\r\nx\r\n"
    assert rest == b"NOOP\r\n"


def test_dot_unstuffing() -> None:
    result, _ = feed([b"..leading\r\nmid\r\n..\r\n.x\r\n.\r\n"])
    assert result.raw == b".leading\r\nmid\r\n.\r\nx\r\n"


@pytest.mark.parametrize(
    "smuggle",
    [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\n", b"\r\n.\r", b"\r.\r", b"\n.\r"],
)
def test_smuggling_variants_do_not_end_data_and_are_refused(smuggle: bytes) -> None:
    payload = (
        b"Subject: a\r\n\r\nfirst" + smuggle
        + b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\nsmuggled\r\n.\r\nNOOP\r\n"
    )
    result, rest = feed([payload])
    # The only end of data is the real CRLF.CRLF; everything before it is one message,
    # and that message is refused as a whole.
    assert result.raw is None
    assert result.error == REPLY_BARE_NEWLINE
    assert rest == b"NOOP\r\n"


def test_too_big_is_drained_then_refused() -> None:
    big = b"x" * 900 + b"\r\n"
    result, rest = feed([big * 50 + b".\r\nQUIT\r\n"], max_size=10_000)
    assert result.error == REPLY_TOO_BIG
    assert rest == b"QUIT\r\n"


def test_too_big_in_many_chunks_keeps_memory_bounded() -> None:
    chunks = [b"y" * 998 + b"\r\n"] * 3000 + [b".\r\n"]
    result, rest = feed(chunks, max_size=50_000)
    assert result.error == REPLY_TOO_BIG
    assert result.received_octets >= 3_000_000


def test_line_length_limit() -> None:
    ok, _ = feed([b"a" * 998 + b"\r\n.\r\n"])
    assert ok.error is None
    stuffed, _ = feed([b"." + b"a" * 998 + b"\r\n.\r\n"])
    assert stuffed.error is None
    long, rest = feed([b"a" * 999 + b"\r\n.\r\nQUIT\r\n"])
    assert long.error == REPLY_LINE_TOO_LONG
    assert rest == b"QUIT\r\n"


@pytest.mark.parametrize("lines", [10, 2_000], ids=["small message", "message over 64 KiB"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_long_line_is_found_anywhere_in_small_and_large_messages(lines: int, where: str) -> None:
    body = [b"x" * 78] * lines
    index = {"first": 0, "middle": lines // 2, "last": lines - 1}[where]
    exact = body.copy()
    exact[index] = b"y" * 998  # 1000 octets with its CRLF: the limit, accepted
    ok, _ = feed([b"\r\n".join(exact) + b"\r\n.\r\n"], max_size=1_000_000)
    assert ok.error is None
    body[index] = b"y" * 999
    long, rest = feed([b"\r\n".join(body) + b"\r\n.\r\nQUIT\r\n"], max_size=1_000_000)
    assert long.error == REPLY_LINE_TOO_LONG
    assert rest == b"QUIT\r\n"


def test_eof_mid_message() -> None:
    with pytest.raises(ConnectionResetError):
        feed([b"Subject: x\r\n\r\nunfinished"])


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(st.integers(min_value=0, max_value=1200), min_size=1, max_size=200),
    limit=st.sampled_from([10, 998, 70_000]),
    repeat=st.sampled_from([1, 400]),
)
def test_long_line_check_agrees_with_measuring_every_line(lines: list[int], limit: int, repeat: int) -> None:
    # Large messages are measured in windows: a line across a window's edge, a message
    # of one huge line and a limit above the window size must all count as plain
    # splitting counts them.
    body = b"\r\n".join(b"x" * n for n in lines * repeat)
    assert _has_long_line(body, limit) == (max(map(len, body.split(b"\r\n"))) > limit)


def test_a_line_longer_than_the_window_is_measured_whole() -> None:
    long_line = b"x" * 70_000  # longer than one 64 KiB window, shorter than the limit
    body = long_line + b"\r\n" + b"\r\n".join([b"y" * 70] * 2_000)
    assert not _has_long_line(body, 100_000)
    assert _has_long_line(body, 69_999)
    assert _has_long_line(b"z" * 200_000, 100_000)
