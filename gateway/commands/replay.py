"""``gateway replay``: what would this policy have done to the captured traffic?

``gateway replay --policy NEW.toml CAPTURE...`` runs each recorded session (files or
``var_dir/capture`` directories, see ``[capture]``) through NEW's plugin chain without
queueing or delivering anything, DNS answered from the record, and prints per message
the old and the new outcome, the changes grouped by plugin and reason, and totals.
``--corpus`` replays ``.eml`` files or mboxes instead, with an assumed client and
envelope (see docs/replay.md).

Exit status: 0 no change (or, with ``--corpus``, every message as ``--expect`` said),
1 changes that fail ``--fail-on`` (or messages not as expected), 2 bad arguments or
policy, 3 no such change but damaged records were passed over.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import Any

from gateway.commands._common import load
from gateway.logs import FORMAT


def register(sub: Any) -> None:
    replay = sub.add_parser(
        "replay", help="run captured sessions (or a corpus) through a policy and show what would change"
    )
    replay.add_argument("capture", nargs="+", help="capture files or directories (with --corpus: .eml files, directories, mboxes)")
    replay.add_argument("--policy", "-p", help="the policy to try (default: the embedded default)")
    replay.add_argument("--dns", choices=("record", "live", "record+live"), default=None,
                        help="DNS answers from the record (default for captures), the policy's resolver"
                             " (default for --corpus), or the record then live for what it lacks")
    replay.add_argument("--skip", action="append", default=[], metavar="PLUGIN",
                        help="leave this plugin (name or id) out of the chain, reported as not replayed;"
                             " repeat for several (e.g. the scanners, which are otherwise asked live)")
    replay.add_argument("--fail-on", choices=("any", "refused", "none"), default="any",
                        help="exit 1 on any outcome change (default), only on newly refused mail, or never")
    replay.add_argument("--json", action="store_true", help="machine-readable output")
    replay.add_argument("--verbose", "-v", action="store_true", help="also print the gateway's log lines")
    corpus = replay.add_argument_group("corpus mode")
    corpus.add_argument("--corpus", action="store_true", help="the arguments are .eml files, directories of them or mboxes")
    corpus.add_argument("--client-ip", default="192.0.2.1", help="the assumed client address (default 192.0.2.1)")
    corpus.add_argument("--helo", default="client.example", help="the assumed EHLO name")
    corpus.add_argument("--from", dest="sender", default=None, metavar="ADDRESS",
                        help="MAIL FROM (default: each message's From: address)")
    corpus.add_argument("--to", dest="recipients", action="append", default=None, metavar="ADDRESS",
                        help="RCPT TO (repeat for several; default: postmaster@ the policy's first local domain)")
    corpus.add_argument("--expect", choices=("accepted", "refused"),
                        help="a ham corpus (accepted) or a spam corpus (refused): exit 1 on any message that is not")
    replay.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from gateway.policy import PolicyError
    from gateway.replay.corpus import corpus_records
    from gateway.replay.records import read_records
    from gateway.replay.run import replay_records

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, defaults={"session": "-", "queue": "-"}))
    handler.setLevel(logging.INFO if args.verbose else logging.ERROR)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO if args.verbose else logging.WARNING)
    try:
        policy, specs = load(args.policy)
        if args.corpus:
            items: Any = corpus_records(
                args.capture, policy, client_ip=args.client_ip, helo=args.helo,
                sender=args.sender, recipients=args.recipients,
            )
            dns = args.dns or "live"
        else:
            items, dns = read_records(args.capture), args.dns or "record"
        report = asyncio.run(replay_records(policy, specs, items, dns=dns, skip=args.skip, has_old=not args.corpus))
    except PolicyError as exc:
        print(f"gateway: invalid policy: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        sys.stdout.write(report.render())
    for text in report.damaged:
        print(f"gateway replay: damaged record, not replayed: {text}", file=sys.stderr)
    if args.corpus:
        failed = report.unexpected(args.expect) if args.expect else 0
        return 1 if failed else (3 if report.damaged else 0)
    if report.gate(args.fail_on):
        return 1
    return 3 if report.damaged else 0
