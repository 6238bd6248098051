"""Users' homes for local delivery: made when missing, their Maildir's parents made
below them without following a symlink the user placed, and who a program runs as in
one (its user's login group; whether that user may enter the home). For the agent,
:mod:`gateway.delivery.local.agent`, which calls these on its pool threads: they touch
the file system or the user database."""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

from gateway.delivery.local.maildir import Confinement, mailbox_error, open_directory
from gateway.delivery.types import LocalAccount

__all__ = ["can_enter", "ensure_account_home", "ensure_home", "make_parents", "primary_gid"]


def ensure_home(home: Path) -> None:
    """Create a mail-root home (0o700) when missing; its parents get default modes."""
    try:
        os.mkdir(home, 0o700)  # one system call when the home is there, as it mostly is
        return
    except FileExistsError:
        return
    except FileNotFoundError:
        pass
    home.parent.mkdir(parents=True, exist_ok=True)
    try:
        home.mkdir(mode=0o700)
    except FileExistsError:
        pass


def ensure_account_home(home: Path, uid: int | None, gid: int | None) -> None:
    """Create a directory account's missing home as Dovecot's own delivery does: each
    missing level 0o700, given to ``uid``/``gid`` when the gateway runs as root. The
    path comes from the administrator's user database, as trusted as an assign home."""
    missing: list[Path] = []
    path = home
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue
        if os.geteuid() == 0 and uid is not None:
            os.chown(path, uid, -1 if gid is None else gid, follow_symlinks=False)


def make_parents(account: LocalAccount, home: Path, confine: Confinement | None) -> Confinement | None:
    """Create the missing parents of an account's Maildir; the confinement to deliver it.

    Below the home, each level is made by the confined walk (no symlink the user placed
    is followed); a Maildir outside the home is the user database's, as trusted as the
    home: its parents are made like a home, and it is confined to its parent.
    """
    assert account.maildir is not None
    parent = account.maildir.parent
    if not account.maildir.is_relative_to(home):
        ensure_account_home(parent, account.uid, account.gid)
        return None if confine is None else Confinement(parent, confine.uid, confine.gid)
    try:
        levels = parent.relative_to(home).parts
        for depth in range(1, len(levels) + 1):
            os.close(open_directory(home.joinpath(*levels[:depth]), confine=confine, create=True))
    except OSError as exc:
        raise mailbox_error(exc, "maildir") from exc
    return confine


def can_enter(info: os.stat_result, uid: int, gid: int) -> bool:
    """Whether ``uid``/``gid`` (not root) may search the directory ``info`` describes."""
    if info.st_uid == uid:
        return bool(info.st_mode & stat.S_IXUSR)
    if info.st_gid == gid:
        return bool(info.st_mode & stat.S_IXGRP)
    return bool(info.st_mode & stat.S_IXOTH)


def primary_gid(uid: int) -> int:
    """The uid's login group, or the same number when the uid has no passwd entry."""
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return uid
