"""Unit tests for gateway.queue.store and gateway.queue.committer: format, recovery,
state, group commit, failures."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from gateway.model import Envelope, Message, QueuedRecipient, RecipientState
from gateway.queue import (
    REPLY_DISK_FULL,
    REPLY_QUEUE_CLOSED,
    REPLY_QUEUE_ERROR,
    CorruptQueueFile,
    QueueStore,
)
from gateway.queue import committer as committer_mod
from gateway.queue import store as store_mod
from gateway.verdicts import TemporaryFailure


def _envelope(recipients: int = 2, **kwargs: Any) -> Envelope:
    return Envelope(
        sender="alice@example.org",
        recipients=[
            QueuedRecipient(f"r{i}@example.net", notify=("FAILURE",)) for i in range(recipients)
        ],
        client_ip="192.0.2.1",
        helo="mx.example.org",
        **kwargs,
    )


def _message(body: bytes = b"Hello.\r\n") -> Message:
    return Message(b"From: alice@example.org\r\nSubject: hi\r\nX-Drop: me\r\n\r\n" + body)


# Fault injection patches names as the module that calls them sees them: the committer
# writes messages (commit), the store writes state and removes and moves files.
STORE = "gateway.queue.store"
COMMITTER = "gateway.queue.committer"


def _recording(
    events: list[str], label: Callable[..., str], real: Callable[..., Any]
) -> Callable[..., Any]:
    """Wrap ``real`` so that each call first appends ``label(*args)`` to ``events``."""
    def wrapper(*args: Any) -> Any:
        events.append(label(*args))
        return real(*args)
    return wrapper


def _run(coro: Any) -> Any:
    return asyncio.run(coro, debug=True)


async def _commit_all(store: QueueStore, items: list[tuple[str, Envelope, Message]],
                      **kw: Any) -> list[Any]:
    coros = (store.commit(q, e, m, **kw) for q, e, m in items)
    return await asyncio.gather(*coros, return_exceptions=True)


def _commit(store: QueueStore, envelope: Envelope | None = None, message: Message | None = None,
            **kw: Any) -> str:
    return _commit_qid(store, store.new_id(), envelope, message, **kw)


def _commit_qid(store: QueueStore, qid: str, envelope: Envelope | None = None,
                message: Message | None = None, **kw: Any) -> str:
    item = (qid, envelope or _envelope(), message or _message())
    [result] = _run(_commit_all(store, [item], **kw))
    if isinstance(result, BaseException):
        raise result
    return qid


@pytest.fixture
def store(tmp_path: Path) -> Iterator[QueueStore]:
    queue = QueueStore(tmp_path / "queue")
    assert queue.open() == []
    yield queue
    _run(queue.close())


def _listing(store: QueueStore, sub: str) -> list[str]:
    return sorted(os.listdir(store.root / sub))


# Format and round trip -------------------------------------------------------------------


def test_commit_then_load_round_trip(store: QueueStore) -> None:
    envelope = _envelope(auth_login="alice", smtputf8=True, envid="E1",
                         notes=[{"plugin": "mail_spf", "score": 0.5, "reason": "softfail"}])
    message = _message(b"x" * 100_000)
    message.prepend_header("Received", "from mx.example.org\n\tby gw.example.net")
    message.prepend_header("Authentication-Results", "gw.example.net; spf=softfail")
    assert message.remove_headers("X-Drop") == 1
    qid = _commit(store, envelope, message)

    loaded = store.load(qid)
    assert loaded.envelope == envelope
    assert (loaded.qid, loaded.area, loaded.held, loaded.attempts) == (qid, "msg", False, 0)
    assert loaded.next_try == envelope.arrived
    data = store.read_message(qid)
    assert data == message.as_bytes()
    assert data.startswith(b"Authentication-Results: gw.example.net; spf=softfail\r\nReceived: ")
    assert b"X-Drop" not in data
    with open(loaded.path, "rb") as f:
        ((offset, size),) = loaded.extents
        f.seek(offset)
        assert f.read() == data and size == len(data)
    assert loaded.message_size == len(data)
    assert store.ids() == [qid]
    assert oct(os.stat(loaded.path).st_mode & 0o777) == "0o600"


def test_file_format_is_header_envelope_message(store: QueueStore) -> None:
    envelope = _envelope()
    qid = _commit(store, envelope, _message())
    raw = (store.root / "msg" / qid).read_bytes()
    head, _, rest = raw.partition(b"\n")
    magic, env_len, msg_len = head.split(b" ")
    assert magic == b"GWQ1"
    assert rest[int(env_len) : int(env_len) + 1] == b"\n"
    assert len(rest) == int(env_len) + 1 + int(msg_len)
    assert rest[: int(env_len)].startswith(b'{"version":1,"sender":"alice@example.org"')


def test_ids_are_sortable_unique_and_alphanumeric(store: QueueStore) -> None:
    other = QueueStore(store.root)  # a second store in the same process shares the clock
    ids = [(store if i % 2 else other).new_id() for i in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(re.fullmatch(r"[0-9A-Z]{23}", qid) for qid in ids)
    assert {qid[13:19] for qid in ids} == {f"{os.getpid() & 0xFFFFFF:06X}"}
    now_us = time.time_ns() // 1000
    assert abs(int(ids[-1][:13], 16) - now_us) < 60_000_000


def test_write_all_copes_with_short_writes_and_many_buffers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_writev = os.writev
    counts: list[int] = []

    def short_writev(fd: int, bufs: list[memoryview]) -> int:
        counts.append(len(bufs))
        return real_writev(fd, [b"".join(bytes(b) for b in bufs)[:10]])  # a prefix only

    monkeypatch.setattr(f"{COMMITTER}.os.writev", short_writev)
    chunks: list[bytes | memoryview] = [bytes([i % 256]) * (i % 13) for i in range(3000)]
    chunks.append(memoryview(b"tail-of-message"))
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        committer_mod.write_all(fd, chunks)
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"".join(bytes(c) for c in chunks)
    assert max(counts) == committer_mod._IOV_MAX


# State, remove, move ---------------------------------------------------------------------


def test_update_state_overlays_recipients_and_keeps_unset_fields(store: QueueStore) -> None:
    envelope = _envelope(recipients=3)
    qid = _commit(store, envelope)
    msg_before = (store.root / "msg" / qid).read_bytes()

    envelope.recipients[0].state = RecipientState.DELIVERED
    envelope.recipients[0].last_reply = "250 2.0.0 ok"
    envelope.recipients[1].attempts = 1
    store.update_state(qid, envelope, next_try=1234.5, attempts=1)
    loaded = store.load(qid)
    assert loaded.envelope.recipients == envelope.recipients
    assert (loaded.next_try, loaded.attempts, loaded.held) == (1234.5, 1, False)

    store.update_state(qid, envelope, held=True)
    loaded = store.load(qid)
    assert (loaded.next_try, loaded.attempts, loaded.held) == (1234.5, 1, True)
    assert (store.root / "msg" / qid).read_bytes() == msg_before  # the message is immutable
    assert _listing(store, "tmp") == []


def test_update_state_writes_tmp_syncs_then_renames(store: QueueStore,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    qid = _commit(store)
    events: list[str] = []
    real_fdatasync, real_rename, real_fsync_dir = os.fdatasync, os.rename, store_mod.fsync_dir
    monkeypatch.setattr(
        f"{STORE}.os.fdatasync", _recording(events, lambda fd: "fdatasync", real_fdatasync)
    )

    def rename(src: Any, dst: Any) -> None:
        events.append(f"rename {Path(src).parent.name}->{Path(dst).parent.name}/{Path(dst).name}")
        real_rename(src, dst)

    monkeypatch.setattr(f"{STORE}.os.rename", rename)
    monkeypatch.setattr(
        f"{STORE}.fsync_dir", _recording(events, lambda p: f"fsync {p.name}", real_fsync_dir)
    )
    store.update_state(qid, _envelope(), attempts=2)
    assert events == ["fdatasync", f"rename tmp->state/{qid}", "fsync state"]


def test_update_state_failure_keeps_old_state(
    store: QueueStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    envelope = _envelope()
    qid = _commit(store, envelope)
    store.update_state(qid, envelope, attempts=1)

    def broken_rename(src: Any, dst: Any) -> None:
        raise OSError(errno.EIO, "simulated crash before rename")

    monkeypatch.setattr(f"{STORE}.os.rename", broken_rename)
    envelope.recipients[0].state = RecipientState.DELIVERED
    with pytest.raises(OSError):
        store.update_state(qid, envelope, attempts=2)
    loaded = store.load(qid)
    assert loaded.attempts == 1
    assert loaded.envelope.recipients[0].state is RecipientState.PENDING
    assert _listing(store, "tmp") == []


def test_update_state_of_unknown_message_fails(store: QueueStore) -> None:
    with pytest.raises(FileNotFoundError):
        store.update_state(store.new_id(), _envelope(), attempts=1)
    assert _listing(store, "state") == []


def test_remove_deletes_message_before_state(
    store: QueueStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    qid = _commit(store)
    store.update_state(qid, _envelope(), attempts=1)
    unlinked: list[str] = []
    real_unlink = os.unlink
    monkeypatch.setattr(
        f"{STORE}.os.unlink", _recording(unlinked, lambda p: Path(p).parent.name, real_unlink)
    )
    store.remove(qid)
    assert unlinked == ["msg", "state"]
    assert store.ids() == [] and _listing(store, "state") == []
    with pytest.raises(FileNotFoundError):
        store.load(qid)
    with pytest.raises(FileNotFoundError):
        store.remove(qid)


def test_move_releases_from_quarantine(store: QueueStore) -> None:
    envelope = _envelope(quarantine_reason="data_clamav: Eicar-Test-Signature")
    qid = _commit(store, envelope, area="quarantine")
    assert store.ids("quarantine") == [qid] and store.ids() == []
    assert store.load(qid, "quarantine").envelope == envelope

    store.move(qid, "quarantine", "msg")
    assert store.ids("quarantine") == [] and store.ids() == [qid]
    loaded = store.load(qid)
    assert loaded.area == "msg"
    assert loaded.envelope.quarantine_reason == envelope.quarantine_reason
    with pytest.raises(FileNotFoundError):
        store.move(qid, "quarantine", "msg")


def test_quarantine_needs_a_reason_and_areas_and_ids_are_checked(store: QueueStore) -> None:
    with pytest.raises(ValueError):
        _commit(store, _envelope(), area="quarantine")
    with pytest.raises(ValueError):
        store.load("../etc/passwd")
    with pytest.raises(ValueError):
        store.ids("tmp")


# Recovery at open() ----------------------------------------------------------------------


def test_open_cleans_tmp_and_moves_bad_files_to_corrupt(store: QueueStore,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    good = [_commit(store) for _ in range(2)]
    store.update_state(good[0], _envelope(), attempts=3)
    quarantined = _commit(store, _envelope(quarantine_reason="spam"), area="quarantine")
    full = (store.root / "msg" / good[0]).read_bytes()
    truncated, garbage, orphan = store.new_id(), store.new_id(), store.new_id()
    (store.root / "msg" / truncated).write_bytes(full[:-10])
    (store.root / "msg" / garbage).write_bytes(b"\x00garbage, not a queue file")
    (store.root / "msg" / "junk.txt").write_bytes(b"editor droppings")
    (store.root / "state" / orphan).write_bytes(b'{"recipients":[]}')  # crash inside remove()
    (store.root / "tmp" / store.new_id()).write_bytes(full[:100])
    (store.root / "tmp" / "X.1.2.state").write_bytes(b"{")

    reopened = QueueStore(store.root)
    with caplog.at_level(logging.ERROR, logger="gateway.queue.store"):
        assert reopened.open() == sorted(good)
    assert _listing(reopened, "tmp") == []
    assert _listing(reopened, "corrupt") == sorted([truncated, garbage, "junk.txt"])
    assert _listing(reopened, "state") == [good[0]]
    assert reopened.ids("quarantine") == [quarantined]
    assert reopened.load(good[0]).attempts == 3
    logged = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    assert truncated in logged and garbage in logged


def test_open_moves_message_with_corrupt_state_to_corrupt(store: QueueStore) -> None:
    qid = _commit(store)
    (store.root / "state" / qid).write_bytes(b'{"recipients": [')
    with pytest.raises(CorruptQueueFile):
        store.load(qid)
    assert QueueStore(store.root).open() == []
    assert _listing(store, "corrupt") == sorted([qid, f"{qid}.state"])


def _damage_envelope(store: QueueStore, qid: str, envelope: bytes) -> None:
    """Replace the envelope of ``msg/<qid>`` with ``envelope`` of the same length, so
    the header, lengths and separator still check out."""
    path = store.root / "msg" / qid
    data = path.read_bytes()
    head, rest = data.split(b"\n", 1)
    env_len = int(head.split()[1])
    assert len(envelope) <= env_len
    path.write_bytes(head + b"\n" + envelope.ljust(env_len) + rest[env_len:])


def test_open_moves_a_right_size_file_whose_envelope_is_bad_with_its_state(
        store: QueueStore, caplog: pytest.LogCaptureFixture) -> None:
    good, bad_json, bad_schema = _commit(store), _commit(store), _commit(store)
    store.update_state(bad_json, _envelope(), attempts=2)
    _damage_envelope(store, bad_json, b'{"version":1,"sender":')
    _damage_envelope(store, bad_schema, b'{"version":1,"sender":"a@example.org"}')  # no recipients
    reopened = QueueStore(store.root)
    with caplog.at_level(logging.ERROR, logger="gateway.queue.store"):
        assert reopened.open() == [good]
    assert _listing(reopened, "corrupt") == sorted([bad_json, f"{bad_json}.state", bad_schema])
    assert _listing(reopened, "state") == []
    assert reopened.moved_aside == 2
    for qid in (bad_json, bad_schema):  # one line each, naming it and saying why
        (line,) = [r.getMessage() for r in caplog.records if qid in r.getMessage()]
        assert "bad envelope" in line and "corrupt" in line


def test_set_aside_moves_a_message_and_its_state_once(store: QueueStore) -> None:
    qid, other = _commit(store), _commit(store)
    store.update_state(qid, _envelope(), attempts=1)
    _damage_envelope(store, qid, b"not json")
    with pytest.raises(CorruptQueueFile, match="bad envelope"):
        store.load(qid)
    store.set_aside(qid, "msg", "bad envelope")
    assert store.ids() == [other]
    assert _listing(store, "corrupt") == sorted([qid, f"{qid}.state"])
    assert store.moved_aside == 1
    with pytest.raises(FileNotFoundError):
        store.set_aside(qid, "msg", "bad envelope")


def test_load_rejects_corrupt_file(store: QueueStore) -> None:
    qid = _commit(store)
    path = store.root / "msg" / qid
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(CorruptQueueFile):
        store.load(qid)
    with pytest.raises(CorruptQueueFile):
        store.read_message(qid)


# Failures --------------------------------------------------------------------------------


def _raiser(err: int) -> Callable[..., Any]:
    def fail(*args: Any) -> Any:
        raise OSError(err, os.strerror(err))
    return fail


@pytest.mark.parametrize(
    ("target", "err", "expected"),
    [
        ("writev", errno.ENOSPC, REPLY_DISK_FULL),
        ("fdatasync", errno.EDQUOT, REPLY_DISK_FULL),
        ("fdatasync", errno.EIO, REPLY_QUEUE_ERROR),
        ("rename", errno.EIO, REPLY_QUEUE_ERROR),
        ("fsync_dir", errno.EIO, REPLY_QUEUE_ERROR),
    ],
)
def test_commit_failure_is_temporary_and_leaves_nothing(
    store: QueueStore, monkeypatch: pytest.MonkeyPatch, target: str, err: int, expected: Any
) -> None:
    where = COMMITTER if target == "fsync_dir" else f"{COMMITTER}.os"
    monkeypatch.setattr(f"{where}.{target}", _raiser(err))
    with pytest.raises(TemporaryFailure) as caught:
        _commit(store)
    assert caught.value.reply == expected
    assert (caught.value.reply.code, caught.value.reply.status) == (
        (452, "4.3.1") if err in (errno.ENOSPC, errno.EDQUOT) else (451, "4.3.0")
    )
    assert _listing(store, "tmp") == [] and _listing(store, "msg") == []


def test_one_failed_message_does_not_fail_its_batch(store: QueueStore,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    real_writev = os.writev

    def writev(fd: int, bufs: list[memoryview]) -> int:
        if any(b"POISON" in bytes(b) for b in bufs):
            raise OSError(errno.ENOSPC, "no space")
        return real_writev(fd, bufs)

    monkeypatch.setattr(f"{COMMITTER}.os.writev", writev)
    items = [
        (store.new_id(), _envelope(), _message(b"POISON" if i == 5 else b"fine")) for i in range(20)
    ]
    results = _run(_commit_all(store, items))
    assert [isinstance(r, TemporaryFailure) for r in results] == [i == 5 for i in range(20)]
    assert store.ids() == sorted(q for i, (q, _, _) in enumerate(items) if i != 5)
    assert _listing(store, "tmp") == []


def test_taken_temporary_name_fails_without_touching_the_other_file(store: QueueStore) -> None:
    qid = store.new_id()
    (store.root / "tmp" / qid).write_bytes(b"someone else's")
    with pytest.raises(TemporaryFailure) as caught:
        _commit_qid(store, qid)
    assert caught.value.reply == REPLY_QUEUE_ERROR
    assert (store.root / "tmp" / qid).read_bytes() == b"someone else's"
    assert store.ids() == []


def test_commit_after_close_is_refused_until_reopened(store: QueueStore) -> None:
    _commit(store)
    _run(store.close())
    async def late() -> None:
        await store.commit(store.new_id(), _envelope(), _message())
    with pytest.raises(TemporaryFailure) as caught:
        _run(late())
    assert caught.value.reply == REPLY_QUEUE_CLOSED
    store.open()
    _commit(store)
    assert len(store.ids()) == 2


# Durability ordering and group commit ----------------------------------------------------


@pytest.mark.parametrize("is_claimed", [False, True], ids=["unclaimed", "claimed"])
def test_commit_syncs_file_and_directory_before_resolving(store: QueueStore, monkeypatch: pytest.MonkeyPatch,
                                                          is_claimed: bool) -> None:
    # Claimed (the SMTP front end with delivery on): the file is kept open and locked
    # for the first attempt, and the order must be the same.
    events: list[str] = []
    entered, release = threading.Event(), threading.Event()
    real_writev, real_fdatasync, real_rename = os.writev, os.fdatasync, os.rename
    real_fsync_dir = committer_mod.fsync_dir
    written_fds: set[int] = set()

    def writev(fd: int, bufs: list[memoryview]) -> int:
        events.append("write")
        written_fds.add(fd)
        return real_writev(fd, bufs)

    def fdatasync(fd: int) -> None:
        events.append("fdatasync" if fd in written_fds else "fdatasync of another fd")
        real_fdatasync(fd)

    def rename(src: Any, dst: Any) -> None:
        events.append(f"rename {Path(src).parent.name}->{Path(dst).parent.name}")
        real_rename(src, dst)

    def fsync_dir(path: Path) -> None:
        real_fsync_dir(path)
        events.append(f"fsync {path.name}")
        entered.set()
        assert release.wait(10)

    for name, fake in (("writev", writev), ("fdatasync", fdatasync), ("rename", rename)):
        monkeypatch.setattr(f"{COMMITTER}.os.{name}", fake)
    monkeypatch.setattr(f"{COMMITTER}.fsync_dir", fsync_dir)

    claims: list[Any] = []

    def take_claim(claim: Any) -> None:
        events.append("claimed")
        claims.append(claim)

    async def main() -> None:
        task = asyncio.create_task(
            store.commit(store.new_id(), _envelope(), _message(), take_claim=take_claim if is_claimed else None)
        )
        assert await asyncio.to_thread(entered.wait, 10)
        await asyncio.sleep(0.05)  # room for a premature resolution to show
        assert not task.done(), "commit returned before the directory fsync finished"
        events.append("released")
        release.set()
        await task
        events.append("resolved")
        await store.close()

    _run(main())
    resolved = ["claimed", "resolved"] if is_claimed else ["resolved"]
    assert events == ["write", "fdatasync", "rename tmp->msg", "fsync msg", "released", *resolved]
    for claim in claims:
        os.close(claim.fd)


def test_concurrent_commits_share_directory_fsyncs(store: QueueStore,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    store = QueueStore(store.root, max_batch=16)
    syncs: list[str] = []
    real_fsync_dir = committer_mod.fsync_dir
    monkeypatch.setattr(
        f"{COMMITTER}.fsync_dir", _recording(syncs, lambda p: p.name, real_fsync_dir)
    )
    items = [(store.new_id(), _envelope(), _message(os.urandom(1000))) for _ in range(200)]
    results = _run(_commit_all(store, items))
    _run(store.close())
    assert results == [None] * 200
    assert store.ids() == sorted(q for q, _, _ in items)
    for qid, _, message in items:
        assert store.read_message(qid) == message.as_bytes()
    assert len(syncs) < 200, "no group commit happened"
    assert len(syncs) >= 200 // 16, "a batch exceeded max_batch"


def test_cancelled_commit_does_not_break_the_committer(store: QueueStore) -> None:
    async def main() -> None:
        task = asyncio.create_task(store.commit(store.new_id(), _envelope(), _message()))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await store.commit(store.new_id(), _envelope(), _message())
        await store.close()

    _run(main())
    assert 1 <= len(store.ids()) <= 2  # the cancelled one may or may not have landed


@pytest.mark.slow
def test_report_commit_throughput(tmp_path: Path) -> None:
    """Not a benchmark with a threshold: prints commits/s for the lead (run with -s)."""
    async def rate(store: QueueStore, total: int, concurrency: int) -> float:
        message = _message(b"x" * 4000)
        todo = iter(range(total))

        async def worker() -> None:
            for _ in todo:
                await store.commit(store.new_id(), _envelope(), message)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
        await store.close()
        return total / elapsed

    serial = QueueStore(tmp_path / "serial")
    serial.open()
    parallel = QueueStore(tmp_path / "parallel")
    parallel.open()
    one = asyncio.run(rate(serial, 300, 1))
    fifty = asyncio.run(rate(parallel, 2000, 50))
    print(f"\nqueue commits/s: 1 at a time {one:.0f}, 50 concurrent {fifty:.0f}")
