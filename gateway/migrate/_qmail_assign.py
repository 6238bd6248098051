"""qmail's ``users/assign`` file, as far as ``[[local.assign]]`` can hold it.

qmail-newu's format: ``=local:user:uid:gid:home:dash:ext:`` gives the address ``local``
exactly to ``home`` (instruction file ``.qmail<dash><ext>``); ``+prefix:user:uid:gid:
home:dash:pre:`` gives every address starting with ``prefix`` to ``home`` (instruction
file ``.qmail<dash><pre><rest>``); a line with a single ``.`` ends the file.

Our ``[[local.assign]]`` entry names a user, a home and ids; the user also receives
``user-ext`` addresses, which read ``.qmail-ext`` in that home. So ``=name:...:::``
and ``+name-:...:-::`` (what qmail-pw2u writes) convert exactly; other forms (the
``+:alias`` catch-all, a non-empty ``ext``/``pre``, a prefix not ending in ``-``) are
reported, not guessed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

__all__ = ["Assign", "Line", "QmailFormatError", "parse"]


class QmailFormatError(Exception):
    """A qmail file that qmail itself would refuse: ``str()`` is ``file:line: message``."""

    def __init__(self, file: str, line: int | None, message: str) -> None:
        self.file = file
        self.line = line
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.message}"


@dataclasses.dataclass(frozen=True)
class Line:
    """One line of a qmail file, trailing blanks stripped."""

    file: str
    number: int
    text: str

    @property
    def where(self) -> str:
        return f"{self.file}:{self.number}"


@dataclasses.dataclass
class _Entry:
    user: str
    system_user: str
    uid: int
    gid: int
    home: str
    lines: list[Line]
    exact: bool = False
    prefix: bool = False


@dataclasses.dataclass
class Assign:
    """The convertible entries of a users/assign file, by user name."""

    entries: dict[str, _Entry] = dataclasses.field(default_factory=dict)

    def users(
        self, virtual: list[tuple[str, str, Line]], warn: Callable[[str, str], None]
    ) -> list[tuple[str, str]]:
        """Users to add to ``[local] users``: virtual prefixes with no assign entry.

        qmail would have found those through the system accounts (qmail-getpw).
        """
        added: list[tuple[str, str]] = []
        for domain, user, line in virtual:
            if user in self.entries or user in (u for u, _ in added):
                continue
            hint = ""
            for name, entry in self.entries.items():
                if entry.prefix and user.startswith(name + "-"):
                    hint = (
                        f"; qmail delivered it through +{name}- (home {entry.home}, files"
                        f" .qmail-{user[len(name) + 1:]}-LOCAL): add an assign entry for"
                        f" {user!r} with that home and rename those files to .qmail-LOCAL"
                    )
            warn(
                line.where,
                f"virtual domain {domain} maps to {user!r}, which has no users/assign entry;"
                f" its mail goes to <mail_root>/{user}{hint}",
            )
            added.append((user, f"virtualdomains:{line.number}, no assign entry"))
        return added

    def render(self, quote: Callable[[str], str]) -> list[str]:
        out: list[str] = []
        if self.entries:
            out += ["", "# users/assign (=name and +name- lines)"]
        for entry in self.entries.values():
            where = ", ".join(f"users/assign:{line.number}" for line in entry.lines)
            out += [
                "[[local.assign]]",
                f"user = {quote(entry.user)}  # {where}; system user {entry.system_user}",
                f"home = {quote(entry.home)}",
                f"uid = {entry.uid}",
                f"gid = {entry.gid}",
            ]
        return out


def parse(
    lines: list[Line],
    skip: Callable[[str, str, str], None],
    warn: Callable[[str, str], None],
) -> Assign:
    """Read users/assign lines.

    :param skip: called with (where, text, reason) for a line with no equivalent.
    :param warn: called with (where, message) for a difference worth knowing.
    :raises QmailFormatError: a line qmail-newu would refuse
    """
    result = Assign()
    ended = False
    for line in lines:
        text = line.text
        if ended:
            if text:
                warn(line.where, "ignored: after the '.' line that ends users/assign")
            continue
        if not text:
            continue
        if text == ".":
            ended = True
            continue
        if text[0] not in "=+":
            raise QmailFormatError(line.file, line.number, f"expected a line starting with =, + or '.', got {text!r}")
        fields = text[1:].split(":")
        if len(fields) != 8 or fields[7]:
            raise QmailFormatError(
                line.file, line.number,
                f"expected 7 fields, each ending in ':' ({text[0]}name:user:uid:gid:home:dash:ext:), got {text!r}",
            )
        name, system_user, uid, gid, home, dash, ext = fields[:7]
        for label, number in (("uid", uid), ("gid", gid)):
            if not number.isdigit():
                raise QmailFormatError(line.file, line.number, f"{label} must be a number, got {number!r}")
        if not home.startswith("/"):
            raise QmailFormatError(line.file, line.number, f"home must be an absolute path, got {home!r}")
        name = name.lower()
        if text[0] == "=" and not dash and not ext:
            user, kind = name, "exact"
        elif text[0] == "+" and len(name) > 1 and name.endswith("-") and dash == "-" and not ext:
            user, kind = name[:-1], "prefix"
        elif text[0] == "+" and not name:
            skip(line.where, text, "a catch-all (+:...) has no equivalent: unknown local users are refused at RCPT")
            continue
        else:
            skip(
                line.where, text,
                "only =name:...:: and +name-:...:-:: lines have an equivalent"
                " (the instruction file is always .qmail or .qmail-EXT in the home)",
            )
            continue
        entry = _Entry(user, system_user, int(uid), int(gid), home, [line])
        existing = result.entries.get(user)
        if existing is None:
            result.entries[user] = entry
            existing = entry
        elif (existing.uid, existing.gid, existing.home) != (entry.uid, entry.gid, entry.home):
            skip(line.where, text, f"conflicts with line {existing.lines[0].number} (another home or ids for {user!r})")
            continue
        else:
            existing.lines.append(line)
        setattr(existing, kind, True)
    if lines and not ended:
        warn(lines[0].file, "no '.' line at the end (qmail-newu needs one): is the file complete?")
    for entry in result.entries.values():
        if entry.exact and not entry.prefix:
            warn(
                entry.lines[0].where,
                f"{entry.user}-EXT addresses are accepted here too (reading .qmail-EXT in"
                f" {entry.home}); qmail had no +{entry.user}- line for them",
            )
    return result
