"""``gateway aliases check``: parse and resolve an aliases file, as ``newaliases`` would."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

_DESCRIPTION = """\
Parse an aliases file (name: target, target, ...), read its :include: files and
expand every alias recursively. Problems are printed as FILE:LINE: alias 'NAME':
what, and the exit status is 1: syntax errors, an alias defined twice, a loop
(a: b / b: a), an :include: file that is missing, unsafe or broken, and, with
--policy, a name that is neither an alias nor a user of [local] users. On
success a summary is printed: aliases, targets by kind, and whether postmaster,
abuse and MAILER-DAEMON go somewhere. The running gateway re-reads the file by
itself when it changes; nothing needs rebuilding.
"""


def register(sub: Any) -> None:
    aliases = sub.add_parser(
        "aliases", help="check an aliases file",
        description="Work with sendmail-style aliases files ([local] aliases).",
    )
    commands = aliases.add_subparsers(dest="aliases_command", required=True, metavar="ACTION")
    check = commands.add_parser(
        "check", help="parse and resolve an aliases file; exit 1 on any problem",
        description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument(
        "file", nargs="?",
        help="the aliases file (default: [local] aliases of the policy)",
    )
    check.add_argument(
        "--policy",
        help="policy file: its local domains and users are used to resolve names "
        "(without it, names that are not aliases are taken to be local users)",
    )
    check.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from gateway.commands._common import load
    from gateway.delivery.local.aliases import AliasError, Resolver, load_aliases
    from gateway.delivery.local.expand import REQUIRED_NAMES, check_aliases
    from gateway.delivery.router import POSTMASTER_ROLES
    from gateway.policy import PolicyError

    domains: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    delimiter = "-"
    path = args.file
    if args.policy is not None:
        try:
            policy, _ = load(args.policy)
        except PolicyError as exc:
            print(f"gateway aliases: invalid policy: {exc}", file=sys.stderr)
            return 2
        local = policy.local
        domains, users, delimiter = local.domains, local.users, local.extension_delimiter
        if path is None and local.aliases != Path():
            path = str(local.aliases)
    if path is None:
        print("gateway aliases check: no file given and no [local] aliases in --policy", file=sys.stderr)
        return 2
    try:
        aliases = load_aliases(path)
        resolve = Resolver(aliases, domains=domains, users=users, delimiter=delimiter)
        expanded = check_aliases(aliases, resolve)
    except AliasError as exc:
        print(f"{exc}", file=sys.stderr)
        return 1
    problems = 0
    for name in sorted(resolve.unknown):
        where = _first_use(aliases, name)
        print(f"{aliases.source}:{where[1]}: alias {where[0]!r}: {name!r} is neither an alias nor a local user",
              file=sys.stderr)
        problems += 1
    if problems:
        return 1
    kinds: dict[str, int] = {}
    for leaves in expanded.values():
        for leaf in leaves:
            kinds[leaf.kind] = kinds.get(leaf.kind, 0) + 1
    summary = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items())) or "none"
    print(f"{aliases.source}: OK: {len(aliases.aliases)} aliases; targets after expansion: {summary}")
    for name in REQUIRED_NAMES:
        shown = "MAILER-DAEMON" if name == "mailer-daemon" else name
        if name in aliases.aliases:
            print(f"{shown}: alias")
        elif users and name in users:
            print(f"{shown}: local user")
        elif users and name in POSTMASTER_ROLES:
            print(f"{shown}: the postmaster's mailbox (neither an alias nor a local user)")
        elif users:
            print(f"{shown}: the mailbox of user {name} (always delivered)")
        else:
            print(f"{shown}: not an alias (a local user?)")
    return 0


def _first_use(aliases: Any, name: str) -> tuple[str, int]:
    """The alias and line that names ``name`` first (for the message)."""
    for alias in aliases.aliases.values():
        for target in alias.targets:
            if target.kind in ("address", "user") and target.value.split("@")[0].lower() == name:
                return alias.name, target.line
    return "?", 0
