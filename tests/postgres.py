"""A real PostgreSQL server on loopback for the tests: one per test session.

The Debian package ``postgresql`` (scripts/install-system-deps.sh) brings the server's
programs under /usr/lib/postgresql/<version>/bin, not on PATH. The session runs its own
cluster: ``initdb`` in a temporary directory (trust authentication, no other user can
reach it: it listens on 127.0.0.1 and a port picked at run time, its unix socket in the
same directory), then ``postgres`` in the foreground with durability off (test data).
As root, both run as the unprivileged ``postgres`` user (``initdb`` refuses root), or
``nobody``. ``postgres_url`` hands a test a database of its own on that server.

    def test_x(postgres_url: str) -> None:   # with "from tests.postgres import *" in the module
        ...
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import free_port

__all__ = ["PostgresServer", "postgres_server", "postgres_url"]


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    postgres = shutil.which("postgres")
    return Path(postgres).parent if postgres else None


class PostgresServer:
    """One private cluster; :meth:`database` makes an empty database, :meth:`stop` ends it."""

    def __init__(self, workdir: Path) -> None:
        bin_dir = _bin_dir()
        assert bin_dir is not None
        self.workdir = workdir
        self.port = free_port()
        self._numbers = itertools.count(1)
        user = None
        if os.getuid() == 0:
            for name in ("postgres", "nobody"):
                try:
                    user = pwd.getpwnam(name)
                    break
                except KeyError:
                    continue
            assert user is not None, "no unprivileged user to run PostgreSQL as"
            os.chown(workdir, user.pw_uid, user.pw_gid)
        as_user = {"user": user.pw_uid, "group": user.pw_gid} if user else {}
        data = workdir / "data"
        with open(workdir / "initdb.log", "wb") as log:
            subprocess.run([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                            "--no-sync", "-E", "UTF8", "--locale=C"], stdout=log, stderr=subprocess.STDOUT,
                           check=True, cwd=workdir, timeout=120, **as_user)  # type: ignore[call-overload]
        self.log = open(workdir / "postgres.log", "wb")
        self.process = subprocess.Popen(
            [str(bin_dir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(self.port),
             "-k", str(workdir), "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "max_connections=100"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=workdir, **as_user,  # type: ignore[call-overload]
        )
        deadline = time.monotonic() + 30
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"postgres did not start; see {workdir / 'postgres.log'}")
            time.sleep(0.05)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _ready(self) -> bool:
        import psycopg

        try:
            psycopg.connect(self.url(), connect_timeout=2).close()
        except psycopg.OperationalError:
            return False
        return True

    def database(self) -> str:
        """A new empty database's URL."""
        import psycopg

        name = f"test_{next(self._numbers)}"
        with psycopg.connect(self.url(), autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # a "fast" shutdown: open sessions are ended
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server."""
    if _bin_dir() is None:
        pytest.skip("PostgreSQL is not installed (scripts/install-system-deps.sh)")
    with tempfile.TemporaryDirectory(prefix="postgres-") as workdir:
        server = PostgresServer(Path(workdir))
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A database of this test's own on the session's server."""
    return postgres_server.database()
