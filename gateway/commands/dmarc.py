"""``gateway dmarc report``: DMARC aggregate reports (RFC 7489 §7.2), shown or sent now.

    gateway dmarc report --preview example.org            the report so far, as XML
    gateway dmarc report --preview example.org --period previous
    gateway dmarc report --send                            send what ended periods owe
    gateway dmarc report --send --period current           also the period in progress

The counts live in the state store of the policy's ``data_dmarc`` entry (the one with
``aggregate_reports = true``); the running gateway sends each period's reports by itself
once the period ends. ``--send`` does it now (for tests and operators): reports already
sent (by either) are never sent again, and sending the period in progress closes it
(its later messages are not reported). Reports go to the policy's queue directory like
``gateway inject``'s mail. Exit status: 0, 1 nothing to show, 2 usage or policy error,
75 state store or queue unavailable.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["main", "register"]


def register(sub: Any) -> None:
    dmarc = sub.add_parser("dmarc", help="DMARC aggregate reports")
    actions = dmarc.add_subparsers(dest="dmarc_command", required=True, metavar="ACTION")
    report = actions.add_parser("report", help="show a domain's aggregate report, or send what is owed")
    what = report.add_mutually_exclusive_group(required=True)
    what.add_argument("--preview", metavar="DOMAIN", help="print DOMAIN's report (XML) for the period")
    what.add_argument("--send", action="store_true", help="queue the reports owed now")
    report.add_argument(
        "--period", default=None, metavar="WHICH",
        help="current, previous, or the period's start (seconds since the epoch);"
        " --preview: default current; --send: default every ended period not yet sent",
    )
    report.add_argument(
        "--domain", action="append", default=None, help="--send --period: only this policy domain (repeatable)"
    )
    report.add_argument("--policy", "-p", help="policy file (default: the embedded default)")
    report.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from gateway.commands._common import load
    from gateway.policy import PolicyError
    from gateway.reports import report_command

    try:
        policy, specs = load(args.policy)
    except (PolicyError, OSError) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    entry = next(
        (e for e in policy.plugins if e.name == "data_dmarc" and getattr(e.settings, "aggregate_reports", False)),
        None,
    )
    if entry is None or "data_dmarc" not in specs:
        print("gateway: the policy has no data_dmarc entry with aggregate_reports = true", file=sys.stderr)
        return 2
    settings = entry.settings
    module = specs["data_dmarc"].module
    return report_command(
        args, name="gateway", period=float(settings.report_period),
        reporter=lambda: module.command_reporter(policy, settings), preview=_preview, verb="queued",
    )


async def _preview(reporter: Any, domain: str, begin: int) -> int:
    xml = await reporter.preview(domain.strip().rstrip(".").lower(), begin)
    if xml is None:
        print(f"gateway: no DMARC evaluations of {domain} in the period from {begin}", file=sys.stderr)
        return 1
    sys.stdout.write(xml.decode("utf-8"))
    return 0
