"""Unit tests for gateway.delivery.local.mbox: From_ line, mboxrd quoting, locking,
truncation on failure, unsafe targets."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.content import CHUNK, Content
from gateway.delivery.local import mbox as mbox_mod
from gateway.delivery.local.maildir import Confinement
from gateway.delivery.local.mbox import MboxrdQuoter, deliver_mbox, from_line, mboxrd_quote
from gateway.verdicts import TemporaryFailure
from tests.streaming import big_message, file_content, no_whole_reads, reference_mboxrd

WHEN = 1700000000.0  # Tue Nov 14 22:13:20 2023 UTC
MESSAGE = b"Subject: hi\r\n\r\nFrom here\r\n>From there\r\nnot From\r\n"
FROM_RE = re.compile(rb"^From \S+ \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}$", re.MULTILINE)


def _messages(path: Path) -> list[bytes]:
    """Split an mbox at its From_ lines (each message keeps its From_ line)."""
    data = path.read_bytes()
    starts = [m.start() for m in FROM_RE.finditer(data)]
    return [data[a:b] for a, b in zip(starts, starts[1:] + [len(data)])]


def test_from_line() -> None:
    expected = "From alice@example.org Tue Nov 14 22:13:20 2023\n"
    assert from_line("alice@example.org", WHEN) == expected
    assert from_line("", WHEN).startswith("From MAILER-DAEMON ")
    assert from_line('"a b"@x', WHEN).startswith('From "a_b"@x ')


def test_quoting_and_line_ends() -> None:
    out = mboxrd_quote(MESSAGE)
    assert out == b"Subject: hi\n\n>From here\n>>From there\nnot From\n\n"
    assert mboxrd_quote(b"no newline") == b"no newline\n\n"
    assert mboxrd_quote(b"From x\r\n") == b">From x\n\n"


def test_append_two_messages(tmp_path: Path) -> None:
    path = tmp_path / "mbox"
    deliver_mbox(path, MESSAGE, sender="alice@example.org", when=WHEN)
    deliver_mbox(path, b"Subject: two\r\n\r\nsecond\r\n", sender="", when=WHEN)
    data = path.read_bytes()
    assert data == (
        b"From alice@example.org Tue Nov 14 22:13:20 2023\n"
        b"Subject: hi\n\n>From here\n>>From there\nnot From\n\n"
        b"From MAILER-DAEMON Tue Nov 14 22:13:20 2023\n"
        b"Subject: two\n\nsecond\n\n"
    )
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    assert not (tmp_path / "mbox.lock").exists()


def test_concurrent_appenders_write_intact_messages(tmp_path: Path) -> None:
    path = tmp_path / "mbox"
    big = [b"Subject: %d\r\n\r\n" % i + (b"line %d\r\n" % i) * 20000 for i in range(2)]
    errors: list[BaseException] = []

    def append(i: int) -> None:
        try:
            deliver_mbox(path, big[i], sender=f"s{i}@example.org", when=WHEN)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=append, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    got = sorted(_messages(path))
    want = sorted(
        from_line(f"s{i}@example.org", WHEN).encode() + mboxrd_quote(big[i]) for i in range(2)
    )
    assert got == want


def test_failure_truncates_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "mbox"
    deliver_mbox(path, MESSAGE, sender="a@example.org", when=WHEN)
    before = path.read_bytes()

    def full(fd: int, data: bytes) -> None:
        os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mbox_mod, "_write_all", full)
    with pytest.raises(TemporaryFailure) as info:
        deliver_mbox(path, b"Subject: x\r\n\r\n" + b"y" * 10000, sender="b@example.org", when=WHEN)
    assert (info.value.reply.code, info.value.reply.status) == (452, "4.3.1")
    assert path.read_bytes() == before
    assert not (tmp_path / "mbox.lock").exists()


def test_held_dotlock_times_out(tmp_path: Path) -> None:
    path = tmp_path / "mbox"
    (tmp_path / "mbox.lock").write_text("1\n")
    started = time.monotonic()
    with pytest.raises(TemporaryFailure) as info:
        deliver_mbox(path, MESSAGE, sender="", when=WHEN, lock_timeout=0.3)
    assert time.monotonic() - started < 5
    assert info.value.reply.code == 451
    assert "locked" in info.value.reply.text
    # Someone else's lock is left alone.
    assert (tmp_path / "mbox.lock").exists()


def test_stale_dotlock_is_broken(tmp_path: Path) -> None:
    path = tmp_path / "mbox"
    lock = tmp_path / "mbox.lock"
    lock.write_text("1\n")
    old = time.time() - mbox_mod.STALE_LOCK_AGE - 10
    os.utime(lock, (old, old))
    deliver_mbox(path, MESSAGE, sender="", when=WHEN, lock_timeout=0.3)
    assert len(_messages(path)) == 1
    assert not lock.exists()


def test_held_kernel_lock_times_out(tmp_path: Path) -> None:
    path = tmp_path / "mbox"
    path.write_bytes(b"")
    with open(path, "ab") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(TemporaryFailure):
            deliver_mbox(path, MESSAGE, sender="", when=WHEN, lock_timeout=0.3)
    assert path.read_bytes() == b""
    assert not (tmp_path / "mbox.lock").exists()


def test_refuses_non_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "mbox"
    os.mkfifo(path)
    started = time.monotonic()
    # A FIFO without a reader must be refused at once, never block the delivery thread.
    with pytest.raises(TemporaryFailure):
        deliver_mbox(path, MESSAGE, sender="", when=WHEN, lock_timeout=0.3)
    assert time.monotonic() - started < 5
    with open(path, "rb", opener=lambda p, f: os.open(p, f | os.O_NONBLOCK)) as reader:
        with pytest.raises(TemporaryFailure) as info:
            deliver_mbox(path, MESSAGE, sender="", when=WHEN, lock_timeout=0.3)
        assert "regular" in info.value.reply.text
        assert reader.read() is None or reader.read() == b""


def test_confined_refuses_symlink_and_hard_link(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    confine = Confinement(home, os.getuid(), os.getgid())
    (home / "mbox").symlink_to(victim)
    with pytest.raises(TemporaryFailure):
        deliver_mbox(home / "mbox", MESSAGE, sender="", when=WHEN, confine=confine)
    (home / "mbox").unlink()
    os.link(victim, home / "mbox")
    with pytest.raises(TemporaryFailure) as info:
        deliver_mbox(home / "mbox", MESSAGE, sender="", when=WHEN, confine=confine)
    assert info.value.reply.status == "4.7.0"
    assert victim.read_bytes() == b"precious\n"


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(TemporaryFailure):
        deliver_mbox(tmp_path / "no" / "mbox", MESSAGE, sender="", when=WHEN)


# -- streaming (issue #17) ------------------------------------------------------------------

_MBOX_TEXT = st.binary(max_size=60).map(lambda b: bytes(b"\r\n>From x"[x % 9] for x in b))


@given(_MBOX_TEXT, st.lists(st.integers(min_value=0, max_value=10_000), max_size=8))
def test_quoting_in_any_pieces_is_the_whole_message_quoted(message: bytes, cuts: list[int]) -> None:
    points = sorted({c % (len(message) + 1) for c in cuts})
    quoter = MboxrdQuoter()
    out = [p for a, b in zip([0, *points], [*points, len(message)]) for p in quoter.feed(message[a:b])]
    assert b"".join([*out, *quoter.end()]) == reference_mboxrd(message)
    assert mboxrd_quote(message) == reference_mboxrd(message)


def test_quoter_holds_no_long_run_of_quote_marks() -> None:
    """A hostile line of '>' is counted, not kept, while it may still become '>>>From '."""
    quoter = MboxrdQuoter()
    for _ in range(64):
        assert list(quoter.feed(b">" * 65536)) == []
    pieces = [*quoter.feed(b"From x\r\n"), *quoter.end()]
    assert max(len(p) for p in pieces) <= CHUNK  # handed out in bounded pieces
    assert b"".join(pieces) == b">" + b">" * (64 * 65536) + b"From x\n\n"


def test_large_message_on_disk_is_quoted_as_streamed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lines that read as separators, cut by chunk boundaries ('Fr|om ', '>>F|rom', a CR
    and its LF apart), are quoted as in the whole message; nothing is read whole."""
    message = big_message()
    path = tmp_path / "mbox"
    with no_whole_reads(monkeypatch) as reads, file_content(tmp_path, message) as content:
        deliver_mbox(path, content, sender="a@example.org", when=WHEN)
    assert reads == []
    data = path.read_bytes()
    separator = from_line("a@example.org", WHEN).encode()
    assert data == separator + reference_mboxrd(message)
    assert b"\n>From split after 'Fr'\n" in data and b"\n>>>From quoted, split" in data


def test_failed_read_of_the_message_truncates_back(tmp_path: Path) -> None:
    """The queued message cannot be read half-way (a damaged file): what was appended
    is taken back."""
    path = tmp_path / "mbox"
    deliver_mbox(path, MESSAGE, sender="a@example.org", when=WHEN)
    before = path.read_bytes()
    message = big_message()
    source = tmp_path / "short"
    source.write_bytes(message[: len(message) // 2])  # the file ends early
    fd = os.open(source, os.O_RDONLY)
    try:
        with pytest.raises(TemporaryFailure):
            deliver_mbox(path, Content.of_file(fd, [(0, len(message))]), sender="b@example.org", when=WHEN)
    finally:
        os.close(fd)
    assert path.read_bytes() == before
