"""A real redis-server on loopback for the state tests: one per session, plus throw-away ones.

Each server runs with no persistence (``--save ''``, no AOF) in its own temporary
directory, on a free port picked at run time. ``redis_url`` hands a test the session's
server with an empty database; ``redis_factory`` starts private servers for tests that
stop theirs (stopping the shared one would break every test after it).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

REDIS_SERVER = shutil.which("redis-server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process; :meth:`stop` ends it, :meth:`flush` empties it."""

    def __init__(self, workdir: Path) -> None:
        assert REDIS_SERVER is not None
        self.port = _free_port()
        self.workdir = workdir
        self.log = open(workdir / "redis.log", "wb")
        self.process = subprocess.Popen(
            [
                REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(self.port),
                "--save", "", "--appendonly", "no", "--daemonize", "no",
                "--dir", str(workdir), "--protected-mode", "yes", "--loglevel", "warning",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while self.command(b"PING") != b"+PONG":
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start; see {workdir / 'redis.log'}")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0?timeout=0.5"

    def command(self, line: bytes) -> bytes | None:
        """Send one inline command; the first reply line, or ``None`` if unreachable."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                s.sendall(line + b"\r\n")
                return s.makefile("rb").readline().rstrip(b"\r\n")
        except OSError:
            return None

    def flush(self) -> None:
        assert self.command(b"FLUSHALL") == b"+OK"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log.close()


def _require_redis() -> None:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """The session's shared redis-server."""
    _require_redis()
    with tempfile.TemporaryDirectory(prefix="redis-") as workdir:
        server = RedisServer(Path(workdir))
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The shared server's URL, emptied for this test."""
    redis_server.flush()
    return redis_server.url


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[[], RedisServer]]:
    """Start private redis-servers for this test; all are stopped at its end."""
    _require_redis()
    servers: list[RedisServer] = []

    def start() -> RedisServer:
        workdir = tmp_path / f"redis{len(servers)}"
        workdir.mkdir()
        servers.append(RedisServer(workdir))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()
