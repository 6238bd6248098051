"""What the console's index (gateway/tracking) costs a gateway, in CPU per message.

    python bench/index_cost.py micro                 # the handler and the writer alone, on made-up mail
    python bench/index_cost.py micro --url postgresql://...   # the writer against PostgreSQL
    python bench/index_cost.py e2e --rounds 3        # the gateway end to end, index on and off

``micro`` feeds the log records of ``--messages`` messages (shaped as the shipped default
logs one: connect, HELO, MAIL, RCPT, the claim, queued, delivered, disconnect, removed;
``--conc`` sessions interleaved) to the index's logging handler, then to a writer
thread's assembly and the index, in batches of ``--batch`` messages (a writer's tick at
200-250 msg/s per process), and prints the CPU time of each part per message. Each is
measured ``--repeat`` times; the best is shown (the least disturbed by the machine).

``e2e`` runs ``bench/end_to_end.py``'s local-delivery case (the shipped default policy,
``workers`` per core, c=100, 5 KiB into a Maildir) for the gateway with ``[console]
index`` as shipped and with ``index = false`` (the same tree, only that key changed),
alternating within each round and rotating the order, and prints each round's msg/s and
CPU ms per message (the whole process tree) and the per-round ratios. No Postfix.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any
from unittest import mock

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

_HEAD = (b"Received: from vm ([127.0.0.1])\r\n\tby localhost with SMTP id %s\r\n\tfor <postmaster@localhost>; "
         b"Sat, 05 Dec 2026 13:59:22 +0000\r\nFrom: <a@example.org>\r\nTo: <postmaster@localhost>\r\n"
         b"Date: Sat,  5 Dec 2026 13:59:21 +0000 (UTC)\r\nMessage-Id: <%s@vm>\r\n\r\n" + b"X" * 5000)


# -- micro ------------------------------------------------------------------------------


def _records(messages: int, conc: int) -> list[tuple[str, str, str, tuple[Any, ...]]]:
    """(session, queue id, format, args) of ``messages`` messages, ``conc`` sessions at a
    time, each step of every open session in turn (as a busy process interleaves them).
    A ``None`` format is the claim (no log line: :meth:`IndexHandler.note_claim`)."""
    steps: list[tuple[str, tuple[Any, ...], bool]] = [
        ("connect client=%s port=%d listener=%s relay_client=%s", ("127.0.0.1", 55016, "smtp", False), False),
        ("helo name=%s esmtp=%s", ("vm", False), False),
        ("mail from=<%s> size=%s", ("a@example.org", None), False),
        ("rcpt to=<%s> accepted by=%s", ("postmaster@localhost", "rcpt_local_users"), False),
        ("", (), True),  # the claim
        ("queued from=<%s> to=%s rcpts=%d size=%d area=%s score=%.1f",
         ("a@example.org", "<postmaster@localhost>", 1, 5257, "msg", 0.0), True),
        ("disconnect client=%s transactions=%d", ("127.0.0.1", 1), False),
        ("delivery to=<%s> status=%s relay=%s reply=%r",
         ("postmaster@localhost", "delivered", "local", "250 2.0.0 delivered to ./Maildir/"), True),
        ("done: removed from the queue", (), True),
    ]
    out = []
    for start in range(0, messages, conc):
        group = range(start, min(messages, start + conc))
        for fmt, args, has_qid in steps:
            for n in group:
                out.append((f"S1-{n:x}", f"{0x661E3664FB38600 + n:X}0" if has_qid else "-", fmt, args))
    return out


class _Claim:
    """What :meth:`IndexHandler.note_claim` reads of a queue claim (in memory)."""

    def __init__(self, qid: str) -> None:
        from gateway.content import Content

        self.item = types.SimpleNamespace(qid=qid, envelope=types.SimpleNamespace(notes=[]), extents=())
        self.message = Content.of_bytes(_HEAD % (qid.encode(), qid.encode()))
        self.fd = -1


def micro(args: argparse.Namespace) -> None:
    from gateway.logs import QUEUE_ID, SESSION_ID
    from gateway.tracking import IndexWriter, SqliteIndex

    try:
        from gateway.tracking import open_index
    except ImportError:  # a tree before index_url (the --root of a comparison)
        def open_index(url: str, path: Any) -> Any:
            return SqliteIndex(path)

    records = _records(args.messages, args.conc)
    claims = {q: _Claim(q) for _, q, fmt, _ in records if not fmt}
    logger = logging.getLogger("gateway.smtp.handler")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    made = [logger.makeRecord(logger.name, logging.INFO, __file__, 1, fmt, a, None) for _, _, fmt, a in records]
    tmp = Path(tempfile.mkdtemp(prefix="gw-index-cost-"))
    print(f"index_cost.py micro: {args.messages} messages, {len(records)} records, batches of {args.batch} "
          f"messages, {args.url or 'SQLite in ' + str(tmp)}", flush=True)
    best: dict[str, float] = {}
    try:
        for attempt in range(args.repeat):
            if not args.url:
                for f in tmp.glob("index.sqlite*"):
                    f.unlink()
            index = open_index(args.url, tmp / "index.sqlite")
            writer = IndexWriter(index, mock.Mock(), 30 * 86400.0, sample_queue=False)
            writer.index.create()
            handler = writer.handler
            # the handler, on the event loop's thread, with the ids as the gateway sets them
            cpu = time.thread_time()
            for (session, qid, fmt, _), record in zip(records, made):
                SESSION_ID.set(session)
                QUEUE_ID.set(qid)
                if fmt:
                    handler.handle(record)
                else:
                    handler.note_claim(claims[qid])
            spent_handler = time.thread_time() - cpu
            cpu = time.thread_time()
            for (session, qid, _, _), record in zip(records, made):
                SESSION_ID.set(session)
                QUEUE_ID.set(qid)
            spent_handler -= time.thread_time() - cpu  # the loop and the ids alone
            events = list(handler.pending)
            handler.pending.clear()
            # the writer: its batches as a tick drains them
            per_batch = max(1, len(events) * args.batch // args.messages)
            cpu = time.thread_time()
            for start in range(0, len(events), per_batch):
                handler.pending.extend(events[start:start + per_batch])
                writer._once()
            writer._once(final=True)
            spent_writer = time.thread_time() - cpu
            writer.index.close()
            for name, spent in (("handler", spent_handler), ("writer", spent_writer)):
                best[name] = min(best.get(name, spent), spent)
            print(f"  run {attempt + 1}: handler {1e6 * spent_handler / args.messages:.1f} µs/msg, "
                  f"writer {1e6 * spent_writer / args.messages:.1f} µs/msg (CPU of its thread)", flush=True)
        found, total = index.search(limit=1)
        assert total >= args.messages, f"the index holds {total} messages, {args.messages} written"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"best: handler {1e6 * best['handler'] / args.messages:.1f} µs/msg, writer "
          f"{1e6 * best['writer'] / args.messages:.1f} µs/msg, together "
          f"{1e3 * (best['handler'] + best['writer']) / args.messages:.3f} ms CPU/msg")


# -- end to end -------------------------------------------------------------------------


def e2e(args: argparse.Namespace) -> int:
    import end_to_end
    from accept import find_tool

    tools = {t: find_tool(t) for t in ("smtp-source", "smtp-sink")}
    shipped = end_to_end.gateway_policy

    def policy(root: Path, case: str, port: int, workdir: Path, workers: int, sink_port: int | None) -> str:
        text = shipped(root, case, port, workdir, workers, sink_port)
        if "index-off" in workdir.parts:
            assert "\nindex = true\n" in text
            text = text.replace("\nindex = true\n", "\nindex = false\n")
        return text

    end_to_end.load.raise_nofile()
    base = Path(tempfile.mkdtemp(prefix="gw-index-cost-", dir=args.tmpdir))
    ns = argparse.Namespace(count=args.count, warmup=100, conc=args.conc, workers=args.workers, timeout=300,
                            keep=True, root=REPO, before_root=None)
    servers = ["index-on", "index-off"]
    rows: list[dict[str, Any]] = []
    print(f"index_cost.py e2e: local delivery, 5 KiB, c={args.conc}, workers={args.workers}, "
          f"{args.count} messages a batch, {args.rounds} rounds; tmp={base}", flush=True)
    try:
        with mock.patch.object(end_to_end, "gateway_policy", policy):
            for rnd in range(args.rounds):
                order = servers[rnd % 2:] + servers[: rnd % 2]
                for name in order:
                    row = end_to_end.run_point("gateway", "local", 5120, rnd, ns, tools, base / name)
                    row["server"] = name
                    row["writer_ms_per_msg"] = _writer_cpu(base / name) * 1000 / (ns.warmup + args.count)
                    shutil.rmtree(base / name, ignore_errors=True)
                    rows.append(row)
                    print(f"  round {rnd + 1} {name:9} " + (
                        f"{row['rate']:6.0f} msg/s, {row['cpu_ms_per_msg']:.2f} ms CPU/msg" if row["ok"]
                        else f"FAILED: {row['error']}")
                        + (f"; index writer threads {row['writer_ms_per_msg']:.3f} ms CPU/msg"
                           if row["writer_ms_per_msg"] else ""), flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    rate_ratios, cpu_diffs = [], []
    for rnd in range(args.rounds):
        on, off = ([r for r in rows if r["round"] == rnd and r["server"] == s and r["ok"]] for s in servers)
        if on and off:
            rate_ratios.append(on[0]["rate"] / off[0]["rate"])
            cpu_diffs.append(on[0]["cpu_ms_per_msg"] - off[0]["cpu_ms_per_msg"])
    writer = [r["writer_ms_per_msg"] for r in rows if r["server"] == "index-on" and r["writer_ms_per_msg"]]
    if writer:
        print(f"index writer threads (their own CPU, all processes, warm-up included): median "
              f"{statistics.median(writer):.3f} ms/msg (rounds: {', '.join(f'{x:.3f}' for x in writer)})")
    if rate_ratios:
        print(f"index on / off, msg/s: median {statistics.median(rate_ratios):.3f} "
              f"(rounds: {', '.join(f'{x:.3f}' for x in rate_ratios)})")
        print(f"CPU ms/msg, on minus off: median {statistics.median(cpu_diffs):+.3f} "
              f"(rounds: {', '.join(f'{x:+.3f}' for x in cpu_diffs)})")
    return 0 if rows and all(r["ok"] for r in rows) else 1


def _writer_cpu(point: Path) -> float:
    """The CPU seconds the index writers of a run say they spent (logged as each stops)."""
    total = 0.0
    for log in point.glob("*/server/server.log"):
        for found in re.finditer(r"index writer: \d+ events in \d+ passes, ([0-9.]+) s CPU", log.read_text(errors="replace")):
            total += float(found.group(1))
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="What the console's index costs, in CPU per message.")
    sub = p.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("micro", help="the handler and the writer alone")
    m.add_argument("--messages", type=int, default=20000)
    m.add_argument("--conc", type=int, default=100)
    m.add_argument("--batch", type=int, default=110, help="messages a writer's batch (default 110)")
    m.add_argument("--repeat", type=int, default=3)
    m.add_argument("--url", default="", help="a PostgreSQL index (postgresql://...; an empty database) instead of SQLite")
    e = sub.add_parser("e2e", help="the gateway end to end, index on and off")
    e.add_argument("--rounds", type=int, default=3)
    e.add_argument("--count", type=int, default=3000)
    e.add_argument("--conc", type=int, default=100)
    e.add_argument("--workers", type=int, default=2)
    e.add_argument("--tmpdir")
    args = p.parse_args(argv)
    if args.mode == "micro":
        micro(args)
        return 0
    return e2e(args)


if __name__ == "__main__":
    sys.exit(main())
