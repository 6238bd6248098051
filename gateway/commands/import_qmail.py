"""``gateway import-qmail``: turn a qmail control directory into a policy file.

    gateway import-qmail /var/qmail -o /etc/gateway/policy.toml
    gateway import-qmail /var/qmail/control > policy.toml

Reads ``control/*`` and ``users/assign`` (see :mod:`gateway.migrate.qmail` and
docs/migrating.md), writes the policy (standard output without ``-o``) and prints one
``warning:`` line on standard error for everything that has no equivalent or behaves
differently. Exit status: 0 converted (warnings or not), 2 a malformed qmail file (the
message names file and line; nothing is written).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

_EPILOG = """\
DIR is the qmail root (/var/qmail) or its control directory (/var/qmail/control); the
users/assign file beside it is read too when present.

Converted: me, locals, rcpthosts, morercpthosts, virtualdomains, smtproutes (with ports,
[address] hosts and the ":host" default route), databytes, timeoutsmtpd,
concurrencylocal, concurrencyremote, queuelifetime, helohost, timeoutconnect,
timeoutremote, doublebounceto, doublebouncehost, defaultdelivery, servercert.pem and the
=name / +name- lines of users/assign. Anything else (badmailfrom, plusdomain,
defaultdomain, ...) is written as a comment under "Not converted" and reported as a
warning. Relay clients live in the tcpserver rules, not in the control directory: set
[relay] clients by hand.

Review the result and check it with `gateway check FILE`. See docs/migrating.md.
"""


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "import-qmail",
        help="convert a qmail control directory (and users/assign) into a policy file",
        description="Convert a qmail configuration into a gateway policy (TOML).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dir", metavar="DIR", type=Path, help="/var/qmail or /var/qmail/control")
    parser.add_argument(
        "-o", "--output", metavar="FILE", type=Path,
        help="write the policy here (default: standard output); not written on error",
    )
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from gateway.migrate.qmail import QmailFormatError, convert

    try:
        result = convert(args.dir)
    except QmailFormatError as exc:
        print(f"gateway import-qmail: {exc}", file=sys.stderr)
        return 2
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.output is None:
        sys.stdout.write(result.policy)
    else:
        try:
            args.output.write_text(result.policy, encoding="utf-8")
        except OSError as exc:
            print(f"gateway import-qmail: {args.output}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        print(f"{args.output}: written ({len(result.warnings)} warnings)", file=sys.stderr)
    return 0
