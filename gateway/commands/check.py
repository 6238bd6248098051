"""``gateway check``: validate a policy without starting anything."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from gateway.commands._common import check_aliases, load


def register(sub: Any) -> None:
    check = sub.add_parser(
        "check", help="validate a policy file (and its [local] aliases file) without starting anything;"
        " print each listener's chain and what each override changes"
    )
    check.add_argument("policy", nargs="?", help="policy file (default: the embedded default)")
    check.add_argument(
        "--probe", action="store_true",
        help="also try every daemon the policy names (clamd, spamd, rspamd, Dovecot, Redis, the DNS"
        " resolvers) and print reachable/UNREACHABLE for each; exit status 1 if any is unreachable",
    )
    check.add_argument(
        "--probe-timeout", type=float, default=5.0, metavar="SECONDS",
        help="longest wait for each daemon (default 5)",
    )
    check.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from gateway.policy import PolicyError

    try:
        policy, specs = load(args.policy)
    except PolicyError as exc:
        print(f"{exc}", file=sys.stderr)
        return 2
    error, warnings = check_aliases(policy)
    if error is not None:
        print(error, file=sys.stderr)
        return 2
    print(f"{policy.source}: OK")
    from gateway.delivery.remote.tlsa import dane_warnings

    for warning in warnings + dane_warnings(policy):
        print(f"warning: {warning}")
    _print_chains(policy)
    if args.probe:
        return _probe(policy, specs, args.probe_timeout)
    return 0


def _probe(policy: Any, specs: Any, timeout: float) -> int:
    """Try the policy's daemons; print one line each. 1 if any is unreachable."""
    import asyncio

    from gateway.probe import probe_policy

    probes = asyncio.run(probe_policy(policy, specs, timeout))
    print("daemons:")
    for line in probes.lines():
        print(f"  {line}")
    if not probes.all_reachable:
        print("some daemons are unreachable: mail that needs them gets what each plugin's settings say"
              " (see the WARNINGs at start-up)", file=sys.stderr)
        return 1
    return 0


def _print_chains(policy: Any) -> None:
    """Each listener's chain (its listener overrides applied, no client or recipient
    ones), then what each override changes from the base policy."""
    from gateway.policy.differences import describe_match, override_changes

    for listener in policy.listeners:
        # No client address: network overrides depend on the client, so none applies here.
        scope = policy.scope(listener=listener.name, client_ip="")
        chain = " -> ".join(e.id + (" (observe)" if e.mode == "observe" else "") for e in scope.plugins)
        print(f"listener {listener.name} {listener.address}:{listener.port} tls={listener.tls}: {chain or '(empty chain)'}")
    if not policy.overrides:
        return
    print("overrides (changes from the base policy; network and recipient_domain ones also apply"
          " on top of a listener's, for the clients or recipients they match):")
    for override in policy.overrides:
        changes = override_changes(policy, override)
        print(f"  {describe_match(override.match)}:{' no change' if changes.is_empty else ''}")
        if changes.disables:
            print(f"    disables: {', '.join(changes.disables)}")
        if changes.limits:
            print(f"    limits: {', '.join(changes.limits)}")
        for plugin_id, settings in changes.settings:
            print(f"    plugin {plugin_id}: {', '.join(settings)}")
