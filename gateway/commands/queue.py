"""``gateway queue``: inspect the queue (and, with --quarantine, the quarantine)."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Any

from gateway.commands._common import load


def register(sub: Any) -> None:
    queue = sub.add_parser("queue", help="inspect the queue")
    queue.add_argument("action", choices=["list", "count", "show"])
    queue.add_argument("id", nargs="?")
    queue.add_argument("--policy", "-p")
    queue.add_argument("--json", action="store_true", help="machine-readable output")
    queue.add_argument("--quarantine", action="store_true", help="the quarantine instead of the queue")
    queue.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from gateway.queue import QueueStore

    policy, _ = load(args.policy)
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
    if not args.id:
        print("gateway: queue show needs an ID", file=sys.stderr)
        return 2
    sys.stdout.buffer.write(store.read_message(args.id, area))
    return 0
