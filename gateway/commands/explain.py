"""``gateway explain``: which plugin would decide what about a message, and why.

Plays one SMTP session (connect, HELO, MAIL, each RCPT, DATA) through a policy's real
plugin chain for a given client address, with live DNS through the policy's ``[dns]``,
and prints each plugin's answer at each stage, the results and scores added, the
headers that would be added, and whether the message would be queued. Nothing is
queued and no port is bound (see :mod:`gateway.explain`).

Exit status: 0 the message would be queued, 1 it would be refused, 2 bad arguments or
policy.
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

# Cut a message read from standard input or a file here: explain is for one message.
_MAX_INPUT = 256 * 1024 * 1024


def register(sub: Any) -> None:
    explain = sub.add_parser(
        "explain", help="show which plugin would decide what about a message, and why (queues nothing)"
    )
    explain.add_argument("message", nargs="?", help="message file (default: standard input)")
    explain.add_argument("--policy", "-p", help="policy file (default: the embedded default)")
    explain.add_argument("--client-ip", required=True, help="the client's address, as if it connected from there")
    explain.add_argument("--helo", help="the EHLO name (default: the client's address literal)")
    explain.add_argument("--from", dest="sender", required=True, metavar="ADDRESS", help='MAIL FROM ("" for <>)')
    explain.add_argument("--to", dest="recipients", action="append", required=True, metavar="ADDRESS",
                         help="RCPT TO (repeat for several)")
    explain.add_argument("--listener", help="listener name (default: the policy's first)")
    explain.add_argument("--auth-user", metavar="LOGIN", help="as if the client authenticated with this login")
    explain.add_argument("--tls", action="store_true", help="as if the client had done STARTTLS")
    explain.add_argument("--json", action="store_true", help="machine-readable output")
    explain.add_argument("--verbose", "-v", action="store_true", help="also print the gateway's log lines")
    explain.set_defaults(func=main)


def _read(path: str | None) -> bytes:
    if path is None:
        return sys.stdin.buffer.read(_MAX_INPUT)
    with open(path, "rb") as f:
        return f.read(_MAX_INPUT)


def main(args: argparse.Namespace) -> int:
    from gateway.explain import explain
    from gateway.policy import PolicyError

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, defaults={"session": "-", "queue": "-"}))
    handler.setLevel(logging.INFO if args.verbose else logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    try:
        policy, specs = load(args.policy)
        message = _read(args.message)
        result = asyncio.run(
            explain(
                policy, specs, message=message, client_ip=args.client_ip, sender=args.sender,
                recipients=args.recipients, helo=args.helo, listener=args.listener,
                auth_user=args.auth_user, tls=args.tls,
            )
        )
    except PolicyError as exc:
        print(f"gateway: invalid policy: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        sys.stdout.write(render(result))
    return 0 if result.queued else 1


def _step_line(step: Any) -> str:
    if step.outcome == "no opinion":
        text = "no opinion"
    else:
        prefix = "(observe) would " if step.observe else ""
        text = f"{prefix}{step.outcome}"
        if step.reply:
            text += f": {step.reply}"
        if step.reason:
            text += f" ({step.reason})"
    return f"    {step.plugin:<24} {text}"


def render(result: Any) -> str:
    """The explanation as text (what ``gateway explain`` prints without ``--json``)."""
    out = [
        f"policy {result.policy}, listener {result.listener}, client {result.client_ip}"
        f" (relay client: {'yes' if result.is_relay_client else 'no'})",
        "",
    ]
    for stage in result.stages:
        out.append(f"{stage.name} {stage.subject}".rstrip())
        if not stage.steps and stage.name != "scoring":
            out.append("    (no plugin in the chain runs at this stage)")
        for step in stage.steps:
            out.append(_step_line(step))
            for r in step.results:
                out.append(f"{'':<30}{r['score']:+g} {r['plugin']}: {r['reason']}")
            out.extend(f"{'':<30}{line}" for line in step.log)
        if stage.name == "scoring" and not stage.steps:
            out.append("    below every threshold: no action")
        if stage.answer:
            by = f"  [by {stage.decided_by}]" if stage.decided_by else ""
            out.append(f"  => {stage.answer}{by}")
    out.append("")
    if result.added_headers:
        out.append("Headers that would be added:")
        out.extend("  " + h.replace("\n", "\n  ") for h in result.added_headers)
    if result.removed_headers:
        out.append("Headers that would be removed:")
        out.extend("  " + h.replace("\n", "\n  ") for h in result.removed_headers)
    if result.queued:
        where = "the quarantine" if result.area == "quarantine" else "the queue"
        out.append(
            f"Result: would go to {where} for {', '.join(f'<{a}>' for a in result.accepted)}"
            f" (score {result.score:g}). Nothing was queued."
        )
    else:
        out.append("Result: refused; nothing would be queued.")
    return "\n".join(out) + "\n"
