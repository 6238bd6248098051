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
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

from gateway import reloads
from gateway.metrics import clear_snapshots
from gateway.queue import QueueStore
from gateway.smtp.tls import server_context

__all__ = ["bind_listeners", "run_workers"]

log = logging.getLogger(__name__)


_PR_SET_PDEATHSIG = 1


def _exit_with_master(master: int) -> None:
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


def run_workers(policy: Any, make_app: Any) -> int:
    """Fork the workers and run the master; returns the exit status.

    :param make_app: ``make_app(role, workers)`` builds a :class:`GatewayApp`
        (``workers``: the pids the master passes SIGHUP on to)
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
    master_sockets = bind_listeners(policy)
    ports = {name: s.getsockname()[1] for name, s in master_sockets.items()}
    children: list[int] = []
    master = os.getpid()
    for _ in range(policy.server.workers - 1):
        pid = os.fork()
        if pid == 0:  # worker
            status = 1
            try:
                _exit_with_master(master)
                for sock in master_sockets.values():
                    sock.close()
                sockets = bind_listeners(policy, ports)
                app = make_app("worker", ())
                asyncio.run(app.run_forever(sockets=sockets, recovered=[]))
                status = 0
            except KeyboardInterrupt:
                status = 0
            finally:
                os._exit(status)
        children.append(pid)
    try:
        app = make_app("master", tuple(children))
        asyncio.run(app.run_forever(sockets=master_sockets, recovered=recovered))
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # stopping: no reload now
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for pid in children:
            os.waitpid(pid, 0)
    return 0
