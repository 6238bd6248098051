"""Unit tests for gateway.delivery.local.maildir: safe delivery, unique names, failures,
confinement below a home when root."""

from __future__ import annotations

import errno
import os
import re
import stat
import threading
import tracemalloc
from pathlib import Path

import pytest

from gateway.content import Content
from gateway.delivery.local import maildir as maildir_mod
from gateway.delivery.local.maildir import (
    Confinement,
    deliver_maildir,
    mailbox_error,
    open_directory,
    unique_name,
)
from gateway.delivery.local.quota import Quota, Usage, deliver_with_quota, read_usage
from gateway.verdicts import TemporaryFailure
from tests.streaming import big_message, file_content, no_whole_reads

MESSAGE = b"Return-Path: <a@example.org>\r\nSubject: hi\r\n\r\nbody\r\n"
NAME_RE = re.compile(r"^\d+\.M\d+P\d+Q\d+\.[^/:]+$")
REQUIRES_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
NOBODY = 65534


def test_delivery_creates_maildir_and_lands_in_new(tmp_path: Path) -> None:
    maildir = tmp_path / "Maildir"
    name = deliver_maildir(maildir, [MESSAGE[:10], MESSAGE[10:]], hostname="mx.example")
    assert NAME_RE.match(name)
    assert name.endswith(".mx.example")
    for sub in ("tmp", "new", "cur"):
        assert stat.S_IMODE((maildir / sub).stat().st_mode) == 0o700
    assert (maildir / "new" / name).read_bytes() == MESSAGE
    assert stat.S_IMODE((maildir / "new" / name).stat().st_mode) == 0o600
    assert list((maildir / "tmp").iterdir()) == []


def test_parent_of_maildir_is_not_created(tmp_path: Path) -> None:
    with pytest.raises(TemporaryFailure) as info:
        deliver_maildir(tmp_path / "missing" / "Maildir", [MESSAGE], hostname="h")
    assert info.value.reply.code == 451
    assert not (tmp_path / "missing").exists()


def test_hostname_escaping() -> None:
    name = unique_name("a/b:c", now=1700000000.25)
    assert name.startswith("1700000000.M250000P")
    assert name.endswith(".a\\057b\\072c")


def test_unique_names_under_concurrency(tmp_path: Path) -> None:
    maildir = tmp_path / "Maildir"
    names: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        try:
            name = deliver_maildir(maildir, [b"message %d\r\n" % i], hostname="h")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
            return
        with lock:
            names.append(name)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(names)) == 50
    bodies = sorted((maildir / "new" / n).read_bytes() for n in names)
    assert bodies == sorted(b"message %d\r\n" % i for i in range(50))
    assert list((maildir / "tmp").iterdir()) == []


def test_write_failure_removes_tmp_and_maps_disk_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, chunks: object) -> None:
        os.write(fd, b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(maildir_mod, "_write_all", full)
    maildir = tmp_path / "Maildir"
    with pytest.raises(TemporaryFailure) as info:
        deliver_maildir(maildir, [MESSAGE], hostname="h")
    assert (info.value.reply.code, info.value.reply.status) == (452, "4.3.1")
    assert list((maildir / "tmp").iterdir()) == []
    assert list((maildir / "new").iterdir()) == []


def test_link_failure_removes_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_link(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "link", broken_link)
    maildir = tmp_path / "Maildir"
    with pytest.raises(TemporaryFailure) as info:
        deliver_maildir(maildir, [MESSAGE], hostname="h")
    assert (info.value.reply.code, info.value.reply.status) == (451, "4.3.0")
    assert list((maildir / "tmp").iterdir()) == []


def test_rename_fallback_without_hard_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    maildir = tmp_path / "Maildir"
    name = deliver_maildir(maildir, [MESSAGE], hostname="h")
    assert (maildir / "new" / name).read_bytes() == MESSAGE
    assert list((maildir / "tmp").iterdir()) == []


def test_error_replies() -> None:
    quota = mailbox_error(OSError(errno.EDQUOT, "Disk quota exceeded"), "maildir")
    assert (quota.reply.code, quota.reply.status) == (452, "4.2.2")
    denied = mailbox_error(OSError(errno.EACCES, "Permission denied"), "mbox")
    assert (denied.reply.code, denied.reply.status) == (451, "4.2.0")
    assert "Permission denied" in denied.reply.text


def test_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "Maildir").write_bytes(b"")
    with pytest.raises(TemporaryFailure):
        deliver_maildir(tmp_path / "Maildir", [MESSAGE], hostname="h")


# --- confinement (root delivering for another user) ---------------------------------


def test_confinement_refuses_paths_outside_base(tmp_path: Path) -> None:
    confine = Confinement(tmp_path / "home", os.getuid(), os.getgid())
    (tmp_path / "home").mkdir()
    with pytest.raises(TemporaryFailure) as info:
        open_directory(tmp_path / "elsewhere", confine=confine)
    assert info.value.reply.status == "4.7.0"
    with pytest.raises(TemporaryFailure):
        open_directory(tmp_path / "home" / ".." / "elsewhere", confine=confine)


def test_confinement_refuses_symlinks_below_base(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    target = tmp_path / "target"
    target.mkdir()
    (home / "Maildir").symlink_to(target)
    confine = Confinement(home, os.getuid(), os.getgid())
    with pytest.raises(TemporaryFailure):
        deliver_maildir(home / "Maildir", [MESSAGE], hostname="h", confine=confine)
    assert list(target.iterdir()) == []
    # Without confinement an administrator's symlink is followed.
    deliver_maildir(home / "Maildir", [MESSAGE], hostname="h")
    assert len(list((target / "new").iterdir())) == 1


@REQUIRES_ROOT
def test_confined_delivery_gives_files_to_the_user(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    confine = Confinement(home, NOBODY, NOBODY)
    name = deliver_maildir(home / "Maildir", [MESSAGE], hostname="h", confine=confine)
    for path in (home / "Maildir", home / "Maildir" / "new", home / "Maildir" / "new" / name):
        info = path.stat()
        assert (info.st_uid, info.st_gid) == (NOBODY, NOBODY)


# Durability: the promises a mutation of deliver_maildir must not break ------------------


def _fd_kind(fd: int, new_dir: Path) -> str:
    info = os.fstat(fd)
    if stat.S_ISDIR(info.st_mode):
        return "fsync new" if info.st_ino == new_dir.stat().st_ino else "fsync other directory"
    return "fsync file"


@pytest.mark.parametrize("way", ["first", "confined", "retry"])
def test_file_synced_then_linked_then_new_synced_before_returning(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    way: str) -> None:
    """Removing the file's fsync, the link into new/ (or its rename fallback) or the
    fsync of new/ breaks this: the queue forgets the message once this returns. Each
    way through deliver_maildir: a first delivery by path, one confined to a home (by
    directory descriptors), a retry that looks for an earlier copy first."""
    maildir = tmp_path / "Maildir"
    kwargs: dict[str, object] = {}
    if way == "confined":
        kwargs["confine"] = Confinement(tmp_path, os.getuid(), os.getgid())
    elif way == "retry":
        kwargs["name"] = "1700000000.Q9R0L0.h"
    deliver_maildir(maildir, [MESSAGE], hostname="mx.example")  # the directories exist
    events: list[str] = []
    real_write, real_fsync, real_link = os.write, os.fsync, os.link

    def write(fd: int, data: bytes) -> int:
        events.append("write")
        return real_write(fd, data)

    def fsync(fd: int) -> None:
        real_fsync(fd)
        events.append(_fd_kind(fd, maildir / "new"))

    def link(src: str, dst: str, **kwargs: object) -> None:
        real_link(src, dst, **kwargs)  # type: ignore[arg-type]
        events.append("link tmp->new")

    monkeypatch.setattr(maildir_mod.os, "write", write)
    monkeypatch.setattr(maildir_mod.os, "fsync", fsync)
    monkeypatch.setattr(maildir_mod.os, "link", link)
    name = deliver_maildir(maildir, [MESSAGE], hostname="mx.example", **kwargs)  # type: ignore[arg-type]
    events.append("returned")
    assert events == ["write", "fsync file", "link tmp->new", "fsync new", "returned"]
    assert (maildir / "new" / name).read_bytes() == MESSAGE
    assert os.listdir(maildir / "tmp") == []


# -- a large message on disk (issue #17) ----------------------------------------------------


@pytest.mark.parametrize("with_quota", [False, True])
def test_large_message_on_disk_is_copied_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_quota: bool
) -> None:
    """Return-Path and Delivered-To from memory, then the queued message copied from its
    file: the Maildir file is exact, the message is never read whole, and this process
    allocates far less than the message (the copy is the kernel's)."""
    message = big_message()
    lines = b"Return-Path: <a@example.org>\r\nDelivered-To: alice@example.org\r\n"
    maildir = tmp_path / "Maildir"
    with no_whole_reads(monkeypatch) as reads, file_content(tmp_path, message) as content:
        delivered = Content.join(lines, content)
        tracemalloc.start()
        try:
            if with_quota:
                deliver_with_quota(
                    maildir, delivered, quota=Quota(storage=100 * 1024 * 1024), bounce=False, hostname="h"
                )
            else:
                deliver_maildir(maildir, delivered, hostname="h")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert reads == []
    assert peak < len(message) // 8, peak
    (name,) = os.listdir(maildir / "new")
    assert (maildir / "new" / name).read_bytes() == lines + message
    if with_quota:
        assert read_usage(maildir) == Usage(len(lines) + len(message), 1)


def test_a_retry_finds_the_copy_a_reader_moved_to_cur_and_writes_nothing(tmp_path: Path) -> None:
    maildir = tmp_path / "Maildir"
    name = "1700000000.Q1R0L0.h"
    assert deliver_maildir(maildir, [MESSAGE], hostname="h", name=name, first=True) == name
    os.rename(maildir / "new" / name, maildir / "cur" / f"{name}:2,S")  # the reader saw it
    assert deliver_maildir(maildir, [b"again\r\n"], hostname="h", name=name) == name
    assert os.listdir(maildir / "new") == []
    assert (maildir / "cur" / f"{name}:2,S").read_bytes() == MESSAGE
    # A first attempt does not look: the scheduler says so only for a message no attempt saw.
    deliver_maildir(maildir, [b"again\r\n"], hostname="h", name=name, first=True)
    assert os.listdir(maildir / "new") == [name]


def test_a_maildir_missing_only_new_gets_it_again_and_the_message_once(tmp_path: Path) -> None:
    maildir = tmp_path / "Maildir"
    deliver_maildir(maildir, [MESSAGE], hostname="h")
    for name in os.listdir(maildir / "new"):
        os.unlink(maildir / "new" / name)
    os.rmdir(maildir / "new")
    name = deliver_maildir(maildir, [MESSAGE], hostname="h")
    assert os.listdir(maildir / "new") == [name]
    assert (maildir / "new" / name).read_bytes() == MESSAGE
    assert os.listdir(maildir / "tmp") == []


def test_a_maildir_missing_tmp_or_new_gets_all_three_again(tmp_path: Path) -> None:
    maildir = tmp_path / "Maildir"
    deliver_maildir(maildir, [MESSAGE], hostname="h")
    os.rmdir(maildir / "tmp")
    os.rmdir(maildir / "cur")
    name = deliver_maildir(maildir, [MESSAGE], hostname="h")
    assert sorted(os.listdir(maildir)) == ["cur", "new", "tmp"]
    assert name in os.listdir(maildir / "new")
