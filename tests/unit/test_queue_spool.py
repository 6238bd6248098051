"""A message spooled while it arrived is queued by renaming its own file (GWQ2), reads
back exactly as an in-memory commit of the same message would, and leaves nothing when
it is not queued (gateway/queue/spool.py, QueueStore.commit(spool=...))."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from gateway.model import Envelope, Message, QueuedRecipient
from gateway.queue import Claim, CorruptQueueFile, QueueStore
from gateway.queue.damage import SPOOL_LINE

BODY = b"".join(b"line %06d of a large body\r\n" % i for i in range(40000))  # ~1.1 MB
RAW = b"From: alice@example.org\r\nSubject: big\r\nX-Drop: me\r\n\r\n" + BODY


def _envelope() -> Envelope:
    return Envelope(sender="alice@example.org", recipients=[QueuedRecipient("bob@example.net")])


@pytest.fixture
def store(tmp_path: Path) -> QueueStore:
    s = QueueStore(tmp_path / "queue")
    s.open()
    return s


async def _spool(store: QueueStore, raw: bytes = RAW, piece: int = 100_000):
    spool = store.spool()
    for i in range(0, len(raw), piece):
        await spool.write(raw[i : i + piece])
    return spool, Message(spool.content())


def _edit(message: Message) -> None:
    message.prepend_header("Received", "from client by gateway")
    message.remove_headers("X-Drop")


def test_spooled_commit_renames_the_spool_and_reads_back_like_memory(store: QueueStore) -> None:
    claims: list[Claim] = []

    async def run() -> str:
        spool, message = await _spool(store)
        _edit(message)
        await store.commit(spool.qid, _envelope(), message, spool=spool, take_claim=claims.append)
        spool.close()
        return spool.qid

    qid = asyncio.run(run())
    expected = Message(RAW)
    _edit(expected)
    assert store.read_message(qid) == expected.as_bytes()
    assert os.listdir(store.root / "tmp") == []  # renamed, not copied
    path = store.root / "msg" / qid
    assert path.read_bytes()[:4] == b"GWQ2"
    # The body is where the spool wrote it, once: the file is the message plus a few headers.
    assert os.path.getsize(path) < len(RAW) + 1024
    item = store.load(qid)
    assert item.message_size == len(expected.as_bytes())
    (claim,) = claims
    try:
        assert claim.item == item
        assert not claim.message.is_in_memory  # extents of the file, not its octets
        assert claim.message.read() == expected.as_bytes()
        with open(path, "rb") as f:
            assert store.content(f.fileno(), item).read() == expected.as_bytes()
    finally:
        os.close(claim.fd)


def test_replaced_body_and_a_copy(store: QueueStore) -> None:
    async def run() -> tuple[str, str]:
        spool, message = await _spool(store)
        message.replace_body(b"short new body\r\n")
        copy_qid = store.new_id()
        copy = _envelope()
        await asyncio.gather(
            store.commit(spool.qid, _envelope(), message, spool=spool),
            store.commit(copy_qid, copy, message, spool=spool),
        )
        spool.close()
        return spool.qid, copy_qid

    qid, copy_qid = asyncio.run(run())
    want = b"From: alice@example.org\r\nSubject: big\r\nX-Drop: me\r\n\r\nshort new body\r\n"
    assert store.read_message(qid) == want
    assert store.read_message(copy_qid) == want
    assert store.ids() == sorted([qid, copy_qid])


def test_a_spool_that_is_not_queued_leaves_nothing(store: QueueStore) -> None:
    async def run() -> None:
        spool, _ = await _spool(store)
        assert os.listdir(store.root / "tmp") == [spool.qid]
        spool.close()
        await asyncio.sleep(0.05)
        for _ in range(100):  # the removal runs on a thread
            if not os.listdir(store.root / "tmp"):
                break
            await asyncio.sleep(0.01)

    asyncio.run(run())
    assert os.listdir(store.root / "tmp") == []
    assert store.ids() == []


def test_a_spool_left_by_a_crash_is_not_taken_for_a_message(store: QueueStore, tmp_path: Path) -> None:
    async def run() -> None:
        await _spool(store)  # never committed nor closed: a crash mid-DATA

    asyncio.run(run())
    assert len(os.listdir(store.root / "tmp")) == 1
    again = QueueStore(store.root)
    assert again.open() == []
    assert os.listdir(store.root / "tmp") == [] and os.listdir(store.root / "corrupt") == []


def test_a_damaged_gwq2_file_is_recognised(store: QueueStore) -> None:
    async def run() -> str:
        spool, message = await _spool(store)
        await store.commit(spool.qid, _envelope(), message, spool=spool)
        spool.close()
        return spool.qid

    qid = asyncio.run(run())
    path = store.root / "msg" / qid
    data = path.read_bytes()
    path.write_bytes(data[:-10])  # truncated
    with pytest.raises(CorruptQueueFile, match="size"):
        store.load(qid)
    line = data[:SPOOL_LINE].replace(b"GWQ2 ", b"GWQ2 9")  # an extent past the envelope
    path.write_bytes(line[: SPOOL_LINE - 1].rstrip()[: SPOOL_LINE - 2] + b" \n" + data[SPOOL_LINE:])
    with pytest.raises(CorruptQueueFile):
        store.load(qid)
    reopened = QueueStore(store.root)
    assert reopened.open() == []
    assert os.listdir(store.root / "corrupt") == [qid]
