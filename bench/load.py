"""Load benchmark: the gateway against reference servers on this machine, in one run.

    python bench/load.py                 # everything (about half an hour)
    python bench/load.py --quick         # a short run (a few minutes)
    python bench/load.py --only accept --sizes 5120 --conc 100 --servers postfix,default

Scenarios (every server is a subprocess on a free 127.0.0.1 port; nothing else is contacted):

accept  messages accepted durably, then dropped: the load generator's ceiling
        (``sink``: Postfix smtp-sink), Postfix accepting into its own queue (a private
        instance in a temp dir, ``discard`` transport), Haraka (npm package, one process,
        a queue plugin that discards), the gateway with the empty chain and with the
        default chain (delivery off, ``[server] workers`` = --workers).
relay   end to end: accept, queue, deliver to an smtp-sink on loopback. The gateway relays
        through a ``[[routes]]`` smarthost; its time runs until its queue is empty. Haraka
        forwards with its ``queue/smtp_forward`` plugin before it answers 250, so its time
        is that of the load generator.
idle    memory of the gateway with --idle connections open that got the greeting and
        then say nothing (RSS summed over every process of the gateway).

Tools: ``smtp-source`` (Postfix) sends the timed batch and gives messages/second from the
wall time around it; latency p50/p99 (connect to the 250 after the final dot, per
message) comes from this script's own asyncio client in a second batch at the same
concurrency, which also gives its own messages/second. Peak RSS is the largest sum of
VmRSS over the server's process tree, sampled every 0.2 s while it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import Any, Iterator

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
from accept import bench_policy, dump_toml, export_rev, find_tool, free_port, wait_ready  # noqa: E402  (same folder)
from accept import gateway_env as accept_gateway_env  # noqa: E402

HOST = "127.0.0.1"
SENDER = "a@example.org"
LOCAL_RCPT = "postmaster@localhost"
REMOTE_RCPT = "bob@remote.example"
CACHE = BENCH / ".cache"
HARAKA_VERSION = "3.3.4"

ACCEPT_SERVERS = ("sink", "postfix", "haraka", "empty", "default")
RELAY_SERVERS = ("gw-relay", "haraka-fwd")
DESCRIPTION = {
    "sink": "Postfix smtp-sink (the generator's ceiling, no disk)",
    "postfix": "Postfix 3 into its own queue, discard transport",
    "haraka": "Haraka, one process, discarding queue plugin",
    "empty": "gateway, empty chain (rcpt_local_users only)",
    "default": "gateway, default chain",
    "gw-relay": "gateway, default chain, smarthost route to smtp-sink",
    "haraka-fwd": "Haraka, smtp_forward to smtp-sink",
}
GATEWAYS = ("empty", "default", "gw-relay")

FULL = {
    "concurrency": [1, 20, 100, 500],
    "sizes": [5 * 1024, 500 * 1024],
    "counts": {5 * 1024: {1: 300, 20: 1500, 100: 3000, 500: 3000},
               500 * 1024: {1: 40, 20: 200, 100: 400, 500: 1000}},
    "rounds": 2,
    "idle": 5000,
}
QUICK = {
    "concurrency": [1, 20, 100, 500],
    "sizes": [5 * 1024, 500 * 1024],
    "counts": {5 * 1024: {1: 100, 20: 500, 100: 1000, 500: 1000},
               500 * 1024: {1: 15, 20: 60, 100: 200, 500: 500}},
    "rounds": 1,
    "idle": 5000,
}


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- process trees and memory -----------------------------------------------------------


def tree_pids(root: int) -> list[int]:
    """``root`` and every process descending from it."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in parent or pid == root:
            found.append(pid)
            todo.extend(p for p, pp in parent.items() if pp == pid)
    return found


def rss_kib(pids: list[int], field: str = "Rss") -> int:
    """Sum of ``field`` (Rss, or Pss: shared pages divided among their sharers) in KiB."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1])
    return total


class RssSampler:
    """Sums VmRSS over a process tree every ``interval`` seconds on a thread."""

    def __init__(self, root: int, interval: float = 0.2) -> None:
        self.root, self.interval = root, interval
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            pids = tree_pids(self.root)
            self.samples.append((time.monotonic() - t0, rss_kib(pids), rss_kib(pids, "Pss")))
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return max((s[1] for s in self.samples), default=0) / 1024

    @property
    def peak_pss_mib(self) -> float:
        return max((s[2] for s in self.samples), default=0) / 1024


def kill_tree(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# -- servers ----------------------------------------------------------------------------


@dataclasses.dataclass
class Server:
    name: str
    port: int
    root_pid: int
    workdir: Path
    queue_msg: Path | None = None


def gateway_policy(kind: str, port: int, workdir: Path, workers: int, sink_port: int | None) -> str:
    data = bench_policy(BENCH / "policies" / "empty-chain.toml", port, workdir)
    data["server"]["workers"] = workers
    data["limits"].update(max_connections=20000, max_connections_per_ip=20000)
    if kind in ("default", "gw-relay"):
        with open(REPO / "policies" / "default.toml", "rb") as f:
            data["plugins"] = tomllib.load(f)["plugins"]
        data.setdefault("auth", {})["users_file"] = str(workdir / "var" / "users")
    if kind == "gw-relay":
        data["relay"] = {"clients": ["127.0.0.0/8"]}
        data["delivery"] = {"remote_concurrency": 100, "destination_concurrency": 100}
        data["routes"] = [{"domain": "*", "host": HOST, "port": sink_port, "tls": "none"}]
    else:
        data["delivery"] = {"enabled": False}
    return dump_toml(data)


#: source tree of the "@before" gateways (--before REV), set in main()
BEFORE_ROOT: Path | None = None


def gateway_env(root: Path = REPO) -> dict[str, str]:
    return accept_gateway_env(root)


def _raise_child_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def popen(argv: list[str], workdir: Path, env: dict[str, str] | None = None,
          quiet_stdout: bool = False) -> subprocess.Popen[bytes]:
    with open(workdir / "server.log", "ab") as log:
        return subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL if quiet_stdout else log, stderr=log,
                                start_new_session=True, preexec_fn=_raise_child_nofile)


def stop_proc(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    pids = tree_pids(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    kill_tree([p for p in pids if p != proc.pid and Path(f"/proc/{p}").exists()])


@contextlib.contextmanager
def smtp_sink(tools: dict[str, str], workdir: Path) -> Iterator[Server]:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = [tools["smtp-sink"], f"{HOST}:{port}", "1024"]
    if os.geteuid() == 0:
        argv[1:1] = ["-u", "root"]
    proc = popen(argv, workdir, quiet_stdout=True)
    try:
        wait_ready(proc, port, 10)
        yield Server("sink", port, proc.pid, workdir)
    finally:
        stop_proc(proc)


@contextlib.contextmanager
def gateway(kind: str, workdir: Path, workers: int, sink_port: int | None = None,
            root: Path = REPO) -> Iterator[Server]:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    policy = workdir / "policy.toml"
    policy.write_text(gateway_policy(kind, port, workdir, workers, sink_port))
    proc = popen([sys.executable, "-m", "gateway.cli", "run", "--policy", str(policy)], workdir, gateway_env(root))
    try:
        wait_ready(proc, port, 60)
        yield Server(kind, port, proc.pid, workdir, workdir / "queue" / "msg")
    finally:
        stop_proc(proc)


POSTFIX_MAIN = """\
compatibility_level = 3.6
queue_directory = {d}/spool
data_directory = {d}/data
mail_owner = {owner}
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = bench.localhost
mydestination = localhost
mynetworks = 127.0.0.0/8
smtpd_recipient_restrictions = permit_mynetworks, reject
default_transport = discard
local_transport = discard
relay_transport = discard
maillog_file_prefixes = {d}
maillog_file = {d}/maillog
"""


@contextlib.contextmanager
def postfix(workdir: Path) -> Iterator[Server]:
    """A private Postfix: its own config and queue directory, loopback only, discarding."""
    workdir.mkdir(parents=True, exist_ok=True)
    etc, spool, data = workdir / "etc", workdir / "spool", workdir / "data"
    for d in (etc, spool, data):
        d.mkdir()
    owner = "postfix"
    shutil.chown(data, user=owner)
    port = free_port()
    (etc / "main.cf").write_text(POSTFIX_MAIN.format(d=workdir, owner=owner))
    master = Path("/etc/postfix/master.cf").read_text().splitlines()
    master = [f"{HOST}:{port} " + l.split(None, 1)[1] if l.startswith("smtp ") and " inet " in l else l
              for l in master]
    (etc / "master.cf").write_text("\n".join(master) + "\n")
    done = subprocess.run(["postfix", "-c", str(etc), "start"], capture_output=True, text=True, timeout=60)
    master_pid = 0
    try:
        if done.returncode != 0:
            raise RuntimeError(f"postfix start failed: {done.stderr.strip()} (see {workdir}/maillog)")
        pidfile = spool / "pid" / "master.pid"
        deadline = time.monotonic() + 20
        while not master_pid and time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                master_pid = int(pidfile.read_text().split()[0])
            time.sleep(0.05)
        _wait_port(port, 20)
        yield Server("postfix", port, master_pid, workdir)
    finally:
        pids = tree_pids(master_pid) if master_pid else []
        subprocess.run(["postfix", "-c", str(etc), "stop"], capture_output=True, timeout=60)
        deadline = time.monotonic() + 15
        while pids and any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        kill_tree([p for p in pids if Path(f"/proc/{p}").exists()])


def _wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=2) as s:
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing answers 220 on port {port}")
        time.sleep(0.1)


def haraka_setup() -> Path:
    """Install Haraka from the npm registry into bench/.cache (ignored by git), once."""
    prefix = CACHE / f"haraka-{HARAKA_VERSION}"
    main = prefix / "node_modules" / "Haraka" / "haraka.js"
    if not main.exists():
        if not shutil.which("npm"):
            raise RuntimeError("npm not found (Debian package npm)")
        prefix.mkdir(parents=True, exist_ok=True)
        print(f"installing Haraka {HARAKA_VERSION} into {prefix} ...", flush=True)
        subprocess.run(["npm", "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--omit=dev",
                        "--loglevel=error", f"Haraka@{HARAKA_VERSION}"], check=True, timeout=900)
    template = prefix / "instance"
    if not (template / "config" / "connection.ini").exists():
        shutil.rmtree(template, ignore_errors=True)
        subprocess.run([str(prefix / "node_modules" / ".bin" / "haraka"), "-i", str(template)],
                       check=True, capture_output=True, timeout=120)
    return main


HARAKA_PLUGIN = """\
// Benchmark plugin: accept every recipient; with hook_queue, drop the message.
exports.hook_rcpt = function (next) { next(OK); };
"""


@contextlib.contextmanager
def haraka(workdir: Path, forward_port: int | None = None) -> Iterator[Server]:
    main = haraka_setup()
    workdir.mkdir(parents=True, exist_ok=True)
    inst = workdir / "haraka"
    shutil.copytree(main.parent.parent.parent / "instance", inst)  # haraka -i: the stock config
    port = free_port()
    plugin = HARAKA_PLUGIN
    plugins = ["bench_accept"]
    if forward_port is None:
        plugin += "exports.hook_queue = function (next) { next(OK); };\n"
    else:
        plugins.append("queue/smtp_forward")
        (inst / "config" / "smtp_forward.ini").write_text(
            f"host={HOST}\nport={forward_port}\nenable_tls=false\nenable_outbound=false\n")
    (inst / "plugins" / "bench_accept.js").write_text(plugin)
    (inst / "config" / "plugins").write_text("\n".join(plugins) + "\n")
    (inst / "config" / "smtp.ini").write_text(f"[main]\nlisten={HOST}:{port}\n")
    (inst / "config" / "log.ini").write_text("[main]\nlevel=warn\n")
    (inst / "config" / "me").write_text("bench.localhost\n")
    (inst / "package.json").write_text('{"name": "bench-haraka", "private": true}\n')
    # haraka.js takes its configuration from the working directory
    proc = popen(["node", str(main)], inst)
    try:
        wait_ready(proc, port, 60)
        yield Server("haraka-fwd" if forward_port else "haraka", port, proc.pid, workdir)
    finally:
        stop_proc(proc)


# -- load -------------------------------------------------------------------------------


def smtp_source(tool: str, port: int, conc: int, count: int, size: int, rcpt: str,
                timeout: float) -> tuple[bool, float, str]:
    argv = [tool, "-s", str(conc), "-m", str(count), "-l", str(size), "-f", SENDER, "-t", rcpt,
            f"{HOST}:{port}"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, time.perf_counter() - t0, "timeout"
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        return False, seconds, (proc.stderr or proc.stdout).decode(errors="replace").strip()[-300:]
    return True, seconds, ""


def message_body(size: int) -> bytes:
    head = (f"From: <{SENDER}>\r\nTo: <{LOCAL_RCPT}>\r\nSubject: bench\r\n"
            "Message-ID: <bench@example.org>\r\n\r\n").encode()
    line = b"x" * 78 + b"\r\n"
    n = max(1, (size - len(head)) // len(line))
    return head + line * n + b".\r\n"


async def _reply(reader: asyncio.StreamReader, code: bytes) -> None:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        if line[3:4] != b"-":
            break
    if not line.startswith(code):
        raise RuntimeError(f"expected {code.decode()}, got {line[:80]!r}")


async def _one(port: int, body: bytes, rcpt: bytes) -> float:
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(HOST, port, limit=1 << 20)
    try:
        await _reply(reader, b"220")
        for cmd, code in ((b"HELO bench.localhost\r\n", b"250"), (b"MAIL FROM:<" + SENDER.encode() + b">\r\n", b"250"),
                          (b"RCPT TO:<" + rcpt + b">\r\n", b"250"), (b"DATA\r\n", b"354")):
            writer.write(cmd)
            await _reply(reader, code)
        writer.write(body)
        await _reply(reader, b"250")
        latency = time.perf_counter() - t0
        writer.write(b"QUIT\r\n")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(reader.readline(), 5)
        return latency
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def _client(port: int, conc: int, count: int, size: int, rcpt: str) -> tuple[list[float], int, float]:
    body, rcpt_b = message_body(size), rcpt.encode()
    latencies: list[float] = []
    errors = 0
    left = count

    async def worker() -> None:
        nonlocal left, errors
        while left > 0:
            left -= 1
            try:
                latencies.append(await _one(port, body, rcpt_b))
            except Exception:
                errors += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(conc, count))))
    return latencies, errors, time.perf_counter() - t0


def latency_run(port: int, conc: int, count: int, size: int, rcpt: str, timeout: float) -> dict[str, Any]:
    try:
        lat, errors, seconds = asyncio.run(asyncio.wait_for(_client(port, conc, count, size, rcpt), timeout))
    except TimeoutError:
        return {"ok": False, "error": "timeout"}
    if not lat:
        return {"ok": False, "error": f"{errors} errors"}
    lat.sort()
    return {"ok": errors == 0, "error": f"{errors} errors" if errors else "", "client_rate": len(lat) / seconds,
            "p50_ms": 1000 * lat[len(lat) // 2], "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))]}


def count_files(d: Path | None) -> int:
    try:
        return sum(1 for _ in os.scandir(d)) if d else 0
    except FileNotFoundError:
        return 0


def wait_drained(d: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while count_files(d) and time.monotonic() < deadline:
        time.sleep(0.02)
    return count_files(d) == 0


# -- the run ----------------------------------------------------------------------------


@contextlib.contextmanager
def start(name: str, tools: dict[str, str], workdir: Path, workers: int) -> Iterator[Server]:
    root = REPO
    if name.endswith("@before"):
        name, root = name.removesuffix("@before"), BEFORE_ROOT
    with contextlib.ExitStack() as stack:
        if name == "sink":
            yield stack.enter_context(smtp_sink(tools, workdir))
        elif name == "postfix":
            yield stack.enter_context(postfix(workdir))
        elif name == "haraka":
            yield stack.enter_context(haraka(workdir))
        elif name in ("empty", "default"):
            yield stack.enter_context(gateway(name, workdir, workers, root=root))
        elif name in ("gw-relay", "haraka-fwd"):
            sink = stack.enter_context(smtp_sink(tools, workdir / "sink"))
            if name == "gw-relay":
                yield stack.enter_context(gateway(name, workdir, workers, sink.port, root=root))
            else:
                yield stack.enter_context(haraka(workdir, sink.port))
        else:
            raise ValueError(name)


def run_server(name: str, scenario: str, size: int, cfg: dict[str, Any], tools: dict[str, str],
               base: Path, args: argparse.Namespace, rnd: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    workdir = base / f"r{rnd}-{scenario}-{name.replace('@', '-')}-{size}"
    rcpt = REMOTE_RCPT if scenario == "relay" else LOCAL_RCPT
    try:
        with start(name, tools, workdir, args.workers) as server, RssSampler(server.root_pid) as rss:
            for conc in cfg["concurrency"]:
                count = max(conc, cfg["counts"][size][conc])
                row: dict[str, Any] = {"round": rnd, "scenario": scenario, "server": name, "size": size,
                                       "conc": conc, "count": count}
                warm = smtp_source(tools["smtp-source"], server.port, conc, min(count, max(conc, 100)), size,
                                   rcpt, args.timeout)
                if scenario == "relay" and server.queue_msg:
                    wait_drained(server.queue_msg, args.timeout)
                before = count_files(server.queue_msg)
                t0 = time.perf_counter()
                ok, seconds, error = smtp_source(tools["smtp-source"], server.port, conc, count, size, rcpt,
                                                 args.timeout)
                if not warm[0]:
                    ok, error = False, f"warm-up: {warm[2]}"
                if scenario == "relay" and server.queue_msg and ok:
                    # end to end: until the last message has left the queue for the sink
                    row["accept_rate"] = count / seconds
                    if not wait_drained(server.queue_msg, args.timeout):
                        ok, error = False, f"queue not drained after {args.timeout:.0f}s"
                    seconds = time.perf_counter() - t0
                row.update(ok=ok, seconds=seconds, rate=count / seconds if ok else None, error=error)
                if scenario == "accept" and server.queue_msg is not None and ok:
                    row["queue_check"] = count_files(server.queue_msg) - before == count
                if scenario == "accept" and not args.no_latency:
                    row.update({f"lat_{k}": v for k, v in latency_run(server.port, conc, count, size, rcpt,
                                                                       args.timeout).items()})
                rows.append(row)
                print(_progress(row), flush=True)
    except Exception as exc:  # one server failing to start must not lose the rest of the run
        print(f"  {name} ({scenario}, {size} B): FAILED: {exc}", flush=True)
        rows.append({"round": rnd, "scenario": scenario, "server": name, "size": size, "conc": None,
                     "ok": False, "error": str(exc)})
        return rows
    for row in rows:
        row["peak_rss_mib"] = rss.peak_mib
        row["peak_pss_mib"] = rss.peak_pss_mib
    return rows


def _progress(row: dict[str, Any]) -> str:
    text = f"  {row['scenario']:6} {row['server']:10} {row['size'] // 1024:>4} KiB c={row['conc']:<3} "
    if not row["ok"]:
        return text + f"FAILED: {row['error']}"
    text += f"{row['rate']:8.0f} msg/s"
    if "accept_rate" in row:
        text += f" (accepting {row['accept_rate']:.0f}/s)"
    if "lat_p50_ms" in row:
        text += f"  client {row.get('lat_client_rate', 0):6.0f}/s p50 {row['lat_p50_ms']:7.1f} ms p99 {row['lat_p99_ms']:7.1f} ms"
    if row.get("lat_error"):
        text += f" [latency client: {row['lat_error']}]"
    if row.get("queue_check") is False:
        text += " QUEUE COUNT MISMATCH"
    return text


async def _idle(port: int, n: int, settle: float, measure: Any) -> tuple[int, int]:
    conns: list[asyncio.StreamWriter] = []
    sem = asyncio.Semaphore(200)

    async def one() -> None:
        async with sem:
            reader, writer = await asyncio.open_connection(HOST, port)
            await asyncio.wait_for(_reply(reader, b"220"), 60)
            conns.append(writer)

    results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    failed = sum(1 for r in results if isinstance(r, BaseException))
    await asyncio.sleep(settle)
    rss = measure()
    for w in conns:
        w.close()
    if failed:
        print(f"  idle: {failed} of {n} connections failed: {next(r for r in results if isinstance(r, BaseException))!r}")
    return len(conns), rss


def idle_memory(tools: dict[str, str], base: Path, args: argparse.Namespace, n: int) -> dict[str, Any]:
    """RSS of the gateway (all processes) at rest and with ``n`` idle connections open."""
    out: dict[str, Any] = {"connections": n, "workers": args.workers}
    for name in ("default",):
        with gateway(name, base / f"idle-{name}", args.workers) as server:
            time.sleep(1)
            pids = tree_pids(server.root_pid)
            out["processes"] = len(pids)
            out["rest_mib"] = rss_kib(pids) / 1024
            out["rest_pss_mib"] = rss_kib(pids, "Pss") / 1024

            def measure() -> tuple[int, int]:
                pids = tree_pids(server.root_pid)
                return rss_kib(pids), rss_kib(pids, "Pss")

            opened, (rss, pss) = asyncio.run(_idle(server.port, n, 3.0, measure))
            out["opened"] = opened
            out["idle_mib"] = rss / 1024
            out["idle_pss_mib"] = pss / 1024
            out["per_conn_kib"] = (rss - out["rest_mib"] * 1024) / max(opened, 1)
    return out


# -- report -----------------------------------------------------------------------------


def _med(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _fmt(x: float | None, digits: int = 0) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def summarise(rows: list[dict[str, Any]]) -> dict[tuple[str, str, int, int], dict[str, Any]]:
    groups: dict[tuple[str, str, int, int], list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("conc") is not None:
            groups.setdefault((r["scenario"], r["server"], r["size"], r["conc"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        good = [r for r in rs if r["ok"]]
        out[key] = {
            "rounds": len(rs), "failed": len(rs) - len(good),
            "rate": _med([r["rate"] for r in good]),
            "rates": {r["round"]: r["rate"] for r in good},
            "client_rate": _med([r.get("lat_client_rate") for r in good]),
            "p50_ms": _med([r.get("lat_p50_ms") for r in good]),
            "p99_ms": _med([r.get("lat_p99_ms") for r in good]),
            "peak_rss_mib": max((r.get("peak_rss_mib", 0) for r in rs), default=0),
            "peak_pss_mib": max((r.get("peak_pss_mib", 0) for r in rs), default=0),
            "queue_check": all(r.get("queue_check", True) for r in good),
            "lat_errors": sorted({r["lat_error"] for r in good if r.get("lat_error")}),
        }
    return out


def _ratio(summary: dict, scenario: str, server: str, ref: str, size: int, conc: int) -> str:
    a, b = summary.get((scenario, server, size, conc)), summary.get((scenario, ref, size, conc))
    if not a or not b or not a["rate"] or not b["rate"]:
        return "-"
    text = f"{a['rate'] / b['rate']:.2f}"
    per_round = [a["rates"][r] / b["rates"][r] for r in a["rates"] if r in b["rates"]]
    if len(per_round) > 1:
        text += f" ({min(per_round):.2f}-{max(per_round):.2f})"
    return text


def report(rows: list[dict[str, Any]], idle: dict[str, Any] | None, cfg: dict[str, Any]) -> str:
    summary = summarise(rows)
    lines = []
    servers = [s for s in ACCEPT_SERVERS if any(k[1] == s for k in summary)]
    if servers:
        lines += ["### Accept (durable accept, then dropped)", "",
                  "| size | conc | server | msg/s (smtp-source) | client msg/s | p50 ms | p99 ms | vs postfix | vs haraka | vs sink | peak RSS / PSS MiB |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for size in cfg["sizes"]:
            for conc in cfg["concurrency"]:
                for s in servers:
                    v = summary.get(("accept", s, size, conc))
                    if not v:
                        continue
                    rate = _fmt(v["rate"]) + (f" ({v['failed']} failed)" if v["failed"] else "")
                    if not v["queue_check"]:
                        rate += " QUEUE MISMATCH"
                    lines.append(
                        f"| {size // 1024} KiB | {conc} | {s} | {rate} | {_fmt(v['client_rate'])} | {_fmt(v['p50_ms'], 1)} | "
                        f"{_fmt(v['p99_ms'], 1)} | {_ratio(summary, 'accept', s, 'postfix', size, conc)} | "
                        f"{_ratio(summary, 'accept', s, 'haraka', size, conc)} | {_ratio(summary, 'accept', s, 'sink', size, conc)} | "
                        f"{v['peak_rss_mib']:.0f} / {v['peak_pss_mib']:.0f} |")
        lines.append("")
    relay = [s for s in RELAY_SERVERS if any(k[1] == s and k[0] == "relay" for k in summary)]
    if relay:
        lines += ["### Relay end to end (accept, queue, deliver to smtp-sink)", "",
                  "| size | conc | server | msg/s end to end | vs haraka-fwd | peak RSS / PSS MiB |", "| --- | --- | --- | --- | --- | --- |"]
        for size in cfg["sizes"]:
            for conc in cfg["concurrency"]:
                for s in relay:
                    v = summary.get(("relay", s, size, conc))
                    if v:
                        lines.append(f"| {size // 1024} KiB | {conc} | {s} | {_fmt(v['rate'])}"
                                     + (f" ({v['failed']} failed)" if v["failed"] else "") + " | "
                                     f"{_ratio(summary, 'relay', s, 'haraka-fwd', size, conc)} | {v['peak_rss_mib']:.0f} / {v['peak_pss_mib']:.0f} |")
        lines.append("")
    if idle:
        lines += ["### Idle connections", "",
                  f"gateway (default chain, {idle['workers']} worker(s), {idle['processes']} processes): "
                  f"RSS {idle['rest_mib']:.1f} MiB (PSS {idle['rest_pss_mib']:.1f}) at rest, RSS {idle['idle_mib']:.1f} MiB "
                  f"(PSS {idle['idle_pss_mib']:.1f}) with {idle['opened']} of "
                  f"{idle['connections']} idle connections open (greeted, then silent), "
                  f"{idle['per_conn_kib']:.1f} KiB RSS per connection", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Gateway load benchmark against smtp-sink, Postfix and Haraka.")
    p.add_argument("--quick", action="store_true", help="fewer messages, one round")
    p.add_argument("--only", default="accept,relay,idle", help="scenarios: accept,relay,idle")
    p.add_argument("--servers", help=f"comma-separated subset of {','.join(ACCEPT_SERVERS + RELAY_SERVERS)}")
    p.add_argument("--sizes", help="message sizes in bytes, comma-separated (default 5120,512000)")
    p.add_argument("--conc", help="concurrencies, comma-separated (default 1,20,100,500)")
    p.add_argument("--count", type=int, help="messages per timed batch (overrides the table)")
    p.add_argument("--rounds", type=int)
    p.add_argument("--workers", type=int, default=2, help="gateway [server] workers (default 2)")
    p.add_argument("--idle", type=int, help="idle connections for the memory test (default 5000)")
    p.add_argument("--relay-sizes", default="5120", help="sizes for the relay scenario (default 5120)")
    p.add_argument("--no-latency", action="store_true", help="skip the asyncio latency client")
    p.add_argument("--timeout", type=float, default=300, help="time limit per batch, seconds")
    p.add_argument("--tmpdir", help="where queues go (default: the system temp dir)")
    p.add_argument("--before", metavar="REV", help="also run the gateways as committed at REV (git archive), "
                   "as empty@before, default@before, gw-relay@before, for before/after ratios in one run")
    p.add_argument("--keep", action="store_true", help="keep the temporary directories")
    p.add_argument("--json", help="also write every sample here (default bench/results/load-*.json)")
    return p.parse_args(argv)


def _terminated(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    global ACCEPT_SERVERS, RELAY_SERVERS, BEFORE_ROOT
    args = parse_args(argv)
    cfg = json.loads(json.dumps(QUICK if args.quick else FULL), object_hook=lambda d: {
        (int(k) if k.isdigit() else k): v for k, v in d.items()})
    if args.sizes:
        cfg["sizes"] = [int(x) for x in args.sizes.split(",")]
    if args.conc:
        cfg["concurrency"] = [int(x) for x in args.conc.split(",")]
    for size in cfg["sizes"]:
        default_counts = cfg["counts"].get(size) or cfg["counts"][5120]
        cfg["counts"][size] = {c: args.count or default_counts.get(c, 1000) for c in cfg["concurrency"]}
    rounds = args.rounds or cfg["rounds"]
    scenarios = args.only.split(",")
    wanted = set(args.servers.split(",")) if args.servers else set(ACCEPT_SERVERS + RELAY_SERVERS)
    tools = {t: find_tool(t) for t in ("smtp-source", "smtp-sink")}
    nofile = raise_nofile()
    signal.signal(signal.SIGTERM, _terminated)
    base = Path(tempfile.mkdtemp(prefix="gw-load-", dir=args.tmpdir))
    base.chmod(0o755)  # Postfix's unprivileged daemons must reach their queue under it
    started = datetime.datetime.now(datetime.timezone.utc)
    print(f"load.py {started:%Y-%m-%d %H:%M} UTC; Python {platform.python_version()}; workers={args.workers}; "
          f"RLIMIT_NOFILE={nofile}; tmp={base}", flush=True)
    rows: list[dict[str, Any]] = []
    idle = None
    if args.before:
        BEFORE_ROOT = export_rev(args.before, base)
        ACCEPT_SERVERS += tuple(f"{s}@before" for s in ("empty", "default"))
        RELAY_SERVERS += ("gw-relay@before",)
        wanted |= {f"{s}@before" for s in wanted if s in GATEWAYS}
        print(f"@before: the gateway at {args.before} ({BEFORE_ROOT})", flush=True)
    try:
        if "haraka" in wanted or "haraka-fwd" in wanted:
            haraka_setup()
        for rnd in range(rounds):
            print(f"round {rnd + 1}/{rounds}", flush=True)
            if "accept" in scenarios:
                order = [s for s in ACCEPT_SERVERS if s in wanted]
                order = order[rnd % len(order):] + order[: rnd % len(order)] if order else order
                for size in cfg["sizes"]:
                    for name in order:
                        rows += run_server(name, "accept", size, cfg, tools, base, args, rnd)
            if "relay" in scenarios:
                for size in [int(x) for x in args.relay_sizes.split(",")]:
                    cfg["counts"].setdefault(size, cfg["counts"][cfg["sizes"][0]])
                    for name in [s for s in RELAY_SERVERS if s in wanted]:
                        rows += run_server(name, "relay", size, cfg, tools, base, args, rnd)
        if "idle" in scenarios:
            idle = idle_memory(tools, base, args, args.idle or cfg["idle"])
    except KeyboardInterrupt:
        print("interrupted; reporting what was measured", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    cfg["sizes"] = sorted({r["size"] for r in rows} | set(cfg["sizes"]))
    print()
    print(report(rows, idle, cfg))
    out = Path(args.json) if args.json else BENCH / "results" / f"load-{started:%Y%m%dT%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"started": started.isoformat(), "workers": args.workers, "rows": rows,
                               "idle": idle}, indent=1))
    print(f"samples: {out}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
