"""Accept-path benchmark: how many messages per second the gateway takes in, against a
do-nothing aiosmtpd server measured in the same run.

    python bench/accept.py                 # full run (several minutes)
    python bench/accept.py --quick         # a short run (about a minute)
    python bench/accept.py -c 100 --count 3000 --rounds 7 --servers plain,empty

Servers (each a subprocess on a free 127.0.0.1 port, started fresh for every point):

    plain         bench/_plain_aiosmtpd.py on the stock asyncio loop (the reference)
    plain-uvloop  the same on uvloop (the reference of docs' performance notes), if importable
    empty         the gateway, bench/policies/empty-chain.toml (rcpt_local_users only)
    default       the gateway, the same policy with policies/default.toml's plugin chain
    sink          Postfix smtp-sink: the load generator's ceiling

Load: Postfix smtp-source, one message per connection, ``-l SIZE`` octets of body, CONC
sessions in parallel, wall time measured around the smtp-source process (after a short
warm-up run against the same server process). Rounds are interleaved (every server at
every concurrency once per round, the server order rotated each round), so drift of the
machine hits all servers alike. Each gateway run has its own queue directory in a fresh
temporary directory (default: under /tmp); after the run the number of files in its
``msg/`` area must equal the number of messages sent.

Only loopback is used. Each load run has a time limit; servers are stopped with SIGTERM
(then SIGKILL) by process id, and the temporary directories are removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any, Iterator

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
EMPTY_POLICY = BENCH / "policies" / "empty-chain.toml"
PLAIN_SERVER = BENCH / "_plain_aiosmtpd.py"
# The gateway source tree under test (--rev exports another one) and what the policy
# writer found it to support; set in main().
ROOT = REPO
FEATURES = {"delivery_section": False}

SENDER = "a@example.org"
RECIPIENT = "postmaster@localhost"
HOST = "127.0.0.1"

ALL_SERVERS = ("plain", "plain-uvloop", "empty", "default", "default-2w", "sink")
DESCRIPTION = {
    "plain": "aiosmtpd, returns 250, asyncio loop",
    "plain-uvloop": "aiosmtpd, returns 250, uvloop",
    "empty": "gateway, empty chain (rcpt_local_users only)",
    "default": "gateway, default chain",
    "default-2w": "gateway, default chain, [server] workers = 2",
    "sink": "Postfix smtp-sink (generator ceiling)",
}
GATEWAYS = ("empty", "default", "default-2w")
REFERENCE = "plain"

FULL = {"concurrency": [1, 20, 100], "counts": {1: 600, 20: 2000, 100: 2000}, "rounds": 5}
QUICK = {"concurrency": [1, 20, 100], "counts": {1: 150, 20: 500, 100: 500}, "rounds": 2}


def find_tool(name: str) -> str:
    """The path of Postfix's ``smtp-source`` or ``smtp-sink``; exits when it is missing."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.access(f"/usr/sbin/{name}", os.X_OK) else None)
    if path is None:
        prog = os.path.basename(sys.argv[0]) or "bench"
        sys.exit(f"{prog}: {name} not found; install the Debian package postfix (scripts/install-system-deps.sh)")
    return path


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1 (bind port 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# -- policies ---------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def dump_toml(data: dict[str, Any]) -> str:
    """Enough TOML for a policy: top-level tables of scalars and arrays of tables."""
    out: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict):
            out.append(f"[{key}]")
            out.extend(f"{k} = {_toml_value(v)}" for k, v in value.items())
            out.append("")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for item in value:
                out.append(f"[[{key}]]")
                out.extend(f"{k} = {_toml_value(v)}" for k, v in item.items())
                out.append("")
        else:
            out.insert(0, f"{key} = {_toml_value(value)}")
    return "\n".join(out)


def bench_policy(path: Path, port: int, workdir: Path, *, log_level: str | None = "warning") -> dict[str, Any]:
    """The policy file ``path`` as data, its queue and state under ``workdir``, every
    listener on ``HOST``:``port``, and the ``log_level`` given (None: the file's)."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    data["server"]["queue_dir"] = str(workdir / "queue")
    data["server"]["var_dir"] = str(workdir / "var")
    if log_level is not None:
        data["server"]["log_level"] = log_level
    for listener in data["listeners"]:
        listener["address"] = HOST
        listener["port"] = port
    return data


def policy_text(kind: str, port: int, workdir: Path) -> str:
    """The bench policy for ``kind`` ("empty"/"default") on ``port``, queue under ``workdir``."""
    data = bench_policy(EMPTY_POLICY, port, workdir)
    if FEATURES["delivery_section"]:
        # Measure accepting only: a gateway that also delivers from the queue would
        # compete for the CPU and empty msg/ under the count check.
        data.setdefault("delivery", {})["enabled"] = False
    if kind == "default-2w":
        data["server"]["workers"] = 2
    if kind in ("default", "default-2w"):
        with open(ROOT / "policies" / "default.toml", "rb") as f:
            data["plugins"] = tomllib.load(f)["plugins"]
        data.setdefault("auth", {})["users_file"] = str(workdir / "var" / "users")
    return dump_toml(data)


def chain_of(kind: str) -> list[str]:
    path = ROOT / "policies" / "default.toml" if kind.startswith("default") else EMPTY_POLICY
    with open(path, "rb") as f:
        return [p["name"] for p in tomllib.load(f).get("plugins", [])]


def gateway_env(root: Path | None = None) -> dict[str, str]:
    """The environment of a gateway process run from the source tree ``root`` (default:
    the tree under test, ``ROOT``)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root or ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    return env


def check_policies(base: Path, kinds: list[str]) -> None:
    """Validate the bench policies with the gateway's own ``check`` before measuring.

    ``[delivery] enabled = false`` is written only if this gateway knows that section."""
    workdir = base / "check"
    workdir.mkdir()

    def check(kind: str) -> subprocess.CompletedProcess[str]:
        path = workdir / f"{kind}.toml"
        path.write_text(policy_text(kind, free_port(), workdir))
        return subprocess.run([sys.executable, "-m", "gateway.cli", "check", str(path)], cwd=workdir,
                              env=gateway_env(), capture_output=True, text=True, timeout=60)

    FEATURES["delivery_section"] = True
    for kind in kinds:
        done = check(kind)
        if done.returncode != 0 and "delivery" in done.stderr and FEATURES["delivery_section"]:
            FEATURES["delivery_section"] = False
            done = check(kind)
        if done.returncode != 0:
            sys.exit(f"accept.py: the {kind} bench policy is refused by this gateway:\n{done.stderr.strip()}")
    shutil.rmtree(workdir, ignore_errors=True)


def export_rev(rev: str, base: Path) -> Path:
    """``git archive REV`` of this repository into ``base/src`` (read-only on the repo)."""
    dest = base / "src"
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev],
                             capture_output=True, check=True, timeout=120).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True, timeout=120)
    return dest


def describe_source(rev: str | None) -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True, timeout=30).stdout.strip()

    try:
        if rev:
            return f"git archive of {rev} ({git('rev-parse', '--short', rev)})"
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "gateway", "plugins")
        return f"work tree at {head}" + (" WITH UNCOMMITTED CHANGES to gateway/ or plugins/" if dirty else "")
    except Exception:
        return str(ROOT)


# -- servers ----------------------------------------------------------------------------


def wait_ready(proc: subprocess.Popen[bytes], port: int, timeout: float) -> None:
    """Until the server answers 220 on ``port`` (then QUIT), or fail."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} before listening")
        try:
            with socket.create_connection((HOST, port), timeout=2) as s:
                banner = s.recv(512)
                if banner.startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    with contextlib.suppress(OSError):
                        s.recv(512)
                    return
                last = RuntimeError(f"unexpected banner {banner[:80]!r}")
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise RuntimeError(f"server not ready on port {port} after {timeout:.0f}s: {last}")


def read_status(pid: int) -> dict[str, int]:
    """VmHWM / VmRSS in KiB from /proc/PID/status."""
    found: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                found[key] = int(rest.split()[0])
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the process we started, SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@dataclasses.dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    workdir: Path
    log: Path
    queue_msg: Path | None = None

    def log_tail(self, lines: int = 5) -> str:
        with contextlib.suppress(OSError):
            text = self.log.read_text(errors="replace").strip().splitlines()
            return " | ".join(text[-lines:])
        return ""


@contextlib.contextmanager
def running(name: str, workdir: Path, sink: str, start_timeout: float) -> Iterator[Server]:
    """Start server ``name`` on a free port with its state under ``workdir``."""
    workdir.mkdir(parents=True)
    port = free_port()
    log = workdir / "server.log"
    env = gateway_env()
    queue_msg = None
    if name in ("plain", "plain-uvloop"):
        loop = "uvloop" if name == "plain-uvloop" else "asyncio"
        argv = [sys.executable, str(PLAIN_SERVER), "--port", str(port), "--loop", loop]
    elif name in GATEWAYS:
        policy = workdir / "policy.toml"
        policy.write_text(policy_text(name, port, workdir))
        argv = [sys.executable, "-m", "gateway.cli", "run", "--policy", str(policy)]
        queue_msg = workdir / "queue" / "msg"
    elif name == "sink":
        argv = [sink, "-c", f"{HOST}:{port}", "1024"]
        if os.geteuid() == 0:
            argv[1:1] = ["-u", "root"]
    else:
        raise ValueError(name)
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
            # smtp-sink -c writes counters on stdout: keep them out of the log
            stdout=subprocess.DEVNULL if name == "sink" else logf, stderr=logf,
            start_new_session=True,  # a Ctrl-C at the terminal reaches only us; we stop it
        )
    server = Server(name, proc, port, workdir, log, queue_msg)
    try:
        wait_ready(proc, port, start_timeout)
        yield server
    finally:
        stop(proc)


# -- load -------------------------------------------------------------------------------


@dataclasses.dataclass
class Load:
    ok: bool
    seconds: float
    sent: int  # the last DATA counter smtp-source printed
    error: str


def smtp_source(source: str, port: int, conc: int, count: int, size: int, timeout: float) -> Load:
    argv = [source, "-c", "-s", str(conc), "-m", str(count), "-l", str(size),
            "-f", SENDER, "-t", RECIPIENT, f"{HOST}:{port}"]
    return run_smtp_source(argv, count, timeout)


def run_smtp_source(argv: list[str], count: int, timeout: float) -> Load:
    """Run one ``smtp-source`` command (``-c``: it counts what it sent) and check that it
    sent ``count`` messages, printed no error and ended well, within ``timeout``."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        seconds = time.perf_counter() - start
        return Load(False, seconds, _last_counter(out), f"timed out after {timeout:.0f}s")
    finally:
        if proc.poll() is None:  # interrupted: do not leave the generator behind
            proc.kill()
            proc.wait()
    seconds = time.perf_counter() - start
    text = err.decode(errors="replace").strip()
    sent = _last_counter(out)
    if proc.returncode != 0 or text:
        return Load(False, seconds, sent, f"smtp-source status {proc.returncode}: {text[-300:]}")
    if sent != count:
        return Load(False, seconds, sent, f"smtp-source counted {sent} of {count}")
    return Load(True, seconds, sent, "")


def _last_counter(out: bytes) -> int:
    numbers = re.findall(rb"\d+", out)
    return int(numbers[-1]) if numbers else 0


def queue_count(msg_dir: Path) -> int:
    try:
        return sum(1 for n in os.listdir(msg_dir) if not n.startswith("."))
    except FileNotFoundError:
        return 0


@dataclasses.dataclass
class Sample:
    server: str
    conc: int
    round: int
    count: int
    seconds: float
    rate: float | None
    hwm_kib: int | None
    cpu_pct: float | None
    queued: int | None
    expected: int | None
    error: str = ""


def run_point(
    name: str, conc: int, count: int, rnd: int, args: argparse.Namespace, base: Path, tools: dict[str, str]
) -> Sample:
    workdir = base / f"r{rnd}-c{conc}-{name}"
    warmup = min(args.warmup, count)
    try:
        with running(name, workdir, tools["smtp-sink"], args.start_timeout) as server:
            if warmup:
                w = smtp_source(tools["smtp-source"], server.port, conc, warmup, args.size, args.timeout)
                if not w.ok:
                    return Sample(name, conc, rnd, count, w.seconds, None, None, None, None, None,
                                  f"warm-up: {w.error} {server.log_tail()}".strip())
            cpu0 = cpu_seconds(server.proc.pid)
            load = smtp_source(tools["smtp-source"], server.port, conc, count, args.size, args.timeout)
            cpu1 = cpu_seconds(server.proc.pid)
            status = read_status(server.proc.pid)
            queued = expected = None
            if server.queue_msg is not None:
                queued, expected = queue_count(server.queue_msg), warmup + count
            error = load.error
            if server.proc.poll() is not None:
                error = f"server exited with status {server.proc.returncode}; {error}"
            if error:
                error = f"{error} {server.log_tail()}".strip()
            return Sample(
                name, conc, rnd, count, load.seconds,
                count / load.seconds if load.ok else None,
                status.get("VmHWM"),
                100.0 * (cpu1 - cpu0) / load.seconds if load.seconds > 0 else None,
                queued, expected, error,
            )
    except Exception as exc:  # a server that never came up: record it, go on
        return Sample(name, conc, rnd, count, 0.0, None, None, None, None, None, f"{type(exc).__name__}: {exc}")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


# -- report -----------------------------------------------------------------------------


def _fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def summarise(samples: list[Sample], servers: list[str], concs: list[int]) -> list[dict[str, Any]]:
    rows = []
    for conc in concs:
        ref = {s.round: s.rate for s in samples if s.server == REFERENCE and s.conc == conc and s.rate}
        uv = {s.round: s.rate for s in samples if s.server == "plain-uvloop" and s.conc == conc and s.rate}
        ref_med = statistics.median(ref.values()) if ref else None
        uv_med = statistics.median(uv.values()) if uv else None
        for name in servers:
            mine = [s for s in samples if s.server == name and s.conc == conc]
            rates = [s.rate for s in mine if s.rate]
            med = statistics.median(rates) if rates else None
            per_round = [s.rate / ref[s.round] for s in mine if s.rate and s.round in ref]
            hwm = [s.hwm_kib for s in mine if s.hwm_kib]
            cpu = [s.cpu_pct for s in mine if s.cpu_pct is not None and s.rate]
            failed = [s for s in mine if s.error]
            mismatched = [s for s in mine if s.expected is not None and s.queued != s.expected]
            rows.append({
                "server": name,
                "concurrency": conc,
                "rounds": len(mine),
                "ok_rounds": len(rates),
                "median": med,
                "min": min(rates) if rates else None,
                "max": max(rates) if rates else None,
                "ratio": med / ref_med if med and ref_med else None,
                "ratio_rounds": (min(per_round), max(per_round)) if per_round else None,
                "ratio_uvloop": med / uv_med if med and uv_med else None,
                "hwm_mib": max(hwm) / 1024 if hwm else None,
                "cpu_pct": statistics.median(cpu) if cpu else None,
                "queue_check": (
                    None if all(s.expected is None for s in mine)
                    else ("ok" if not mismatched else
                          "MISMATCH " + ", ".join(f"{s.queued}/{s.expected}" for s in mismatched))
                ),
                "failures": len(failed),
            })
    return rows


def table(rows: list[dict[str, Any]], with_uvloop: bool) -> str:
    head = ["server", "conc", "msgs/s median", "min-max", "vs plain (per-round range)"]
    if with_uvloop:
        head.append("vs uvloop")
    head += ["peak RSS MiB", "server CPU %", "queue check"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    for r in rows:
        if r["median"] is None:
            what = "not run" if r["rounds"] == 0 else "FAILED"
            cells = [r["server"], str(r["concurrency"]), what, "", "", *([""] if with_uvloop else []), "", "", ""]
        else:
            ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
            if r["ratio_rounds"] and r["server"] != REFERENCE:
                ratio += f" ({r['ratio_rounds'][0]:.2f}-{r['ratio_rounds'][1]:.2f})"
            cells = [
                r["server"], str(r["concurrency"]), _fmt_rate(r["median"]),
                f"{_fmt_rate(r['min'])}-{_fmt_rate(r['max'])}", ratio,
            ]
            if with_uvloop:
                cells.append(f"{r['ratio_uvloop']:.2f}" if r["ratio_uvloop"] is not None else "-")
            cells += [
                f"{r['hwm_mib']:.1f}" if r["hwm_mib"] is not None else "-",
                f"{r['cpu_pct']:.0f}" if r["cpu_pct"] is not None else "-",
                r["queue_check"] or "n/a",
            ]
        if r["failures"]:
            cells[-1] += f"; {r['failures']} of {r['rounds']} runs FAILED"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def environment(base: Path, tools: dict[str, str]) -> dict[str, Any]:
    def version(mod: str) -> str:
        try:
            from importlib.metadata import version as v

            return v(mod)
        except Exception:
            return "not installed"

    postfix = "unknown"
    with contextlib.suppress(Exception):
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "postfix"], capture_output=True, text=True, timeout=10)
        postfix = out.stdout.strip() or postfix
    dev = "unknown"
    with contextlib.suppress(Exception):
        out = subprocess.run(["df", "--output=source,fstype,target", str(base)], capture_output=True, text=True, timeout=10)
        dev = " ".join(out.stdout.splitlines()[-1].split())
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "aiosmtpd": version("aiosmtpd"),
        "uvloop": version("uvloop"),
        "postfix": postfix,
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "queue_fs": dev,
        "tmp_base": str(base),
    }


# -- main -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Accept-path throughput of the gateway vs a do-nothing aiosmtpd.")
    p.add_argument("--quick", action="store_true", help="short run: fewer messages and 2 rounds")
    p.add_argument("-c", "--concurrency", help="comma-separated session counts (default 1,20,100)")
    p.add_argument("-m", "--count", type=int, help="messages per timed run at every concurrency "
                   "(default: 600 at c=1, 2000 otherwise; --quick 150/500)")
    p.add_argument("-l", "--size", type=int, default=5120, help="message body octets (default 5120)")
    p.add_argument("-r", "--rounds", type=int, help="interleaved rounds (default 5; --quick 2)")
    p.add_argument("--servers", default=",".join(ALL_SERVERS),
                   help=f"comma-separated subset of {','.join(ALL_SERVERS)} (default: all; plain-uvloop "
                   "is skipped when uvloop is not importable)")
    p.add_argument("--warmup", type=int, default=100, help="messages sent before each timed run (default 100)")
    p.add_argument("--timeout", type=float, default=180, help="time limit per smtp-source run, seconds")
    p.add_argument("--start-timeout", type=float, default=30, help="time limit for a server to start, seconds")
    p.add_argument("--tmpdir", help="where the queue directories go (default: the system temp dir, /tmp); "
                   "keep it on the same disk for runs you compare")
    p.add_argument("--json", help="also write every sample and the summary to this file")
    p.add_argument("--keep", action="store_true", help="keep the temporary directories (queue, logs)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--rev", help="benchmark the gateway as committed at this git revision (git archive into the "
                     "temporary directory) instead of the work tree, e.g. --rev HEAD")
    src.add_argument("--gateway-root", help="benchmark the gateway source tree in this directory (it must hold "
                     "gateway/, plugins/ and policies/default.toml) instead of the work tree")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    args.concs = [int(c) for c in args.concurrency.split(",")] if args.concurrency else list(preset["concurrency"])
    args.counts = {c: args.count or preset["counts"].get(c, preset["counts"][100]) for c in args.concs}
    args.rounds = args.rounds or preset["rounds"]
    args.server_list = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = set(args.server_list) - set(ALL_SERVERS)
    if unknown:
        p.error(f"unknown servers: {', '.join(sorted(unknown))}")
    return args


def _terminated(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwinds through every cleanup: servers stopped, temp dirs removed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)
    tools = {"smtp-source": find_tool("smtp-source"), "smtp-sink": find_tool("smtp-sink")}
    servers = list(args.server_list)
    if "plain-uvloop" in servers:
        try:
            import uvloop  # noqa: F401
        except ImportError:
            print("accept.py: uvloop is not importable; skipping plain-uvloop", file=sys.stderr)
            servers.remove("plain-uvloop")
    global ROOT
    base = Path(tempfile.mkdtemp(prefix="gw-bench-", dir=args.tmpdir))
    try:
        if args.rev:
            ROOT = export_rev(args.rev, base)
        elif args.gateway_root:
            ROOT = Path(args.gateway_root).resolve()
        gateways = [s for s in servers if s in GATEWAYS]
        if gateways:
            check_policies(base, gateways)
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    env = environment(base, tools)
    env["gateway"] = str(ROOT) if args.gateway_root else describe_source(args.rev)
    env["delivery_disabled"] = FEATURES["delivery_section"]
    print(f"accept.py  {env['date']}  python {env['python']}  aiosmtpd {env['aiosmtpd']}  uvloop {env['uvloop']}  "
          f"postfix {env['postfix']}  cpus {env['cpus']} ({env['cpu_model']})  kernel {env['kernel']}")
    print(f"queue dirs under {base} ({env['queue_fs']})")
    print(f"gateway: {env['gateway']}" + ("; [delivery] enabled = false" if env["delivery_disabled"] else ""))
    print(f"servers: {', '.join(servers)}; concurrency {args.concs}; messages "
          f"{', '.join(f'c={c}: {n}' for c, n in args.counts.items())}; {args.size} octets; "
          f"{args.rounds} rounds; warm-up {args.warmup}")
    for name in servers:
        chain = f": {' -> '.join(chain_of(name))}" if name in GATEWAYS else ""
        print(f"  {name:<13} {DESCRIPTION[name]}{chain}")
    samples: list[Sample] = []
    started = time.monotonic()
    interrupted = False
    try:
        for rnd in range(args.rounds):
            order = servers[rnd % len(servers):] + servers[: rnd % len(servers)]
            for conc in args.concs:
                for name in order:
                    s = run_point(name, conc, args.counts[conc], rnd, args, base, tools)
                    samples.append(s)
                    rate = f"{s.rate:8.0f} msg/s" if s.rate else "  FAILED    "
                    extra = f"  queue {s.queued}/{s.expected}" if s.expected is not None else ""
                    flag = "  <-- MISMATCH" if s.expected is not None and s.queued != s.expected else ""
                    print(f"round {rnd + 1}/{args.rounds}  c={conc:<4} {name:<13}{rate}  {s.seconds:6.2f}s"
                          f"{extra}{flag}{'  ' + s.error if s.error else ''}", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted; summarising what was measured", file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    rows = summarise(samples, servers, args.concs)
    print()
    print(f"Finished in {time.monotonic() - started:.0f}s. Median of {args.rounds} interleaved rounds; "
          f"'vs plain' = ratio of medians to the plain aiosmtpd server (asyncio loop) at the same concurrency, "
          f"in parentheses the range of the per-round ratios; peak RSS = max VmHWM of the server process; "
          f"server CPU % = its CPU time / wall time during the timed run (200 = both cores).")
    print()
    print(table(rows, "plain-uvloop" in servers))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"environment": env, "args": {k: v for k, v in vars(args).items() if k != "counts"},
             "counts": args.counts, "samples": [dataclasses.asdict(s) for s in samples], "summary": rows},
            indent=2, default=str))
    bad = any(r["failures"] or (r["queue_check"] or "").startswith("MISMATCH") for r in rows)
    return 130 if interrupted else (1 if bad else 0)


if __name__ == "__main__":
    sys.exit(main())
