"""``gateway maildir``: housekeeping of local Maildirs (``expire``: delete stale mail)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

_EXPIRE_EPILOG = """\
A message is stale when its file was delivered (last modified) more than DAYS days
ago. Each --folder is a Maildir++ folder of every MAILDIR: INBOX (the default) is the
Maildir itself, Trash is MAILDIR/.Trash, Lists/x is MAILDIR/.Lists.x. The Maildir's
maildirsize file, when there is one, gets a line with the negative sizes, so Maildir++
quotas stay right. Safe while mail is delivered and read: new mail is younger, and a
file a mail reader renamed meanwhile is skipped.

Examples:
  gateway maildir expire --days 30 --folder Trash --folder Spam /var/mail/*/Maildir
  gateway maildir expire --days 365 --dry-run /var/mail/alice/Maildir

Exit status: 0 done, 1 a MAILDIR or folder was missing (the others were expired), 2 bad
arguments.
"""


def register(sub: Any) -> None:
    maildir = sub.add_parser(
        "maildir", help="housekeeping of local Maildirs (expire stale mail)",
        description="Housekeeping of local Maildirs. Run `gateway maildir expire --help`.",
    )
    actions = maildir.add_subparsers(dest="maildir_action", metavar="ACTION", required=True)
    expire = actions.add_parser(
        "expire", help="delete mail older than N days from Maildir folders",
        description="Delete mail older than N days from Maildir folders, keeping maildirsize right.",
        epilog=_EXPIRE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    expire.add_argument("--days", type=float, required=True, metavar="DAYS", help="age limit in days (fractions allowed)")
    expire.add_argument("--folder", action="append", metavar="FOLDER", help="folder to expire (repeatable; default: INBOX)")
    expire.add_argument("--dry-run", "-n", action="store_true", help="list what would be deleted, delete nothing")
    expire.add_argument("--verbose", "-v", action="store_true", help="name every deleted file")
    expire.add_argument("maildirs", nargs="+", metavar="MAILDIR", help="Maildir directories")
    maildir.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from gateway.delivery.local.expire import expire_folder

    if args.days < 0:
        print("gateway: maildir expire: --days must not be negative", file=sys.stderr)
        return 2
    status = 0
    verb = "would delete" if args.dry_run else "deleted"
    for maildir in args.maildirs:
        for folder in args.folder or ["INBOX"]:
            try:
                result = expire_folder(Path(maildir), folder, days=args.days, dry_run=args.dry_run)
            except (FileNotFoundError, ValueError) as exc:
                print(f"gateway: maildir expire: {exc}", file=sys.stderr)
                status = 1
                continue
            if args.verbose or args.dry_run:
                for path in result.files:
                    print(f"{verb} {path}")
            print(f"{result.folder}: {verb} {len(result.files)} messages, {result.bytes} bytes")
    return status
