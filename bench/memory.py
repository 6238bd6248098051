"""Peak memory of the server's whole process tree under large messages at once (issue #17).

    python bench/memory.py                            # 10M:50 and 500K:500, gateway and Postfix
    python bench/memory.py --before HEAD~1            # also the gateway at a revision, and a
                                                      # 5 KiB throughput pair against it
    python bench/memory.py --scenarios 1M:20 --throughput-rounds 0     # a smoke run
    python bench/memory.py --rev HEAD                 # the gateway as committed, not the work tree

A scenario ``SIZE:CONC`` sends CONC messages of SIZE bytes (``K`` = 1024, ``M`` = 1024²)
from CONC sessions at once, one message each, to each server in turn. The sender is
``load.py``'s asyncio client in a process of its own, which keeps every body in flight at
once; ``smtp-source`` (``--client smtp-source``: ``-s CONC -m CONC -l SIZE``) writes a
session's body with a blocking write, so its large messages go one after the other. The
servers: the gateway (the tree under test), Postfix, and with ``--before REV`` the gateway
as committed at REV. Both deliver into a Maildir exactly as ``end_to_end.py``'s ``local``
case (its ``running()`` starts them: the shipped ``policies/default.toml`` with ``workers =
2`` and the per-IP limit raised; a private Postfix with ``virtual(8)``), with what an
operator changes in Postfix for this load (postfix_changes): ``message_size_limit`` raised
to the gateway's 25 MiB (Postfix's 10,240,000 bytes refuses 10 MiB) and, above 100
sessions, ``default_process_limit`` raised to CONC.

For each point the server is started fresh, idle for ``--idle`` seconds, then loaded; until
``--settle`` seconds after the last message is in ``Maildir/new/`` a thread sums, every
``--interval`` seconds, ``Rss`` and ``Pss`` of ``/proc/PID/smaps_rollup`` over the server's
process tree, walked from its root process (the gateway's master; Postfix's ``master``) through
``/proc/PID/task/TID/children``. RSS counts a page shared by forked processes once per
process; PSS divides it among them, so the sum of PSS is the tree's fair share of memory.
The client is not in the tree, nor is this script. A sampled peak can miss a spike
shorter than the interval; the largest ``VmHWM`` of one process (read at the end, processes
still alive) is a check from below on that.

With ``--before REV`` (``--throughput-rounds``, default 3) ``end_to_end.py``'s own ``local``
point at 5 KiB, c=100 runs the two gateways interleaved, and the median of the per-round
ratios says whether throughput moved. Results go to ``bench/results/memory-*.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from unittest import mock

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
import end_to_end as e2e  # noqa: E402  (same folder)
import load  # noqa: E402
from _daemons import _proc_tree, tree_cpu_seconds  # noqa: E402
from accept import describe_source, export_rev, find_tool  # noqa: E402
from deliver import _log_tail  # noqa: E402

DEFAULT_SCENARIOS = "10M:50,500K:500"
#: issue #17: peak RSS of the gateway's tree under 200 MB (the policy's units: MB = 1024²)
TARGET_MIB = 200
#: Postfix's message_size_limit: the gateway's shipped max_message_size, "25MB"
POSTFIX_SIZE_LIMIT = 25 * 1024**2
_UNITS = {"": 1, "K": 1024, "M": 1024**2}


def parse_scenario(text: str) -> tuple[int, int]:
    """``"10M:50"`` -> (10485760, 50): message size in bytes, sessions at once."""
    found = re.fullmatch(r"\s*(\d+)([KkMm]?)\s*:\s*(\d+)\s*", text)
    if not found:
        raise ValueError(f"bad scenario {text!r}: want SIZE:CONC, e.g. 10M:50 or 500K:500")
    return int(found[1]) * _UNITS[found[2].upper()], int(found[3])


# -- memory of a process tree -------------------------------------------------------------


def _rollup(pid: int) -> tuple[int, int]:
    """(Rss, Pss) of one process in KiB, from one read of ``smaps_rollup``; (0, 0) if gone."""
    rss = pss = 0
    with contextlib.suppress(OSError, ValueError):
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    return rss, pss


def largest_hwm_kib(root: int) -> int:
    """The largest ``VmHWM`` (peak resident set) of one live process of the tree, KiB."""
    best = 0
    for pid in _proc_tree(root):
        with contextlib.suppress(OSError, ValueError):
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        best = max(best, int(line.split()[1]))
    return best


class TreeSampler:
    """Sums Rss and Pss over the tree of ``root`` every ``interval`` seconds, on a thread.

    ``samples`` holds (seconds since start, processes, Rss KiB, Pss KiB, seconds the sample
    took); :meth:`mark` notes the time of an event (the load's start) for :meth:`peak`."""

    def __init__(self, root: int, interval: float) -> None:
        self.root, self.interval = root, interval
        self.samples: list[tuple[float, int, int, int, float]] = []
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            pids = _proc_tree(self.root)
            rss = pss = 0
            for pid in pids:
                r, p = _rollup(pid)
                rss, pss = rss + r, pss + p
            took = time.monotonic() - start
            self.samples.append((start - self.t0, len(pids), rss, pss, took))
            self._stop.wait(max(0.0, self.interval - took))

    def now(self) -> float:
        return time.monotonic() - self.t0

    def __enter__(self) -> "TreeSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def between(self, start: float, end: float = float("inf")) -> list[tuple[float, int, int, int, float]]:
        return [s for s in self.samples if start <= s[0] <= end]

    def summary(self, load_at: float, done_at: float | None) -> dict[str, Any]:
        """Idle (median before the load), peak (largest after it) and after (median of the
        settle time once everything arrived) RSS and PSS in MiB, and the sampling's pace."""
        idle, busy = self.between(0, load_at), self.between(load_at)
        after = self.between(done_at) if done_at is not None else []
        mib = 1 / 1024

        def med(rows: list[tuple[float, int, int, int, float]], i: int) -> float | None:
            return statistics.median(r[i] for r in rows) * mib if rows else None

        out: dict[str, Any] = {
            "idle_rss_mib": med(idle, 2), "idle_pss_mib": med(idle, 3),
            "after_rss_mib": med(after, 2), "after_pss_mib": med(after, 3),
            "samples": len(self.samples),
            "sample_ms": 1000 * statistics.mean(s[4] for s in self.samples) if self.samples else None,
            "interval_ms": 1000 * statistics.mean(b[0] - a[0] for a, b in zip(busy, busy[1:]))
            if len(busy) > 1 else None,
        }
        if busy:
            top_rss, top_pss = max(busy, key=lambda s: s[2]), max(busy, key=lambda s: s[3])
            out.update(peak_rss_mib=top_rss[2] * mib, peak_rss_at=top_rss[0] - load_at,
                       peak_pss_mib=top_pss[3] * mib, peak_pss_at=top_pss[0] - load_at,
                       max_processes=max(s[1] for s in busy))
        return out


# -- the load -----------------------------------------------------------------------------


@dataclass
class Sent:
    """What a client run did: ``ok``, its wall time, an error, and client-side figures."""

    ok: bool
    seconds: float
    error: str
    extra: dict[str, Any] = field(default_factory=dict)


def send(client: str, tools: dict[str, str], port: int, conc: int, size: int, timeout: float) -> Sent:
    """``conc`` sessions at once, one message of ``size`` bytes each, to ``postmaster@localhost``.

    ``asyncio``: ``load.py``'s own client (``latency_run``) in a process of its own, so its
    buffers and its CPU stay out of this one; every session writes its body as the socket
    takes it, so all the bodies are in flight together. ``smtp-source`` writes one body at a
    time (a blocking write per session: with ``-s 5 -l 10485760`` the next DATA starts when
    the previous one is nearly done), so at most two or so large messages are ever in flight.
    """
    if client == "smtp-source":
        done = e2e.send(tools, port, "local", conc, conc, size, timeout)
        return Sent(done.ok, done.seconds, done.error)
    argv = [sys.executable, str(Path(__file__).resolve()), "_send", str(port), str(conc), str(size), str(timeout)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    clients.append(proc)
    try:
        stdout, stderr = proc.communicate(timeout=timeout + 30)
    except subprocess.TimeoutExpired:
        return Sent(False, time.perf_counter() - t0, f"client timed out after {timeout:.0f}s")
    finally:
        stop_client(proc)
    seconds = time.perf_counter() - t0
    try:
        out = json.loads(stdout)
    except ValueError:
        return Sent(False, seconds, f"client status {proc.returncode}: {stderr.decode(errors='replace')[-300:]}")
    return Sent(bool(out.get("ok")), seconds, out.get("error", ""), out)


#: client processes started by send(), so that an interrupt or a failed point ends them
clients: list[subprocess.Popen[bytes]] = []


def stop_client(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def _role_send(argv: list[str]) -> int:
    """The client process: ``_send PORT CONC SIZE TIMEOUT``; prints ``latency_run``'s JSON."""
    port, conc, size, timeout = int(argv[0]), int(argv[1]), int(argv[2]), float(argv[3])
    out = load.latency_run(port, conc, conc, size, load.LOCAL_RCPT, timeout)
    print(json.dumps(out))
    return 0


# -- one point ----------------------------------------------------------------------------


def postfix_changes(conc: int) -> dict[str, int]:
    """What an operator changes in Postfix for this load (beside ``end_to_end.py``'s ``main.cf``).

    ``message_size_limit``: the gateway's 25 MiB. ``default_process_limit`` (100 ``smtpd``)
    raised to CONC above 100: ``master`` listens with that backlog, and a session beyond
    it whose handshake the full accept queue dropped is established only on the client's
    side, which then waits for a greeting that never comes (with 500 at once, 194 of them
    hung for ten minutes); the gateway takes all CONC sessions at once, so Postfix does too.
    """
    changes = {"message_size_limit": POSTFIX_SIZE_LIMIT}
    if conc > 100:
        changes["default_process_limit"] = conc
    return changes


def _postfix_main(changes: dict[str, int]) -> Callable[[str, int | None], str]:
    base = e2e.postfix_main

    def main_cf(case: str, sink_port: int | None) -> str:
        return base(case, sink_port) + "".join(f"{key} = {value}\n" for key, value in changes.items())
    return main_cf


def run_point(name: str, size: int, conc: int, rnd: int, args: argparse.Namespace,
              tools: dict[str, str], base: Path) -> dict[str, Any]:
    """Server ``name`` fresh, idle, then ``conc`` messages of ``size`` bytes at once; its
    memory until every message is in ``Maildir/new/`` and ``--settle`` seconds more."""
    row: dict[str, Any] = {"round": rnd, "server": name, "size": size, "conc": conc, "client": args.client, "ok": False,
                           "error": "", "loadavg": os.getloadavg()}
    workdir = base / f"r{rnd}-{size}x{conc}-{name.replace('@', '-')}"
    log_offset = 0
    try:
        with mock.patch.object(e2e, "postfix_main", _postfix_main(postfix_changes(conc))), \
                e2e.running(name, "local", workdir, args, tools) as (server, arrived, strays), \
                TreeSampler(server.root_pid, args.interval) as mem:
            time.sleep(args.idle)
            # start-up lines (the self-signed certificate, the console's first password)
            # are not the load's
            with contextlib.suppress(OSError):
                log_offset = e2e.server_log(server.workdir, name).stat().st_size
            result: list[Any] = []
            sending = threading.Thread(target=lambda: result.append(
                send(args.client, tools, server.port, conc, size, args.timeout)), daemon=True)
            load_at, cpu0, t0 = mem.now(), tree_cpu_seconds(server.root_pid), time.perf_counter()
            sending.start()
            done = e2e.until_arrived(arrived, conc, args.timeout)
            cpu1 = tree_cpu_seconds(server.root_pid)
            done_at = mem.now() if done is not None else None
            sending.join()
            time.sleep(args.settle)  # the memory given back, and any duplicate, show up now
            row["largest_hwm_mib"] = largest_hwm_kib(server.root_pid) / 1024
            got = arrived()
            row.update(received=got, maildir_tmp=strays(), cpu_seconds=cpu1 - cpu0,
                       accept_seconds=result[0].seconds if result else None,
                       client_figures=result[0].extra if result else {})
        row.update(mem.summary(load_at, done_at))
        row["series"] = [(round(s[0] - load_at, 3), s[1], s[2], s[3]) for s in mem.samples]
        if done is not None:
            row["seconds"] = done - t0
        if result and not result[0].ok:
            row["error"] = result[0].error
        elif done is None:
            row["error"] = f"{got} of {conc} arrived after {args.timeout:.0f}s"
        elif got != conc:
            row["error"] = f"{got} arrived, {conc} sent"
        elif row["maildir_tmp"]:
            row["error"] = f"{row['maildir_tmp']} files left in Maildir/tmp"
        row["ok"] = not row["error"]
    except Exception as exc:  # one server failing must not lose the rest of the run
        log = e2e.server_log(workdir / "server", name)
        row["error"] = f"{type(exc).__name__}: {exc}; log: {_log_tail(log, 3)}"
    finally:
        for proc in clients:
            stop_client(proc)
        clients.clear()
        problems = e2e.log_problems(workdir / "server", name, log_offset)
        row["log_problems"], row["log_first_problem"] = len(problems), problems[0][:300] if problems else ""
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return row


def _size_text(size: int) -> str:
    for unit, factor in (("M", 1024**2), ("K", 1024)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def _fmt(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _seconds(ms: float | None) -> str:
    return "-" if ms is None else f"{ms / 1000:.1f}"


def _progress(row: dict[str, Any]) -> str:
    text = (f"  {_size_text(row['size'])}:{row['conc']:<4} {row['server']:15} idle "
            f"{_fmt(row.get('idle_rss_mib'))}/{_fmt(row.get('idle_pss_mib'))} MiB, peak RSS "
            f"{_fmt(row.get('peak_rss_mib'))} PSS {_fmt(row.get('peak_pss_mib'))} MiB, all in "
            f"{_fmt(row.get('seconds'), 1)} s")
    if not row["ok"]:
        text += f" FAILED: {row['error']}"
    if row["log_problems"]:
        text += f"\n      {row['log_problems']} warning/error log lines, first: {row['log_first_problem']}"
    return text


# -- 5 KiB throughput against --before ------------------------------------------------------


def throughput(args: argparse.Namespace, tools: dict[str, str], base: Path) -> list[dict[str, Any]]:
    """``end_to_end.py``'s local point at 5 KiB for the two gateways, interleaved rounds."""
    e2e_args = argparse.Namespace(count=args.throughput_count, warmup=100, conc=100, timeout=args.timeout,
                                  keep=args.keep, root=args.root, before_root=args.before_root,
                                  workers=args.workers)
    servers, rows = ["gateway", "gateway@before"], []
    for rnd in range(args.throughput_rounds):
        for name in servers[rnd % 2:] + servers[: rnd % 2]:
            rows.append(e2e.run_point(name, "local", 5120, rnd, e2e_args, tools, base))
            print(e2e._progress(rows[-1]), flush=True)
    return rows


def throughput_ratios(rows: list[dict[str, Any]]) -> list[float]:
    rate = {(r["server"], r["round"]): r["rate"] for r in rows if r["ok"]}
    return [rate["gateway", n] / rate["gateway@before", n] for n in sorted({r["round"] for r in rows})
            if ("gateway", n) in rate and ("gateway@before", n) in rate]


# -- report and run -------------------------------------------------------------------------


def report(rows: list[dict[str, Any]], tput: list[dict[str, Any]]) -> str:
    lines = ["| scenario | server | idle RSS / PSS MiB | peak RSS / PSS MiB | peak at s | after RSS / PSS MiB "
             f"| largest process VmHWM MiB | processes | all delivered in s | client p50 / p99 s | CPU s | arrived "
             f"| RSS < {TARGET_MIB} MiB |",
             "|" + " --- |" * 13]
    for r in rows:
        target = "-" if r["server"] == "postfix" or r.get("peak_rss_mib") is None else \
            ("yes" if r["peak_rss_mib"] < TARGET_MIB else "no")
        lines.append(
            f"| {_size_text(r['size'])}:{r['conc']} | {r['server']} | {_fmt(r.get('idle_rss_mib'))} / "
            f"{_fmt(r.get('idle_pss_mib'))} | **{_fmt(r.get('peak_rss_mib'))}** / **{_fmt(r.get('peak_pss_mib'))}** | "
            f"{_fmt(r.get('peak_rss_at'), 1)} | {_fmt(r.get('after_rss_mib'))} / {_fmt(r.get('after_pss_mib'))} | "
            f"{_fmt(r.get('largest_hwm_mib'))} | {r.get('max_processes', '-')} | {_fmt(r.get('seconds'), 1)} | "
            f"{_seconds(r.get('client_figures', {}).get('p50_ms'))} / {_seconds(r.get('client_figures', {}).get('p99_ms'))} | "
            f"{_fmt(r.get('cpu_seconds'), 1)} | {r.get('received', '-')}/{r['conc']} | {target} |")
    paces = [(r["sample_ms"], r["interval_ms"]) for r in rows if r.get("interval_ms")]
    if paces:
        lines += ["", f"Sampling: one sample took {min(p[0] for p in paces):.1f}-{max(p[0] for p in paces):.1f} ms, "
                  f"one every {min(p[1] for p in paces):.0f}-{max(p[1] for p in paces):.0f} ms under load."]
    if tput:
        ratios = throughput_ratios(tput)
        rates = {s: [r["rate"] for r in tput if r["ok"] and r["server"] == s] for s in ("gateway", "gateway@before")}
        lines += ["", "5 KiB local, c=100, gateway / gateway@before: per-round ratios "
                  + ", ".join(f"{x:.2f}" for x in ratios)
                  + (f"; median **{statistics.median(ratios):.2f}**" if ratios else "; no complete round")
                  + "; msg/s " + "; ".join(f"{s} {', '.join(f'{x:.0f}' for x in v)}" for s, v in rates.items())]
    errors = [f"{r['server']} {_size_text(r['size'])}:{r['conc']}: {r['error']}" for r in rows + tput if r["error"]]
    if errors:
        lines += ["", "Failures:", *(f"- {e}" for e in errors)]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Peak memory of the gateway's and Postfix's process trees "
                                "under large messages sent at once, delivered into a Maildir.")
    p.add_argument("--scenarios", default=DEFAULT_SCENARIOS,
                   help=f"SIZE:CONC,... (K = 1024, M = 1024²; default {DEFAULT_SCENARIOS})")
    p.add_argument("--servers", default="gateway,postfix", help="gateway,postfix (default both; "
                   "--before adds gateway@before)")
    p.add_argument("--client", choices=("asyncio", "smtp-source"), default="asyncio",
                   help="the sender (default asyncio: every body in flight at once; see send())")
    p.add_argument("--rounds", type=int, default=1, help="times each scenario runs on each server")
    p.add_argument("--workers", type=int, default=2, help="gateway [server] workers (default 2: one per core)")
    p.add_argument("--interval", type=float, default=0.05, help="seconds between memory samples")
    p.add_argument("--idle", type=float, default=2.0, help="seconds sampled at rest before the load")
    p.add_argument("--settle", type=float, default=2.0, help="seconds sampled after the last arrival")
    p.add_argument("--rev", help="measure the gateway as committed at REV (git archive) instead of the work tree")
    p.add_argument("--before", metavar="REV", help="also the gateway as committed at REV, and the 5 KiB "
                   "throughput pair against it")
    p.add_argument("--throughput-rounds", type=int, default=3, help="5 KiB rounds with --before (0: none)")
    p.add_argument("--throughput-count", type=int, default=1000, help="5 KiB messages per timed batch")
    p.add_argument("--timeout", type=float, default=600, help="time limit per batch, seconds")
    p.add_argument("--tmpdir", help="where queues and Maildirs go (default: the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directories")
    p.add_argument("--json", help="where to write the samples (default bench/results/memory-*.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        scenarios = [parse_scenario(s) for s in args.scenarios.split(",") if s.strip()]
    except ValueError as exc:
        sys.exit(f"memory.py: {exc}")
    servers = [s for s in args.servers.split(",") if s]
    if set(servers) - {"gateway", "postfix"}:
        sys.exit(f"memory.py: unknown server in --servers {args.servers!r}")
    if max(size for size, _ in scenarios) > POSTFIX_SIZE_LIMIT:
        sys.exit("memory.py: a message larger than the gateway's 25 MiB limit would be refused")
    tools = {t: find_tool(t) for t in ("smtp-source", "smtp-sink")}
    nofile = load.raise_nofile()
    signal.signal(signal.SIGTERM, load._terminated)
    base = Path(tempfile.mkdtemp(prefix="gw-memory-", dir=args.tmpdir))
    base.chmod(0o755)  # Postfix's unprivileged daemons must reach their queue under it
    started = datetime.datetime.now(datetime.timezone.utc)
    args.root, args.before_root = REPO, None
    for attr, rev in (("root", args.rev), ("before_root", args.before)):
        if rev:
            (base / attr).mkdir()
            setattr(args, attr, export_rev(rev, base / attr))
    if args.before:
        servers.append("gateway@before")
    print(f"memory.py {started:%Y-%m-%d %H:%M} UTC; Python {platform.python_version()}; gateway: "
          f"{describe_source(args.rev)}{f'; @before: {describe_source(args.before)}' if args.before else ''}; "
          f"workers={args.workers}; scenarios {args.scenarios}; client {args.client}; sampling every {args.interval * 1000:.0f} ms; "
          f"RLIMIT_NOFILE={nofile}; tmp={base}", flush=True)
    rows: list[dict[str, Any]] = []
    tput: list[dict[str, Any]] = []
    try:
        for rnd in range(args.rounds):
            for size, conc in scenarios:
                for name in servers:
                    rows.append(run_point(name, size, conc, rnd, args, tools, base))
                    print(_progress(rows[-1]), flush=True)
        if args.before and args.throughput_rounds > 0:
            print("5 KiB throughput, local, c=100:", flush=True)
            tput = throughput(args, tools, base)
    except KeyboardInterrupt:
        print("interrupted; reporting what was measured", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(f"\n{report(rows, tput)}")
    out = Path(args.json) if args.json else BENCH / "results" / f"memory-{started:%Y%m%dT%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"started": started.isoformat(), "argv": sys.argv, "servers": servers,
                               "rows": rows, "throughput": tput}, indent=1))
    print(f"samples: {out}")
    return 0 if rows and all(r["ok"] for r in rows + tput) else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["_send"]:
        sys.exit(_role_send(sys.argv[2:]))
    sys.exit(main())
