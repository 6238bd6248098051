"""``gateway inject``: queue a message read on standard input (qmail-inject, ``sendmail -t``).

The message is completed (Date, Message-ID, From; Bcc removed; CRLF line ends) and
committed to the policy's queue directory, where the running gateway's scheduler picks
it up at its next rescan; the queue id is printed. The work is done by
:mod:`gateway.sendmail`, which is also the ``sendmail`` command.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from gateway.delivery.verp import DEFAULT_DELIMITERS


def register(sub: Any) -> None:
    inject = sub.add_parser(
        "inject", help="queue a message read on standard input as locally generated mail"
    )
    inject.add_argument("recipients", nargs="*", metavar="RECIPIENT", help="envelope recipients")
    inject.add_argument("-t", dest="from_headers", action="store_true",
                        help="also send to the To, Cc and Bcc header recipients")
    inject.add_argument("-f", "--from", dest="sender", metavar="ADDRESS",
                        help="envelope sender and From address (default $USER@<first local domain>; '' for <>)")
    inject.add_argument("-F", "--name", dest="full_name", metavar="NAME", help="full name for an added From")
    inject.add_argument("-V", "--verp", nargs="?", const=DEFAULT_DELIMITERS, metavar="DELIMITERS",
                        help="VERP: a return path per recipient, sender-user=domain@host (delimiters default -=)")
    inject.add_argument("--policy", "-p", help="policy file (default: the embedded default)")
    inject.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from gateway.sendmail import inject

    status, text = inject(
        args.policy, sys.stdin.buffer, recipients=args.recipients, from_headers=args.from_headers,
        sender=args.sender, full_name=args.full_name, verp=args.verp,
    )
    if status:
        print(f"gateway: {text}", file=sys.stderr)
        return status
    print(text)
    return 0
