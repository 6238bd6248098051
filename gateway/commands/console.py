"""``gateway console digest``: the quarantine digests, now, from the command line.

``--preview`` prints the digests owed (messages quarantined since the last digest,
``var_dir/console/digest.last``) without sending anything or moving that mark;
``--send`` queues them in the policy's queue (a running gateway is woken through its
trigger FIFO and delivers them at once) and moves the mark, as the console's timer
does every ``[console] digest_interval``. See docs/console.md. Exit status: 0 done,
1 the queue is not there, 2 bad usage or policy.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add ``console digest`` to the ``gateway`` command line."""
    parser = sub.add_parser("console", help="web console tasks: quarantine digests")
    actions = parser.add_subparsers(dest="console_command", required=True, metavar="ACTION")
    digest = actions.add_parser(
        "digest", help="print (--preview) or send (--send) the quarantine digests owed now",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = digest.add_mutually_exclusive_group(required=True)
    what.add_argument("--preview", action="store_true", help="print the digests; send nothing")
    what.add_argument("--send", action="store_true", help="queue the digests and move the mark")
    digest.add_argument("--policy", "-p", help="policy file (default: the embedded policy)")
    digest.set_defaults(func=main)


async def _queue(store: Any, digests: list[Any]) -> list[str]:
    from gateway.model import Envelope, Message, QueuedRecipient

    qids = []
    for item in digests:
        qid = store.new_id()
        envelope = Envelope(sender=item.sender, recipients=[QueuedRecipient(address=item.recipient)], body="8BITMIME")
        await store.commit(qid, envelope, Message(item.message))
        qids.append(qid)
    await store.close()
    return qids


def main(args: argparse.Namespace) -> int:
    from gateway.commands._common import load
    from gateway.console.digest import base_url, build_digests, digest_key, last_run, set_last_run
    from gateway.policy import PolicyError
    from gateway.queue import QueueStore

    try:
        policy, _ = load(args.policy)
    except PolicyError as exc:
        print(f"{exc}", file=sys.stderr)
        return 2
    var_dir = Path(policy.server.var_dir)
    store = QueueStore(policy.server.queue_dir)
    if not (Path(policy.server.queue_dir) / "quarantine").is_dir():
        print(f"gateway: no quarantine under {policy.server.queue_dir}", file=sys.stderr)
        return 1
    now = time.time()
    digests = build_digests(store, policy, digest_key(var_dir), last_run(var_dir), now,
                            base_url(policy, policy.console.port))
    if args.preview:
        for item in digests:
            print(f"=== to <{item.recipient}>: {item.count} message(s)")
            print(item.message.decode("utf-8", "replace").replace("\r\n", "\n"))
        if not digests:
            print("no digest owed")
        return 0
    store.attach()
    qids = asyncio.run(_queue(store, digests))
    set_last_run(var_dir, now)
    store.trigger(*qids)
    for item, qid in zip(digests, qids):
        print(f"queued {qid} to <{item.recipient}>: {item.count} message(s)")
    return 0
