"""Helper daemons for ``bench/filters.py``: a DNS server, clamd and spamd, on 127.0.0.1 only.

Each one is a subprocess with its configuration in a private temporary directory and a
port found free at start-up (bind port 0, read, close), as in the test fixtures:

- **DNS**: ``tests/dnsserver.py``'s ``DnsTestServer`` (dnslib, UDP and TCP on one port)
  run in a process of its own (``python bench/_daemons.py dns ZONEFILE PORTFILE``), so its
  CPU time can be read from ``/proc`` and it does not share the bench driver's GIL.
- **clamd** with an EICAR-only signature database made with ``sigtool`` (as
  ``tests/integration/scanners/conftest.py``; nothing is downloaded), on a TCP port.
- **spamd** with the shipped rules and an offline site config (no network tests, no
  Bayes), with a fixed number of children (``--min-children`` = ``--max-children``).

The scanner fixtures of the tests are pytest generator fixtures, not plain functions, so
the few lines that start the daemons are repeated here rather than imported.

Every start has a time limit; :meth:`Daemon.stop` sends SIGTERM (then SIGKILL) to the
process we started, by its id, and removes the temporary directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HOST = "127.0.0.1"
BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent

# The EICAR test file, assembled at run time so this source does not itself trip a scanner.
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-" + b"TEST-FILE!$H+H*"

# spamd's site config: offline and deterministic (real-components.md §2).
SPAMD_LOCAL_CF = (
    "use_bayes 0\nbayes_auto_learn 0\nskip_rbl_checks 1\nuse_razor2 0\nuse_pyzor 0\n"
    "dns_available no\nrequired_score 5.0\n"
)


def find_binary(name: str) -> str | None:
    """The path of a daemon or tool, also in the sbin directories root's PATH may lack."""
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind port 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _proc_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants, from ``/proc/PID/task/TID/children``."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process, its reaped children and its live descendants (all threads).

    spamd's scans run in preforked children; a child that exits between two readings
    and is reaped moves its time into the parent's ``cutime``/``cstime``.
    """
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for i, p in enumerate(_proc_tree(pid)):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
        if i == 0:
            total += int(fields[13]) + int(fields[14])
    return total / tick


@dataclass
class Daemon:
    """A running helper: ``address`` is ``127.0.0.1:PORT``; :meth:`stop` ends it."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    root: Path
    log: Path
    extra_roots: list[Path] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.proc.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the process we started, SIGKILL if it lingers; remove its directories."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for root in self.extra_roots:
            shutil.rmtree(root, ignore_errors=True)


def _wait(proc: subprocess.Popen[bytes], ready: Callable[[], bool], log: Path, limit: float, what: str) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{what} exited with status {proc.returncode}: {tail}")
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(0.05)
    proc.kill()
    proc.wait(5)
    raise RuntimeError(f"{what} not ready after {limit:.0f}s")


def _ask(address: tuple[str, int], request: bytes, until: bytes) -> bytes:
    with socket.create_connection(address, timeout=2) as s:
        s.sendall(request)
        data = b""
        while until not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


# -- DNS --------------------------------------------------------------------------------


def _dns_answers(port: int, name: str) -> bool:
    import dns.message
    import dns.query

    query = dns.message.make_query(name, "SOA")
    dns.query.udp(query, HOST, port=port, timeout=0.5)
    return True


def start_dns(zone: str, root: Path, soa_name: str, limit: float = 30.0) -> Daemon:
    """``tests/dnsserver.py`` serving ``zone`` (zone-file text) in its own process.

    :param zone: the zone-file text to serve
    :param root: a fresh directory for the zone file, the port file and the log
    :param soa_name: a name with a SOA record, asked to see that the server answers
    :param limit: seconds to wait for it to answer
    """
    root.mkdir(parents=True)
    zone_file, port_file, log = root / "bench.zone", root / "port", root / "dns.log"
    zone_file.write_text(zone)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH")))))
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "dns", str(zone_file), str(port_file)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    port = 0

    def ready() -> bool:
        nonlocal port
        if not port:
            if not port_file.exists():
                return False
            port = int(port_file.read_text())
        return _dns_answers(port, soa_name)

    _wait(proc, ready, log, limit, "DNS server")
    return Daemon("dns", proc, port, root, log)


def _serve_dns(zone_file: str, port_file: str) -> int:
    """The DNS subprocess: serve until SIGTERM, having written the port (atomically)."""
    sys.path.insert(0, str(REPO))
    from tests.dnsserver import DnsTestServer

    server = DnsTestServer(Path(zone_file).read_text())
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    tmp = Path(port_file + ".tmp")
    tmp.write_text(str(server.port))
    tmp.rename(port_file)
    while not done.wait(1.0):
        if os.getppid() == 1:  # the bench died without stopping us
            break
    server.stop()
    return 0


# -- clamd ------------------------------------------------------------------------------


def start_clamd(root: Path, threads: int = 10, limit: float = 60.0) -> Daemon:
    """clamd with an EICAR-only database (whole-file MD5 and a body pattern), on TCP.

    :param root: a fresh directory for the database, config, socket and logs
    :param threads: clamd's ``MaxThreads`` (scans at once)
    :param limit: seconds to wait for ``PONG``
    """
    clamd, sigtool = find_binary("clamd"), find_binary("sigtool")
    if clamd is None or sigtool is None:
        raise RuntimeError("clamd or sigtool not found; install clamav-daemon and clamav")
    db = root / "db"
    db.mkdir(parents=True)
    sample = root / "eicar.com"
    sample.write_bytes(EICAR)
    hdb = subprocess.run([sigtool, "--md5", str(sample)], capture_output=True, check=True, text=True, timeout=30)
    (db / "test.hdb").write_text(hdb.stdout)
    (db / "test.ndb").write_text(f"Eicar-Test-Signature-Body:0:*:{EICAR.hex()}\n")
    port = free_port()
    conf = root / "clamd.conf"
    conf.write_text(
        f"DatabaseDirectory {db}\nLocalSocket {root / 'clamd.sock'}\nLocalSocketMode 660\n"
        f"TCPSocket {port}\nTCPAddr {HOST}\nForeground yes\nLogFile {root / 'clamd.log'}\n"
        f"PidFile {root / 'clamd.pid'}\nTemporaryDirectory {root}\nStreamMaxLength 25M\n"
        f"MaxThreads {threads}\nSelfCheck 0\n"
    )
    log = root / "clamd.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen([clamd, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    _wait(proc, lambda: _ask((HOST, port), b"zPING\0", b"\0").startswith(b"PONG"), log, limit, "clamd")
    return Daemon("clamd", proc, port, root, log)


# -- spamd ------------------------------------------------------------------------------


def start_spamd(children: int, limit: float = 90.0) -> Daemon:
    """spamd with the shipped rules, an offline site config and ``children`` children.

    Its directory is a fresh ``mkdtemp`` of its own: when we are root the children run as
    debian-spamd, which must be able to read the site config (a 0700 parent would hide it).

    :param children: spamd's ``--min-children`` and ``--max-children``
    :param limit: seconds to wait for ``PONG`` and for the children to be forked
    """
    spamd = find_binary("spamd")
    if spamd is None:
        raise RuntimeError("spamd not found; install spamd and spamassassin")
    root = Path(tempfile.mkdtemp(prefix="gw-bench-spamd-"))
    site, home = root / "site", root / "home"
    site.mkdir()
    home.mkdir()
    for pre in Path("/etc/spamassassin").glob("*.pre"):
        shutil.copy(pre, site)
    (site / "local.cf").write_text(SPAMD_LOCAL_CF)
    port = free_port()
    cmd = [
        spamd, f"--listen={HOST}:{port}", f"--allowed-ips={HOST}", f"--siteconfigpath={site}",
        "--configpath=/usr/share/spamassassin", "--local", "--nouser-config", f"--helper-home-dir={home}",
        f"--pidfile={root / 'spamd.pid'}", f"--max-children={children}", f"--min-children={children}",
        "--syslog=stderr",
    ]
    if os.geteuid() == 0:  # spamd will not run its children as root
        for path in (root, site, home, *site.iterdir()):
            shutil.chown(path, "debian-spamd", "debian-spamd")
        cmd += ["--username=debian-spamd", "--groupname=debian-spamd"]
    log = root / "spamd.out"
    try:
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        daemon = Daemon("spamd", proc, port, root, log, extra_roots=[root])
        try:
            _wait(proc, lambda: b"PONG" in _ask((HOST, port), b"PING SPAMC/1.5\r\n\r\n", b"\r\n"),
                  log, limit, "spamd")
            # spamd forks its children one by one after it listens: wait for all of them,
            # so the first timed batch does not pay for forking.
            _wait(proc, lambda: len(_proc_tree(proc.pid)) - 1 >= children, log, limit, "spamd children")
        except BaseException:
            daemon.stop()
            raise
        return daemon
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "dns":
        sys.exit(_serve_dns(sys.argv[2], sys.argv[3]))
    sys.exit("usage: _daemons.py dns ZONEFILE PORTFILE")
