"""How fast ``gateway replay`` goes: captured sessions per second, default chain, recorded DNS.

Starts a real gateway (``gateway run``, the plugin chain of ``policies/default.toml``,
``[capture] enabled = true``, delivery off) on loopback, sends it ``--messages`` sessions
of one 5 KiB message each over SMTP (from ``--clients`` threads), stops it (the capture
is flushed at exit), then replays the capture through the same policy in this process
``--rounds`` times and prints messages per second for each round (the replay alone: from
the first record read to the report, plugins' start-up included; policy loading not).

    .venv/bin/python bench/replay.py [--messages 2000] [--rounds 3] [--dnsbl]

``--dnsbl`` puts ``connect_dnsbl`` (two zones, on a test DNS server on loopback that the
capture asks and the replay does not) before the default chain, so the replay answers
two lookups per session from the record.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import smtplib
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.commands._common import load  # noqa: E402
from gateway.replay.run import replay_capture  # noqa: E402
from tests.processes import free_port, start_gateway, stop_gateway, write_policy  # noqa: E402

CHAIN = ("auth_users_file", "rcpt_relay", "rcpt_local_users", "queue_received_header")
ZONE = """
$TTL 300
test.                  IN SOA ns.test. hostmaster.test. 1 3600 600 86400 60
2.0.0.127.bl.test.     IN A   127.0.0.2
"""
DNSBL = """
[[plugins]]
name = "connect_dnsbl"
cache_size = 0
[[plugins.zones]]
zone = "bl.test"
[[plugins.zones]]
zone = "sc.test"
action = "score"
"""
BODY = ("x" * 76 + "\r\n") * 66  # about 5 KiB


def send(port: int, count: int) -> None:
    message = f"From: a@example.org\r\nTo: postmaster@localhost\r\nSubject: bench\r\n\r\n{BODY}"
    for _ in range(count):
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
            c.sendmail("a@example.org", ["postmaster@localhost"], message)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dnsbl", action="store_true", help="connect_dnsbl first, with recorded DNS answers")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
        port = free_port()
        (Path(tmp) / "users").write_text("")
        extra = f'[auth]\nusers_file = "{tmp}/users"\n[capture]\nenabled = true\n[delivery]\nenabled = false\n'
        chain = CHAIN
        dns = None
        if args.dnsbl:
            from tests.dnsserver import DnsTestServer

            dns = DnsTestServer(ZONE).__enter__()
            extra += f'[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\n' + DNSBL
            # cache_size = 0: every session asks (and records) both lists.
        policy_path = write_policy(Path(tmp), port, plugins=chain, extra=extra)
        proc = start_gateway(policy_path, port)
        try:
            start = time.perf_counter()
            share = args.messages // args.clients
            with ThreadPoolExecutor(args.clients) as pool:
                list(pool.map(lambda _: send(port, share), range(args.clients)))
            sent = share * args.clients
            print(f"captured {sent} sessions in {time.perf_counter() - start:.1f} s")
        finally:
            stop_gateway(proc)
            if dns is not None:
                dns.stop()
        capture_dir = Path(tmp) / "var" / "capture"
        policy, specs = load(str(policy_path))
        rates = []
        for n in range(1, args.rounds + 1):
            start = time.perf_counter()
            report = asyncio.run(replay_capture(policy, specs, [capture_dir]))
            elapsed = time.perf_counter() - start
            totals = report.totals()
            assert totals["messages"] == sent and totals["unchanged"] == sent, totals
            rates.append(totals["messages"] / elapsed)
            print(f"round {n}: {totals['messages']} messages replayed in {elapsed:.2f} s: {rates[-1]:.0f} msg/s"
                  f" (dns not in record: {len(report.missing_dns)}, damaged: {len(report.damaged)})")
        print(f"median: {sorted(rates)[len(rates) // 2]:.0f} msg/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
