"""Soak run: the gateway relaying at a steady load for a bounded time, memory sampled.

    python bench/soak.py                      # 5 minutes
    python bench/soak.py --minutes 2 --conc 20 --rate 200

The gateway (default chain, ``[server] workers`` = --workers, delivery on) relays every
message through a ``[[routes]]`` smarthost to a Postfix ``smtp-sink`` on 127.0.0.1.
Postfix ``smtp-source`` sends batches of --batch messages at --conc sessions, paced to
about --rate messages/second (0: as fast as it goes), until --minutes are up. Every
--every seconds the summed RSS and PSS of the gateway's processes and the number of
messages in its queue are printed. At the end the load stops, the queue must drain
within --drain seconds, and first/last/max RSS are printed. Exit status 1 if a batch
failed or the queue did not drain. Only loopback is used; every process is stopped.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import (  # noqa: E402  (same folder)
    REMOTE_RCPT, count_files, find_tool, gateway, raise_nofile, rss_kib, smtp_sink, smtp_source, tree_pids,
    wait_drained,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Soak: steady relay load, RSS sampled, queue drained at the end.")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--conc", type=int, default=20, help="smtp-source sessions in parallel")
    p.add_argument("--rate", type=float, default=150, help="target messages/second (0: unpaced)")
    p.add_argument("--batch", type=int, default=300, help="messages per smtp-source run")
    p.add_argument("--size", type=int, default=5120, help="message body size in bytes")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--every", type=float, default=5.0, help="seconds between memory samples")
    p.add_argument("--drain", type=float, default=120.0, help="seconds the queue may take to drain at the end")
    p.add_argument("--tmpdir")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tools = {t: find_tool(t) for t in ("smtp-source", "smtp-sink")}
    raise_nofile()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    base = Path(tempfile.mkdtemp(prefix="gw-soak-", dir=args.tmpdir))
    samples: list[tuple[float, int, int, int]] = []
    sent = failed = 0
    ok = True
    try:
        with smtp_sink(tools, base / "sink") as sink, \
                gateway("gw-relay", base / "gw", args.workers, sink.port) as gw:
            stop = threading.Event()
            t0 = time.monotonic()

            def sample() -> None:
                while True:
                    pids = tree_pids(gw.root_pid)
                    row = (time.monotonic() - t0, rss_kib(pids), rss_kib(pids, "Pss"), count_files(gw.queue_msg))
                    samples.append(row)
                    print(f"  t={row[0]:6.0f}s  RSS {row[1] / 1024:6.1f} MiB  PSS {row[2] / 1024:6.1f} MiB  "
                          f"queue {row[3]:5d}  sent {sent}", flush=True)
                    if stop.wait(args.every):
                        return

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            end = t0 + args.minutes * 60
            while time.monotonic() < end:
                started = time.monotonic()
                good, seconds, error = smtp_source(tools["smtp-source"], gw.port, args.conc, args.batch,
                                                   args.size, REMOTE_RCPT, timeout=300)
                if good:
                    sent += args.batch
                else:
                    failed += 1
                    print(f"  batch failed: {error}", flush=True)
                if args.rate > 0:
                    time.sleep(max(0.0, started + args.batch / args.rate - time.monotonic()))
            load_seconds = time.monotonic() - t0
            drained = wait_drained(gw.queue_msg, args.drain)
            drain_seconds = time.monotonic() - t0 - load_seconds
            stop.set()
            sampler.join()
            pids = tree_pids(gw.root_pid)
            samples.append((time.monotonic() - t0, rss_kib(pids), rss_kib(pids, "Pss"), count_files(gw.queue_msg)))
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        return 1
    finally:
        shutil.rmtree(base, ignore_errors=True)
    rss = [s[1] / 1024 for s in samples]
    pss = [s[2] / 1024 for s in samples]
    peak_queue = max(s[3] for s in samples)
    print()
    print(f"load: {sent} messages in {load_seconds:.0f} s ({sent / load_seconds:.0f}/s), {failed} failed batches; "
          f"c={args.conc}, {args.size} B, workers={args.workers}")
    print(f"RSS (all gateway processes): first {rss[0]:.1f} MiB, last {rss[-1]:.1f} MiB, max {max(rss):.1f} MiB; "
          f"PSS first {pss[0]:.1f}, last {pss[-1]:.1f}, max {max(pss):.1f} MiB; {len(samples)} samples")
    print(f"queue: at most {peak_queue} messages waiting; "
          + (f"drained {drain_seconds:.1f} s after the load stopped" if drained else
             f"NOT drained {args.drain:.0f} s after the load stopped ({samples[-1][3]} left)"))
    ok = drained and failed == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
