"""End to end on the default path, like for like with Postfix, in one run (issue #16).

    python bench/end_to_end.py                        # 5 rounds, 5 KiB and 500 KiB, c=100
    python bench/end_to_end.py --rounds 1 --count 300 # a smoke run
    python bench/end_to_end.py --before HEAD~3        # also the gateway as committed at a revision
    python bench/end_to_end.py --rev HEAD             # the gateway as committed, not the work tree

Both servers do the same work, from the first connection of the timed batch until the
last message has arrived:

local   delivery into a Maildir. The gateway: ``policies/default.toml`` as shipped,
        ``postmaster@localhost`` into ``<mail_root>/postmaster/Maildir/``. Postfix (a
        private instance, ``load.py``'s) delivers the same recipient with ``virtual(8)``
        (``virtual_mailbox_maps = static:postmaster/Maildir/``), which fsyncs each file.
        Done when the last message is in ``new/`` (its files counted; see until_arrived).
relay   to one ``smtp-sink -c`` on loopback. The gateway: a ``[[routes]]`` smarthost
        ``"*"`` to the sink (no TLS). Postfix: ``relayhost = [127.0.0.1]:PORT`` with the
        connection cache on for it. Done when the sink's running ``mesg=`` counter says so.

The gateway's policy is the shipped file with only what an operator would change: the
listener's address and port, queue, var and mail paths under the run's directory,
``[server] workers`` (one per core), ``max_connections_per_ip`` raised to the listener's
``max_connections`` (all the load comes from 127.0.0.1), and for relay the loopback
network as relay clients plus the smarthost route. Logging stays as shipped (``info``,
to the server's log file); Postfix logs to its own file through postlogd.

Each (round, case, size, server) starts the server fresh, sends a warm-up batch and waits
for it to arrive, then times ``smtp-source`` (one message per connection). The servers
alternate within a round and their order rotates from round to round; the per-round ratio
is gateway / Postfix of the same round and case, and the table gives their median. CPU
per message is the server's process tree (reaped children included) over the timed batch.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import pwd
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import Any, Callable, Iterator
from unittest import mock

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
import load  # noqa: E402  (same folder)
from _daemons import tree_cpu_seconds  # noqa: E402
from accept import bench_policy, dump_toml, export_rev, find_tool, free_port, gateway_env  # noqa: E402
from accept import describe_source, run_smtp_source, wait_ready  # noqa: E402
from deliver import _log_tail, maildir_count, sink_running  # noqa: E402

HOST = load.HOST
CASES = ("local", "relay")
RCPT = {"local": load.LOCAL_RCPT, "relay": load.REMOTE_RCPT}
#: messages per timed batch by size (--count overrides)
COUNTS = {5 * 1024: 3000, 500 * 1024: 400}
#: messages/second no server reaches here end to end (sets how seldom arrivals are counted)
MAX_RATE = 2000


# -- servers ----------------------------------------------------------------------------


def gateway_policy(root: Path, case: str, port: int, workdir: Path, workers: int, sink_port: int | None) -> str:
    """``policies/default.toml`` of the tree ``root`` with an operator's edits only."""
    data = bench_policy(root / "policies" / "default.toml", port, workdir, log_level=None)
    data["server"]["workers"] = workers
    limits = data["limits"]
    limits["max_connections_per_ip"] = limits["max_connections"]
    data.setdefault("local", {})["mail_root"] = str(workdir / "mail")
    for section in ("console", "metrics"):  # its other listeners: free ports, as the SMTP one
        if data.get(section, {}).get("enabled"):
            data[section]["port"] = free_port()
    if case == "relay":
        data.setdefault("relay", {})["clients"] = ["127.0.0.0/8"]
        data["routes"] = [{"domain": "*", "host": HOST, "port": sink_port, "tls": "none"}]
    return dump_toml(data)


@contextlib.contextmanager
def gateway(root: Path, case: str, workdir: Path, workers: int, sink_port: int | None) -> Iterator[load.Server]:
    workdir.mkdir(parents=True)
    port = free_port()
    policy = workdir / "policy.toml"
    policy.write_text(gateway_policy(root, case, port, workdir, workers, sink_port))
    argv = [sys.executable, "-m", "gateway.cli", "run", "--policy", str(policy)]
    with contextlib.ExitStack() as stack:
        proc = load.popen(argv, workdir, gateway_env(root))
        stack.callback(load.stop_proc, proc)
        wait_ready(proc, port, 60)
        yield load.Server("gateway", port, proc.pid, workdir)


def postfix_main(case: str, sink_port: int | None) -> str:
    """``load.py``'s private Postfix ``main.cf`` doing ``case`` instead of discarding."""
    if case == "local":
        nobody = pwd.getpwnam("nobody")
        changes = {
            "mydestination": "",
            "virtual_mailbox_domains": "localhost",
            "virtual_mailbox_base": "{d}/mail",
            "virtual_mailbox_maps": "static:postmaster/Maildir/",
            "virtual_uid_maps": f"static:{nobody.pw_uid}",
            "virtual_gid_maps": f"static:{nobody.pw_gid}",
        }
    else:
        changes = {
            "default_transport": "smtp",
            "relay_transport": "relay",
            "relayhost": f"[{HOST}]:{sink_port}",
            "smtp_connection_cache_destinations": "$relayhost",
        }
    # No aliases: a packaged Postfix has /etc/aliases.db; this private one would log an
    # error and a NIS warning from every smtpd it starts (local_recipient_maps).
    changes["alias_maps"] = ""
    kept = [line for line in load.POSTFIX_MAIN.splitlines() if line.split(" = ", 1)[0] not in changes]
    return "\n".join(kept + [f"{key} = {value}" for key, value in changes.items()]) + "\n"


@contextlib.contextmanager
def postfix(case: str, workdir: Path, sink_port: int | None) -> Iterator[load.Server]:
    workdir.mkdir(parents=True)
    if case == "local":  # virtual(8) writes as nobody and makes the Maildir itself
        (workdir / "mail").mkdir()
        nobody = pwd.getpwnam("nobody")
        os.chown(workdir / "mail", nobody.pw_uid, nobody.pw_gid)
    with contextlib.ExitStack() as stack:
        # load.postfix() writes load.POSTFIX_MAIN as main.cf when it starts: ours instead
        with mock.patch.object(load, "POSTFIX_MAIN", postfix_main(case, sink_port)):
            server = stack.enter_context(load.postfix(workdir))
        yield server


def sink_messages(out: Path) -> int:
    """Messages received so far: the last running counter ``smtp-sink -c`` wrote."""
    with contextlib.suppress(OSError), open(out, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 100))
        found = re.findall(rb"mesg=(\d+)", f.read())
        if found:
            return int(found[-1])
    return 0


@contextlib.contextmanager
def running(name: str, case: str, workdir: Path, args: argparse.Namespace, tools: dict[str, str]
            ) -> Iterator[tuple[load.Server, Callable[[], int], Callable[[], int]]]:
    """Server ``name`` doing ``case``; with it a count of the messages that arrived and
    one of the files left in ``Maildir/tmp`` (always 0 for relay)."""
    with contextlib.ExitStack() as stack:
        sink_port = None
        if case == "relay":
            (workdir / "sink").mkdir(parents=True)
            sink = stack.enter_context(sink_running(workdir / "sink", tools["smtp-sink"], 10))
            sink_port = sink.port

            def arrived() -> int:
                return sink_messages(sink.out)

            def strays() -> int:
                return 0
        else:
            mail = workdir / "server" / "mail"

            def arrived() -> int:
                return load.count_files(mail / "postmaster" / "Maildir" / "new")

            def strays() -> int:
                return maildir_count(mail)[1]
        if name == "postfix":
            server = stack.enter_context(postfix(case, workdir / "server", sink_port))
        else:
            root = args.before_root if name.endswith("@before") else args.root
            server = stack.enter_context(gateway(root, case, workdir / "server", args.workers, sink_port))
        yield server, arrived, strays


# -- one timed batch --------------------------------------------------------------------


def send(tools: dict[str, str], port: int, case: str, conc: int, count: int, size: int, timeout: float) -> Any:
    argv = [tools["smtp-source"], "-c", "-s", str(conc), "-m", str(count), "-l", str(size),
            "-f", load.SENDER, "-t", RCPT[case], f"{HOST}:{port}"]
    return run_smtp_source(argv, count, timeout)


def until_arrived(arrived: Callable[[], int], target: int, timeout: float) -> float | None:
    """Poll ``arrived()`` until it reaches ``target``: the perf_counter when it first
    did, or None after ``timeout`` seconds.

    Counting 3,000 files in ``new/`` costs about 2 ms of CPU, so each poll waits as long
    as the messages still missing need at ``MAX_RATE`` (at most 0.1 s, at least 5 ms):
    it sees the last arrival within 5 ms while the server stays under that rate."""
    deadline = time.perf_counter() + timeout
    while True:
        now = time.perf_counter()
        missing = target - arrived()
        if missing <= 0:
            return now
        if now > deadline:
            return None
        time.sleep(min(0.1, max(0.005, missing / MAX_RATE)))


def server_log(workdir: Path, name: str) -> Path:
    return workdir / ("maillog" if name == "postfix" else "server.log")


def log_problems(workdir: Path, name: str, offset: int) -> list[str]:
    """Warning and error lines the server logged after ``offset`` (Postfix: also deferred
    or bounced mail)."""
    pattern = r"(warning|error|fatal|panic):|status=(deferred|bounced)" if name == "postfix" \
        else r" (WARNING|ERROR|CRITICAL) |Traceback"
    with contextlib.suppress(OSError), open(server_log(workdir, name), "rb") as f:
        f.seek(offset)
        return [line for line in f.read().decode(errors="replace").splitlines() if re.search(pattern, line)]
    return []


def run_point(name: str, case: str, size: int, rnd: int, args: argparse.Namespace,
              tools: dict[str, str], base: Path) -> dict[str, Any]:
    count = args.count or COUNTS.get(size, 1000)
    warmup = min(args.warmup, count)
    row: dict[str, Any] = {"round": rnd, "case": case, "size": size, "server": name, "conc": args.conc,
                           "count": count, "ok": False, "error": ""}
    workdir = base / f"r{rnd}-{case}-{size}-{name.replace('@', '-')}"
    log_offset = 0
    try:
        # RSS twice a second: a sample reads smaps_rollup of every process (Postfix: 100 and
        # more, about 8 ms of CPU)
        with running(name, case, workdir, args, tools) as (server, arrived, strays), \
                load.RssSampler(server.root_pid, interval=0.5) as rss:
            # start-up warnings (the shipped policy's missing aliases, the self-signed
            # certificate) are not the run's
            with contextlib.suppress(OSError):
                log_offset = server_log(server.workdir, name).stat().st_size
            warm = send(tools, server.port, case, args.conc, warmup, size, args.timeout)
            if not warm.ok or until_arrived(arrived, warmup, args.timeout) is None:
                row["error"] = f"warm-up: {warm.error or f'{arrived()} of {warmup} arrived'}"
                return row
            result: list[Any] = []
            sending = threading.Thread(target=lambda: result.append(
                send(tools, server.port, case, args.conc, count, size, args.timeout)))
            cpu0, t0 = tree_cpu_seconds(server.root_pid), time.perf_counter()
            sending.start()
            done_at = until_arrived(arrived, warmup + count, args.timeout)
            cpu1 = tree_cpu_seconds(server.root_pid)
            sending.join()
            time.sleep(0.5)  # anything beyond the target would show up now
            got = arrived() - warmup
            row.update(received=got, peak_rss_mib=rss.peak_mib, peak_pss_mib=rss.peak_pss_mib,
                       accept_seconds=result[0].seconds if result else None, maildir_tmp=strays())
            if result and not result[0].ok:
                row["error"] = result[0].error
            elif done_at is None:
                row["error"] = f"{got} of {count} arrived after {args.timeout:.0f}s"
            elif got != count:
                row["error"] = f"{got} arrived, {count} sent"
            elif row.get("maildir_tmp"):
                row["error"] = f"{row['maildir_tmp']} files left in Maildir/tmp"
            if done_at is not None:
                row.update(seconds=done_at - t0, rate=count / (done_at - t0),
                           cpu_ms_per_msg=1000 * (cpu1 - cpu0) / count)
            row["ok"] = not row["error"]
    except Exception as exc:  # one server failing must not lose the rest of the run
        row["error"] = f"{type(exc).__name__}: {exc}; log: {_log_tail(server_log(workdir / 'server', name), 3)}"
    finally:
        problems = log_problems(workdir / "server", name, log_offset)
        row["log_problems"], row["log_first_problem"] = len(problems), problems[0][:300] if problems else ""
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return row


def _progress(row: dict[str, Any]) -> str:
    text = f"  {row['case']:5} {row['size'] // 1024:>3} KiB {row['server']:15}"
    if row.get("rate"):
        text += f" {row['rate']:7.0f} msg/s end to end"
        if row.get("accept_seconds"):
            text += f" (accepting {row['count'] / row['accept_seconds']:.0f}/s)"
        text += f", {row['cpu_ms_per_msg']:.2f} ms CPU/msg"
    if not row["ok"]:
        text += f" FAILED: {row['error']}"
    if row["log_problems"]:
        text += f"\n      {row['log_problems']} warning/error log lines, first: {row['log_first_problem']}"
    return text


# -- report -----------------------------------------------------------------------------


def _fmt(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def report(rows: list[dict[str, Any]], servers: list[str], args: argparse.Namespace) -> str:
    gateways = [s for s in servers if s != "postfix"]
    rate = {(r["case"], r["size"], r["server"], r["round"]): r["rate"] for r in rows if r["ok"]}
    points = sorted({(r["case"], r["size"]) for r in rows}, key=lambda p: (CASES.index(p[0]), p[1]))
    head = ["case", "size", "round"] + [f"{s} msg/s" for s in servers] + [f"{g} / postfix" for g in gateways]
    lines = ["### Per round (msg/s end to end)", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]

    def ratio(case: str, size: int, g: str, rnd: int) -> float | None:
        a, b = rate.get((case, size, g, rnd)), rate.get((case, size, "postfix", rnd))
        return a / b if a and b else None

    for case, size in points:
        for rnd in range(args.rounds):
            cells = [_fmt(rate.get((case, size, s, rnd))) for s in servers]
            cells += [_fmt(ratio(case, size, g, rnd), 2) for g in gateways]
            lines.append(f"| {case} | {size // 1024} KiB | {rnd + 1} | " + " | ".join(cells) + " |")
        cells = [_fmt(_median([v for k, v in rate.items() if k[:3] == (case, size, s)])) for s in servers]
        cells += [_fmt(_median([x for rnd in range(args.rounds)
                                if (x := ratio(case, size, g, rnd)) is not None]), 2) for g in gateways]
        lines.append(f"| {case} | {size // 1024} KiB | **median** | " + " | ".join(cells) + " |")
    lines += ["", "### Summary (medians over the rounds)", "",
              "| case | size | server | msg/s (min-max) | vs postfix: median of per-round ratios (min-max) "
              "| accepting msg/s | CPU ms/msg | peak RSS / PSS MiB | failed rounds | warning/error log lines |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for case, size in points:
        for s in servers:
            rs = [r for r in rows if (r["case"], r["size"], r["server"]) == (case, size, s)]
            good = [r for r in rs if r["ok"]]
            rates = [r["rate"] for r in good]
            ratios = [x for rnd in range(args.rounds) if (x := ratio(case, size, s, rnd)) is not None]
            spread = f" ({min(rates):,.0f}-{max(rates):,.0f})" if rates else ""
            vs = "1.00" if s == "postfix" else _fmt(_median(ratios), 2) + (
                f" ({min(ratios):.2f}-{max(ratios):.2f})" if ratios else "")
            lines.append(
                f"| {case} | {size // 1024} KiB | {s} | {_fmt(_median(rates))}{spread} | {vs} | "
                f"{_fmt(_median([r['count'] / r['accept_seconds'] for r in good]))} | "
                f"{_fmt(_median([r['cpu_ms_per_msg'] for r in good]), 2)} | "
                f"{max((r.get('peak_rss_mib', 0) for r in rs), default=0):.0f} / "
                f"{max((r.get('peak_pss_mib', 0) for r in rs), default=0):.0f} | "
                f"{len(rs) - len(good)} | {sum(r['log_problems'] for r in rs)} |")
    errors = sorted({f"{r['server']} {r['case']} {r['size'] // 1024} KiB: {r['error']}" for r in rows if r["error"]})
    if errors:
        lines += ["", "Failures:", *(f"- {e}" for e in errors)]
    return "\n".join(lines)


# -- the run ----------------------------------------------------------------------------


def measure(rows: list[dict[str, Any]], servers: list[str], cases: list[str], sizes: list[int],
            args: argparse.Namespace, tools: dict[str, str], base: Path) -> None:
    """Every round: each case and size, the servers one after the other, their order
    rotated by one from round to round. Appends to ``rows``; an interrupt ends it early."""
    try:
        for rnd in range(args.rounds):
            order = servers[rnd % len(servers):] + servers[: rnd % len(servers)]
            loadavg = os.getloadavg()
            print(f"round {rnd + 1}/{args.rounds}: {', '.join(order)}; load average "
                  f"{' '.join(f'{x:.1f}' for x in loadavg)}", flush=True)
            for case in cases:
                for size in sizes:
                    for name in order:
                        rows.append(run_point(name, case, size, rnd, args, tools, base) | {"loadavg": loadavg})
                        print(_progress(rows[-1]), flush=True)
    except KeyboardInterrupt:
        print("interrupted; reporting what was measured", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="The gateway's default policy against Postfix doing the same "
                                "work (Maildir delivery, relay to smtp-sink), end to end, interleaved rounds.")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cases", default=",".join(CASES), help="local,relay (default both)")
    p.add_argument("--sizes", default="5120,512000", help="message sizes in bytes (default 5120,512000)")
    p.add_argument("--conc", type=int, default=100, help="smtp-source sessions in parallel (default 100)")
    p.add_argument("--count", type=int, help="messages per timed batch (default 3000 at 5 KiB, 400 at 500 KiB)")
    p.add_argument("--warmup", type=int, default=100, help="messages sent and awaited before each timed batch")
    p.add_argument("--workers", type=int, default=2, help="gateway [server] workers (default 2: one per core)")
    p.add_argument("--rev", help="measure the gateway as committed at REV (git archive) instead of the work tree")
    p.add_argument("--before", metavar="REV", help="also run the gateway as committed at REV (git archive, "
                   "with that revision's policies/default.toml) as gateway@before")
    p.add_argument("--timeout", type=float, default=300, help="time limit per batch, seconds")
    p.add_argument("--tmpdir", help="where queues and Maildirs go (default: the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directories")
    p.add_argument("--json", help="also write every sample here (default bench/results/end_to_end-*.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    if set(cases) - set(CASES):
        sys.exit(f"end_to_end.py: unknown case in --cases {args.cases!r}")
    sizes = [int(x) for x in args.sizes.split(",")]
    tools = {t: find_tool(t) for t in ("smtp-source", "smtp-sink")}
    nofile = load.raise_nofile()
    signal.signal(signal.SIGTERM, load._terminated)
    base = Path(tempfile.mkdtemp(prefix="gw-e2e-", dir=args.tmpdir))
    base.chmod(0o755)  # Postfix's unprivileged daemons must reach their queue under it
    started = datetime.datetime.now(datetime.timezone.utc)
    servers = ["gateway", "postfix"]
    args.root, args.before_root = REPO, None
    for attr, rev in (("root", args.rev), ("before_root", args.before)):
        if rev:
            (base / attr).mkdir()
            setattr(args, attr, export_rev(rev, base / attr))
    if args.before:
        servers.append("gateway@before")
    with open(args.root / "policies" / "default.toml", "rb") as f:
        shipped = tomllib.load(f)
    print(f"end_to_end.py {started:%Y-%m-%d %H:%M} UTC; Python {platform.python_version()}; gateway: "
          f"{describe_source(args.rev)}{f'; @before: {describe_source(args.before)}' if args.before else ''}; "
          f"workers={args.workers}; log_level={shipped['server'].get('log_level')}; c={args.conc}; "
          f"RLIMIT_NOFILE={nofile}; tmp={base}", flush=True)
    rows: list[dict[str, Any]] = []
    try:
        measure(rows, servers, cases, sizes, args, tools, base)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(f"\n{report(rows, servers, args)}")
    out = Path(args.json) if args.json else BENCH / "results" / f"end_to_end-{started:%Y%m%dT%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    samples = {"started": started.isoformat(), "argv": sys.argv, "servers": servers, "rows": rows}
    out.write_text(json.dumps(samples, indent=1))
    print(f"samples: {out}")
    return 0 if rows and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
