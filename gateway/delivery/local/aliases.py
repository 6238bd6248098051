"""Sendmail-style aliases and ``.forward`` files: parsing and recursive expansion.

An aliases file maps a local name to targets::

    # comment
    postmaster: root
    staff:      alice, bob@example.org,
                "|/usr/local/bin/archive --list staff",   # continuation line
                /var/mail/staff.mbox, /srv/mail/staff/,
                :include:/etc/gateway/staff.list
    list:       list, carol                               # owner keeps a copy

Targets, separated by commas (a comma inside double quotes does not separate):

- ``name`` or ``name@<local domain>``: another alias, else a local user (whose own
  ``.forward`` applies when ``[local] dot_forward`` is on);
- ``\\name``: the local user ``name`` itself, never expanded again;
- ``user@elsewhere``: forwarded there;
- ``|command``: piped to a program;
- ``/path``: appended to an mbox file, ``/path/`` (trailing slash): a Maildir;
- ``:include:/path``: the targets listed in that file (one or more a line, ``#`` comments).

A target may be double quoted (``"|prog arg, arg"``); ``\\"`` and ``\\\\`` escape inside
quotes. A line starting with white space continues the previous one.

Expansion (:class:`Resolver`) is recursive. A name that refers to the alias or
``.forward`` being expanded right now (``list: list, carol``) means that local user, as
sendmail does. Any other name met again on the way down is a loop: an
:class:`ExpansionError` naming the chain (554 5.4.6), never an endless expansion.
Parsing errors are :class:`AliasError`, naming file, line and alias.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gateway.address import Address, AddressError
from gateway.delivery.router import split_user
from gateway.verdicts import Reply

__all__ = [
    "Alias",
    "AliasError",
    "AliasFile",
    "ExpansionError",
    "UnsafeFileError",
    "Leaf",
    "Resolver",
    "Target",
    "load_aliases",
    "parse_aliases",
    "parse_targets",
    "read_target_file",
]

MAX_FILE_SIZE = 16 << 20
"""An aliases or include file bigger than this is refused (a mistake or an attack)."""
MAX_DEPTH = 32
"""Nesting deeper than this is refused like a loop (sendmail's MAXRCRSN is 10)."""
MAX_LEAVES = 10000
"""At most this many concrete targets from one expansion."""
UNSAFE_MODE = 0o022

TargetKind = Literal["address", "user", "program", "file", "include"]


class AliasError(Exception):
    """A broken aliases, include or ``.forward`` file: where and what.

    ``str()`` gives ``"{file}:{line}: alias {name!r}: {message}"`` (parts omitted when
    unknown).
    """

    def __init__(self, file: str, line: int | None, alias: str, message: str) -> None:
        self.file = file
        self.line = line
        self.alias = alias
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        what = f"alias {self.alias!r}: " if self.alias else ""
        return f"{where}: {what}{self.message}"


class UnsafeFileError(AliasError):
    """An include or ``.forward`` file (or its home) writable by group or others."""


class ExpansionError(Exception):
    """An expansion that cannot finish: a loop, an unreadable include file.

    :ivar reply: the delivery answer: 5xx for a loop or a bad file, 4xx when the file
        may come back (cannot be read right now)
    """

    def __init__(self, reply: Reply, detail: str = "", *, name: str = "") -> None:
        self.reply = reply
        self.detail = detail or reply.text
        self.name = name  # for a loop: the name it returns to
        super().__init__(self.detail)

    @property
    def is_permanent(self) -> bool:
        return self.reply.code >= 500


@dataclass(frozen=True, slots=True)
class Target:
    """One target as written.

    :ivar kind: ``address`` (a name or an address), ``user`` (``\\name``), ``program``,
        ``file`` (mbox, or Maildir when it ends in ``/``) or ``include``
    :ivar value: the address, name, command or path (quotes removed)
    :ivar line: the line it is on
    """

    kind: TargetKind
    value: str
    line: int


@dataclass(frozen=True, slots=True)
class Alias:
    """One alias: its name (lower case), targets, and the line it starts on."""

    name: str
    targets: tuple[Target, ...]
    line: int


@dataclass(frozen=True)
class AliasFile:
    """A parsed aliases file: name -> :class:`Alias`."""

    source: str
    aliases: Mapping[str, Alias] = field(default_factory=dict)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self.aliases


EMPTY = AliasFile("<none>")


@dataclass(frozen=True, slots=True)
class Leaf:
    """A concrete delivery an expansion ends in.

    :ivar kind: ``user`` (a local mailbox, not expanded again), ``address`` (forward,
        routed as any recipient), ``program``, ``mbox`` or ``maildir``
    :ivar value: user name, address, command, or absolute path
    :ivar owner: whose rights a program or mailbox file uses: ``""`` for the aliases
        file (``[local] program_user``), else the local user whose ``.forward`` it is
    """

    kind: Literal["user", "address", "program", "mbox", "maildir"]
    value: str
    owner: str = ""


# -- parsing ----------------------------------------------------------------


def _split(text: str, *, source: str, line: int, alias: str) -> list[str]:
    """Split at commas outside double quotes; quotes are kept for :func:`_target`."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    escaped = False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            current.append(char)
            escaped = True
        elif char == '"':
            current.append(char)
            quoted = not quoted
        elif char == "," and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if quoted:
        raise AliasError(source, line, alias, "unterminated double quote")
    parts.append("".join(current))
    return [p.strip() for p in parts]


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        out: list[str] = []
        chars = iter(text[1:-1])
        for char in chars:
            out.append(next(chars, "") if char == "\\" else char)
        return "".join(out)
    return text


def _target(raw: str, *, source: str, line: int, alias: str) -> Target:
    text = _unquote(raw).strip()
    if not raw.startswith(('"', "|")) and any(c.isspace() for c in text):
        # "/a/mbox /b/mbox": a forgotten comma, or a path that needed quotes.
        raise AliasError(source, line, alias, f"white space in target {raw!r} (missing comma or quotes?)")
    if text.startswith("|"):
        if not text[1:].strip():
            raise AliasError(source, line, alias, "empty program target '|'")
        return Target("program", text[1:].strip(), line)
    if text.lower().startswith(":include:"):
        path = text[len(":include:"):].strip()
        if not path:
            raise AliasError(source, line, alias, "empty :include: path")
        return Target("include", path, line)
    if text.startswith("/"):
        return Target("file", text, line)
    if text.startswith("\\"):
        name = text[1:].strip().lower()
        if not name or any(c in name for c in "@/ \t\0"):
            raise AliasError(source, line, alias, f"invalid local user {text!r}")
        return Target("user", name, line)
    if "@" not in text:
        if not text or any(c in text for c in " \t\0/\"") or text.startswith((".", "-")):
            raise AliasError(source, line, alias, f"invalid target {raw!r}")
        return Target("address", text.lower(), line)
    try:
        parsed = Address.parse(text)
    except AddressError as exc:
        raise AliasError(source, line, alias, f"invalid address {raw!r} ({exc})") from None
    return Target("address", str(parsed), line)


def parse_targets(text: str, *, source: str, line: int = 1, alias: str = "") -> tuple[Target, ...]:
    """Parse a comma separated list of targets (the right side of an alias).

    :raises AliasError: a malformed target, naming ``source`` and ``line``
    """
    return tuple(
        _target(part, source=source, line=line, alias=alias)
        for part in _split(text, source=source, line=line, alias=alias)
        if part
    )


def _strip_comment(line: str) -> str:
    """The line without a ``#`` comment: at its start, or after white space outside quotes."""
    quoted = False
    for index, char in enumerate(line):
        if char == '"' and (index == 0 or line[index - 1] != "\\"):
            quoted = not quoted
        elif char == "#" and not quoted and (index == 0 or line[index - 1] in " \t"):
            return line[:index].rstrip()
    return line


def _logical_lines(text: str) -> Iterable[tuple[int, str]]:
    """``(first line number, joined text)``: comments dropped, continuations joined."""
    start = 0
    pending: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = _strip_comment(raw.rstrip("\r"))
        if not line.strip() and raw.strip():
            continue  # a comment line does not end a continued entry
        if line[:1] in (" ", "\t") and pending:
            if line.strip():
                pending.append(line.strip())
            continue
        if pending:
            yield start, " ".join(pending)
            pending = []
        if line.strip():
            start = number
            pending = [line.strip()]
    if pending:
        yield start, " ".join(pending)


def _line_of(text: str, start: int, target: str) -> int:
    """The physical line (from ``start``) a target of a continued entry is on."""
    lines = text.splitlines()
    words = target.split()
    target = words[0] if words else target
    for offset, raw in enumerate(lines[start - 1 :]):
        if target and target in raw:
            return start + offset
        if offset and raw[:1] not in (" ", "\t", "#") and raw.strip():
            break
    return start


def parse_aliases(text: str, *, source: str) -> AliasFile:
    """Parse an aliases file.

    :param text: the file's content
    :param source: its name, for messages
    :raises AliasError: the first problem, with file, line and alias
    """
    aliases: dict[str, Alias] = {}
    for number, line in _logical_lines(text):
        name, sep, rest = line.partition(":")
        name = _unquote(name.strip()).lower()
        if not sep:
            raise AliasError(source, number, "", "expected 'name: target, ...'")
        if not name or any(c in name for c in " \t\0/@,\"\\"):
            raise AliasError(source, number, name, "invalid alias name")
        if name in aliases:
            raise AliasError(
                source, number, name, f"defined twice (first at line {aliases[name].line})"
            )
        targets = []
        for part in _split(rest, source=source, line=number, alias=name):
            if part:
                where = _line_of(text, number, part)
                targets.append(_target(part, source=source, line=where, alias=name))
        if not targets:
            raise AliasError(source, number, name, "no targets")
        aliases[name] = Alias(name, tuple(targets), number)
    return AliasFile(source, aliases)


def _read_text(path: Path, *, check_mode: bool) -> str:
    """A file's text; ``OSError`` when it cannot be read, ``ValueError`` when unsafe."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        if check_mode and info.st_mode & UNSAFE_MODE:
            raise ValueError("writable by group or others")
        if info.st_size > MAX_FILE_SIZE:
            raise ValueError("too large")
        chunks = []
        while data := os.read(fd, 1 << 20):
            chunks.append(data)
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", "surrogateescape")


def load_aliases(path: str | os.PathLike[str]) -> AliasFile:
    """Read and parse an aliases file. Synchronous: run it in a thread.

    :raises AliasError: unreadable or malformed (file and line)
    """
    source = os.fspath(path)
    try:
        text = _read_text(Path(source), check_mode=False)
    except OSError as exc:
        raise AliasError(source, None, "", f"cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise AliasError(source, None, "", str(exc)) from None
    return parse_aliases(text, source=source)


def read_target_file(path: Path, *, alias: str = "") -> tuple[Target, ...]:
    """The targets of an include or ``.forward`` file (one or more a line, ``#`` comments).

    The file must be a regular file not writable by group or others: whoever could
    write it could decide where mail goes.

    :raises FileNotFoundError: there is no such file
    :raises AliasError: unreadable, unsafe or malformed
    """
    source = str(path)
    try:
        text = _read_text(path, check_mode=True)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise AliasError(source, None, alias, f"cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        cls = UnsafeFileError if "writable" in str(exc) else AliasError
        raise cls(source, None, alias, str(exc)) from None
    targets: list[Target] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = _strip_comment(raw).strip()
        if not line:
            continue
        targets.extend(parse_targets(line, source=source, line=number, alias=alias))
    return tuple(targets)


# -- expansion --------------------------------------------------------------

LOOP = "5.4.6"


def _unsafe(what: str, exc: AliasError) -> ExpansionError:
    # As for .qmail files (qmail's "Uh-oh"): defer until someone fixes the permissions.
    reply = Reply(451, "4.7.0", f"unsafe permissions: {what} is writable by group or others")
    return ExpansionError(reply, str(exc))


def _loop(chain: list[str], name: str) -> ExpansionError:
    path = " -> ".join([*chain[chain.index(name):], name])
    return ExpansionError(Reply(554, LOOP, f"alias loop: {path}"[:200]), f"alias loop: {path}", name=name)


class Resolver:
    """Expands a name into :class:`Leaf` targets, following aliases, includes, ``.forward``.

    :param aliases: the parsed aliases file
    :param domains: the local domains: ``name@<one of these>`` is the name ``name``
    :param users: the local users (names that are not aliases and not users are still
        returned as ``user`` leaves; delivery refuses them, ``unknown`` lists them)
    :param forward: ``forward(user)`` gives that user's ``.forward`` targets, or
        ``None`` (no file, or ``.forward`` files are off); may raise :class:`AliasError`
    :param base: the directory relative ``:include:`` paths start from
    :param delimiter: the extension delimiter (``user-ext`` is user ``user``)
    :param home: ``home(user)``: an ``:include:`` in that user's ``.forward`` must lie
        inside it (the gateway reads it as root: no one may make it read other files)
    """

    def __init__(
        self,
        aliases: AliasFile,
        *,
        domains: Iterable[str] = (),
        users: Iterable[str] = (),
        forward: Callable[[str], tuple[Target, ...] | None] | None = None,
        base: Path | None = None,
        delimiter: str = "-",
        home: Callable[[str], Path] | None = None,
    ) -> None:
        self.aliases = aliases
        self.domains = frozenset(d.lower() for d in domains)
        self.users = frozenset(u.lower() for u in users)
        self.forward = forward
        self.base = base if base is not None else Path(aliases.source).parent
        self.delimiter = delimiter
        self.home = home
        self.unknown: set[str] = set()

    def is_alias(self, name: str) -> bool:
        return name.lower() in self.aliases.aliases

    def expand(self, name: str) -> list[Leaf]:
        """The concrete targets of ``name`` (an alias, or a user with a ``.forward``).

        A name that is neither gives ``[Leaf("user", name)]``. Duplicates are dropped,
        order is kept.

        :raises ExpansionError: a loop (554 5.4.6), too deep or too wide (554 5.4.6),
            a broken include or ``.forward`` file (554 5.3.5) or one that cannot be
            read now (451 4.3.0)
        """
        leaves: dict[Leaf, None] = {}
        self._name(name.lower(), [], "", leaves, ())
        return list(leaves)

    def _local_name(self, value: str) -> str | None:
        """``name`` for a bare name or ``name@<local domain>``, ``None`` for other addresses."""
        if "@" not in value:
            return value.lower()
        local, _, domain = value.rpartition("@")
        if domain.lower().rstrip(".") in self.domains and not local.startswith('"'):
            return local.lower()
        return None

    def _add(self, leaves: dict[Leaf, None], leaf: Leaf) -> None:
        leaves[leaf] = None
        if len(leaves) > MAX_LEAVES:
            raise ExpansionError(Reply(554, LOOP, f"alias expands to more than {MAX_LEAVES} targets"))

    def _name(
        self, name: str, chain: list[str], owner: str, leaves: dict[Leaf, None],
        includes: tuple[str, ...],
    ) -> None:
        if name in chain:
            if name == chain[-1]:
                # list: list, bob — the list's own name is its owner's mailbox (sendmail).
                self._user(name, leaves)
                return
            raise _loop(chain, name)
        if len(chain) >= MAX_DEPTH:
            raise ExpansionError(Reply(554, LOOP, f"aliases nested deeper than {MAX_DEPTH}"))
        alias = self.aliases.aliases.get(name)
        if alias is not None:
            self._targets(alias.targets, [*chain, name], "", leaves, includes)
            return
        targets = self._forward(name)
        if targets:
            self._targets(targets, [*chain, name], name, leaves, includes)
            return
        self._user(name, leaves)

    def _user(self, name: str, leaves: dict[Leaf, None]) -> None:
        if self.users and split_user(name, self.users, self.delimiter)[0] not in self.users:
            self.unknown.add(name)
        self._add(leaves, Leaf("user", name))

    def _forward(self, name: str) -> tuple[Target, ...] | None:
        if self.forward is None or name not in self.users:
            return None
        try:
            return self.forward(name)
        except UnsafeFileError as exc:
            raise _unsafe(".forward", exc) from None
        except AliasError as exc:
            raise ExpansionError(Reply(554, "5.3.5", f"bad .forward of {name}"), str(exc)) from None

    def _targets(
        self, targets: Iterable[Target], chain: list[str], owner: str,
        leaves: dict[Leaf, None], includes: tuple[str, ...],
    ) -> None:
        for target in targets:
            if target.kind == "program":
                self._add(leaves, Leaf("program", target.value, owner))
            elif target.kind == "file":
                kind: Literal["mbox", "maildir"] = "maildir" if target.value.endswith("/") else "mbox"
                self._add(leaves, Leaf(kind, os.path.normpath(target.value) + ("/" if kind == "maildir" else ""), owner))
            elif target.kind == "user":
                self._user(target.value, leaves)
            elif target.kind == "include":
                self._include(target.value, chain, owner, leaves, includes)
            else:
                name = self._local_name(target.value)
                if name is None:
                    self._add(leaves, Leaf("address", target.value))
                else:
                    self._name(name, chain, owner, leaves, includes)

    def _include(
        self, value: str, chain: list[str], owner: str, leaves: dict[Leaf, None],
        includes: tuple[str, ...],
    ) -> None:
        if owner:
            home = self.home(owner) if self.home is not None else None
            path = Path(os.path.realpath((home or Path("/nonexistent")) / value))
            if home is None or not path.is_relative_to(os.path.realpath(home)):
                raise ExpansionError(
                    Reply(554, "5.3.5", f"bad .forward of {owner}: :include: outside the home"),
                    f"{owner}'s .forward includes {value}, outside the home",
                )
        else:
            path = Path(os.path.normpath(self.base / value))
        key = str(path)
        if key in includes:
            raise ExpansionError(Reply(554, LOOP, f"alias loop: {path.name} includes itself"))
        if len(includes) >= MAX_DEPTH:
            raise ExpansionError(Reply(554, LOOP, f"includes nested deeper than {MAX_DEPTH}"))
        try:
            targets = read_target_file(path, alias=chain[-1] if chain else "")
        except FileNotFoundError:
            # Maybe on a file system that is not mounted yet: try again later.
            raise ExpansionError(
                Reply(451, "4.3.0", f"cannot read :include: file {path.name}"),
                f"{path}: no such file",
            ) from None
        except UnsafeFileError as exc:
            raise _unsafe(f":include: file {path.name}", exc) from None
        except AliasError as exc:
            raise ExpansionError(Reply(554, "5.3.5", f"bad :include: file {path.name}"), str(exc)) from None
        self._targets(targets, chain, owner, leaves, (*includes, key))
