"""Unit tests for the grouped directory fsyncs of state updates and removals
(gateway.queue.dirsync, used by QueueStore.update_state/remove/move)."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Any, Callable

import pytest

from gateway.model import Envelope, Message, QueuedRecipient, RecipientState
from gateway.queue import QueueStore
from gateway.queue import store as store_mod
from gateway.queue.dirsync import DirSync

STORE = "gateway.queue.store"


def _envelope() -> Envelope:
    return Envelope(sender="alice@example.org", recipients=[QueuedRecipient("bob@example.net")])


@pytest.fixture
def store(tmp_path: Path) -> QueueStore:
    s = QueueStore(tmp_path / "queue")
    s.open()
    return s


def _commit(store: QueueStore, count: int) -> list[str]:
    """Commit ``count`` messages whose ids fall on distinct state-lock stripes, so the
    test's threads never wait for each other's locks."""
    import asyncio

    qids: list[str] = []
    stripes: set[int] = set()
    while len(qids) < count:
        qid = store.new_id()
        if id(store._state_lock(qid)) in stripes:
            continue
        stripes.add(id(store._state_lock(qid)))
        qids.append(qid)

    async def commit_all() -> None:
        for qid in qids:
            await store.commit(qid, _envelope(), Message(b"Subject: hi\r\n\r\nHello.\r\n"))
        await store.close()

    asyncio.run(commit_all())
    return qids


class _GatedFsync:
    """Stands in for the store's ``fsync_dir``: records each directory synced (after the
    real fsync) and holds the first fsync of each directory named in ``gated`` until
    :meth:`release`."""

    def __init__(self, gated: str, real: Callable[[Path], None]) -> None:
        self.real = real
        self.synced: list[str] = []
        self.entered = {name: threading.Event() for name in gated.split(",")}
        self._gate = threading.Event()

    @property
    def entered_all(self) -> bool:
        return all(e.is_set() for e in self.entered.values())

    def __call__(self, path: Path) -> None:
        entered = self.entered.get(path.name)
        if entered is not None and not entered.is_set():
            entered.set()
            assert self._gate.wait(10)
        self.real(path)
        self.synced.append(path.name)

    def release(self) -> None:
        self._gate.set()


def _in_threads(calls: list[Callable[[], Any]]) -> tuple[list[threading.Thread], list[BaseException]]:
    errors: list[BaseException] = []

    def run(call: Callable[[], Any]) -> None:
        try:
            call()
        except BaseException as exc:  # collected for the test to inspect
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    return threads, errors


def _wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    done = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return True
        done.wait(0.01)
    return predicate()


def test_a_removal_returns_only_after_its_directory_fsync(store: QueueStore,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    (qid,) = _commit(store, 1)
    fsync = _GatedFsync("msg", store_mod.fsync_dir)
    monkeypatch.setattr(f"{STORE}.fsync_dir", fsync)
    threads, errors = _in_threads([lambda: store.remove(qid)])
    assert fsync.entered["msg"].wait(10)
    assert not (store.root / "msg" / qid).exists()  # unlinked before the fsync started
    threads[0].join(0.2)
    assert threads[0].is_alive(), "remove() returned before msg/ was fsynced"
    fsync.release()
    threads[0].join(10)
    assert not threads[0].is_alive() and errors == []
    assert fsync.synced == ["msg"]  # no state file: nothing else to sync


def test_concurrent_removals_and_updates_all_complete_sharing_fsyncs(
    store: QueueStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    qids = _commit(store, 24)
    removed, updated = qids[:12], qids[12:]
    fsync = _GatedFsync("msg,state", store_mod.fsync_dir)
    monkeypatch.setattr(f"{STORE}.fsync_dir", fsync)
    delivered = _envelope()
    delivered.recipients[0].state = RecipientState.DELIVERED
    # The first removal holds msg/'s fsync, the first update state/'s; the others make
    # their change and queue up behind them.
    first, errors = _in_threads([lambda: store.remove(removed[0]),
                                 lambda: store.update_state(updated[0], delivered, attempts=1)])
    assert _wait_until(lambda: fsync.entered_all)
    rest, more_errors = _in_threads(
        [lambda q=q: store.remove(q) for q in removed[1:]]
        + [lambda q=q: store.update_state(q, delivered, attempts=1) for q in updated[1:]]
    )
    assert _wait_until(lambda: not any((store.root / "msg" / q).exists() for q in removed)
                       and all((store.root / "state" / q).exists() for q in updated))
    fsync.release()
    for t in first + rest:
        t.join(20)
        assert not t.is_alive()
    assert errors == [] and more_errors == []
    assert store.ids() == sorted(updated)
    for qid in updated:
        assert store.load(qid).envelope.recipients[0].state is RecipientState.DELIVERED
    # 12 removals and 12 updates, fewer fsyncs than callers on each directory.
    assert fsync.synced.count("msg") < len(removed)
    assert fsync.synced.count("state") < len(updated)


def test_a_failing_fsync_fails_every_caller_it_covered(store: QueueStore,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    qids = _commit(store, 6)
    gate = _GatedFsync("msg", store_mod.fsync_dir)
    is_broken = threading.Event()

    def fsync_dir(path: Path) -> None:
        gate(path)  # the first msg/ fsync waits for the others to queue up, then works
        if is_broken.is_set() and path.name == "msg":
            raise OSError(errno.EIO, "simulated I/O error")

    monkeypatch.setattr(f"{STORE}.fsync_dir", fsync_dir)
    first, first_errors = _in_threads([lambda: store.remove(qids[0])])
    assert gate.entered["msg"].wait(10)
    is_broken.set()  # both rounds fail: the one held, and the one the others join
    rest, errors = _in_threads([lambda q=q: store.remove(q) for q in qids[1:]])
    assert _wait_until(lambda: not any((store.root / "msg" / q).exists() for q in qids))
    gate.release()
    for t in first + rest:
        t.join(20)
    # Every caller hears of it: none returns as if its removal were durable.
    assert len(first_errors) + len(errors) == len(qids)
    for exc in first_errors + errors:
        assert isinstance(exc, OSError) and exc.errno == errno.EIO
        assert "fsync of" in str(exc)


def test_a_failing_state_fsync_surfaces_from_update_state(store: QueueStore,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    (qid,) = _commit(store, 1)
    real = store_mod.fsync_dir

    def fsync_dir(path: Path) -> None:
        if path.name == "state":
            raise OSError(errno.EIO, "simulated I/O error")
        real(path)

    monkeypatch.setattr(f"{STORE}.fsync_dir", fsync_dir)
    with pytest.raises(OSError) as info:
        store.update_state(qid, _envelope(), attempts=1)
    assert info.value.errno == errno.EIO
    monkeypatch.setattr(f"{STORE}.fsync_dir", real)
    store.update_state(qid, _envelope(), attempts=2)  # the next round works again
    assert store.load(qid).attempts == 2


def test_dirsync_alone_fsyncs_at_once_and_recovers_after_an_error(tmp_path: Path) -> None:
    calls: list[Path] = []
    fail = [True]

    def fsync_dir(path: Path) -> None:
        calls.append(path)
        if fail[0]:
            raise OSError(errno.EIO, "simulated")
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    sync = DirSync(tmp_path, fsync_dir)
    with pytest.raises(OSError):
        sync.sync()
    fail[0] = False
    sync.sync()
    sync.sync()
    assert calls == [tmp_path] * 3  # one fsync per lone caller, none skipped after a failure
