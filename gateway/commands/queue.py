"""``gateway queue``: look at and act on the queue, safe while the gateway runs.

``list`` and ``stat`` (qmail-qread, qmail-qstat), ``show ID``, ``hold ID``,
``release ID``, ``retry [ID]`` (postqueue -f / -i), ``delete ID`` (postsuper -d).
State changes go through the queue store's atomic, locked state file, and the running
gateway is woken through the queue's trigger FIFO.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from typing import Any

from gateway.commands._common import load

ACTIONS = ("list", "stat", "count", "show", "hold", "release", "retry", "delete")


def register(sub: Any) -> None:
    queue = sub.add_parser(
        "queue", help="inspect the queue and act on messages (safe while the gateway runs)",
        description="list | stat | count | show ID | hold ID | release ID | retry [ID] | delete ID",
    )
    queue.add_argument("action", choices=ACTIONS)
    queue.add_argument("id", nargs="*", help="queue ids (retry without an id: every message)")
    queue.add_argument("--policy", "-p", help="policy file (its [server] queue_dir)")
    queue.add_argument("--json", action="store_true", help="machine-readable output")
    queue.add_argument("--quarantine", action="store_true", help="list/show/delete in the quarantine")
    queue.set_defaults(func=main)


def _row(store: Any, qid: str, area: str) -> dict[str, Any]:
    item = store.load(qid, area)
    env = item.envelope
    return {
        "id": qid,
        "area": area,
        "arrived": datetime.datetime.fromtimestamp(env.arrived).isoformat(timespec="seconds"),
        "age_seconds": round(time.time() - env.arrived),
        "size": item.message_size,
        "sender": env.sender,
        "held": item.held,
        "attempts": item.attempts,
        "next_try": datetime.datetime.fromtimestamp(item.next_try).isoformat(timespec="seconds"),
        "recipients": [r.to_dict() for r in env.recipients],
        "quarantine_reason": env.quarantine_reason,
    }


def _list(store: Any, area: str, as_json: bool) -> int:
    rows = []
    for qid in store.ids(area):
        try:
            rows.append(_row(store, qid, area))
        except FileNotFoundError:
            continue  # delivered meanwhile
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        flags = " held" if row["held"] else ""
        print(f"{row['id']}  {row['arrived']}  {row['size']:>9}  <{row['sender']}>{flags}")
        for r in row["recipients"]:
            last = f"  {r['last_reply']}" if r.get("last_reply") else ""
            target = f" {r['target']}" if r.get("target") else ""  # an alias/.forward target
            print(f"    {r['state']:<9} <{r['address']}>{target}{last}")
    return 0


def _stat(store: Any, as_json: bool) -> int:
    now = time.time()
    stats: dict[str, Any] = {"messages": 0, "bytes": 0, "recipients_pending": 0, "held": 0, "oldest_seconds": 0}
    for qid in store.ids("msg"):
        try:
            item = store.load(qid)
        except FileNotFoundError:
            continue
        stats["messages"] += 1
        stats["bytes"] += item.message_size
        stats["held"] += int(item.held)
        stats["recipients_pending"] += sum(r.state.value == "pending" for r in item.envelope.recipients)
        stats["oldest_seconds"] = max(stats["oldest_seconds"], round(now - item.envelope.arrived))
    stats["quarantined"] = len(store.ids("quarantine"))
    if as_json:
        print(json.dumps(stats))
    else:
        print(
            f"messages in queue: {stats['messages']} ({stats['bytes']} bytes), "
            f"recipients pending: {stats['recipients_pending']}, held: {stats['held']}, "
            f"oldest: {stats['oldest_seconds']}s, quarantined: {stats['quarantined']}"
        )
    return 0


def _change(store: Any, qids: list[str], action: str) -> int:
    status = 0
    for qid in qids:
        try:
            if action == "delete":
                store.remove(qid)
            else:
                item = store.load(qid)
                if action == "hold":
                    store.update_state(qid, item.envelope, held=True)
                elif action == "release":
                    store.update_state(qid, item.envelope, held=False, next_try=time.time())
                else:  # retry
                    store.update_state(qid, item.envelope, next_try=time.time())
        except (FileNotFoundError, ValueError):
            print(f"gateway: no message {qid} in the queue", file=sys.stderr)
            status = 1
            continue
        print(f"{qid}: {action}")
    if action in ("release", "retry"):
        store.trigger(*qids)
    return status


def main(args: argparse.Namespace) -> int:
    from gateway.queue import QueueStore

    policy, _ = load(args.policy)
    store = QueueStore(policy.server.queue_dir)
    area = "quarantine" if args.quarantine else "msg"
    if args.action == "list":
        return _list(store, area, args.json)
    if args.action == "stat":
        return _stat(store, args.json)
    if args.action == "count":
        print(len(store.ids(area)))
        return 0
    if args.action == "retry" and not args.id:
        for qid in store.ids():
            try:
                store.update_state(qid, store.load(qid).envelope, next_try=time.time())
            except FileNotFoundError:
                continue
        print("retrying every queued message" + ("" if store.trigger("*") else " (gateway not running)"))
        return 0
    if not args.id:
        print(f"gateway: queue {args.action} needs a queue id", file=sys.stderr)
        return 2
    if args.action == "show":
        try:
            sys.stdout.buffer.write(store.read_message(args.id[0], area))
        except (FileNotFoundError, ValueError):
            print(f"gateway: no message {args.id[0]}", file=sys.stderr)
            return 1
        return 0
    if args.action == "delete" and args.quarantine:
        for qid in args.id:
            store.remove(qid, "quarantine")
        return 0
    return _change(store, args.id, args.action)
