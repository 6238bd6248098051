"""What ``[capture]`` costs: the accept load with capture off and on, in the same run.

    .venv/bin/python bench/capture.py                  # 5 rounds, c=20, 2000 messages each
    .venv/bin/python bench/capture.py -r 3 -c 1,20 -m 1000 --spf

For every round, concurrency and mode (``off``: ``[capture] enabled = false``, ``on``:
``= true``) a gateway (``gateway run``, the chain of ``policies/default.toml``, delivery
off, as ``bench/accept.py``'s ``default``) is started fresh on a free 127.0.0.1 port,
warmed up, and Postfix's ``smtp-source`` sends the timed batch, one 5 KiB message a
session; the wall time around it gives msg/s. Rounds are interleaved and the order of
the modes alternates, so the machine's drift hits both alike. After an ``on`` run the
capture files are counted: every session must be in them (the writer flushes at exit),
with its SPF lookups under ``--spf``, or the figure would flatter capture by dropping
records.

``--spf`` puts ``mail_spf`` first in the chain, with a test DNS server on loopback
(``tests/dnsserver.py``) passing the sender's domain (one TXT and one A lookup a
session), so the ``on`` runs also record those lookups from the thread pool.

Prints per round the msg/s of each mode and the ratio on/off; then the medians and the
ratio of the medians with the range of the per-round ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(BENCH.parent))
import accept  # noqa: E402  (same folder)
from accept import HOST, find_tool, free_port, gateway_env, run_smtp_source, stop, wait_ready  # noqa: E402

MODES = ("off", "on")
SENDER = "bench@pass.spf.test"
SPF_ZONE = """
$ORIGIN spf.test.
$TTL 300
@        IN SOA ns.spf.test. hostmaster.spf.test. 1 3600 600 86400 60
pass     IN TXT "v=spf1 a:out.pass.spf.test -all"
out.pass IN A   127.0.0.1
"""


def policy_text(mode: str, port: int, workdir: Path, dns_port: int | None) -> str:
    """``bench/accept.py``'s ``default`` bench policy with capture ``mode``, and with
    ``mail_spf`` first and ``[dns]`` at ``dns_port`` when given."""
    text = accept.policy_text("default", port, workdir)
    text += f"\n[capture]\nenabled = {'true' if mode == 'on' else 'false'}\n"
    if dns_port is not None:
        # A table header ends the last [[plugins]] entry; the chain's order is the array's.
        text = text.replace("[[plugins]]", '[[plugins]]\nname = "mail_spf"\n\n[[plugins]]', 1)
        text += f'\n[dns]\nnameservers = ["{HOST}:{dns_port}"]\ntimeout = "2s"\n'
    return text


@contextlib.contextmanager
def gateway(mode: str, workdir: Path, dns_port: int | None, start_timeout: float) -> Iterator[tuple[Any, int]]:
    """A ``gateway run`` process with capture ``mode``; (process, port)."""
    workdir.mkdir(parents=True)
    port = free_port()
    policy = workdir / "policy.toml"
    policy.write_text(policy_text(mode, port, workdir, dns_port))
    with open(workdir / "server.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "run", "--policy", str(policy)], cwd=workdir,
            env=gateway_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )
    try:
        wait_ready(proc, port, start_timeout)
        yield proc, port
    finally:
        stop(proc, grace=60)  # the capture writer flushes at exit


def captured(workdir: Path) -> tuple[int, int]:
    """(sessions with a message, those with DNS lookups) in the capture under ``workdir``
    (the readiness probe's session has neither)."""
    records = [json.loads(line) for p in (workdir / "var" / "capture").glob("*.jsonl") for line in p.read_bytes().splitlines()]
    return sum(1 for r in records if r["txns"]), sum(1 for r in records if r["txns"] and r["dns"])


def run_point(mode: str, conc: int, rnd: int, args: argparse.Namespace, base: Path, source: str,
              dns_port: int | None) -> float:
    """msg/s of one timed batch; exits on any failure (a failed run has no figure)."""
    workdir = base / f"r{rnd}-c{conc}-{mode}"
    try:
        with gateway(mode, workdir, dns_port, args.start_timeout) as (proc, port):
            def batch(count: int) -> Any:
                argv = [source, "-c", "-s", str(conc), "-m", str(count), "-l", str(args.size),
                        "-f", SENDER, "-t", accept.RECIPIENT, f"{HOST}:{port}"]
                return run_smtp_source(argv, count, args.timeout)

            for count in (args.warmup, args.count):
                load = batch(count)
                if not load.ok:
                    tail = (workdir / "server.log").read_text(errors="replace")[-500:]
                    sys.exit(f"capture.py: {mode} c={conc} round {rnd}: {load.error}\n{tail}")
            if proc.poll() is not None:
                sys.exit(f"capture.py: the gateway exited with status {proc.returncode}")
        if mode == "on":
            sent, (seen, with_dns) = args.warmup + args.count, captured(workdir)
            if seen != sent or (dns_port is not None and with_dns != sent):
                sys.exit(f"capture.py: {seen} sessions captured of {sent}, {with_dns} with DNS lookups")
        return float(args.count / load.seconds)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--concurrency", default="20", help="comma-separated session counts (default 20)")
    p.add_argument("-m", "--count", type=int, default=2000, help="messages per timed run (default 2000)")
    p.add_argument("-l", "--size", type=int, default=5120, help="message body octets (default 5120)")
    p.add_argument("-r", "--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--warmup", type=int, default=100, help="messages sent before each timed run (default 100)")
    p.add_argument("--spf", action="store_true", help="mail_spf first in the chain, a test DNS server behind it")
    p.add_argument("--timeout", type=float, default=300, help="time limit per smtp-source run, seconds")
    p.add_argument("--start-timeout", type=float, default=30, help="time limit for a gateway to start, seconds")
    p.add_argument("--tmpdir", help="where the queue and capture directories go (default: the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directories")
    args = p.parse_args(argv)
    args.concs = [int(c) for c in args.concurrency.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    source = find_tool("smtp-source")
    rates: dict[tuple[int, str], list[float]] = {(c, m): [] for c in args.concs for m in MODES}
    with contextlib.ExitStack() as stack:
        base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-capture-", dir=args.tmpdir)))
        accept.check_policies(base, ["default"])  # the [delivery] section, if this gateway knows it
        dns_port = None
        if args.spf:
            from tests.dnsserver import DnsTestServer

            dns_port = stack.enter_context(DnsTestServer(SPF_ZONE)).port
        print(f"capture off/on, default chain{' + mail_spf' if args.spf else ''}, {args.count} messages of "
              f"{args.size} octets, {args.rounds} rounds, pid {os.getpid()}")
        for rnd in range(1, args.rounds + 1):
            for conc in args.concs:
                order = MODES if rnd % 2 else MODES[::-1]
                for mode in order:
                    rates[conc, mode].append(run_point(mode, conc, rnd, args, base, source, dns_port))
                off, on = rates[conc, "off"][-1], rates[conc, "on"][-1]
                print(f"round {rnd} c={conc}: off {off:.0f} msg/s, on {on:.0f} msg/s, on/off {on / off:.3f}",
                      flush=True)
    print()
    for conc in args.concs:
        off, on = rates[conc, "off"], rates[conc, "on"]
        ratios = [b / a for a, b in zip(off, on)]
        print(f"c={conc}: off median {statistics.median(off):.0f} msg/s ({min(off):.0f}-{max(off):.0f}), "
              f"on median {statistics.median(on):.0f} msg/s ({min(on):.0f}-{max(on):.0f}), "
              f"on/off {statistics.median(on) / statistics.median(off):.3f} "
              f"(per round {min(ratios):.3f}-{max(ratios):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
