"""gateway.delivery.scheduler: what the master's queue scan picks up."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import SimpleNamespace

from gateway.delivery.scheduler import Scheduler
from gateway.model import Envelope, Message, QueuedRecipient
from gateway.policy.model import Policy
from gateway.queue import QueueStore


def _queue(tmp_path: Path, count: int) -> tuple[QueueStore, list[str]]:
    store = QueueStore(tmp_path / "queue")
    store.open()
    qids = [store.new_id() for _ in range(count)]

    async def commit() -> None:
        for qid in qids:
            envelope = Envelope(sender="a@example.org", recipients=[QueuedRecipient("b@example.net")])
            await store.commit(qid, envelope, Message(b"Subject: s\r\n\r\nbody\r\n"))
        await store.close()

    asyncio.run(commit())
    return store, qids


def test_scan_leaves_messages_someone_holds_to_a_later_scan(tmp_path: Path) -> None:
    """A worker's message waiting for its first attempt there (locked since its commit)
    is not attempted by the master's scan only to be found locked."""
    store, (held, free) = _queue(tmp_path, 2)
    policy = Policy(source="test")
    app = SimpleNamespace(queue=store, policy=policy, gateway=SimpleNamespace(policy=policy))
    scheduler = Scheduler(app)
    lock = store.lock_delivery(held)  # another holder: a worker's claim, an export
    assert lock is not None
    try:
        asyncio.run(scheduler._rescan())
        assert set(scheduler._due) == {free}
    finally:
        os.close(lock)
    asyncio.run(scheduler._rescan())  # let go: the next scan takes it
    assert set(scheduler._due) == {free, held}


def test_is_delivery_locked(tmp_path: Path) -> None:
    store, (qid,) = _queue(tmp_path, 1)
    assert store.is_delivery_locked(qid) is False
    lock = store.lock_delivery(qid)
    assert lock is not None
    try:
        assert store.is_delivery_locked(qid) is True
    finally:
        os.close(lock)
    assert store.is_delivery_locked(qid) is False


def test_only_the_attempt_on_a_message_this_process_just_queued_counts_as_its_first(tmp_path: Path) -> None:
    """A Maildir delivery skips looking for an earlier attempt's copy only when the
    scheduler says no attempt can have been made: the claim of a message it just queued.
    A message found in the queue (a restart, another process) may have been tried."""
    store = QueueStore(tmp_path / "queue")
    store.open()
    policy = Policy(source="test")
    seen: list[tuple[str, bool]] = []

    class Dispatch:
        async def deliver(self, gateway: object, qid: str, envelope: Envelope, pending: list[QueuedRecipient],
                          content: object, *, first: bool = False, tried: object = None) -> bool:
            seen.append((qid, first))
            return True  # as if delivered and removed

        async def close(self) -> None:
            pass

    async def main() -> tuple[str, str]:
        gateway = SimpleNamespace(policy=policy, run_in_thread=asyncio.to_thread)
        scheduler = Scheduler(SimpleNamespace(queue=store, policy=policy, gateway=gateway))
        scheduler._dispatch = Dispatch()  # type: ignore[assignment]
        envelope = Envelope(sender="a@example.org", recipients=[QueuedRecipient("b@example.net")])
        claimed, found = store.new_id(), store.new_id()
        await store.commit(claimed, envelope, Message(b"Subject: s\r\n\r\nbody\r\n"), take_claim=scheduler.take)
        await store.commit(found, Envelope(sender="a@example.org", recipients=[QueuedRecipient("c@example.net")]),
                           Message(b"Subject: t\r\n\r\nbody\r\n"))
        while len(scheduler._tasks) or not seen:
            await asyncio.sleep(0.01)
        await scheduler.attempt(found)  # as the master's scan would
        await scheduler.attempt(claimed)  # again: no claim now
        await scheduler.stop()
        await store.close()
        return claimed, found

    claimed, found = asyncio.run(main())
    assert seen == [(claimed, True), (found, False), (claimed, False)]
