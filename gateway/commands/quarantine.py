"""``gateway quarantine``: list, show, release and delete quarantined messages.

A data-stage ``quarantine`` verdict (a virus with ``data_clamav``'s ``action =
"quarantine"``, a spam score over a scanner's ``quarantine_score``, the policy's
``[scoring] quarantine``) stores the accepted message in the queue's ``quarantine/``
area with the deciding plugin and its reason. From there an operator:

- ``list [--json]``: one line per message (id, arrival, size, sender, reason) and its
  recipients;
- ``show ID [--raw]``: the envelope (client, sender, recipients, reason, plugin
  findings) and the message as stored; ``--raw`` prints only the message;
- ``release ID``: moves the message, untouched, into the normal queue. A running
  gateway's scheduler looks for new work every ``[delivery] poll_interval`` and
  delivers it from there. The envelope keeps its ``quarantine_reason`` as a record;
- ``delete ID``: removes the message for good.

The queue directory is the policy's ``[server] queue_dir`` (``--policy``, default the
embedded policy). Exit status: 0 done, 1 no such message, 2 bad usage or policy.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

from gateway.commands._common import load

__all__ = ["delete", "describe", "register", "release"]

AREA = "quarantine"


def register(sub: Any) -> None:
    """Add ``quarantine`` and its actions to the ``gateway`` command line."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--policy", "-p", help="policy file (default: the embedded policy)")
    parser = sub.add_parser("quarantine", help="list, show, release or delete quarantined messages")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", parents=[common], help="list quarantined messages")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    show = actions.add_parser("show", parents=[common], help="show a message and why it is held")
    show.add_argument("id")
    show.add_argument("--raw", action="store_true", help="only the message, as stored")
    for name, text in (("release", "move a message into the queue for delivery"),
                       ("delete", "remove a message for good")):
        actions.add_parser(name, parents=[common], help=text).add_argument("id")
    parser.set_defaults(func=main)


def _when(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch).isoformat(timespec="seconds")


def describe(store: Any, qid: str) -> dict[str, Any]:
    """A quarantined message's envelope facts (``list --json`` prints these; the web
    console shows them).

    :raises FileNotFoundError: no such message in the quarantine
    """
    item = store.load(qid, AREA)
    env = item.envelope
    return {
        "id": qid,
        "arrived": _when(env.arrived),
        "size": item.message_size,
        "sender": env.sender,
        "recipients": [r.address for r in env.recipients],
        "reason": env.quarantine_reason or "",
        "client_ip": env.client_ip,
        "helo": env.helo,
        "notes": env.notes,
    }


def _list(store: Any, as_json: bool) -> int:
    rows = [describe(store, qid) for qid in store.ids(AREA)]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"{row['id']}  {row['arrived']}  {row['size']:>9}  <{row['sender']}>  {row['reason']}")
        for address in row["recipients"]:
            print(f"    <{address}>")
    return 0


def _show(store: Any, qid: str, raw: bool) -> int:
    data = store.read_message(qid, AREA)
    out = sys.stdout.buffer
    if not raw:
        row = describe(store, qid)
        lines = [
            f"Queue-ID: {row['id']}",
            f"Arrived: {row['arrived']}",
            f"Reason: {row['reason']}",
            f"Client: [{row['client_ip']}] helo={row['helo']}",
            f"Sender: <{row['sender']}>",
            *(f"Recipient: <{a}>" for a in row["recipients"]),
            *(f"Finding: {n.get('plugin')} {n.get('score')} {n.get('reason')}" for n in row["notes"]),
            f"Size: {row['size']}",
            "",
        ]
        out.write(("\n".join(lines) + "\n").encode("utf-8", "backslashreplace"))
    out.write(data)
    out.flush()
    return 0


def release(store: Any, qid: str) -> None:
    """Move a quarantined message, untouched, into the queue for delivery.

    :raises FileNotFoundError: no such message in the quarantine
    :raises FileExistsError: the queue holds that queue id already
    """
    store.move(qid, AREA, "msg")


def delete(store: Any, qid: str) -> None:
    """Remove a quarantined message for good.

    :raises FileNotFoundError: no such message in the quarantine
    """
    store.remove(qid, AREA)


def main(args: argparse.Namespace) -> int:
    """Run one quarantine action; see the module docstring for the exit status."""
    from gateway.policy import PolicyError
    from gateway.queue import QueueStore

    try:
        policy, _ = load(args.policy)
    except PolicyError as exc:
        print(f"{exc}", file=sys.stderr)
        return 2
    store = QueueStore(policy.server.queue_dir)
    if not (Path(policy.server.queue_dir) / AREA).is_dir():
        print(f"gateway: no quarantine under {policy.server.queue_dir}", file=sys.stderr)
        return 1
    try:
        if args.action == "list":
            return _list(store, args.json)
        if args.action == "show":
            return _show(store, args.id, args.raw)
        if args.action == "release":
            release(store, args.id)
            print(f"released {args.id} into the queue")
            return 0
        delete(store, args.id)
        print(f"deleted {args.id}")
        return 0
    except FileNotFoundError:
        print(f"gateway: no quarantined message {args.id}", file=sys.stderr)
        return 1
    except FileExistsError:
        print(f"gateway: {args.id} is already in the queue", file=sys.stderr)
        return 1
    except ValueError as exc:  # a malformed queue id
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
