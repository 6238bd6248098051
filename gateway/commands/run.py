"""``gateway run``: run the gateway in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any

from gateway import logs

log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    run = sub.add_parser("run", help="run the gateway in the foreground")
    run.add_argument("--policy", "-p", help="policy file (default: the embedded default)")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    # Internal: the master starts a worker this way to replace one that died
    # (gateway/workers.py); the ports and the policy come on standard input.
    run.add_argument("--worker-of", type=int, metavar="PID", help=argparse.SUPPRESS)
    run.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from gateway.app import GatewayApp, registry
    from gateway.hooks import discover_plugins
    from gateway.policy import PolicyError
    from gateway.reloads import digest, hold_hangups, read_policy_data

    if args.worker_of is not None:
        return serve_replacement(args)
    specs = discover_plugins()
    try:
        # With the digest of the bytes it read: `gateway reload` compares them.
        policy, data = read_policy_data(args.policy, registry=registry(specs))
    except PolicyError as exc:
        print(f"gateway: invalid policy: {exc}", file=sys.stderr)
        return 2
    logs.configure(args.log_level or policy.server.log_level)
    # Until the event loop handles SIGHUP, one is kept for later instead of killing us.
    hold_hangups()
    if policy.server.workers > 1:
        from gateway.workers import run_workers

        def make_app(role: str, supervisor: Any) -> GatewayApp:
            return GatewayApp(
                policy, specs=specs, policy_path=args.policy, role=role, policy_digest=digest(data),
                policy_data=data, supervisor=supervisor,
            )

        run_args = [*(["--policy", args.policy] if args.policy else []),
                    *(["--log-level", args.log_level] if args.log_level else [])]
        try:
            return run_workers(policy, make_app, run_args)
        except PolicyError as exc:  # the aliases file, read at start
            log.error("cannot start: %s", exc)
            return 2
        except OSError as exc:
            log.error("cannot start: %s", exc)
            return 1
    app = GatewayApp(policy, specs=specs, policy_path=args.policy, policy_digest=digest(data))
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


def serve_replacement(args: argparse.Namespace) -> int:
    """``gateway run --worker-of PID``: a worker the master started in place of one that
    died. It runs the policy the master runs now (handed over on standard input, with
    the ports to join), which may be newer or older than the file; a reload reads the
    file, as in every process. Any start-up failure is logged with its traceback."""
    from gateway.app import GatewayApp, registry
    from gateway.hooks import discover_plugins
    from gateway.reloads import digest, hold_hangups, policy_from_data
    from gateway.workers import exit_with_master, read_handover, serve_worker

    exit_with_master(args.worker_of)
    # The master started us with SIGHUP blocked: one passed on meanwhile waits for this.
    hold_hangups()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    logs.configure(args.log_level or "info")
    try:
        handover = read_handover(sys.stdin.buffer)
        specs = discover_plugins()
        policy = policy_from_data(handover.policy, args.policy, registry=registry(specs))
    except Exception as exc:  # a boundary: the process ends here
        log.error("worker pid=%d cannot start: %s", os.getpid(), exc, exc_info=True)
        return 1
    logs.configure(args.log_level or policy.server.log_level)

    def make_app() -> GatewayApp:
        return GatewayApp(
            policy, specs=specs, policy_path=args.policy, role="worker", policy_digest=digest(handover.policy),
            policy_data=handover.policy, start_report=handover.report,
        )

    return serve_worker(make_app, policy, handover.ports)
