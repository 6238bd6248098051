"""What the docs, the shipped policies' comments and the docstrings say about the code
agrees with the code: the command options they show exist, the reply codes they quote
are the ones sent."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

from gateway.cli import build_parser
from plugins.auth_lockout import REPLY_LOCKED

ROOT = Path(__file__).resolve().parents[2]
# `gateway check FILE`, ``gateway queue list``, "$ gateway dkim keygen ...", a bare line
_COMMAND = re.compile(r"``?(gateway [^`]+)``?|^\$ (gateway .+)$|^(gateway [a-z].*)$", re.M)
_OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


def documents() -> Iterator[Path]:
    yield ROOT / "README.md"
    yield from sorted((ROOT / "docs").glob("*.md"))
    yield from sorted((ROOT / "policies").rglob("*.toml"))
    yield from sorted((ROOT / "gateway").rglob("*.py"))
    yield from sorted((ROOT / "plugins").glob("*.py"))


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def unknown_options(command: str) -> list[str]:
    """The options in a documented ``gateway ...`` command line that its (sub)command
    does not take. ``list|stat`` alternatives take any of theirs; ``# ...`` is a comment."""
    words = command.split(" #")[0].replace("\\|", "|").split()[1:]
    parsers = [build_parser()]
    while words:
        subs = _subcommands(parsers[0])
        chosen = [subs[w] for w in words[0].split("|") if w in subs]
        if not chosen:
            break
        parsers = chosen
        words.pop(0)
    if len(parsers) == 1 and parsers[0].prog == "gateway":
        return []  # prose ("the gateway starts ..."), a line that names no command
    known = {option for parser in parsers for action in parser._actions for option in action.option_strings}
    return [option for option in _OPTION.findall(" ".join(words)) if option not in known]


def test_documented_command_options_exist() -> None:
    wrong = []
    for path in documents():
        for match in _COMMAND.finditer(path.read_text()):
            command = next(group for group in match.groups() if group)
            wrong += [f"{path.relative_to(ROOT)}: {command!r}: {option}" for option in unknown_options(command)]
    assert not wrong, "documented options that the command does not take:\n" + "\n".join(wrong)


def test_the_option_check_sees_a_wrong_option() -> None:
    assert unknown_options("gateway check --policy FILE") == ["--policy"]
    assert unknown_options("gateway queue list\\|stat [--json] [--policy F]") == []
    assert unknown_options("gateway dkim keygen --domain D --selector S [--out DIR]") == []


def test_shipped_policies_quote_the_lockout_reply() -> None:
    # The comments next to auth_lockout say what a locked-out client gets.
    sent = f"{REPLY_LOCKED.code} {REPLY_LOCKED.status}"
    quoted = []
    for path in sorted((ROOT / "policies").rglob("*.toml")):
        for line in path.read_text().splitlines():
            if "lock" in line.lower():
                quoted += [(path.name, code) for code in re.findall(r"\b[45]\d\d [45]\.\d{1,3}\.\d{1,3}\b", line)]
    assert quoted, "no shipped policy quotes the lock-out reply"
    assert all(code == sent for _, code in quoted), quoted
