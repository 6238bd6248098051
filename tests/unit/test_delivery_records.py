"""gateway.delivery.records: delivery state the disk refuses is kept, overlaid, written later.

The refusals here are injected (``update_state`` raising ENOSPC) to reach both modes in
one process; the real thing, a small filesystem filled up under a running gateway, is
``tests/integration/test_faults.py``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from pathlib import Path
from typing import Any

import pytest

from gateway.delivery.records import StateRecorder
from gateway.model import Envelope, Message, QueuedRecipient, RecipientState
from gateway.queue import QueueStore


async def _in_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(fn, *args, **kwargs)


def _queued(tmp_path: Path) -> tuple[QueueStore, str]:
    store = QueueStore(tmp_path / "queue")
    store.open()
    qid = store.new_id()

    async def commit() -> None:
        env = Envelope(sender="a@example.org", recipients=[QueuedRecipient("b@example.net"), QueuedRecipient("c@example.net")])
        await store.commit(qid, env, Message(b"Subject: s\r\n\r\nbody\r\n"))
        await store.close()

    asyncio.run(commit())
    return store, qid


def _full_disk(store: QueueStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "update_state", refuse)


def test_master_keeps_the_refused_state_overlays_it_and_writes_it_later(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    store, qid = _queued(tmp_path)
    records = StateRecorder(store, _in_thread)
    item = store.load(qid)
    item.envelope.recipients[0].state = RecipientState.DELIVERED  # the peer took b
    with caplog.at_level(logging.DEBUG, logger="gateway.delivery.scheduler"):
        with monkeypatch.context() as patch:
            _full_disk(store, patch)
            assert asyncio.run(records.save(qid, item.envelope, next_try=2e9, attempts=3)) is False
            assert asyncio.run(records.save(qid, item.envelope, attempts=4)) is False
            asyncio.run(records.retry(set()))  # still full: one probe, kept
        assert store.read_state(qid) is None  # nothing reached the disk
        again = records.overlay(store.load(qid))
        assert (again.attempts, again.next_try) == (4, 2e9)
        assert [r.state for r in again.envelope.recipients] == [RecipientState.DELIVERED, RecipientState.PENDING]
        asyncio.run(records.retry({qid}))  # an attempt runs on it: left to that attempt
        assert store.read_state(qid) is None
        asyncio.run(records.retry(set()))  # the disk takes writes again
    state = store.read_state(qid)
    assert state is not None and (state["attempts"], state["next_try"]) == (4, 2e9)
    assert state["recipients"][0]["state"] == "delivered"
    assert records.unsaved == {}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "No space left on device" in warnings[0].getMessage()
    assert any("takes state writes again" in r.getMessage() for r in caplog.records)


def test_worker_keeps_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, qid = _queued(tmp_path)
    records = StateRecorder(store, _in_thread, keep=False)
    item = store.load(qid)
    _full_disk(store, monkeypatch)
    assert asyncio.run(records.save(qid, item.envelope, attempts=1)) is False
    assert records.unsaved == {} and records.overlay(store.load(qid)).attempts == 0
