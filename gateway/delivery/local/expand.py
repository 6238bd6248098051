"""Aliases and ``.forward`` for a running gateway: which recipients expand, into what.

The policy names the aliases file (``[local] aliases``) and switches ``.forward`` files
on (``[local] dot_forward``). This module ties those to :mod:`gateway.delivery.local.aliases`:

- :func:`is_alias` answers RCPT (an alias name is a valid local recipient);
- :func:`expand_recipient` gives the scheduler the concrete targets of one recipient,
  or ``None`` when it is an ordinary mailbox;
- :func:`startup_check` loads and validates the file when the gateway starts or
  reloads (a broken file stops either) and lists the warnings owed (``postmaster``,
  ``abuse`` or ``MAILER-DAEMON`` going nowhere);
- :class:`AliasTable` keeps the parsed file and reads it again when it changes.

Everything here that touches files is synchronous: callers run it in the gateway's
thread pool.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from gateway.delivery.local.aliases import (
    EMPTY,
    AliasError,
    AliasFile,
    ExpansionError,
    UnsafeFileError,
    Leaf,
    Resolver,
    Target,
    load_aliases,
    read_target_file,
)
from gateway.delivery.local.dotqmail import UNSAFE_MODE
from gateway.policy.model import LocalSettings
from gateway.verdicts import Reply

__all__ = [
    "REQUIRED_NAMES",
    "AliasTable",
    "alias_table",
    "aliases_enabled",
    "check_aliases",
    "current_aliases",
    "expand_recipient",
    "home_of",
    "is_alias",
    "read_forward",
    "resolver",
    "startup_check",
]

log = logging.getLogger("gateway.delivery.local.aliases")

RECHECK_SECONDS = 1.0
"""The aliases file's mtime is looked at no more often than this."""

REQUIRED_NAMES = ("postmaster", "abuse", "mailer-daemon")
"""Names every mail domain should answer (RFC 2142, RFC 5321 §4.5.1)."""


def aliases_enabled(local: LocalSettings) -> bool:
    """Whether the policy names an aliases file."""
    return os.fspath(local.aliases) != "."  # Path(), the default: no file


def current_aliases(local: LocalSettings) -> AliasFile:
    """The policy's aliases, re-read if the file changed (synchronous)."""
    if not aliases_enabled(local):
        return EMPTY
    return alias_table(local.aliases).current()


def is_alias(local: LocalSettings, name: str) -> bool | None:
    """Whether ``name`` is an alias, without I/O; ``None`` when the file is due a look."""
    if not aliases_enabled(local):
        return False
    cached = alias_table(local.aliases).cached()
    return None if cached is None else name.lower() in cached.aliases


def home_of(local: LocalSettings, user: str) -> Path:
    """A user's home: the ``[[local.assign]]`` home, else ``<mail_root>/<user>``."""
    assign = next((a for a in local.assign if a.user.lower() == user), None)
    if assign is not None and assign.home != Path():
        return Path(os.path.abspath(assign.home))
    return Path(os.path.abspath(local.mail_root / user))


def read_forward(local: LocalSettings, user: str) -> tuple[Target, ...] | None:
    """The targets of ``<home>/.forward``; ``None`` when off, missing, or only comments.

    :raises AliasError: unreadable, malformed, or writable by group or others (the
        home too), since then someone else could redirect the user's mail
    """
    if not local.dot_forward or "/" in user or user in ("", ".", ".."):
        return None
    home = home_of(local, user)
    path = home / ".forward"
    try:
        if os.stat(home).st_mode & UNSAFE_MODE:
            raise UnsafeFileError(str(path), None, user, "home directory is writable by group or others")
        targets = read_target_file(path, alias=user)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return targets or None


def resolver(local: LocalSettings, aliases: AliasFile | None = None) -> Resolver:
    """A :class:`Resolver` on the policy's aliases, users, domains and ``.forward`` files."""
    return Resolver(
        aliases if aliases is not None else current_aliases(local),
        domains=local.domains,
        users=local.users,
        forward=(lambda user: read_forward(local, user)) if local.dot_forward else None,
        base=local.aliases.parent if aliases_enabled(local) else Path("/"),
        delimiter=local.extension_delimiter,
        home=lambda user: home_of(local, user),
    )


def expand_recipient(local: LocalSettings, local_part: str) -> list[Leaf] | None:
    """The concrete targets of a local recipient, or ``None`` for an ordinary mailbox.

    ``local_part`` expands when it is an alias name, or a local user with a
    ``.forward`` file (and ``dot_forward`` on). Synchronous: run it in a thread.

    :raises ExpansionError: a loop, or an include or ``.forward`` file that is broken
        (5xx) or cannot be read now (4xx)
    """
    name = local_part.lower()
    if not aliases_enabled(local) and not local.dot_forward:
        return None
    resolve = resolver(local)
    if not resolve.is_alias(name) and (not local.dot_forward or name not in local.users):
        return None
    leaves = resolve.expand(name)
    if leaves == [Leaf("user", name)]:
        return None  # a .forward that says only "\me", or nothing: the mailbox itself
    if not leaves:
        raise ExpansionError(Reply(550, "5.1.1", f"alias {name} has no recipients"))
    return leaves


def startup_check(local: LocalSettings) -> list[str]:
    """Load and check the aliases file now; the warnings to log.

    ``postmaster`` is always delivered (to the user of that name), and ``abuse`` and
    ``MAILER-DAEMON`` reach the postmaster when neither a user nor an alias has their
    name (:data:`gateway.delivery.router.POSTMASTER_ROLES`), so none of the
    :data:`REQUIRED_NAMES` can go nowhere: the warnings are the aliases file's own.

    :raises AliasError: the file is unreadable or broken, or an alias loops (file,
        line and alias named)
    """
    warnings: list[str] = []
    if aliases_enabled(local):
        aliases = alias_table(local.aliases).load()
        # .forward files are the users' business, read at delivery: not here.
        resolve = Resolver(
            aliases, domains=local.domains, users=local.users,
            base=local.aliases.parent, delimiter=local.extension_delimiter,
        )
        check_aliases(aliases, resolve, warnings=warnings)
    return warnings


def check_aliases(
    aliases: AliasFile, resolve: Resolver, *, warnings: list[str] | None = None,
) -> dict[str, list[Leaf]]:
    """Expand every alias (``:include:`` files read); the leaves of each.

    :param warnings: when given, an include file that cannot be read right now (a 4xx
        at delivery) is reported here instead of raised
    :raises AliasError: the first alias whose expansion fails, naming its line
    """
    out: dict[str, list[Leaf]] = {}
    for name, alias in aliases.aliases.items():
        try:
            out[name] = resolve.expand(name)
        except ExpansionError as exc:
            # A loop is reported at the alias it returns to, wherever the walk began.
            at = aliases.aliases.get(exc.name, alias)
            error = AliasError(aliases.source, at.line, at.name, exc.detail)
            if warnings is None or exc.is_permanent:
                raise error from None
            warnings.append(str(error))
    return out


class AliasTable:
    """The aliases file named by the policy, re-read when it changes on disk.

    :meth:`current` looks at the file's inode, size and mtime at most once per
    :data:`RECHECK_SECONDS`; a changed file that no longer parses is logged at ERROR
    (file and line) and the last good version stays in use.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file: AliasFile = EMPTY
        self._stamp: tuple[int, int, int, int] | None = None
        self._checked = 0.0

    def _stat(self) -> tuple[int, int, int, int] | None:
        try:
            info = os.stat(self.path)
        except OSError:
            return None
        return (info.st_ino, info.st_dev, info.st_size, info.st_mtime_ns)

    def load(self) -> AliasFile:
        """Read the file now (start-up, reload). Synchronous.

        :raises AliasError: the file is unreadable or broken; the table is unchanged
        """
        with self._lock:
            stamp = self._stat()
            parsed = load_aliases(self.path)
            self._file, self._stamp, self._checked = parsed, stamp, time.monotonic()
            return parsed

    def cached(self) -> AliasFile | None:
        """The table without any I/O, or ``None`` when it is due for a look at the file."""
        if self._stamp is not None and time.monotonic() - self._checked < RECHECK_SECONDS:
            return self._file
        return None

    def current(self) -> AliasFile:
        """The table, re-read first if the file changed. Synchronous: run it in a thread."""
        with self._lock:
            if time.monotonic() - self._checked < RECHECK_SECONDS and self._stamp is not None:
                return self._file
            self._checked = time.monotonic()
            stamp = self._stat()
            if stamp == self._stamp:
                return self._file
            try:
                self._file = load_aliases(self.path)
                log.info("aliases re-read from %s: %d aliases", self.path, len(self._file.aliases))
            except AliasError as exc:
                log.error("aliases file changed but is broken, keeping the previous one: %s", exc)
            self._stamp = stamp
            return self._file


_TABLES: dict[Path, AliasTable] = {}
_TABLES_LOCK = threading.Lock()


def alias_table(path: Path) -> AliasTable:
    """The process-wide table for ``path`` (shared by policy generations)."""
    key = Path(os.path.abspath(path))
    with _TABLES_LOCK:
        table = _TABLES.get(key)
        if table is None:
            table = _TABLES[key] = AliasTable(key)
        return table
