"""Queue export/import on real queue directories, and the delivery lock they rely on."""

from __future__ import annotations

import asyncio
import fcntl
import io
import json
import tarfile
from pathlib import Path

import pytest

from gateway.model import Envelope, Message, QueuedRecipient, RecipientState
from gateway.queue import QueueStore
from gateway.queue import locks
from gateway.queue import store as store_mod
from gateway.queue.transfer import TransferError, export_queue, import_queue


def _queue(path: Path) -> QueueStore:
    store = QueueStore(path)
    store.open()
    return store


def _commit(store: QueueStore, body: bytes, recipients: tuple[str, ...] = ("a@x.example", "b@x.example")) -> str:
    qid = store.new_id()
    envelope = Envelope(sender="s@x.example", recipients=[QueuedRecipient(address=r) for r in recipients])
    asyncio.run(store.commit(qid, envelope, Message(b"Subject: t\r\n\r\n" + body)))
    return qid


def test_delivery_lock_and_exclusive_lock_exclude_each_other(tmp_path: Path) -> None:
    store = _queue(tmp_path / "q")
    qid = _commit(store, b"x\r\n")
    fd = store.lock_delivery(qid)
    assert fd is not None
    # An exporter's write lock cannot be had while an attempt holds the message.
    probe = store_mod.os.open(store.root / "msg" / qid, store_mod.os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            locks.ofd_lock(probe, fcntl.F_WRLCK, wait=False)
        store_mod.os.close(fd)
        locks.ofd_lock(probe, fcntl.F_WRLCK, wait=False)  # free once the attempt ends
    finally:
        store_mod.os.close(probe)
    with store.lock_exclusive(qid):
        assert store.lock_delivery(qid) is None  # the scheduler looks again later
    again = store.lock_delivery(qid)
    assert again is not None
    store_mod.os.close(again)
    with pytest.raises(FileNotFoundError):
        store.lock_delivery("0" * 23)


def test_round_trip_keeps_states_and_refuses_duplicates(tmp_path: Path) -> None:
    source = _queue(tmp_path / "a")
    first = _commit(source, b"one\r\n")
    second = _commit(source, b"two\r\n")
    item = source.load(first)
    item.envelope.recipients[0].state = RecipientState.DELIVERED
    source.update_state(first, item.envelope, attempts=3)
    out = io.BytesIO()
    result = export_queue(source, out, mode="hold")
    assert result.exported == [first, second] and sorted(result.held) == [first, second]
    assert all(source.load(q).held for q in (first, second))

    target = _queue(tmp_path / "b")
    taken = _commit(target, b"other\r\n")  # occupies a queue id the stream also uses
    (target.root / "msg" / taken).rename(target.root / "msg" / first)
    loaded = import_queue(target, io.BytesIO(out.getvalue()))
    assert loaded.imported[second] == second and loaded.imported[first] != first
    moved = target.load(loaded.imported[first])
    assert [r.state for r in moved.envelope.recipients] == [RecipientState.DELIVERED, RecipientState.PENDING]
    assert moved.attempts == 3 and moved.held is False  # the state before the export's hold
    assert target.read_message(loaded.imported[first]) == source.read_message(first)
    # Again: the journal knows both, even once they have left the queue.
    target.remove(loaded.imported[second])
    again = import_queue(target, io.BytesIO(out.getvalue()))
    assert again.imported == {} and sorted(again.duplicates) == sorted([first, second])


def test_move_removes_only_after_the_stream_is_complete(tmp_path: Path) -> None:
    source = _queue(tmp_path / "a")
    qid = _commit(source, b"one\r\n")

    held_when_failing: list[bool] = []

    class Broken(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, data: object) -> int:
            held_when_failing.append(source.load(qid).held)
            raise OSError(28, "No space left on device")

    with pytest.raises(TransferError):
        export_queue(source, Broken(), mode="move")
    assert held_when_failing == [True]  # the disk filled up after the hold was set
    assert source.ids() == [qid] and source.load(qid).held is False  # hold undone
    out = io.BytesIO()
    assert export_queue(source, out, mode="move").removed == [qid]
    assert source.ids() == []


def test_import_refuses_what_is_not_an_export(tmp_path: Path) -> None:
    target = _queue(tmp_path / "b")
    with pytest.raises(TransferError):
        import_queue(target, io.BytesIO(b"garbage"))
    stream = io.BytesIO()
    with tarfile.open(fileobj=stream, mode="w") as tar:
        info = tarfile.TarInfo("GATEWAY-QUEUE")
        data = json.dumps({"format": 1}).encode()
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        bad = tarfile.TarInfo("msg/ABC")
        bad.size = 5
        tar.addfile(bad, io.BytesIO(b"hello"))
        evil = tarfile.TarInfo("msg/../../etc")
        evil.size = 1
        tar.addfile(evil, io.BytesIO(b"x"))
    result = import_queue(target, io.BytesIO(stream.getvalue()))
    assert result.imported == {} and len(result.errors) == 2
    assert target.ids() == [] and list((target.root / "tmp").iterdir()) == []
