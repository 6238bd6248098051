"""Several processes on one set of listening ports (``[server] workers``).

One process cannot use both cores of a machine for Python code. With ``workers = N``
the gateway forks N-1 worker processes after the queue is recovered; each process
binds its own listening socket to the same address with SO_REUSEPORT, so the kernel
spreads new connections across them. Every process delivers the mail it accepted
(so delivery uses both cores too), with its share of the concurrency limits; the
queue's delivery lock keeps two processes off one message. The first process (the
master) also recovers the queue at start, scans it for retries and for what others
left, and reads the trigger FIFO. It passes SIGHUP on to the workers (each reloads the
policy itself and reports it, see gateway/reloads.py), sends them SIGTERM when it stops
and waits for them; a worker whose master died (even by SIGKILL) gets SIGTERM from the
kernel and stops too. What every process needs made once (the queue's recovery, a
self-signed certificate) is made before the fork.

As Postfix's master(8) does, the master watches its workers (:class:`Supervisor`): a
worker that exits (a crash, the OOM killer, ``kill -9``) is logged at ERROR with its
exit status or signal, at once, and replaced. The master's event loop has threads by
then, so it does not fork again: it starts a fresh interpreter, ``gateway run
--worker-of PID``, and hands it on standard input the ports to join and the bytes of
the policy the master runs now (a reloaded one included), see :func:`serve_replacement`
in gateway/commands/run.py. The replacement starts with SIGHUP blocked, so a reload
passed on while it starts is taken once it runs. A worker that dies again soon after
its start is replaced after a delay that doubles from 1 s to 60 s, and the log says so;
one that ran a while (:data:`STABLE`) starts the back-off again.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Sequence

from gateway import logs, reloads
from gateway.metrics import clear_snapshots
from gateway.queue import QueueStore
from gateway.smtp.tls import server_context

__all__ = [
    "Handover", "STABLE", "Supervisor", "bind_listeners", "exit_with_master", "read_handover", "run_workers",
    "serve_worker",
]

log = logging.getLogger(__name__)

#: seconds a worker must run for its next replacement to start after the first delay again
STABLE = 60.0
#: the delay before a replacement: the first, and the most it doubles to
FIRST_DELAY, MAX_DELAY = 1.0, 60.0
#: the most a handover on standard input may hold (a policy file is a few KiB)
_HANDOVER_LIMIT = 16 * 1024 * 1024

_PR_SET_PDEATHSIG = 1


def exit_with_master(master: int) -> None:
    """Have the kernel send this worker SIGTERM when the master dies, even by SIGKILL
    (Linux ``PR_SET_PDEATHSIG``), so that no orphan goes on serving the port."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the master's SIGTERM still stops us
        return
    if os.getppid() != master:  # the master died before the call
        os.kill(os.getpid(), signal.SIGTERM)


def _bind(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((address, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def bind_listeners(policy: Any, ports: dict[str, int] | None = None) -> dict[str, socket.socket]:
    """A SO_REUSEPORT listening socket per listener (on ``ports`` when given: port 0
    in the policy binds a free port once, and every worker then joins that port)."""
    return {
        l.name: _bind(l.address, (ports or {}).get(l.name, l.port)) for l in policy.listeners
    }


def serve_worker(make_app: Callable[[], Any], policy: Any, ports: dict[str, int]) -> int:
    """Bind a worker's listeners, run its app until SIGTERM; the exit status.

    Whatever stops it otherwise (a start-up failure above all) is logged with its
    traceback before it exits non-zero: the master then only sees the status.
    """
    app = None
    try:
        sockets = bind_listeners(policy, ports)
        app = make_app()
        asyncio.run(app.run_forever(sockets=sockets, recovered=[]))
    except KeyboardInterrupt:
        return 0
    except Exception as exc:  # a boundary: the process ends here
        what = "failed" if app is not None and app.is_serving else "cannot start"
        log.error("worker pid=%d %s: %s", os.getpid(), what, exc, exc_info=True)
        return 1
    return 0


def run_workers(policy: Any, make_app: Any, run_args: Sequence[str] = ()) -> int:
    """Fork the workers and run the master; returns the exit status.

    :param make_app: ``make_app(role, supervisor)`` builds a :class:`GatewayApp`
        (``supervisor``: the master's :class:`Supervisor`, ``None`` in a worker)
    :param run_args: the ``gateway run`` options a replacement worker is started with
        (``--policy``, ``--log-level``)
    """
    recovered = QueueStore(policy.server.queue_dir).open()
    var_dir = Path(policy.server.var_dir)
    clear_snapshots(var_dir)  # counts of workers of an earlier run
    reloads.clear(var_dir)  # and what their processes ran
    if any(l.tls != "none" for l in policy.listeners):
        # Once here rather than in each process: N first starts would each make a
        # self-signed certificate into the same place. This also checks a given pair.
        server_context(policy.tls, var_dir, policy.server.hostname)
    # The workers inherit gateway.reloads.hold_hangups() (gateway run installs it): the
    # master may pass a SIGHUP on while a worker starts, before its loop handles them.
    master_sockets = bind_listeners(policy, ports=None)
    ports = {name: s.getsockname()[1] for name, s in master_sockets.items()}
    children: list[int] = []
    master = os.getpid()
    for _ in range(policy.server.workers - 1):
        pid = os.fork()
        if pid == 0:  # worker
            status = 1
            try:
                exit_with_master(master)
                for sock in master_sockets.values():
                    sock.close()
                status = serve_worker(lambda: make_app("worker", None), policy, ports)
            finally:
                logs.flush()  # os._exit skips logging's own flush at exit
                os._exit(status)
        children.append(pid)
    supervisor = Supervisor(children, ports, list(run_args), var_dir)
    try:
        app = make_app("master", supervisor)
        asyncio.run(app.run_forever(sockets=master_sockets, recovered=recovered))
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # stopping: no reload now
        supervisor.stop()
        for pid in supervisor.pids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:  # reaped already
                pass
    return 0


# -- watching and replacing the workers ----------------------------------------------


@dataclass
class Handover:
    """What the master gives a replacement worker on its standard input."""

    master: int
    ports: dict[str, int]
    #: the master's last report (result, request, error): the replacement runs its policy
    report: tuple[str, int, str]
    policy: bytes

    def encode(self) -> bytes:
        head = {"master": self.master, "ports": self.ports, "report": list(self.report)}
        return json.dumps(head).encode() + b"\n" + self.policy


def read_handover(stream: IO[bytes]) -> Handover:
    """The handover a replacement worker reads from ``stream`` (its standard input).

    :raises ValueError: it is not one (not started by a master)
    """
    data = stream.read(_HANDOVER_LIMIT + 1)
    head, newline, policy = data.partition(b"\n")
    if not newline or len(data) > _HANDOVER_LIMIT:
        raise ValueError("no handover from the master on standard input")
    try:
        fields = json.loads(head)
        result, request, error = fields["report"]
        ports = {str(name): int(port) for name, port in fields["ports"].items()}
        return Handover(int(fields["master"]), ports, (str(result), int(request), str(error)), policy)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a handover from the master: {exc!r}") from None


@dataclass(eq=False)
class _Slot:
    """One of the N-1 workers, across its replacements."""

    pid: int
    started: float = field(default_factory=time.monotonic)
    delay: float = FIRST_DELAY
    quick_exits: int = 0
    pidfd: int = -1
    #: started while the master had a reload to do: pass it SIGHUP once that is done
    is_behind: bool = False


def _how(status: int) -> str:
    """How a worker ended, from its wait status (-1: unknown)."""
    if status < 0:
        return "exited (its status was taken elsewhere)"
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            return f"was killed by signal {number} ({signal.Signals(number).name})"
        except ValueError:
            return f"was killed by signal {number}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


class Supervisor:
    """The master's watch over its workers: it notices an exit at once (a pidfd per
    worker in the event loop), logs it and starts a replacement, with back-off."""

    def __init__(self, pids: Sequence[int], ports: dict[str, int], run_args: list[str], var_dir: Path) -> None:
        """
        :param pids: the workers forked at start
        :param ports: listener name -> the port every process joins
        :param run_args: ``gateway run`` options for a replacement (policy, log level)
        """
        self._slots = [_Slot(pid) for pid in pids]
        self.ports = ports
        self.run_args = run_args
        self.var_dir = var_dir
        self._app: Any = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._is_stopping = False

    @property
    def pids(self) -> tuple[int, ...]:
        """The workers running now (a dead one waiting for its replacement is not)."""
        return tuple(slot.pid for slot in self._slots if slot.pid)

    def watch(self, app: Any) -> None:
        """Start watching, in the master's event loop (``app`` is the master's)."""
        self._app = app
        for slot in self._slots:
            if slot.pid:
                self._watch(slot)

    def _watch(self, slot: _Slot) -> None:
        loop = asyncio.get_running_loop()
        try:
            slot.pidfd = os.pidfd_open(slot.pid)
        except (AttributeError, OSError):  # no pidfd (Linux < 5.3): look every second
            slot.pidfd = -1
            loop.call_later(1.0, self._poll, slot, slot.pid)
            return
        loop.add_reader(slot.pidfd, self._reap, slot, slot.pid)

    def _poll(self, slot: _Slot, pid: int) -> None:
        if slot.pid == pid and not self._is_stopping and not self._reap(slot, pid):
            asyncio.get_running_loop().call_later(1.0, self._poll, slot, pid)

    def _reap(self, slot: _Slot, pid: int) -> bool:
        """The worker ``pid`` may have exited: if so, log it and plan its replacement."""
        if slot.pid != pid or self._is_stopping:
            return True
        try:
            reaped, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # someone else reaped it (a waitpid(-1) somewhere)
            reaped, status = pid, -1
        if reaped == 0:
            return False
        self._unwatch(slot)
        slot.pid = 0
        ran = time.monotonic() - slot.started
        if ran >= STABLE:
            slot.delay, slot.quick_exits = FIRST_DELAY, 0
        slot.quick_exits += 1
        delay = slot.delay
        slot.delay = min(MAX_DELAY, slot.delay * 2)
        note = ""
        if slot.quick_exits > 1:
            note = f" (backing off: {slot.quick_exits} exits in a row within {STABLE:g}s of a start)"
        log.error("worker pid=%d %s after %.0fs; starting a replacement in %gs%s", pid, _how(status), ran, delay, note)
        self._own(self._replace(slot, pid, delay))
        return True

    def _unwatch(self, slot: _Slot) -> None:
        if slot.pidfd >= 0:
            asyncio.get_running_loop().remove_reader(slot.pidfd)
            os.close(slot.pidfd)
            slot.pidfd = -1

    def _own(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _replace(self, slot: _Slot, dead: int, delay: float) -> None:
        # It no longer answers reloads: gateway reload must not wait for it.
        await asyncio.to_thread(reloads.forget, self.var_dir, dead)
        await self._app.workers_changed()
        await asyncio.sleep(delay)
        if self._is_stopping:
            return
        try:
            pid, writer = self._spawn()
        except OSError as exc:
            delay, slot.delay = slot.delay, min(MAX_DELAY, slot.delay * 2)
            log.error("cannot start a worker to replace pid=%d: %s; trying again in %gs", dead, exc, delay)
            self._own(self._replace(slot, dead, delay))
            return
        slot.pid, slot.started = pid, time.monotonic()
        slot.is_behind = self._app.is_reload_pending
        self._watch(slot)
        log.info("worker pid=%d started to replace pid=%d", pid, dead)
        handover = Handover(os.getpid(), self.ports, self._app.last_report, self._app.policy_data)
        await asyncio.gather(asyncio.to_thread(_write_all, writer, handover.encode()), self._app.workers_changed())

    def _spawn(self) -> tuple[int, int]:
        """Start ``gateway run --worker-of <master>``; its pid and the pipe to its stdin.

        Called on the event loop's thread, the main one, which lives as long as the
        master: PR_SET_PDEATHSIG follows the thread that started the worker."""
        reader, writer = os.pipe()
        if reader < 3:  # our own standard input was closed: dup2 onto 0 would keep CLOEXEC
            reader = fcntl.fcntl(reader, fcntl.F_DUPFD_CLOEXEC, 3)
        argv = [sys.executable, "-m", "gateway.cli", "run", *self.run_args, "--worker-of", str(os.getpid())]
        try:
            pid = os.posix_spawn(
                sys.executable, argv, dict(os.environ),
                file_actions=[(os.POSIX_SPAWN_DUP2, reader, 0)],
                # A SIGHUP passed on while it starts waits until it can take it.
                setsigmask={signal.SIGHUP},
                setsigdef={signal.SIGTERM, signal.SIGINT},
            )
        except OSError:
            os.close(writer)
            raise
        finally:
            os.close(reader)
        return pid, writer

    def reload_done(self) -> None:
        """The master finished a reload: a worker started meanwhile got the policy
        from before it, so it reloads now too."""
        for slot in self._slots:
            if slot.pid and slot.is_behind:
                slot.is_behind = False
                try:
                    os.kill(slot.pid, signal.SIGHUP)
                except ProcessLookupError:
                    pass

    def stop(self) -> None:
        """No more replacements; SIGTERM every worker (the master stops)."""
        if self._is_stopping:
            return
        self._is_stopping = True
        for task in self._tasks:
            task.cancel()
        for slot in self._slots:
            try:
                self._unwatch(slot)
            except RuntimeError:  # no running loop any more: the pidfd just closes
                os.close(slot.pidfd)
                slot.pidfd = -1
            if slot.pid:
                try:
                    os.kill(slot.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass


def _write_all(fd: int, data: bytes) -> None:
    """Write ``data`` to the pipe ``fd`` and close it (in a thread: it may block)."""
    try:
        with open(fd, "wb", closefd=True) as pipe:
            pipe.write(data)
    except BrokenPipeError:  # the worker died first: its exit is logged
        pass
