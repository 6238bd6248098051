"""The gateway as a separate process, for tests that need what only a real process
has: signals, several workers, a crash, its exit status.

    port = free_port()
    proc = start_gateway(policy_file, port)      # waits until the port answers
    ...
    assert stop_gateway(proc) == 0               # SIGTERM, then its exit status
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import wait_for

__all__ = ["ROOT", "free_port", "gateway_env", "port_open", "start_gateway", "stop_gateway", "write_policy"]

ROOT = Path(__file__).resolve().parents[1]


def free_port(*addresses: str) -> int:
    """A TCP port free on every one of ``addresses`` (default 127.0.0.1)."""
    addresses = addresses or ("127.0.0.1",)
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind((addresses[0], 0))
            port = int(probe.getsockname()[1])
        try:
            for address in addresses:
                with socket.socket() as other:
                    other.bind((address, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host:port`` now."""
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def gateway_env(*paths: str | os.PathLike[str]) -> dict[str, str]:
    """This environment, with the source tree (after ``paths``) on ``PYTHONPATH``."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([*(str(p) for p in paths), str(ROOT)]))


def write_policy(
    tmp: Path, port: int, *, workers: int = 1, extra: str = "",
    plugins: tuple[str, ...] = ("rcpt_relay", "rcpt_local_users"),
) -> Path:
    """``tmp/policy.toml``: queue, state and mailboxes under ``tmp``, one listener without
    TLS on ``port``, local users postmaster and alice at ``localhost``, then ``extra``
    (TOML sections) and ``plugins`` in that order."""
    chain = "".join(f'[[plugins]]\nname = "{name}"\n' for name in plugins)
    path = tmp / "policy.toml"
    path.write_text(f"""
[server]
hostname = "gw.test.example"
queue_dir = "{tmp / 'queue'}"
var_dir = "{tmp / 'var'}"
workers = {workers}
[[listeners]]
name = "smtp"
port = {port}
tls = "none"
[local]
domains = ["localhost"]
users = ["postmaster", "alice"]
mail_root = "{tmp / 'mail'}"
[limits]
max_connections_per_ip = 200
{extra}
{chain}""")
    return path


def start_gateway(
    policy: Path, port: int, *, stderr: Any = subprocess.DEVNULL, text: bool = False,
    new_session: bool = False, env: dict[str, str] | None = None, timeout: float = 20.0,
) -> subprocess.Popen[Any]:
    """``gateway run --policy <policy>``, returned once ``port`` answers.

    :param stderr: where its log goes (a file, ``subprocess.PIPE``, or nowhere)
    :param new_session: its own process group, so ``os.killpg`` reaches every worker
    :raises AssertionError: it exited, or did not listen within ``timeout``
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "run", "--policy", str(policy)],
        env=env or gateway_env(), stdout=subprocess.DEVNULL, stderr=stderr, text=text,
        start_new_session=new_session,
    )
    if not wait_for(lambda: proc.poll() is not None or port_open(port), timeout) or proc.poll() is not None:
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"gateway did not start (exit status {proc.returncode})")
    return proc


def stop_gateway(proc: subprocess.Popen[Any], timeout: float = 30.0) -> int:
    """SIGTERM and wait: the exit status (0 after a clean shutdown)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout)
