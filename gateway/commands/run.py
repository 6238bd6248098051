"""``gateway run``: run the gateway in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from gateway import logs

log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    run = sub.add_parser("run", help="run the gateway in the foreground")
    run.add_argument("--policy", "-p", help="policy file (default: the embedded default)")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from gateway.app import GatewayApp, registry
    from gateway.hooks import discover_plugins
    from gateway.policy import PolicyError
    from gateway.reloads import hold_hangups, read_policy

    specs = discover_plugins()
    try:
        # With the digest of the bytes it read: `gateway reload` compares them.
        policy, digest = read_policy(args.policy, registry=registry(specs))
    except PolicyError as exc:
        print(f"gateway: invalid policy: {exc}", file=sys.stderr)
        return 2
    logs.configure(args.log_level or policy.server.log_level)
    # Until the event loop handles SIGHUP, one is kept for later instead of killing us.
    hold_hangups()
    if policy.server.workers > 1:
        from gateway.workers import run_workers

        def make_app(role: str, workers: tuple[int, ...]) -> GatewayApp:
            return GatewayApp(
                policy, specs=specs, policy_path=args.policy, role=role, policy_digest=digest, workers=workers
            )

        try:
            return run_workers(policy, make_app)
        except PolicyError as exc:  # the aliases file, read at start
            log.error("cannot start: %s", exc)
            return 2
        except OSError as exc:
            log.error("cannot start: %s", exc)
            return 1
    app = GatewayApp(policy, specs=specs, policy_path=args.policy, policy_digest=digest)
    try:
        asyncio.run(app.run_forever())
    except KeyboardInterrupt:
        pass
    except PolicyError as exc:  # the aliases file, read at start
        log.error("cannot start: %s", exc)
        return 2
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0
