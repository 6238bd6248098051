"""The DATA reader past the spool threshold: the message goes to a file as it arrives,
with exactly the same end-of-data, unstuffing and refusals as the in-memory reader, and
no file is left for a message that is refused or cut off (gateway/smtp/data.py)."""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.queue.spool import Spool
from gateway.smtp.data import REPLY_BARE_NEWLINE, REPLY_DISK_FULL, REPLY_LINE_TOO_LONG, REPLY_TOO_BIG, read_data

_ids = itertools.count()


async def _read(tmp: Path, chunks: list[bytes], threshold: int | None, eof: bool = True, **limits: int):
    reader = asyncio.StreamReader(limit=2**20)
    spools: list[Spool] = []

    def new_spool() -> Spool:
        spools.append(Spool(str(tmp), f"Q{next(_ids)}"))
        return spools[-1]

    async def feeder() -> None:
        for chunk in chunks:
            reader.feed_data(chunk)
            await asyncio.sleep(0)  # one read per chunk: boundaries as the client sent them
        if eof:
            reader.feed_eof()

    task = asyncio.create_task(feeder())
    try:
        result = await read_data(
            reader, max_size=limits.get("max_size", 100_000), max_line_length=limits.get("max_line_length", 1000),
            timeout=5, spool_threshold=threshold, new_spool=new_spool,
        )
    finally:
        await task
    data = None
    if result.spool is not None:
        data = result.spool.content().read()
        result.spool.close()
    elif result.raw is not None:
        data = result.raw
    await asyncio.sleep(0.01)
    rest = await reader.read() if eof else b""
    return result, data, rest, spools


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)]) if b > a]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.lists(st.sampled_from([b"a", b"bb", b".", b"..", b"\r\n", b"\r", b"\n", b"x" * 40]), max_size=60),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=8),
    threshold=st.integers(min_value=0, max_value=40),
)
def test_spooling_reads_exactly_what_memory_reads(tmp_path: Path, body: list[bytes], cuts: list[int], threshold: int) -> None:
    wire = b"".join(body) + b"\r\n.\r\nQUIT\r\n"
    limits = {"max_size": 300, "max_line_length": 1000}
    mem, mem_data, mem_rest, _ = asyncio.run(_read(tmp_path, [wire], None, **limits))
    sp, sp_data, sp_rest, spools = asyncio.run(_read(tmp_path, _split(wire, cuts), threshold, **limits))
    assert (sp.error is None) == (mem.error is None)
    assert sp_data == mem_data
    assert sp_rest == mem_rest
    if sp.error is not None and not spools:
        assert sp.error == mem.error
    assert os.listdir(tmp_path) == [] or all(not (tmp_path / s.qid).exists() for s in spools)


@pytest.mark.parametrize("threshold", [None, 0])
def test_a_lone_dot_sent_apart_is_an_empty_message(tmp_path: Path, threshold: int | None) -> None:
    result, data, rest, _ = asyncio.run(_read(tmp_path, [b".", b"\r", b"\nQUIT\r\n"], threshold))
    assert result.error is None and data == b""
    assert rest == b"QUIT\r\n"


def test_a_large_message_is_spooled_not_held(tmp_path: Path) -> None:
    line = b"." + b"x" * 70 + b"\r\n"  # every line dot-stuffed
    wire = b"Subject: big\r\n\r\n" + line * 50_000 + b".\r\nNOOP\r\n"
    chunks = [wire[i : i + 65536] for i in range(0, len(wire), 65536)]
    result, data, rest, spools = asyncio.run(_read(tmp_path, chunks, 256 * 1024, max_size=10**7))
    assert result.error is None and result.raw is None and len(spools) == 1
    assert data == b"Subject: big\r\n\r\n" + line[1:] * 50_000
    assert rest == b"NOOP\r\n"
    assert result.received_octets == len(wire) - len(b"NOOP\r\n")


@pytest.mark.parametrize(
    ("tail", "limits", "reply"),
    [
        (b"x" * 2000 + b"\r\n", {"max_line_length": 1000}, REPLY_LINE_TOO_LONG),
        (b"bare\nLF\r\n", {}, REPLY_BARE_NEWLINE),
        (b"y" * 500 + b"\r\n", {"max_size": 100_000 + 100}, REPLY_TOO_BIG),
    ],
)
def test_a_refused_spooled_message_leaves_no_file_and_the_session_goes_on(
    tmp_path: Path, tail: bytes, limits: dict[str, int], reply: object
) -> None:
    wire = b"Subject: x\r\n\r\n" + b"z" * 70 + b"\r\n" + (b"q" * 98 + b"\r\n") * 1000 + tail + b".\r\nRSET\r\n"
    result, data, rest, spools = asyncio.run(_read(tmp_path, [wire[:50_000], wire[50_000:]], 1000, **limits))
    assert result.error == reply and data is None
    assert rest == b"RSET\r\n"
    assert len(spools) == 1
    asyncio.run(asyncio.sleep(0.05))
    assert os.listdir(tmp_path) == []


def test_a_client_gone_mid_data_leaves_no_spool_file(tmp_path: Path) -> None:
    wire = b"Subject: x\r\n\r\n" + b"line\r\n" * 100_000  # no end of data, then EOF
    with pytest.raises(ConnectionResetError):
        asyncio.run(_read(tmp_path, [wire[:300_000], wire[300_000:]], 1000))
    for _ in range(50):
        if not os.listdir(tmp_path):
            break
        asyncio.run(asyncio.sleep(0.02))
    assert os.listdir(tmp_path) == []


def test_disk_full_mid_spool_is_452_and_removes_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real full disk is tested end to end on a small tmpfs; here the third write fails.
    from gateway.queue import spool as spool_mod

    real = spool_mod._pwrite_all
    calls = itertools.count()

    def failing(fd: int, data: bytes | memoryview, offset: int) -> None:
        if next(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data, offset)

    monkeypatch.setattr(spool_mod, "_pwrite_all", failing)
    wire = b"Subject: x\r\n\r\n" + b"line of text\r\n" * 50_000 + b".\r\nQUIT\r\n"
    chunks = [wire[i : i + 100_000] for i in range(0, len(wire), 100_000)]
    result, data, rest, spools = asyncio.run(_read(tmp_path, chunks, 1000, max_size=10**7))
    assert result.error == REPLY_DISK_FULL and data is None
    assert rest == b"QUIT\r\n"
    asyncio.run(asyncio.sleep(0.05))
    assert os.listdir(tmp_path) == []


def test_after_one_slow_write_spool_writes_leave_the_event_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Spool writes go to the page cache from the event loop; once one is slow (a disk
    throttling its writers), the next ones run on a thread for a while, and say so."""
    import threading
    import time

    from gateway.queue import spool as spool_mod

    monkeypatch.setattr(spool_mod, "_slow_until", [0.0])
    real = spool_mod._pwrite_all
    writers: list[str] = []

    def slow_first(fd: int, data: bytes | memoryview, offset: int) -> None:
        writers.append(threading.current_thread().name)
        if len(writers) == 2:  # the placeholder line, then the first stretch: slow
            time.sleep(spool_mod.SLOW_WRITE * 1.5)
        real(fd, data, offset)

    monkeypatch.setattr(spool_mod, "_pwrite_all", slow_first)

    async def run() -> str:
        loop_thread = threading.current_thread().name
        spool = Spool(str(tmp_path), "QSLOW")
        for _ in range(3):
            await spool.write(b"x" * 1000 + b"\r\n")
        spool.close()
        return loop_thread

    loop_thread = asyncio.run(run())
    assert writers[:2] == [loop_thread, loop_thread]
    assert all(name != loop_thread for name in writers[2:]) and len(writers) == 4
