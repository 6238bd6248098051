"""``gateway check``: validate a policy without starting anything."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from gateway.commands._common import check_aliases, load


def register(sub: Any) -> None:
    check = sub.add_parser(
        "check", help="validate a policy file (and its [local] aliases file) without starting anything"
    )
    check.add_argument("policy", nargs="?", help="policy file (default: the embedded default)")
    check.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from gateway.policy import PolicyError

    try:
        policy, _ = load(args.policy)
    except PolicyError as exc:
        print(f"{exc}", file=sys.stderr)
        return 2
    error, warnings = check_aliases(policy)
    if error is not None:
        print(error, file=sys.stderr)
        return 2
    print(f"{policy.source}: OK")
    for warning in warnings:
        print(f"warning: {warning}")
    for listener in policy.listeners:
        scope = policy.scope(listener=listener.name, client_ip="192.0.2.1")
        chain = " -> ".join(e.id + (" (observe)" if e.mode == "observe" else "") for e in scope.plugins)
        print(f"listener {listener.name} {listener.address}:{listener.port} tls={listener.tls}: {chain or '(empty chain)'}")
    return 0
