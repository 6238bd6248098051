"""Delivery benchmark: how many messages per second the gateway delivers from its queue,
against a plain Python loop doing the same work, measured in the same run.

    python bench/deliver.py                # full run (several minutes)
    python bench/deliver.py --quick        # a short run (about a minute)
    python bench/deliver.py --paths local -m 5000 -r 7

Paths and runners (every one a subprocess started fresh for every point):

    local   gateway       the gateway (bench/policies/deliver-local.toml) delivering its queue
                          into the Maildirs of local users (userNN@localhost)
            maildir-copy  the reference: one Python process copying the same messages from
                          plain spool files into the same Maildirs with the same durability
                          (tmp/ file, fsync, link into new/, fsync new/; then the spool
                          file unlinked and its directory fsynced, as the queue removes a
                          delivered message), asyncio + a thread pool as wide as the
                          gateway's, as many at once as local_concurrency
    remote  gateway       the gateway (bench/policies/deliver-remote.toml) delivering its
                          queue through the smarthost route "*" to Postfix's smtp-sink
            smtp-loop     the reference: one asyncio SMTP client sending the same messages
                          to an smtp-sink over as many connections as destination_concurrency,
                          each reused like the gateway's pool (RSET between transactions, a new
                          connection after max_transactions)

How the gateway is timed: a helper process (with the tree under test on PYTHONPATH)
writes the batch with the gateway's own ``QueueStore`` into a staging queue beside the
gateway's; the gateway is started, a warm-up batch is renamed into its ``queue/msg/``
and delivered, then the timed batch is renamed in and the clock runs until ``msg/`` is
empty again (polled every 10 ms). The scheduler finds renamed files at its next scan
(``poll_interval``, 50 ms in the bench policies), so the figure includes at most that
much start-up delay. The references time their own warm-up-free batch internally.

Checks: the receiving side must hold exactly the messages sent (warm-up included): files
in the Maildirs' ``new/``, or smtp-sink's message counter (``-c``); a mismatch is
flagged. A queue that stops shrinking for ``--stall`` seconds is reported as stuck, with
the last replies recorded in its state files.

Only loopback is used. Each run has a time limit; processes are stopped with SIGTERM
(then SIGKILL) by process id, and the temporary directories are removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
# Shared with the accept bench: ports, TOML writing, /proc readings, process stopping.
from accept import (  # noqa: E402
    bench_policy,
    cpu_seconds,
    describe_source,
    dump_toml,
    environment,
    export_rev,
    find_tool,
    free_port,
    queue_count,
    read_status,
    stop,
    wait_ready,
)
from accept import gateway_env as accept_gateway_env  # noqa: E402

POLICIES = {"local": BENCH / "policies" / "deliver-local.toml", "remote": BENCH / "policies" / "deliver-remote.toml"}
# The gateway source tree under test (--rev exports another one); set in main().
ROOT = REPO

HOST = "127.0.0.1"
SENDER = "a@example.org"
HELO = "bench.localhost"
DATE = "Wed, 25 Nov 2026 12:00:00 +0000"  # fixed: every run sends the same bytes

ALL_PATHS = ("local", "remote")
REFERENCE = {"local": "maildir-copy", "remote": "smtp-loop"}
RUNNERS = {path: ("gateway", REFERENCE[path]) for path in ALL_PATHS}

FULL = {"count": 2000, "rounds": 5, "warmup": 100}
QUICK = {"count": 500, "rounds": 2, "warmup": 50}


# -- messages ---------------------------------------------------------------------------


def recipient(path: str, i: int, users: int) -> str:
    """Message ``i``'s one recipient: a local user, or a remote address for the smarthost."""
    if path == "local":
        return f"user{i % users:02d}@localhost"
    return f"rcpt{i % users:02d}@remote.example"


def bench_message(i: int, size: int, rcpt: str) -> bytes:
    """Message ``i`` as the gateway would have queued it: CRLF line ends, ``size`` octets of
    body in 76-character lines, a Received header like ours."""
    head = (
        f"Received: from bench.client (localhost [127.0.0.1])\r\n\tby bench.localhost with ESMTP id B{i:08d};"
        f" {DATE}\r\nFrom: <{SENDER}>\r\nTo: <{rcpt}>\r\nSubject: delivery bench {i}\r\nDate: {DATE}\r\n"
        f"Message-ID: <{i}.deliver-bench@example.org>\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode()
    line = (b"0123456789abcdefghijklmnopqrstuvwxyz" * 3)[:76] + b"\r\n"
    body = (line * (size // len(line) + 1))[:size]
    return head + body.rstrip(b"\r\n") + b"\r\n"


def write_spool(directory: Path, path: str, first: int, count: int, size: int, users: int) -> None:
    """The references' source: one plain file per message, ``sender rcpt`` on a first line."""
    directory.mkdir(parents=True)
    for i in range(first, first + count):
        rcpt = recipient(path, i, users)
        (directory / f"{i:08d}").write_bytes(f"{SENDER} {rcpt}\n".encode() + bench_message(i, size, rcpt))


# -- helper processes (sub-commands of this file) ---------------------------------------


def _role_fill(argv: list[str]) -> int:
    """``_fill``: queue a batch with the gateway's own QueueStore (tree under test on PYTHONPATH)."""
    p = argparse.ArgumentParser(prog="deliver.py _fill")
    p.add_argument("--stage", required=True)
    p.add_argument("--path", choices=ALL_PATHS, required=True)
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--users", type=int, required=True)
    args = p.parse_args(argv)
    from gateway.model import Envelope, Message, QueuedRecipient
    from gateway.queue import QueueStore

    store = QueueStore(args.stage)
    store.open()

    async def commit_all() -> None:
        async def one(i: int) -> None:
            rcpt = recipient(args.path, i, args.users)
            envelope = Envelope(
                sender=SENDER, recipients=[QueuedRecipient(address=rcpt)], client_ip=HOST, helo="bench.client"
            )
            await store.commit(store.new_id(), envelope, Message(bench_message(i, args.size, rcpt)))

        ids = range(args.first, args.first + args.count)
        for start in range(0, len(ids), 256):  # many commits in flight: group commits
            await asyncio.gather(*(one(i) for i in ids[start:start + 256]))
        await store.close()

    asyncio.run(commit_all())
    return 0


def _role_settings(argv: list[str]) -> int:
    """``_settings``: validate a bench policy with the gateway under test and print, as
    JSON, what the references copy from it (concurrency, thread pool, connection reuse)."""
    import inspect

    from gateway.app import GatewayApp, registry
    from gateway.delivery.remote import agent as remote_agent
    from gateway.hooks import discover_plugins
    from gateway.policy import PolicyError, load_policy

    specs = discover_plugins()
    try:
        policy = load_policy(argv[0], registry=registry(specs))
    except PolicyError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    delivery = policy.delivery
    out: dict[str, Any] = {
        name: getattr(delivery, name)
        for name in ("local_concurrency", "remote_concurrency", "destination_concurrency", "poll_interval")
    }
    try:
        app = GatewayApp(policy, specs=specs)
        out["threads"] = app.executor._max_workers
        app.executor.shutdown()
    except Exception:  # the constructor changed: fall back to app.py's formula of today
        out["threads"] = min(32, (os.cpu_count() or 2) * 4)
    defaults = inspect.signature(remote_agent.RemoteDeliveryAgent.__init__).parameters
    for name, fallback in (("max_transactions", 100), ("max_idle", 2), ("idle_timeout", 5.0)):
        default = defaults[name].default if name in defaults else fallback
        out[name] = fallback if default is inspect.Parameter.empty else default
    if out["max_idle"] is None:  # the pool keeps as many as may run at once
        out["max_idle"] = out["destination_concurrency"]
    print(json.dumps(out))
    return 0


def _self_report(count: int, seconds: float, cpu: float, **extra: Any) -> None:
    status = read_status(os.getpid())
    print(json.dumps({"count": count, "seconds": seconds, "cpu_seconds": cpu, "hwm_kib": status.get("VmHWM"), **extra}))


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return usage.ru_utime + usage.ru_stime


_made: set[Path] = set()
_name_seq = itertools.count(1)


def _copy_one(source: Path, mail_root: Path, hostname: str) -> None:
    """The reference delivery: spool file -> Maildir, synced like gateway/delivery/local/maildir.py."""
    data = source.read_bytes()
    head, _, message = data.partition(b"\n")
    sender, rcpt = head.decode().split(" ")
    maildir = mail_root / rcpt.partition("@")[0] / "Maildir"
    if maildir not in _made:
        for sub in ("tmp", "new", "cur"):
            (maildir / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        _made.add(maildir)
    content = f"Return-Path: <{sender}>\r\nDelivered-To: {rcpt}\r\n".encode() + message
    now = time.time()
    name = f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{next(_name_seq)}.{hostname}"
    tmp = maildir / "tmp" / name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.link(tmp, maildir / "new" / name)
    dir_fd = os.open(maildir / "new", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    os.unlink(tmp)
    # Forget the source for good, as the gateway's queue removal does (unlink, then a
    # flush of the directory): after a crash it must not be delivered again.
    os.unlink(source)
    spool_fd = os.open(source.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(spool_fd)
    finally:
        os.close(spool_fd)


def _role_maildir_copy(argv: list[str]) -> int:
    """``_maildir-copy``: the local reference. Copies --warm (untimed), then --src (timed)."""
    p = argparse.ArgumentParser(prog="deliver.py _maildir-copy")
    p.add_argument("--warm", required=True)
    p.add_argument("--src", required=True)
    p.add_argument("--mail-root", required=True)
    p.add_argument("--concurrency", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    args = p.parse_args(argv)
    mail_root = Path(args.mail_root)
    pool = ThreadPoolExecutor(max_workers=args.threads)

    async def copy_all(src: Path) -> int:
        loop = asyncio.get_running_loop()
        limit = asyncio.Semaphore(args.concurrency)

        async def one(name: str) -> None:
            async with limit:
                await loop.run_in_executor(pool, _copy_one, src / name, mail_root, HELO)

        names = sorted(os.listdir(src))
        await asyncio.gather(*(one(n) for n in names))
        return len(names)

    asyncio.run(copy_all(Path(args.warm)))
    cpu0, start = _cpu_self(), time.perf_counter()
    count = asyncio.run(copy_all(Path(args.src)))
    seconds, cpu = time.perf_counter() - start, _cpu_self() - cpu0
    pool.shutdown()
    _self_report(count, seconds, cpu)
    return 0


class _SmtpClient:
    """Just enough SMTP for the remote reference: EHLO, pipelined MAIL+RCPT, DATA, RSET, QUIT."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.extensions: set[str] = set()
        self.transactions = 0

    @classmethod
    async def open(cls, port: int) -> _SmtpClient:
        client = cls(*await asyncio.open_connection(HOST, port))
        await client.expect(220)
        client.writer.write(f"EHLO {HELO}\r\n".encode())
        lines = await client.expect(250)
        client.extensions = {line[4:].split(" ")[0].upper() for line in lines[1:]}
        return client

    async def expect(self, code: int) -> list[str]:
        lines: list[str] = []
        while True:
            line = (await self.reader.readline()).decode("ascii", "replace").rstrip("\r\n")
            if not line:
                raise ConnectionError("connection closed by the server")
            lines.append(line)
            if line[3:4] != "-":
                break
        if not lines[-1].startswith(str(code)):
            raise ConnectionError(f"expected {code}, got {lines[-1]!r}")
        return lines

    async def send(self, sender: str, rcpt: str, message: bytes) -> None:
        if self.transactions:
            self.writer.write(b"RSET\r\n")  # as the gateway's pool does before reusing a connection
            await self.expect(250)
        self.transactions += 1
        mail = f"MAIL FROM:<{sender}>" + (f" SIZE={len(message)}" if "SIZE" in self.extensions else "")
        commands = f"{mail}\r\nRCPT TO:<{rcpt}>\r\n".encode()
        if "PIPELINING" in self.extensions:
            self.writer.write(commands)
            await self.expect(250)
            await self.expect(250)
        else:
            first, _, second = commands.partition(b"\r\n")
            self.writer.write(first + b"\r\n")
            await self.expect(250)
            self.writer.write(second)
            await self.expect(250)
        self.writer.write(b"DATA\r\n")
        await self.expect(354)
        self.writer.write(re.sub(rb"(?m)^\.", b"..", message) + b".\r\n")
        await self.expect(250)

    async def quit(self) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            self.writer.write(b"QUIT\r\n")
            await self.expect(221)
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def _role_smtp_loop(argv: list[str]) -> int:
    """``_smtp-loop``: the remote reference. Sends --warm (untimed), then --src (timed)."""
    p = argparse.ArgumentParser(prog="deliver.py _smtp-loop")
    p.add_argument("--warm", required=True)
    p.add_argument("--src", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--connections", type=int, required=True)
    p.add_argument("--max-transactions", type=int, required=True)
    p.add_argument("--timeout", type=float, default=60.0)
    args = p.parse_args(argv)
    sessions = 0

    async def send_all(src: Path) -> int:
        names = sorted(os.listdir(src))
        todo = iter(names)  # shared by the workers: each takes the next message

        async def worker() -> None:
            nonlocal sessions
            client: _SmtpClient | None = None
            for name in todo:
                data = (src / name).read_bytes()
                head, _, message = data.partition(b"\n")
                sender, rcpt = head.decode().split(" ")
                async with asyncio.timeout(args.timeout):
                    if client is not None and client.transactions >= args.max_transactions:
                        await client.quit()
                        client = None
                    if client is None:
                        client = await _SmtpClient.open(args.port)
                        sessions += 1
                    await client.send(sender, rcpt, message)
                os.unlink(src / name)
            if client is not None:
                await client.quit()

        await asyncio.gather(*(worker() for _ in range(args.connections)))
        return len(names)

    asyncio.run(send_all(Path(args.warm)))
    cpu0, start = _cpu_self(), time.perf_counter()
    count = asyncio.run(send_all(Path(args.src)))
    seconds, cpu = time.perf_counter() - start, _cpu_self() - cpu0
    _self_report(count, seconds, cpu, sessions=sessions)
    return 0


ROLES = {"_fill": _role_fill, "_settings": _role_settings, "_maildir-copy": _role_maildir_copy,
         "_smtp-loop": _role_smtp_loop}


# -- the parent: policies, processes ----------------------------------------------------


def gateway_env() -> dict[str, str]:
    return accept_gateway_env(ROOT)


def user_names(users: int) -> list[str]:
    return [f"user{u:02d}" for u in range(users)]


def policy_text(path: str, port: int, workdir: Path, users: int, sink_port: int | None = None) -> str:
    """The bench policy for ``path`` on ``port``, state under ``workdir``."""
    data = bench_policy(POLICIES[path], port, workdir, log_level=None)
    data["local"]["mail_root"] = str(workdir / "mail")
    if path == "local":
        data["local"]["users"] = ["postmaster", *user_names(users)]
    for route in data.get("routes", []):
        if route.get("host") and sink_port is not None:
            route["port"] = sink_port
    return dump_toml(data)


def read_settings(base: Path, path: str, users: int) -> dict[str, Any]:
    """What the gateway under test makes of the bench policy (exits if it refuses it)."""
    workdir = base / f"check-{path}"
    workdir.mkdir()
    policy = workdir / "policy.toml"
    policy.write_text(policy_text(path, free_port(), workdir, users, free_port()))
    done = subprocess.run([sys.executable, __file__, "_settings", str(policy)], cwd=workdir,
                          env=gateway_env(), capture_output=True, text=True, timeout=60)
    shutil.rmtree(workdir, ignore_errors=True)
    if done.returncode != 0:
        sys.exit(f"deliver.py: the {path} bench policy is refused by this gateway:\n{done.stderr.strip()}")
    return dict(json.loads(done.stdout))


def fill(stage: Path, path: str, first: int, count: int, args: argparse.Namespace) -> None:
    """Write ``count`` messages into the staging queue ``stage`` with the gateway's QueueStore."""
    argv = [sys.executable, __file__, "_fill", "--stage", str(stage), "--path", path, "--first", str(first),
            "--count", str(count), "--size", str(args.size), "--users", str(args.users)]
    done = subprocess.run(argv, env=gateway_env(), capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        raise RuntimeError(f"filling the queue failed: {done.stderr.strip()[-500:]}")


def move_batch(stage: Path, queue_msg: Path) -> int:
    """Rename every staged queue file into the gateway's ``msg/`` (same file system)."""
    moved = 0
    for entry in os.scandir(stage / "msg"):
        os.rename(entry.path, queue_msg / entry.name)
        moved += 1
    return moved


def stuck_reasons(queue: Path, limit: int = 3) -> str:
    """The last replies recorded for a few messages still queued (their state files)."""
    replies: list[str] = []
    with contextlib.suppress(OSError):
        for entry in sorted(os.scandir(queue / "state"), key=lambda e: e.name)[:limit]:
            with contextlib.suppress(OSError, ValueError, KeyError):
                state = json.loads(Path(entry.path).read_bytes())
                replies += [f"{r['address']}: {r.get('state')} {r.get('last_reply', '')}".strip()
                            for r in state["recipients"]]
    return "; ".join(replies) or "no state recorded"


def is_empty(directory: Path) -> bool:
    """Whether ``directory`` holds no queue file; stops at the first entry, so polling it
    costs far less than counting a directory of thousands."""
    with os.scandir(directory) as entries:
        return not any(not e.name.startswith(".") for e in entries)


def wait_empty(queue: Path, proc: subprocess.Popen[bytes], timeout: float, stall: float) -> str:
    """Until ``queue/msg`` is empty (checked every 10 ms, counted once a second for the
    stall check); returns "" or why it did not empty."""
    start = last_change = last_count = time.monotonic()
    last = -1
    while not is_empty(queue / "msg"):
        now = time.monotonic()
        if proc.poll() is not None:
            return f"gateway exited with status {proc.returncode}, {queue_count(queue / 'msg')} left in the queue"
        if now - last_count >= 1.0:
            last_count, left = now, queue_count(queue / "msg")
            if left != last:
                last, last_change = left, now
            elif now - last_change > stall:
                return f"queue stuck: {left} left, none delivered for {stall:.0f}s ({stuck_reasons(queue)})"
        if now - start > timeout:
            return f"timed out after {timeout:.0f}s, {queue_count(queue / 'msg')} left ({stuck_reasons(queue)})"
        time.sleep(0.01)
    return ""


def maildir_count(mail_root: Path) -> tuple[int, int]:
    """Messages in every user's ``Maildir/new`` and stray files in ``Maildir/tmp``."""
    new = tmp = 0
    with contextlib.suppress(FileNotFoundError):
        for home in os.scandir(mail_root):
            maildir = Path(home.path) / "Maildir"
            with contextlib.suppress(FileNotFoundError):
                new += len(os.listdir(maildir / "new"))
            with contextlib.suppress(FileNotFoundError):
                tmp += len(os.listdir(maildir / "tmp"))
    return new, tmp


@dataclasses.dataclass
class Sink:
    proc: subprocess.Popen[bytes]
    port: int
    out: Path

    def counters(self) -> tuple[int, int]:
        """(sessions, messages) from smtp-sink's ``-c`` output once it is stopped; one
        session is our readiness probe and is not counted."""
        stop(self.proc)
        found = re.findall(rb"sess=(\d+) quit=\d+ mesg=(\d+)", self.out.read_bytes())
        if not found:
            return 0, 0
        return max(int(found[-1][0]) - 1, 0), int(found[-1][1])


@contextlib.contextmanager
def sink_running(workdir: Path, tool: str, start_timeout: float) -> Iterator[Sink]:
    port = free_port()
    out = workdir / "sink.out"
    argv = [tool, "-c", f"{HOST}:{port}", "1000"]
    if os.geteuid() == 0:
        argv[1:1] = ["-u", "root"]  # smtp-sink refuses to run as root without -u
    with open(out, "wb") as outf, open(workdir / "sink.log", "wb") as logf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=outf, stderr=logf, start_new_session=True)
    try:
        wait_ready(proc, port, start_timeout)
        yield Sink(proc, port, out)
    finally:
        stop(proc)


@dataclasses.dataclass
class Sample:
    path: str
    runner: str
    round: int
    count: int
    seconds: float
    rate: float | None
    hwm_kib: int | None
    cpu_pct: float | None
    received: int | None
    expected: int | None
    sessions: int | None = None
    error: str = ""


def _log_tail(log: Path, lines: int = 5) -> str:
    with contextlib.suppress(OSError):
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])
    return ""


def run_gateway(path: str, rnd: int, args: argparse.Namespace, base: Path, tools: dict[str, str]) -> Sample:
    """One timed batch through the gateway: fill, start, warm up, move in, wait for empty."""
    workdir = base / f"r{rnd}-{path}-gateway"
    workdir.mkdir(parents=True)
    warm, count = args.warmup, args.count
    log = workdir / "gateway.log"

    def fail(seconds: float, error: str) -> Sample:
        return Sample(path, "gateway", rnd, count, seconds, None, None, None, None, None, None,
                      f"{error} {_log_tail(log)}".strip())

    try:
        with contextlib.ExitStack() as stack:
            sink = stack.enter_context(sink_running(workdir, tools["smtp-sink"], args.start_timeout)) \
                if path == "remote" else None
            if warm:
                fill(workdir / "stage-warm", path, 0, warm, args)
            fill(workdir / "stage", path, warm, count, args)
            port = free_port()
            policy = workdir / "policy.toml"
            policy.write_text(policy_text(path, port, workdir, args.users, sink.port if sink else None))
            with open(log, "wb") as logf:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "gateway.cli", "run", "--policy", str(policy)], cwd=workdir,
                    env=gateway_env(), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True,
                )
            stack.callback(stop, proc)
            wait_ready(proc, port, args.start_timeout)
            queue = workdir / "queue"
            if warm:
                move_batch(workdir / "stage-warm", queue / "msg")
                error = wait_empty(queue, proc, args.timeout, args.stall)
                if error:
                    return fail(0.0, f"warm-up: {error}")
            cpu0, start = cpu_seconds(proc.pid), time.perf_counter()
            move_batch(workdir / "stage", queue / "msg")
            error = wait_empty(queue, proc, args.timeout, args.stall)
            seconds = time.perf_counter() - start
            cpu1 = cpu_seconds(proc.pid)
            hwm = read_status(proc.pid).get("VmHWM")
            stop(proc)  # the gateway QUITs its pooled connections: the sink counts them
            sessions = None
            if sink is not None:
                sessions, received = sink.counters()
            else:
                received, stray = maildir_count(workdir / "mail")
                if stray:
                    error = f"{error} {stray} stray file(s) in Maildir/tmp".strip()
            if error:
                return dataclasses.replace(fail(seconds, error), received=received, expected=warm + count)
            return Sample(path, "gateway", rnd, count, seconds, count / seconds, hwm,
                          100.0 * (cpu1 - cpu0) / seconds, received, warm + count, sessions)
    except Exception as exc:  # a process that never came up: record it, go on
        return fail(0.0, f"{type(exc).__name__}: {exc}")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def run_reference(
    path: str, rnd: int, args: argparse.Namespace, base: Path, tools: dict[str, str], settings: dict[str, Any]
) -> Sample:
    """One timed batch through the plain loop of ``path`` (same messages, same checks)."""
    runner = REFERENCE[path]
    workdir = base / f"r{rnd}-{path}-{runner}"
    workdir.mkdir(parents=True)
    warm, count = args.warmup, args.count
    try:
        write_spool(workdir / "warm", path, 0, warm, args.size, args.users)
        write_spool(workdir / "src", path, warm, count, args.size, args.users)
        common = ["--warm", str(workdir / "warm"), "--src", str(workdir / "src")]
        with contextlib.ExitStack() as stack:
            sink = None
            if path == "local":
                argv = [sys.executable, __file__, "_maildir-copy", *common, "--mail-root", str(workdir / "mail"),
                        "--concurrency", str(settings["local_concurrency"]), "--threads", str(settings["threads"])]
            else:
                sink = stack.enter_context(sink_running(workdir, tools["smtp-sink"], args.start_timeout))
                argv = [sys.executable, __file__, "_smtp-loop", *common, "--port", str(sink.port),
                        "--connections", str(settings["destination_concurrency"]),
                        "--max-transactions", str(settings["max_transactions"])]
            done = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, timeout=args.timeout)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["no message"])[-1]
                raise RuntimeError(f"{runner} status {done.returncode}: {last[-300:]}")
            report = json.loads(done.stdout.strip().splitlines()[-1])
            sessions = None
            if sink is not None:
                sessions, received = sink.counters()
            else:
                received, stray = maildir_count(workdir / "mail")
        seconds = float(report["seconds"])
        return Sample(path, runner, rnd, count, seconds, report["count"] / seconds, report["hwm_kib"],
                      100.0 * report["cpu_seconds"] / seconds, received, warm + count, sessions)
    except Exception as exc:
        return Sample(path, runner, rnd, count, 0.0, None, None, None, None, None, None,
                      f"{type(exc).__name__}: {exc}")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


# -- report -----------------------------------------------------------------------------


def _fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def summarise(samples: list[Sample], paths: list[str]) -> list[dict[str, Any]]:
    rows = []
    for path in paths:
        ref = {s.round: s.rate for s in samples if s.path == path and s.runner == REFERENCE[path] and s.rate}
        ref_med = statistics.median(ref.values()) if ref else None
        for runner in RUNNERS[path]:
            mine = [s for s in samples if s.path == path and s.runner == runner]
            rates = [s.rate for s in mine if s.rate]
            med = statistics.median(rates) if rates else None
            per_round = [s.rate / ref[s.round] for s in mine if s.rate and s.round in ref]
            hwm = [s.hwm_kib for s in mine if s.hwm_kib]
            cpu = [s.cpu_pct for s in mine if s.cpu_pct is not None and s.rate]
            sessions = [s.sessions for s in mine if s.sessions is not None]
            mismatched = [s for s in mine if s.expected is not None and s.received != s.expected]
            rows.append({
                "path": path,
                "runner": runner,
                "messages": mine[0].count if mine else 0,
                "rounds": len(mine),
                "ok_rounds": len(rates),
                "median": med,
                "min": min(rates) if rates else None,
                "max": max(rates) if rates else None,
                "ratio": med / ref_med if med and ref_med else None,
                "ratio_rounds": (min(per_round), max(per_round)) if per_round else None,
                "hwm_mib": max(hwm) / 1024 if hwm else None,
                "cpu_pct": statistics.median(cpu) if cpu else None,
                "sessions": statistics.median(sessions) if sessions else None,
                "check": ("n/a" if all(s.expected is None for s in mine) else "ok" if not mismatched else
                          "MISMATCH " + ", ".join(f"{s.received}/{s.expected}" for s in mismatched)),
                "failures": len([s for s in mine if s.error]),
            })
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = ["path", "runner", "messages", "msgs/s median", "min-max", "vs reference (per-round range)",
            "peak RSS MiB", "CPU %", "SMTP sessions", "received check"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    for r in rows:
        if r["median"] is None:
            cells = [r["path"], r["runner"], str(r["messages"]), "not run" if r["rounds"] == 0 else "FAILED",
                     "", "", "", "", "", r["check"]]
        else:
            ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
            if r["ratio_rounds"] and r["runner"] != REFERENCE[r["path"]]:
                ratio += f" ({r['ratio_rounds'][0]:.2f}-{r['ratio_rounds'][1]:.2f})"
            cells = [
                r["path"], r["runner"], f"{r['messages']:,}", _fmt_rate(r["median"]),
                f"{_fmt_rate(r['min'])}-{_fmt_rate(r['max'])}", ratio,
                f"{r['hwm_mib']:.1f}" if r["hwm_mib"] is not None else "-",
                f"{r['cpu_pct']:.0f}" if r["cpu_pct"] is not None else "-",
                f"{r['sessions']:,.0f}" if r["sessions"] is not None else "-",
                r["check"],
            ]
        if r["failures"]:
            cells[-1] += f"; {r['failures']} of {r['rounds']} runs FAILED"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Delivery throughput of the gateway vs plain Python loops.")
    p.add_argument("--quick", action="store_true", help="short run: fewer messages and 2 rounds")
    p.add_argument("--paths", default=",".join(ALL_PATHS), help="comma-separated subset of local,remote")
    p.add_argument("-m", "--count", type=int, help="messages per timed batch (default 2000; --quick 500)")
    p.add_argument("-r", "--rounds", type=int, help="interleaved rounds (default 5; --quick 2)")
    p.add_argument("-l", "--size", type=int, default=5120, help="message body octets (default 5120)")
    p.add_argument("-u", "--users", type=int, default=10,
                   help="distinct recipients, message i goes to number i mod USERS (default 10)")
    p.add_argument("--warmup", type=int, help="messages delivered before each timed batch (default 100; --quick 50)")
    p.add_argument("--timeout", type=float, default=600, help="time limit per batch, seconds")
    p.add_argument("--stall", type=float, default=30,
                   help="a queue that does not shrink for this long is reported as stuck, seconds")
    p.add_argument("--start-timeout", type=float, default=30, help="time limit for a server to start, seconds")
    p.add_argument("--tmpdir", help="where queues and Maildirs go (default: the system temp dir, /tmp); "
                   "keep it on the same disk for runs you compare")
    p.add_argument("--json", help="also write every sample and the summary to this file")
    p.add_argument("--keep", action="store_true", help="keep the temporary directories (queues, Maildirs, logs)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--rev", help="benchmark the gateway as committed at this git revision (git archive into the "
                     "temporary directory) instead of the work tree, e.g. --rev HEAD")
    src.add_argument("--gateway-root", help="benchmark the gateway source tree in this directory instead of the "
                     "work tree")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    args.count = args.count or preset["count"]
    args.rounds = args.rounds or preset["rounds"]
    args.warmup = preset["warmup"] if args.warmup is None else args.warmup
    args.path_list = [s.strip() for s in args.paths.split(",") if s.strip()]
    unknown = set(args.path_list) - set(ALL_PATHS)
    if unknown:
        p.error(f"unknown paths: {', '.join(sorted(unknown))}")
    if not 1 <= args.users <= 100:
        p.error("--users must be 1-100")
    return args


def _terminated(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwinds through every cleanup: processes stopped, temp dirs removed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)
    tools = {"smtp-sink": find_tool("smtp-sink")} if "remote" in args.path_list else {}
    global ROOT
    base = Path(tempfile.mkdtemp(prefix="gw-deliver-", dir=args.tmpdir))
    try:
        if args.rev:
            ROOT = export_rev(args.rev, base)
        elif args.gateway_root:
            ROOT = Path(args.gateway_root).resolve()
        settings = {path: read_settings(base, path, args.users) for path in args.path_list}
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    env = environment(base, tools)
    env["gateway"] = str(ROOT) if args.gateway_root else describe_source(args.rev)
    env["settings"] = settings
    print(f"deliver.py  {env['date']}  python {env['python']}  postfix {env['postfix']}  "
          f"cpus {env['cpus']} ({env['cpu_model']})  kernel {env['kernel']}")
    print(f"queues and Maildirs under {base} ({env['queue_fs']})")
    print(f"gateway: {env['gateway']}")
    print(f"paths: {', '.join(args.path_list)}; {args.count} messages per batch after {args.warmup} warm-up; "
          f"{args.size} octets of body; {args.users} recipients; {args.rounds} rounds")
    for path, s in settings.items():
        if path == "local":
            print(f"  local   gateway vs maildir-copy: local_concurrency {s['local_concurrency']}, "
                  f"{s['threads']} threads")
        else:
            print(f"  remote  gateway vs smtp-loop: destination_concurrency {s['destination_concurrency']} "
                  f"(remote_concurrency {s['remote_concurrency']}), {s['max_transactions']} transactions per "
                  f"connection; gateway pool keeps {s['max_idle']} idle for {s['idle_timeout']}s")
    samples: list[Sample] = []
    started = time.monotonic()
    interrupted = False
    try:
        for rnd in range(args.rounds):
            for path in args.path_list:
                order = RUNNERS[path] if rnd % 2 == 0 else RUNNERS[path][::-1]  # A, B, then B, A
                for runner in order:
                    if runner == "gateway":
                        s = run_gateway(path, rnd, args, base, tools)
                    else:
                        s = run_reference(path, rnd, args, base, tools, settings[path])
                    samples.append(s)
                    rate = f"{s.rate:8.0f} msg/s" if s.rate else "  FAILED    "
                    check = f"  received {s.received}/{s.expected}" if s.expected is not None else ""
                    flag = "  <-- MISMATCH" if s.expected is not None and s.received != s.expected else ""
                    conns = f"  sessions {s.sessions}" if s.sessions is not None else ""
                    print(f"round {rnd + 1}/{args.rounds}  {path:<6} {runner:<13}{rate}  {s.seconds:6.2f}s"
                          f"{check}{conns}{flag}{'  ' + s.error if s.error else ''}", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted; summarising what was measured", file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    rows = summarise(samples, args.path_list)
    print()
    print(f"Finished in {time.monotonic() - started:.0f}s. Median of {args.rounds} interleaved rounds; "
          "'vs reference' = ratio of medians to the plain loop of the same path, in parentheses the range of "
          "the per-round ratios; peak RSS = max VmHWM of the delivering process; CPU % = its CPU time / wall "
          "time of the timed batch (200 = both cores); SMTP sessions = median smtp-sink sessions per run "
          "(warm-up included); received check = messages at the receiving side / messages sent.")
    print()
    print(table(rows))
    bad = [r for r in rows if r["failures"] or r["check"].startswith("MISMATCH")]
    for r in bad:
        print(f"WARNING: {r['path']} {r['runner']}: {r['check']}"
              + (f", {r['failures']} failed run(s)" if r["failures"] else ""), file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"environment": env, "args": vars(args), "samples": [dataclasses.asdict(s) for s in samples],
             "summary": rows}, indent=2, default=str))
    return 130 if interrupted else (1 if bad else 0)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ROLES:
        sys.exit(ROLES[sys.argv[1]](sys.argv[2:]))
    sys.exit(main())
