"""Unit tests for the queue's hand-over to delivery within one process: a commit that
claims its message for the first attempt (``QueueStore.commit`` with ``take_claim``) and
a removal that goes through the committer thread (``QueueStore.delete``)."""

from __future__ import annotations

import asyncio
import logging
import errno
import os
from pathlib import Path
from typing import Any

import pytest

from gateway.model import Envelope, Message, QueuedRecipient
from gateway.queue import Claim, QueueStore
from gateway.queue import committer as committer_mod
from gateway.queue import locks
from gateway.queue import store as store_mod
from tests.unit.test_queue_dirsync import _GatedFsync

STORE = "gateway.queue.store"
COMMITTER = "gateway.queue.committer"


@pytest.fixture
def store(tmp_path: Path) -> QueueStore:
    s = QueueStore(tmp_path / "queue")
    s.open()
    return s


def _envelope() -> Envelope:
    return Envelope(
        sender="alice@example.org",
        recipients=[QueuedRecipient("bob@example.net"), QueuedRecipient("carol@example.net")],
    )


def _message() -> Message:
    message = Message(b"Subject: hi\r\n\r\nHello.\r\n")
    message.prepend_header("Received", "from client by gateway")  # written in its own chunk
    return message


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        assert exc.errno == errno.EBADF
        return False
    return True


def test_a_claim_is_the_message_as_loaded_and_holds_its_delivery_lock(store: QueueStore) -> None:
    claims: list[Claim] = []
    qid = store.new_id()

    async def run() -> None:
        await store.commit(qid, _envelope(), _message(), take_claim=claims.append)
        await store.close()

    asyncio.run(run())
    (claim,) = claims
    assert claim.item == store.load(qid)  # what an attempt would have read from disk
    assert claim.message.read() == store.read_message(qid)
    assert claim.message.read().startswith(b"Received: from client by gateway\r\n")
    assert store.lock_delivery(qid) is None  # nobody else may start on it
    os.close(claim.fd)
    fd = store.lock_delivery(qid)
    assert fd is not None
    os.close(fd)


def test_an_unclaimed_commit_leaves_no_lock(store: QueueStore) -> None:
    qid = store.new_id()

    async def run() -> None:
        await store.commit(qid, _envelope(), _message())
        await store.close()

    asyncio.run(run())
    fd = store.lock_delivery(qid)
    assert fd is not None
    os.close(fd)


def test_a_claim_whose_waiter_is_cancelled_leaves_the_message_queued_and_unlocked(
    store: QueueStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = _GatedFsync("msg", committer_mod.fsync_dir)
    monkeypatch.setattr(f"{COMMITTER}.fsync_dir", gate)
    claims: list[Claim] = []
    qid = store.new_id()

    async def run() -> int | None:
        task = asyncio.create_task(store.commit(qid, _envelope(), _message(), take_claim=claims.append))
        assert await asyncio.to_thread(gate.entered["msg"].wait, 10)
        task.cancel()  # the session went away while the batch was being made durable
        gate.release()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(500):
            fd = await asyncio.to_thread(store.lock_delivery, qid)
            if fd is not None:
                return fd
            await asyncio.sleep(0.01)
        return None

    fd = asyncio.run(run())
    assert claims == []
    assert fd is not None, "the cancelled claim's lock was never released"
    os.close(fd)
    assert store.ids() == [qid]  # committed all the same: the next queue scan delivers it


def test_delete_makes_the_unlink_durable_before_the_state_goes_and_closes_the_lock(
    store: QueueStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    qid = store.new_id()
    asyncio.run(store.commit(qid, _envelope(), _message()))
    store.update_state(qid, _envelope(), attempts=1)  # a state file to drop after it
    lock = store.lock_delivery(qid)
    assert lock is not None
    events: list[str] = []
    real_unlink, real_fsync = os.unlink, store_mod.fsync_dir

    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        events.append(f"unlink {Path(path).parent.name}")
        real_unlink(path, *args, **kwargs)

    def fsync_dir(path: Path) -> None:
        real_fsync(path)
        events.append(f"fsync {path.name}")

    monkeypatch.setattr(f"{STORE}.os.unlink", unlink)
    monkeypatch.setattr(f"{STORE}.fsync_dir", fsync_dir)
    monkeypatch.setattr(f"{COMMITTER}.fsync_dir", fsync_dir)

    async def run() -> None:
        await store.delete(qid, lock=lock)
        await store.close()

    asyncio.run(run())
    assert events == ["unlink msg", "fsync msg", "unlink state", "fsync state"]
    assert not _is_open(lock)
    assert store.ids() == [] and not (store.root / "state" / qid).exists()


def test_a_commit_and_a_removal_in_one_batch_share_the_fsync_of_msg(
    store: QueueStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = store.new_id()
    asyncio.run(store.commit(old, _envelope(), _message()))
    gate = _GatedFsync("msg", committer_mod.fsync_dir)
    monkeypatch.setattr(f"{COMMITTER}.fsync_dir", gate)
    blocker, new = store.new_id(), store.new_id()

    async def run() -> None:
        first = asyncio.create_task(store.commit(blocker, _envelope(), _message()))
        assert await asyncio.to_thread(gate.entered["msg"].wait, 10)
        # The committer thread is inside the first batch's fsync: these two wait for
        # it and then go together as the next batch.
        second = asyncio.gather(store.commit(new, _envelope(), _message()), store.delete(old))
        await asyncio.sleep(0.05)
        gate.release()
        await first
        await second
        await store.close()

    asyncio.run(run())
    assert store.ids() == sorted([blocker, new])
    assert gate.synced == ["msg", "msg"]  # one per batch, not one per change


def test_delete_of_a_message_already_gone_raises_and_still_closes_the_lock(store: QueueStore) -> None:
    qid = store.new_id()
    asyncio.run(store.commit(qid, _envelope(), _message()))
    lock = store.lock_delivery(qid)
    assert lock is not None
    store.remove(qid)

    async def run() -> None:
        try:
            await store.delete(qid, lock=lock)
        finally:
            await store.close()

    with pytest.raises(FileNotFoundError):
        asyncio.run(run())
    assert not _is_open(lock)


def test_a_lock_taken_just_after_the_holder_removed_the_message_finds_it_gone(
    store: QueueStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another process opened msg/<qid> while this one was delivering it; this one then
    # removed the message (no state file: the removal is the record) and let go of the
    # lock, and only then did the other take the lock. Its descriptor still reads the
    # whole message with every recipient pending: it must see the message as gone,
    # not deliver it again.
    qid = store.new_id()
    asyncio.run(store.commit(qid, _envelope(), _message()))
    real_lock = locks.ofd_lock

    def lock_after_the_removal(fd: int, kind: int, *, wait: bool) -> None:
        os.unlink(store.root / "msg" / qid)  # the holder's removal, between open and lock
        real_lock(fd, kind, wait=wait)

    monkeypatch.setattr("gateway.queue.locks.ofd_lock", lock_after_the_removal)
    with pytest.raises(FileNotFoundError):
        store.lock_delivery(qid)


@pytest.mark.parametrize("target", ["fdatasync", "rename", "fsync_dir"])
def test_a_claimed_commit_that_fails_hands_over_nothing_and_leaks_no_descriptor(
    store: QueueStore, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    from gateway.verdicts import TemporaryFailure

    def fail(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(f"{COMMITTER}.fsync_dir" if target == "fsync_dir" else f"{COMMITTER}.os.{target}", fail)
    claims: list[Claim] = []
    before = len(os.listdir("/proc/self/fd"))

    async def run() -> None:
        try:
            await store.commit(store.new_id(), _envelope(), _message(), take_claim=claims.append)
        finally:
            await store.close()

    with pytest.raises(TemporaryFailure) as caught:
        asyncio.run(run())
    assert caught.value.reply.code == 451
    assert claims == []
    assert sorted(os.listdir(store.root / "tmp")) == [] and store.ids() == []
    assert len(os.listdir("/proc/self/fd")) == before  # the kept descriptor was closed


def test_delete_leaves_the_removal_line_to_its_caller_remove_logs_it(
        store: QueueStore, caplog: pytest.LogCaptureFixture) -> None:
    """The scheduler logs 'done: removed from the queue' with the queue id after its
    delete: one line for the event, not two. A removal by anyone else (gateway queue
    delete, store.remove) still logs 'removed qid='."""
    deleted, removed = store.new_id(), store.new_id()

    async def run() -> None:
        for qid in (deleted, removed):
            await store.commit(qid, _envelope(), _message())
        with caplog.at_level(logging.INFO, logger="gateway.queue"):
            await store.delete(deleted)
            await asyncio.to_thread(store.remove, removed)
        await store.close()

    asyncio.run(run())
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("gateway.queue")]
    assert lines == [f"removed qid={removed}"]
    assert store.ids() == []
