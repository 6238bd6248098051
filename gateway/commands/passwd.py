"""``gateway passwd``: hash a password for the users file."""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any


def register(sub: Any) -> None:
    passwd = sub.add_parser("passwd", help="hash a password for the users file (reads standard input)")
    passwd.add_argument("login", nargs="?", help="print login:hash instead of the hash alone")
    passwd.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from gateway.passwords import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("gateway: passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\n")
    if not password:
        print("gateway: empty password", file=sys.stderr)
        return 1
    hashed = hash_password(password)
    print(f"{args.login}:{hashed}" if args.login else hashed)
    return 0
