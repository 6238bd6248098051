"""The ``gateway`` command: run, check, passwd, queue."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import getpass
import json
import logging
import sys
from typing import Sequence

from gateway import logs

__all__ = ["main"]

log = logging.getLogger(__name__)


def _load(policy_path: str | None):  # type: ignore[no-untyped-def]
    from gateway.app import registry
    from gateway.hooks import discover_plugins
    from gateway.policy import load_policy

    specs = discover_plugins()
    return load_policy(policy_path, registry=registry(specs)), specs


def cmd_run(args: argparse.Namespace) -> int:
    from gateway.app import GatewayApp
    from gateway.policy import PolicyError

    try:
        policy, specs = _load(args.policy)
    except PolicyError as exc:
        print(f"gateway: invalid policy: {exc}", file=sys.stderr)
        return 2
    logs.configure(args.log_level or policy.server.log_level)
    app = GatewayApp(policy, specs=specs, policy_path=args.policy)
    try:
        asyncio.run(app.run_forever())
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from gateway.policy import PolicyError

    try:
        policy, _ = _load(args.policy)
    except PolicyError as exc:
        print(f"{exc}", file=sys.stderr)
        return 2
    print(f"{policy.source}: OK")
    for listener in policy.listeners:
        scope = policy.scope(listener=listener.name, client_ip="192.0.2.1")
        chain = " -> ".join(e.id + (" (observe)" if e.mode == "observe" else "") for e in scope.plugins)
        print(f"listener {listener.name} {listener.address}:{listener.port} tls={listener.tls}: {chain or '(empty chain)'}")
    return 0


def cmd_passwd(args: argparse.Namespace) -> int:
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


def cmd_queue(args: argparse.Namespace) -> int:
    from gateway.queue import QueueStore

    policy, _ = _load(args.policy)
    store = QueueStore(policy.server.queue_dir)
    area = "quarantine" if args.quarantine else "msg"
    if args.action in ("list", "count"):
        ids = store.ids(area)
        if args.action == "count":
            print(len(ids))
            return 0
        rows = []
        for qid in ids:
            item = store.load(qid, area)
            env = item.envelope
            rows.append(
                {
                    "id": qid,
                    "arrived": datetime.datetime.fromtimestamp(env.arrived).isoformat(timespec="seconds"),
                    "size": item.message_size,
                    "sender": env.sender,
                    "recipients": [r.to_dict() for r in env.recipients],
                }
            )
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for row in rows:
                print(f"{row['id']}  {row['arrived']}  {row['size']:>9}  <{row['sender']}>")
                for r in row["recipients"]:
                    print(f"    {r['state']:<9} <{r['address']}>")
        return 0
    if args.action == "show":
        if not args.id:
            print("gateway: queue show needs an ID", file=sys.stderr)
            return 2
        sys.stdout.buffer.write(store.read_message(args.id, area))
        return 0
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="Plugin-based SMTP filtering gateway.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the gateway in the foreground")
    run.add_argument("--policy", "-p", help="policy file (default: the embedded default)")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="validate a policy file without starting anything")
    check.add_argument("policy", nargs="?", help="policy file (default: the embedded default)")
    check.set_defaults(func=cmd_check)

    passwd = sub.add_parser("passwd", help="hash a password for the users file (reads standard input)")
    passwd.add_argument("login", nargs="?", help="print login:hash instead of the hash alone")
    passwd.set_defaults(func=cmd_passwd)

    queue = sub.add_parser("queue", help="inspect the queue")
    queue.add_argument("action", choices=["list", "count", "show"])
    queue.add_argument("id", nargs="?")
    queue.add_argument("--policy", "-p")
    queue.add_argument("--json", action="store_true", help="machine-readable output")
    queue.add_argument("--quarantine", action="store_true", help="the quarantine instead of the queue")
    queue.set_defaults(func=cmd_queue)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
