"""``gateway queue``: look at and act on the queue, safe while the gateway runs.

``list`` and ``stat`` (qmail-qread, qmail-qstat), ``show ID``, ``hold ID``,
``release ID``, ``retry [ID]`` (postqueue -f / -i), ``delete ID`` (postsuper -d),
``flush DOMAIN`` (held routes, like ETRN), ``export`` and ``import`` (backup, restore,
moving a queue to another node). State changes go through the queue store's atomic,
locked state file, and the running gateway is woken through the queue's trigger FIFO.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from typing import Any

from gateway.commands._common import load
from gateway.queue.damage import CorruptQueueFile

ACTIONS = ("list", "stat", "count", "show", "hold", "release", "retry", "delete", "flush", "export", "import")

_HELP = {
    "list": ("list the queued messages and each recipient's state (qmail-qread)", "", False),
    "stat": ("count messages, bytes, pending recipients, held and oldest (qmail-qstat)", "", False),
    "count": ("print the number of queued messages", "", False),
    "show": ("print a queued message as committed, added headers included", "the queue id", True),
    "hold": ("keep messages from delivery until released", "queue ids", True),
    "release": ("undo hold and try the messages now", "queue ids", True),
    "retry": ("try messages now instead of at their next retry time (postqueue -i / -f)",
              "queue ids; none: every message", False),
    "delete": ("delete messages for good, without a bounce (postsuper -d)", "queue ids", True),
}

_FLUSH_EPILOG = """Delivers now, once, every pending recipient in DOMAIN (with @DOMAIN: also its
subdomains) of the messages queued at this moment: mail held by a route with
hold = true (serialmail, the way ETRN does it for a client) and mail waiting for its
next retry. Recipients that fail are held again; mail arriving later is held again.
Needs the running gateway (it is told through the queue's trigger FIFO): exit status
1 when no delivering gateway listens. Messages put on hold by hand stay held.
"""

_EXPORT_EPILOG = """Writes a tar stream (a manifest, then per message its state file and its queue file)
to FILE, or to standard output with - or no FILE. Safe while the gateway runs: each
message is read under the queue's locks, after any delivery attempt on it has ended.

Whoever imports the stream delivers the recipients still pending in it, so the
source must not deliver them too:
  --hold (the default)  the exported messages are put on hold here; delete them
                        once the import elsewhere is done (gateway queue delete ID)
  --move                the exported messages are removed here once the stream is
                        complete (moving a queue to another node)
  --keep                nothing changes here (a backup): never import it while this
                        node still has the messages, or they are delivered twice
If writing fails, nothing is removed and the holds this export set are undone.
"""

_IMPORT_EPILOG = """Loads an export (FILE, or standard input with -) into this policy's queue, running or
not. Recorded recipient states are kept: delivered recipients stay delivered, held
messages stay held; the rest is due at once. A message already queued here or imported
here before (the queue's "imported" journal) is skipped; a queue id in use here gets a
new one. Each message is written atomically (synced, renamed into place).
Exit status 0 when every message was imported or skipped as a duplicate, 1 otherwise.
"""


def register(sub: Any) -> None:
    queue = sub.add_parser(
        "queue", help="inspect the queue and act on messages (safe while the gateway runs)",
        description="Inspect the queue and act on messages; safe while the gateway runs. "
        "Run `gateway queue ACTION --help` for each action.",
    )
    actions = queue.add_subparsers(dest="action", metavar="ACTION", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--policy", "-p", help="policy file (its [server] queue_dir); default: the embedded one")
    for name, (text, ids, required) in _HELP.items():
        action = actions.add_parser(name, parents=[common], help=text, description=text)
        if ids:
            action.add_argument("id", nargs="+" if required else "*", metavar="ID", help=ids)
        else:
            action.set_defaults(id=[])
        if name in ("list", "stat"):
            action.add_argument("--json", action="store_true", help="machine-readable output")
        if name in ("list", "count", "show", "delete"):
            action.add_argument("--quarantine", action="store_true", help="act on the quarantine")
    flush = actions.add_parser(
        "flush", parents=[common], help="deliver the mail held for a domain now (like ETRN)",
        description="Deliver the mail held for a domain now (like ETRN).", epilog=_FLUSH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    flush.add_argument("domain", metavar="DOMAIN", help="domain, or @domain for it and its subdomains")
    export = actions.add_parser(
        "export", parents=[common], help="write the queue to a tar stream (backup, move)",
        description="Write the queue to a tar stream (backup, or moving mail to another node).",
        epilog=_EXPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("file", nargs="?", default="-", metavar="FILE", help="output file; - (default): standard output")
    mode = export.add_mutually_exclusive_group()
    mode.add_argument("--hold", dest="mode", action="store_const", const="hold", help="hold the exported messages here (default)")
    mode.add_argument("--move", dest="mode", action="store_const", const="move", help="remove the exported messages here afterwards")
    mode.add_argument("--keep", dest="mode", action="store_const", const="keep", help="change nothing here (a backup)")
    export.set_defaults(mode="hold")
    export.add_argument("--id", dest="ids", action="append", metavar="ID", help="only this message (repeatable)")
    export.add_argument("--no-quarantine", action="store_true", help="leave the quarantine out")
    imp = actions.add_parser(
        "import", parents=[common], help="load an export into this queue",
        description="Load a queue export into this policy's queue.",
        epilog=_IMPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    imp.add_argument("file", metavar="FILE", help="the export; - for standard input")
    queue.set_defaults(func=main)


def describe(store: Any, qid: str, area: str, policy: Any) -> dict[str, Any]:
    """A message's facts and each recipient's state, as ``list --json`` prints them.

    :raises FileNotFoundError: no such message (delivered meanwhile)
    :raises CorruptQueueFile: its file or state is damaged
    """
    from gateway.delivery.router import holding_route

    item = store.load(qid, area)
    env = item.envelope
    recipients = [r.to_dict() for r in env.recipients]
    for r in recipients:
        # A pending recipient whose [[routes]] entry holds it (hold = true) waits for a
        # flush or ETRN, not for a retry: shown as held, with the route.
        route = holding_route(r["address"], policy) if area == "msg" and r["state"] == "pending" else None
        if route is not None:
            r["state"], r["held_by_route"] = "held", route
    waiting = [r for r in recipients if r["state"] in ("pending", "held")]
    by_route = bool(waiting) and all(r["state"] == "held" for r in waiting)
    return {
        "id": qid,
        "area": area,
        "arrived": datetime.datetime.fromtimestamp(env.arrived).isoformat(timespec="seconds"),
        "age_seconds": round(time.time() - env.arrived),
        "size": item.message_size,
        "sender": env.sender,
        # held: nothing of it goes out until a release (operator) or a flush (route)
        "held": item.held or by_route,
        "held_by": "operator" if item.held else "route" if by_route else None,
        "attempts": item.attempts,
        "next_try": datetime.datetime.fromtimestamp(item.next_try).isoformat(timespec="seconds"),
        "recipients": recipients,
        "quarantine_reason": env.quarantine_reason,
        "verp": env.verp,  # VERP delimiters (XVERP): each recipient gets its own sender
    }


def _damaged(exc: CorruptQueueFile) -> None:
    """One damaged file does not stop a listing: the gateway sets it aside (docs/queue.md)."""
    print(f"gateway: damaged, skipped: {exc} (the gateway moves it to corrupt/)", file=sys.stderr)


def _list(store: Any, area: str, as_json: bool, policy: Any) -> int:
    rows = []
    for qid in store.ids(area):
        try:
            rows.append(describe(store, qid, area, policy))
        except FileNotFoundError:
            continue  # delivered meanwhile
        except CorruptQueueFile as exc:
            _damaged(exc)
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        routes = sorted({r["held_by_route"] for r in row["recipients"] if "held_by_route" in r})
        held = " held" if row["held_by"] == "operator" else ""
        held += f" held by route {', '.join(routes)}" if routes else ""
        flags = held + (f" verp={row['verp']}" if row["verp"] else "")
        print(f"{row['id']}  {row['arrived']}  {row['size']:>9}  <{row['sender']}>{flags}")
        for r in row["recipients"]:
            last = f"  {r['last_reply']}" if r.get("last_reply") else ""
            target = f" {r['target']}" if r.get("target") else ""  # an alias/.forward target
            route = f" (route {r['held_by_route']}: until flushed)" if r.get("held_by_route") else ""
            print(f"    {r['state']:<9} <{r['address']}>{target}{route}{last}")
    return 0


def _stat(store: Any, as_json: bool) -> int:
    now = time.time()
    stats: dict[str, Any] = {"messages": 0, "bytes": 0, "recipients_pending": 0, "held": 0, "oldest_seconds": 0}
    for qid in store.ids("msg"):
        try:
            item = store.load(qid)
        except FileNotFoundError:
            continue
        except CorruptQueueFile as exc:
            _damaged(exc)
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


CHANGES = ("hold", "release", "retry", "delete")
"""What :func:`change` does to a queued message."""


def change(store: Any, qid: str, action: str) -> None:
    """Hold, release, retry or delete one queued message. After a release or a retry,
    the caller wakes the scheduler (``store.trigger(qid)``, or its own scheduler).

    :raises FileNotFoundError: no such message
    :raises ValueError: a malformed queue id, or an unknown action
    :raises CorruptQueueFile: its file or state is damaged
    """
    if action not in CHANGES:
        raise ValueError(f"unknown queue action {action!r}")
    if action == "delete":
        store.remove(qid)
        return
    item = store.load(qid)
    if action == "hold":
        store.update_state(qid, item.envelope, held=True)
    elif action == "release":
        store.update_state(qid, item.envelope, held=False, next_try=time.time())
    else:  # retry
        store.update_state(qid, item.envelope, next_try=time.time())


def _change(store: Any, qids: list[str], action: str) -> int:
    status = 0
    for qid in qids:
        try:
            change(store, qid, action)
        except (FileNotFoundError, ValueError):
            print(f"gateway: no message {qid} in the queue", file=sys.stderr)
            status = 1
            continue
        except CorruptQueueFile as exc:
            _damaged(exc)
            status = 1
            continue
        print(f"{qid}: {action}")
    if action in ("release", "retry"):
        store.trigger(*qids)
    return status


def _flush(store: Any, text: str) -> int:
    from gateway.delivery.flush import TRIGGER_PREFIX, matching_messages, parse_target

    try:
        target = parse_target(text)
    except ValueError as exc:
        print(f"gateway: queue flush: {exc}", file=sys.stderr)
        return 2
    count = len(matching_messages(store, target))
    if not count:
        print(f"no messages waiting for {target}")
        return 0
    if not store.trigger(TRIGGER_PREFIX + str(target)):
        print(f"gateway: {count} messages wait for {target}, but no delivering gateway is running", file=sys.stderr)
        return 1
    print(f"flushing {count} messages for {target}")
    return 0


def _export(store: Any, args: argparse.Namespace, hostname: str) -> int:
    from gateway.queue.transfer import TransferError, export_queue

    areas = ("msg",) if args.no_quarantine else ("msg", "quarantine")
    out = sys.stdout.buffer if args.file == "-" else open(args.file, "xb")
    try:
        result = export_queue(store, out, mode=args.mode, qids=args.ids, areas=areas, source=hostname)
    except TransferError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    finally:
        if out is not sys.stdout.buffer:
            out.close()
    what = {"hold": ", held here", "move": ", removed here", "keep": ""}[args.mode]
    print(f"exported {len(result.exported)} messages{what}", file=sys.stderr)
    missing = [qid for qid in args.ids or [] if qid not in result.exported]
    for qid in missing:
        print(f"gateway: no message {qid} in the queue", file=sys.stderr)
    return 1 if missing else 0


def _import(store: Any, args: argparse.Namespace) -> int:
    from gateway.queue.transfer import TransferError, import_queue

    if (store.root / "msg").is_dir():
        store.attach()
    else:
        store.open()  # a new queue: no gateway can be running on it
    source = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")
    try:
        result = import_queue(store, source)
    except TransferError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    finally:
        if source is not sys.stdin.buffer:
            source.close()
    for origin, qid in result.imported.items():
        print(f"{origin}: imported" + ("" if qid == origin else f" as {qid}"))
    for origin in result.duplicates:
        print(f"{origin}: already here, skipped")
    for error in result.errors:
        print(f"gateway: {error}", file=sys.stderr)
    if result.imported:
        store.trigger("*")
    return 1 if result.errors else 0


def main(args: argparse.Namespace) -> int:
    from gateway.queue import QueueStore

    policy, _ = load(args.policy)
    store = QueueStore(policy.server.queue_dir)
    area = "quarantine" if getattr(args, "quarantine", False) else "msg"
    as_json = getattr(args, "json", False)
    if args.action != "import" and not (store.root / "msg").is_dir():
        print(f"gateway: no queue at {store.root} (the gateway creates it when it first starts)", file=sys.stderr)
        return 1
    if args.action == "flush":
        return _flush(store, args.domain)
    if args.action == "export":
        return _export(store, args, policy.server.effective_hostname())
    if args.action == "import":
        return _import(store, args)
    if args.action == "list":
        return _list(store, area, as_json, policy)
    if args.action == "stat":
        return _stat(store, as_json)
    if args.action == "count":
        print(len(store.ids(area)))
        return 0
    if args.action == "retry" and not args.id:
        for qid in store.ids():
            try:
                store.update_state(qid, store.load(qid).envelope, next_try=time.time())
            except FileNotFoundError:
                continue
            except CorruptQueueFile as exc:
                _damaged(exc)
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
        except CorruptQueueFile as exc:
            _damaged(exc)
            return 1
        return 0
    if args.action == "delete" and args.quarantine:
        for qid in args.id:
            store.remove(qid, "quarantine")
        return 0
    return _change(store, args.id, args.action)
