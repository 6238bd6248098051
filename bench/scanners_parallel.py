"""Scanners in parallel: the wait from the final dot to the reply with clamd, spamd and
rspamd in the chain, the scanners one at a time against at the same time, in one run.

    python bench/scanners_parallel.py                     # 30 messages a variant, 100 KiB
    python bench/scanners_parallel.py --count 50 --size 300000

Helpers, started once for the run, on 127.0.0.1 only: clamd with an EICAR-only database
and spamd with the shipped rules offline (bench/_daemons.py), rspamd's normal worker
with the stock config offline (its DNS a test server on loopback, tests/dnsserver.py),
as the test fixtures run them.

Two gateways run in this process on free ports, on the same policy (the tests'
``BASE_POLICY``: no TLS, delivery off, since only the DATA phase is timed) with
``data_clamav``, ``data_spamd`` and ``data_rspamd`` next to one another in the chain:

    parallel     the stock plugins, whose ``gateway_data`` is ``@independent``
    sequential   the same plugins, each ``gateway_data`` wrapped in a plain coroutine
                 hook (same code, same settings, not marked): one scanner at a time

Every message is the same clean text message (no verdict: all three scanners answer).
The two gateways are sent to in turn, one message each, on one connection each, so
both see the same load on the machine. What is timed is from the moment the final
``.`` line is written to the moment the reply is read; the body before it is sent
first and not timed. Printed: median, 10th and 90th percentile per variant, and the
ratio of the medians (sequential / parallel), and each scanner's own mean time (the
hook runner's statistics): the parallel wait is at best the slowest scanner's, the
sequential one their sum. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import shutil
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Iterator

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from _daemons import Daemon, _wait, find_binary, free_port, start_clamd, start_spamd  # noqa: E402

from gateway.hooks import PluginSpec, hookimpl  # noqa: E402
from gateway.testing import running_gateway  # noqa: E402
from plugins import data_clamav, data_rspamd, data_spamd  # noqa: E402
from tests.conftest import BASE_POLICY, plugin_specs  # noqa: E402
from tests.dnsserver import DnsTestServer  # noqa: E402

SCANNERS = (data_clamav, data_spamd, data_rspamd)
ZONE = """
$ORIGIN test.example.
$TTL 300
@       IN SOA ns1.test.example. hostmaster.test.example. 1 3600 600 86400 300
@       IN NS  ns1.test.example.
ns1     IN A   127.0.0.1
"""


def start_rspamd(root: Path, dns_port: int, limit: float = 180.0) -> Daemon:
    """rspamd's normal worker only (controller and proxy off), offline, on TCP."""
    rspamd = find_binary("rspamd")
    if rspamd is None:
        raise RuntimeError("rspamd not found")
    for sub in ("local.d", "override.d", "db", "run", "log"):
        (root / sub).mkdir(parents=True)
    port = free_port()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gateway-tests" / "rspamd-hs"
    cache.mkdir(parents=True, exist_ok=True)  # shared with the tests: the hyperscan compile is paid once
    (root / "override.d" / "worker-normal.inc").write_text(f'bind_socket = "127.0.0.1:{port}";\ncount = 1;\n')
    (root / "override.d" / "worker-controller.inc").write_text("enabled = false;\n")
    (root / "override.d" / "worker-proxy.inc").write_text("enabled = false;\n")
    (root / "override.d" / "logging.inc").write_text('type = "console";\nlevel = "notice";\n')
    (root / "local.d" / "options.inc").write_text(
        f'dns {{ nameserver = ["127.0.0.1:{dns_port}"]; timeout = 0.5s; retransmits = 1; }}\n'
        f'hs_cache_dir = "{cache}";\n'
    )
    (root / "local.d" / "fuzzy_check.conf").write_text("enabled = false;\n")
    cmd = [
        rspamd, "-f", "-c", "/etc/rspamd/rspamd.conf", f"--var=LOCAL_CONFDIR={root}",
        f"--var=DBDIR={root / 'db'}", f"--var=RUNDIR={root / 'run'}", f"--var=LOGDIR={root / 'log'}",
    ]
    if os.geteuid() == 0:
        cmd.append("--insecure")
    log = root / "rspamd.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def pong() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"GET /ping HTTP/1.0\r\nHost: localhost\r\n\r\n")
            return b"pong" in s.recv(4096)

    _wait(proc, pong, log, limit, "rspamd")
    return Daemon("rspamd", proc, port, root, log)


def sequential_copy(module: types.ModuleType) -> types.ModuleType:
    """``module`` with its ``gateway_data`` wrapped in a plain (not independent) hook."""
    copy = types.ModuleType(module.__name__ + "_sequential")
    copy.__dict__.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
    original = module.gateway_data
    wanted = list(inspect.signature(original).parameters)

    async def gateway_data(session: Any, txn: Any, message: Any, gateway: Any, settings: Any) -> Any:
        given = {"session": session, "txn": txn, "message": message, "gateway": gateway, "settings": settings}
        return await original(**{name: given[name] for name in wanted})

    copy.gateway_data = hookimpl(gateway_data)  # type: ignore[attr-defined]
    return copy


def policy(daemons: dict[str, Daemon]) -> str:
    text = BASE_POLICY.replace('tls = "starttls"', 'tls = "none"')
    for module in SCANNERS:
        daemon = daemons[module.NAME]
        text += f'\n[[plugins]]\nname = "{module.NAME}"\naddress = "{daemon.address}"\nmax_size = "20MB"\n'
    return text


def message(size: int) -> bytes:
    head = (
        b"From: Sender <sender@example.org>\r\nTo: Alice <alice@localhost>\r\nSubject: Quarterly figures\r\n"
        b"Date: Mon, 7 Dec 2026 10:00:00 +0000\r\nMessage-ID: <bench-1@example.org>\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    )
    line = b"The figures for the quarter are in the attached sheet; see the notes below.\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


class Sender:
    """One SMTP connection; :meth:`send` times the final dot to the reply."""

    def __init__(self, port: int) -> None:
        self.client = smtplib.SMTP("127.0.0.1", port, timeout=120)
        self.client.ehlo("bench.example")

    def send(self, body: bytes) -> float:
        c = self.client
        assert c.mail("sender@example.org")[0] == 250
        assert c.rcpt("alice@localhost")[0] == 250
        c.putcmd("data")
        assert c.getreply()[0] == 354
        c.send(body)  # ends with CRLF; dot-stuffing: no line of this body starts with "."
        started = time.perf_counter()
        c.send(b".\r\n")
        code, text = c.getreply()
        elapsed = time.perf_counter() - started
        if code != 250:
            raise RuntimeError(f"message refused: {code} {text!r}")
        return elapsed

    def close(self) -> None:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            self.client.quit()


@contextlib.contextmanager
def helpers(base: Path) -> Iterator[dict[str, Daemon]]:
    with DnsTestServer(ZONE) as dns, contextlib.ExitStack() as stack:
        daemons = {"data_clamav": start_clamd(base / "clamd", threads=4)}
        stack.callback(daemons["data_clamav"].stop)
        daemons["data_spamd"] = start_spamd(children=2)
        stack.callback(daemons["data_spamd"].stop)
        daemons["data_rspamd"] = start_rspamd(base / "rspamd", dns.port)
        stack.callback(daemons["data_rspamd"].stop)
        yield daemons


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=30, help="messages per variant (default 30)")
    parser.add_argument("--size", type=int, default=100 * 1024, help="message size in octets (default 100 KiB)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed messages per variant first (default 3)")
    args = parser.parse_args(argv)

    base = Path(tempfile.mkdtemp(prefix="gw-bench-scanners-"))
    body = message(args.size)
    specs_parallel = plugin_specs(**{m.NAME: m for m in SCANNERS})
    specs_sequential = plugin_specs(**{m.NAME: sequential_copy(m) for m in SCANNERS})
    times: dict[str, list[float]] = {"sequential": [], "parallel": []}
    try:
        with helpers(base) as daemons, contextlib.ExitStack() as stack:
            text = policy(daemons)
            gateways = {
                "sequential": stack.enter_context(running_gateway(text, base / "gw-seq", specs=specs_sequential)),
                "parallel": stack.enter_context(running_gateway(text, base / "gw-par", specs=specs_parallel)),
            }
            senders = {name: Sender(gw.port) for name, gw in gateways.items()}
            for sender in senders.values():
                stack.callback(sender.close)
            for _ in range(args.warmup):
                for sender in senders.values():
                    sender.send(body)
            for i in range(args.count):
                order = list(senders) if i % 2 == 0 else list(reversed(senders))
                for name in order:
                    times[name].append(senders[name].send(body))
            # Each scanner's own time (the runner's hook statistics, the untimed warm-up
            # included): what the parallel wait can at best come down to is the slowest.
            stats = gateways["parallel"].app.hook_stats
            own = {
                m.NAME: stats.seconds[(m.NAME, "gateway_data")] / stats.calls[(m.NAME, "gateway_data")]
                for m in SCANNERS
            }
    finally:
        shutil.rmtree(base, ignore_errors=True)

    print(f"final dot to reply, clamd + spamd + rspamd, {len(body)} octets, {args.count} messages a variant")
    print(f"{'variant':<12} {'median ms':>10} {'p10 ms':>8} {'p90 ms':>8}")
    for name, values in times.items():
        print(f"{name:<12} {statistics.median(values) * 1000:>10.1f} {_pct(values, 0.1) * 1000:>8.1f}"
              f" {_pct(values, 0.9) * 1000:>8.1f}")
    ratio = statistics.median(times["sequential"]) / statistics.median(times["parallel"])
    print(f"ratio sequential / parallel (medians): {ratio:.2f}x")
    print("each scanner's mean time in the parallel gateway: "
          + ", ".join(f"{name} {seconds * 1000:.1f} ms" for name, seconds in own.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
