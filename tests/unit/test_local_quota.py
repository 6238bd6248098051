"""Maildir++ quota bookkeeping (maildirsize) and Maildir expiry, on real directories."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from gateway.delivery.flush import parse_target
from gateway.delivery.local.expire import expire_folder, folder_path
from gateway.delivery.local.quota import (
    RECALCULATE_SIZE,
    Quota,
    Usage,
    deliver_with_quota,
    quota_root,
    read_usage,
    usage,
)
from gateway.verdicts import PermanentFailure, TemporaryFailure


def make_maildir(path: Path, messages: dict[str, bytes] | None = None) -> Path:
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    for name, data in (messages or {}).items():
        (path / name).write_bytes(data)
    return path


def root_usage(path: Path, quota: Quota) -> Usage:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return usage(fd, quota)
    finally:
        os.close(fd)


def test_missing_maildirsize_is_recalculated_in_courier_format(tmp_path: Path) -> None:
    md = make_maildir(tmp_path / "Maildir", {"new/1.a.host": b"x" * 10, "cur/2.b.host:2,S": b"y" * 5,
                                               "cur/3.c.host,S=100:2,": b"z"})
    make_maildir(md / ".Lists", {"cur/4.d.host:2,": b"w" * 7})
    used = root_usage(md, Quota(1000, 10))
    # Sizes come from S= in the name when there is one (Maildir++), else from stat.
    assert used == Usage(10 + 5 + 100 + 7, 4)
    assert (md / "maildirsize").read_text() == "1000S,10C\n122 4\n"


def test_usage_sums_lines_and_recounts_when_stale(tmp_path: Path) -> None:
    md = make_maildir(tmp_path / "Maildir", {"new/1.a.host": b"x" * 10})
    (md / "maildirsize").write_text("1000S\n10 1\n30 1\n-10 -1\n")
    assert root_usage(md, Quota(1000)) == Usage(30, 1)  # trusted as written
    assert read_usage(md) == Usage(30, 1)
    # Another quota in the policy than in the file: recount with the new line.
    assert root_usage(md, Quota(2000, 5)) == Usage(10, 1)
    assert (md / "maildirsize").read_text().splitlines()[0] == "2000S,5C"
    # A file grown past 5120 bytes is rewritten.
    (md / "maildirsize").write_text("2000S,5C\n" + "1 0\n" * (RECALCULATE_SIZE // 4))
    assert root_usage(md, Quota(2000, 5)) == Usage(10, 1)
    assert len((md / "maildirsize").read_text().splitlines()) == 2
    # A torn last line (no newline) is not trusted either.
    (md / "maildirsize").write_text("2000S,5C\n10 1\n99")
    assert root_usage(md, Quota(2000, 5)) == Usage(10, 1)


def test_deliver_with_quota_counts_refuses_and_is_idempotent(tmp_path: Path) -> None:
    md = tmp_path / "Maildir"
    quota = Quota(storage=100, messages=None)
    deliver_with_quota(md, [b"a" * 60], quota=quota, bounce=False, hostname="h", name="fixed")
    assert (md / "maildirsize").read_text() == "100S\n0 0\n60 1\n"
    # The same delivery again (a retry after a crash) is neither written nor counted twice.
    deliver_with_quota(md, [b"a" * 60], quota=quota, bounce=False, hostname="h", name="fixed")
    assert read_usage(md) == Usage(60, 1)
    with pytest.raises(TemporaryFailure) as deferred:
        deliver_with_quota(md, [b"b" * 41], quota=quota, bounce=False, hostname="h")
    assert (deferred.value.reply.code, deferred.value.reply.status) == (452, "4.2.2")
    with pytest.raises(PermanentFailure) as bounced:
        deliver_with_quota(md, [b"b" * 41], quota=quota, bounce=True, hostname="h")
    assert (bounced.value.reply.code, bounced.value.reply.status) == (552, "5.2.2")
    deliver_with_quota(md, [b"c" * 40], quota=quota, bounce=False, hostname="h")  # exactly full
    assert read_usage(md) == Usage(100, 2) and len(list((md / "new").iterdir())) == 2
    # A Maildir++ folder counts toward its parent.
    make_maildir(md / ".Lists")
    assert quota_root(md / ".Lists") == md
    with pytest.raises(TemporaryFailure):
        deliver_with_quota(md / ".Lists", [b"d"], quota=quota, bounce=False, hostname="h")


def test_expire_deletes_old_mail_and_updates_maildirsize(tmp_path: Path) -> None:
    md = make_maildir(tmp_path / "Maildir", {"new/old.host": b"x" * 10, "cur/new.host:2,S": b"y" * 3})
    make_maildir(md / ".Trash", {"cur/t.host:2,T": b"z" * 4})
    root_usage(md, Quota(None, 100))
    old = time.time() - 10 * 86400
    for path in (md / "new/old.host", md / ".Trash/cur/t.host:2,T"):
        os.utime(path, (old, old))
    dry = expire_folder(md, "INBOX", days=5, dry_run=True)
    assert dry.files == [md / "new/old.host"] and (md / "new/old.host").exists()
    done = expire_folder(md, "INBOX", days=5)
    assert done.bytes == 10 and not (md / "new/old.host").exists() and (md / "cur/new.host:2,S").exists()
    assert expire_folder(md, "Trash", days=5).files == [md / ".Trash/cur/t.host:2,T"]
    assert read_usage(md) == Usage(3, 1)
    assert folder_path(md, "Lists/x") == md / ".Lists.x"
    with pytest.raises(ValueError):
        folder_path(md, "../etc")
    with pytest.raises(FileNotFoundError):
        expire_folder(md, "Spam", days=1)


@pytest.mark.parametrize("text, domain, subdomains", [
    ("Example.ORG.", "example.org", False), ("@example.org", "example.org", True),
])
def test_flush_targets(text: str, domain: str, subdomains: bool) -> None:
    target = parse_target(text)
    assert (target.domain, target.subdomains) == (domain, subdomains)
    assert target.covers("a@example.org")
    assert target.covers("a@x.example.org") is subdomains
    assert not target.covers("a@badexample.org")


@pytest.mark.parametrize("text", ["", "@", "#queue", "a b", "a..b", ".x", "é.example"])
def test_bad_flush_targets(text: str) -> None:
    with pytest.raises(ValueError):
        parse_target(text)
