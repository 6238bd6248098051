"""Per-user instruction files in qmail's ``.qmail`` format: lookup and parsing.

For ``user-ext@domain`` the instructions come from ``<home>/.qmail-ext``, falling back
to ``-default`` files exactly as qmail-local searches them: for ``foo-bar`` the files
``.qmail-foo-bar``, ``.qmail-foo-default``, ``.qmail-default``, first found wins, and
the part of the extension a ``-default`` stood for becomes ``$DEFAULT``. A plain
``user@domain`` reads ``.qmail``. The extension is lower-cased, and ``.`` and ``/`` in
it become ``:`` so an address can never name a file outside the home.

One instruction per line (docs/local-delivery.md has the reference):

- blank lines and ``#`` comments are skipped;
- ``|command``: program delivery;
- ``/path`` or ``./path``: a mailbox, a Maildir when it ends in ``/``, else an mbox;
  relative paths are relative to the home;
- ``&address`` or anything else: forward to ``address`` (``local@domain``).

A home or instruction file writable by group or others is refused with a temporary
failure (qmail's "Uh-oh: .qmail file is writable"), because someone other than the
user could then decide where the user's mail goes.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gateway.address import Address, AddressError
from gateway.verdicts import PermanentFailure, Reply, TemporaryFailure

__all__ = [
    "NO_MAILBOX",
    "DotQmail",
    "Instruction",
    "candidate_files",
    "load_dotqmail",
    "parse_instructions",
]

NO_MAILBOX = Reply(550, "5.1.1", "Sorry, no mailbox here by that name")
# qmail's conf-patrn: who besides the owner may not write the home or the .qmail file.
UNSAFE_MODE = 0o022
# An instruction file is a handful of lines; anything this big is a mistake or an attack.
MAX_FILE_SIZE = 1 << 20
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


@dataclass(frozen=True, slots=True)
class Instruction:
    """One delivery line of an instruction file.

    :ivar kind: ``program``, ``maildir``, ``mbox`` or ``forward``
    :ivar value: the command, the mailbox path as written, or the address
    :ivar line: the line number in the file, for messages
    :ivar path: the absolute mailbox path (``maildir`` and ``mbox`` only)
    """

    kind: Literal["program", "maildir", "mbox", "forward"]
    value: str
    line: int
    path: Path | None = None


@dataclass(frozen=True, slots=True)
class DotQmail:
    """The instruction file that applies to one delivery.

    :ivar path: the file that matched
    :ivar default: qmail's ``$DEFAULT``: the part of the extension a ``-default`` file
        stood for (empty when the file named the extension exactly)
    :ivar instructions: the delivery lines, in file order; empty means "default delivery"
    :ivar is_default: a ``-default`` file matched (so ``$DEFAULT`` is set, maybe empty)
    """

    path: Path
    default: str
    instructions: tuple[Instruction, ...]
    is_default: bool = False


def candidate_files(extension: str, delimiter: str = "-") -> list[tuple[str, str | None]]:
    """The file names qmail-local tries for ``extension``, in order, with their ``$DEFAULT``.

    :param extension: the address extension (``foo-bar`` of ``user-foo-bar@domain``)
    :param delimiter: the extension delimiter; ``-default`` files are tried at each of
        its positions, while the file prefix stays ``.qmail-`` (with ``+``: ``.qmail-a+b``,
        ``.qmail-a+default``, ``.qmail-default``)
    :returns: ``(file name, default part or None)`` pairs, ``None`` for the exact file;
        ``[(".qmail", None)]`` for no extension
    """
    if not extension:
        return [(".qmail", None)]
    # ASCII-only lowering keeps indices aligned with ``extension`` for $DEFAULT.
    ext = extension.translate(_ASCII_LOWER)
    # qmail replaces dots so ".qmail-..foo" tricks are impossible; "/" would leave the home.
    safe = ext.replace(".", ":").replace("/", ":").replace("\0", ":")
    # The file prefix is always ".qmail-"; the delimiter splits the extension itself.
    names: list[tuple[str, str | None]] = [(f".qmail-{safe}", None)]
    # qmail-local: for i from len(ext) down to 0, where i == 0 or ext[i-1] is the
    # delimiter, try ".qmail-" + ext[:i] + "default"; $DEFAULT is ext[i:].
    for i in range(len(ext), -1, -1):
        if i == 0 or ext[i - len(delimiter) : i] == delimiter:
            names.append((f".qmail-{safe[:i]}default", extension[i:]))
    return names


def parse_instructions(text: str, *, home: Path, source: str) -> tuple[Instruction, ...]:
    """Parse the lines of an instruction file.

    :param text: the file's content
    :param home: the home directory relative mailbox paths start from
    :param source: the file's name, for error messages
    :raises PermanentFailure: 554 5.3.5 naming the file and line of a bad forward address
        or an empty program line (a configuration error the user must fix)
    """
    out: list[Instruction] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip(" \t\r")
        if not line or line.startswith("#"):
            continue
        if line.startswith("|"):
            command = line[1:].strip()
            if not command:
                raise _config_error(source, number, "empty program line")
            out.append(Instruction("program", command, number))
        elif line.startswith(("/", ".")):
            kind: Literal["maildir", "mbox"] = "maildir" if line.endswith("/") else "mbox"
            path = Path(line) if line.startswith("/") else home / line
            out.append(Instruction(kind, line, number, Path(os.path.normpath(path))))
        else:
            address = line[1:].strip() if line.startswith("&") else line.strip()
            try:
                parsed = Address.parse(address)
            except AddressError as exc:
                raise _config_error(source, number, f"invalid forward address ({exc})") from exc
            out.append(Instruction("forward", str(parsed), number))
    return tuple(out)


def _config_error(source: str, line: int, what: str) -> PermanentFailure:
    # Name the file and line, never its content: the text may reach the sender.
    return PermanentFailure(Reply(554, "5.3.5", f"{what} in {source} line {line}"))


def _unsafe(what: str) -> TemporaryFailure:
    return TemporaryFailure(
        Reply(451, "4.7.0", f"unsafe permissions: {what} is writable by group or others")
    )


def _read_file(path: Path) -> str | None:
    """The file's text, ``None`` when it does not exist; refuses unsafe or odd files."""
    try:
        # O_NONBLOCK: a FIFO planted under the name must not hang the delivery.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise TemporaryFailure(
            Reply(451, "4.3.0", f"cannot open {path.name}: {exc.strerror}")
        ) from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise TemporaryFailure(Reply(451, "4.3.0", f"{path.name} is not a regular file"))
        if info.st_mode & UNSAFE_MODE:
            raise _unsafe(path.name)
        if info.st_size > MAX_FILE_SIZE:
            raise TemporaryFailure(Reply(451, "4.3.0", f"{path.name} is too large"))
        data = os.read(fd, MAX_FILE_SIZE + 1)
    except OSError as exc:
        raise TemporaryFailure(
            Reply(451, "4.3.0", f"cannot read {path.name}: {exc.strerror}")
        ) from exc
    finally:
        os.close(fd)
    return data.decode("utf-8", "surrogateescape")


def load_dotqmail(home: Path, extension: str, *, delimiter: str = "-") -> DotQmail | None:
    """Find and parse the instruction file for one delivery. Synchronous: run it in a thread.

    :param home: the user's home directory
    :param extension: the address extension, empty for the plain address
    :param delimiter: the extension delimiter (``policy.local.extension_delimiter``)
    :returns: the file and its instructions, or ``None`` when there is no extension and
        no ``.qmail`` (default delivery)
    :raises TemporaryFailure: unsafe permissions on the home or the file, unreadable file
    :raises PermanentFailure: an extension no file answers (550 5.1.1), or a bad line
    """
    try:
        home_mode = os.stat(home).st_mode
    except OSError as exc:
        raise TemporaryFailure(
            Reply(451, "4.3.0", f"cannot use home directory: {exc.strerror}")
        ) from exc
    if home_mode & UNSAFE_MODE:
        raise _unsafe("home directory")
    for name, default in candidate_files(extension, delimiter):
        text = _read_file(home / name)
        if text is None:
            continue
        instructions = parse_instructions(text, home=home, source=name)
        return DotQmail(home / name, default or "", instructions, default is not None)
    if extension:
        raise PermanentFailure(NO_MAILBOX)
    return None
