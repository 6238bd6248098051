"""Unit tests for gateway.delivery.local.dotqmail: lookup order, $DEFAULT, line kinds,
errors, unsafe permissions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.delivery.local.dotqmail import (
    NO_MAILBOX,
    Instruction,
    candidate_files,
    load_dotqmail,
    parse_instructions,
)
from gateway.verdicts import PermanentFailure, TemporaryFailure


@pytest.fixture()
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir(mode=0o700)
    return path


def _write(home: Path, name: str, text: str, mode: int = 0o600) -> None:
    path = home / name
    path.write_text(text)
    path.chmod(mode)


def test_candidates_follow_qmail_order() -> None:
    assert candidate_files("") == [(".qmail", None)]
    assert candidate_files("foo-bar") == [
        (".qmail-foo-bar", None),
        (".qmail-foo-default", "bar"),
        (".qmail-default", "foo-bar"),
    ]
    assert candidate_files("a-b-c")[1:] == [
        (".qmail-a-b-default", "c"),
        (".qmail-a-default", "b-c"),
        (".qmail-default", "a-b-c"),
    ]


def test_candidates_fold_case_and_escape_dots_and_slashes() -> None:
    names = [name for name, _ in candidate_files("Foo.Bar/../x")]
    assert names[0] == ".qmail-foo:bar::::x"
    assert all("/" not in name for name in names)
    # $DEFAULT keeps the address's spelling.
    assert candidate_files("List-Sub")[1] == (".qmail-list-default", "Sub")


def test_candidates_other_delimiter() -> None:
    assert candidate_files("a+b", "+") == [
        (".qmail-a+b", None),
        (".qmail-a+default", "b"),
        (".qmail-default", "a+b"),
    ]


def test_no_extension_no_file_means_default_delivery(home: Path) -> None:
    assert load_dotqmail(home, "") is None


def test_unknown_extension_is_permanent(home: Path) -> None:
    with pytest.raises(PermanentFailure) as info:
        load_dotqmail(home, "nobody-here")
    assert info.value.reply == NO_MAILBOX
    assert (info.value.reply.code, info.value.reply.status) == (550, "5.1.1")


def test_exact_file_wins(home: Path) -> None:
    _write(home, ".qmail-foo-bar", "./exact/\n")
    _write(home, ".qmail-foo-default", "./foo/\n")
    _write(home, ".qmail-default", "./any/\n")
    found = load_dotqmail(home, "foo-bar")
    assert found is not None
    assert found.path == home / ".qmail-foo-bar"
    assert (found.default, found.is_default) == ("", False)


def test_default_fallbacks_and_default_part(home: Path) -> None:
    _write(home, ".qmail-foo-default", "./foo/\n")
    _write(home, ".qmail-default", "./any/\n")
    found = load_dotqmail(home, "Foo-Bar")
    assert found is not None
    assert found.path == home / ".qmail-foo-default"
    assert (found.default, found.is_default) == ("Bar", True)
    other = load_dotqmail(home, "zap-zip")
    assert other is not None
    assert other.path == home / ".qmail-default"
    assert other.default == "zap-zip"


def test_dots_in_extension_map_to_colons(home: Path) -> None:
    _write(home, ".qmail-a:b", "./ab/\n")
    found = load_dotqmail(home, "a.b")
    assert found is not None and found.path.name == ".qmail-a:b"


def test_line_kinds(home: Path) -> None:
    text = (
        "# a comment\n"
        "\n"
        "./Maildir/\n"
        "./mbox  \n"
        "/var/mail/alice\n"
        "/srv/mail/alice/\r\n"
        "|preline /usr/bin/procmail\n"
        "&bob@example.org\n"
        "carol@example.net\n"
        "./sub/../Maildir/\n"
    )
    got = parse_instructions(text, home=home, source=".qmail")
    assert got == (
        Instruction("maildir", "./Maildir/", 3, home / "Maildir"),
        Instruction("mbox", "./mbox", 4, home / "mbox"),
        Instruction("mbox", "/var/mail/alice", 5, Path("/var/mail/alice")),
        Instruction("maildir", "/srv/mail/alice/", 6, Path("/srv/mail/alice")),
        Instruction("program", "preline /usr/bin/procmail", 7),
        Instruction("forward", "bob@example.org", 8),
        Instruction("forward", "carol@example.net", 9),
        Instruction("maildir", "./sub/../Maildir/", 10, home / "Maildir"),
    )


@pytest.mark.parametrize("line", ["&not an address", "bob", "&", "bob@", "|"])
def test_bad_lines_are_permanent_and_name_file_and_line(home: Path, line: str) -> None:
    _write(home, ".qmail-x", f"# first\n{line}\n")
    with pytest.raises(PermanentFailure) as info:
        load_dotqmail(home, "x")
    assert info.value.reply.code == 554
    assert ".qmail-x line 2" in info.value.reply.text


def test_empty_file_has_no_instructions(home: Path) -> None:
    _write(home, ".qmail", "# only a comment\n")
    found = load_dotqmail(home, "")
    assert found is not None and found.instructions == ()


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666])
def test_writable_file_is_refused(home: Path, mode: int) -> None:
    _write(home, ".qmail", "./Maildir/\n", mode)
    with pytest.raises(TemporaryFailure) as info:
        load_dotqmail(home, "")
    assert (info.value.reply.code, info.value.reply.status) == (451, "4.7.0")
    assert "unsafe permissions" in info.value.reply.text


def test_writable_home_is_refused(home: Path) -> None:
    home.chmod(0o777)
    with pytest.raises(TemporaryFailure) as info:
        load_dotqmail(home, "")
    assert info.value.reply.status == "4.7.0"


def test_readable_file_is_fine(home: Path) -> None:
    _write(home, ".qmail", "./Maildir/\n", 0o644)
    assert load_dotqmail(home, "") is not None


def test_symlinked_file_is_followed(home: Path) -> None:
    # A qmail idiom: ln -s .qmail-list .qmail-list-owner
    _write(home, ".qmail-list", "./list/\n")
    (home / ".qmail-list-owner").symlink_to(".qmail-list")
    found = load_dotqmail(home, "list-owner")
    assert found is not None and found.instructions[0].value == "./list/"


def test_fifo_is_refused_without_hanging(home: Path) -> None:
    os.mkfifo(home / ".qmail", 0o600)
    with pytest.raises(TemporaryFailure):
        load_dotqmail(home, "")


def test_missing_home_is_temporary(tmp_path: Path) -> None:
    with pytest.raises(TemporaryFailure):
        load_dotqmail(tmp_path / "gone", "")
