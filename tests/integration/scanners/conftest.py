"""Real scanner daemons for the scanner plugins' tests: clamd, spamd and rspamd.

Each daemon is started once per test session, on 127.0.0.1 with ports picked at run
time and a private configuration in a temporary directory (see
/work/shared/notes/real-components.md §1-3):

- clamd loads a signature database made here with ``sigtool``: EICAR as a whole-file MD5
  (``.hdb``) and as a body pattern (``.ndb``, so EICAR inline in a text part matches too).
  Nothing is downloaded.
- spamd uses the shipped rules with a private site config (no network tests, no Bayes),
  which is enough for GTUBE.
- rspamd uses the stock config with workers, DNS and settings redirected to private
  files. Its hyperscan cache lives in ``~/.cache/gateway-tests/rspamd-hs`` so that only
  the first run on a machine pays the 10 s compile. Its DNS server is a test server on
  loopback, so no lookup ever waits on the network.

A test is skipped (with the reason) only when the daemon's binary is missing.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.dnsserver import DnsTestServer
from tests.processes import free_port

# The EICAR test file (https://www.eicar.org), assembled at run time so that this source
# file does not itself trip a virus scanner on a developer's machine.
EICAR = (
    b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-"
    + b"TEST-FILE!$H+H*"
)
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-" + b"TEST-EMAIL*C.34X"

ZONE = """
$ORIGIN test.example.
$TTL 300
@       IN SOA ns1.test.example. hostmaster.test.example. 1 3600 600 86400 300
@       IN NS  ns1.test.example.
ns1     IN A   127.0.0.1
@       IN A   127.0.0.1
@       IN MX  10 mail.test.example.
mail    IN A   127.0.0.1
@       IN TXT "v=spf1 ip4:127.0.0.0/8 -all"
"""


def _need(binary: str) -> str:
    path = shutil.which(binary) or next(
        (p for p in (f"/usr/sbin/{binary}", f"/usr/bin/{binary}") if os.access(p, os.X_OK)), None
    )
    if path is None:
        pytest.skip(f"{binary} is not installed")
    return path


def _wait(proc: subprocess.Popen[bytes], ready: Callable[[], bool], log: Path, limit: float) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(0.05)
    proc.terminate()
    raise RuntimeError(f"{proc.args[0]} not ready after {limit}s:\n{log.read_text(errors='replace')[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _ask(family: int, address: object, request: bytes, until: bytes) -> bytes:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect(address)
        s.sendall(request)
        data = b""
        while until not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


@dataclass(frozen=True)
class Clamd:
    socket: str
    port: int

    def ping(self) -> bool:
        return _ask(socket.AF_UNIX, self.socket, b"zPING\0", b"\0").startswith(b"PONG")


@pytest.fixture(scope="session")
def clamd_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clamd]:
    """clamd with an EICAR-only database, on a Unix socket and a TCP port."""
    clamd, sigtool = _need("clamd"), _need("sigtool")
    root = tmp_path_factory.mktemp("clamd")
    db = root / "db"
    db.mkdir()
    sample = root / "eicar.com"
    sample.write_bytes(EICAR)
    hdb = subprocess.run([sigtool, "--md5", str(sample)], capture_output=True, check=True, text=True)
    (db / "test.hdb").write_text(hdb.stdout)
    (db / "test.ndb").write_text(f"Eicar-Test-Signature-Body:0:*:{EICAR.hex()}\n")
    daemon = Clamd(str(root / "clamd.sock"), free_port())
    (root / "clamd.conf").write_text(
        f"DatabaseDirectory {db}\nLocalSocket {daemon.socket}\nLocalSocketMode 660\n"
        f"TCPSocket {daemon.port}\nTCPAddr 127.0.0.1\nForeground yes\n"
        f"LogFile {root / 'clamd.log'}\nPidFile {root / 'clamd.pid'}\nTemporaryDirectory {root}\n"
        "StreamMaxLength 4M\nMaxThreads 4\nSelfCheck 0\n"
    )
    log = root / "clamd.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen([clamd, "-c", str(root / "clamd.conf")], stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait(proc, daemon.ping, log, 60)
        yield daemon
    finally:
        _stop(proc)


@dataclass(frozen=True)
class Spamd:
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ping(self) -> bool:
        return b"PONG" in _ask(socket.AF_INET, ("127.0.0.1", self.port), b"PING SPAMC/1.5\r\n\r\n", b"\r\n")


@pytest.fixture(scope="session")
def spamd_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Spamd]:
    """spamd with the shipped rules and a private, offline site config."""
    spamd = _need("spamd")
    # spamd's children run as debian-spamd when we are root: pytest's 0700 base directory
    # would hide the site config from them, so this one lives beside it and is theirs.
    root = Path(tempfile.mkdtemp(prefix="gateway-spamd-"))
    site, home = root / "site", root / "home"
    site.mkdir()
    home.mkdir()
    for pre in Path("/etc/spamassassin").glob("*.pre"):
        shutil.copy(pre, site)
    (site / "local.cf").write_text(
        "use_bayes 0\nbayes_auto_learn 0\nskip_rbl_checks 1\nuse_razor2 0\nuse_pyzor 0\n"
        "dns_available no\nrequired_score 5.0\n"
    )
    daemon = Spamd(free_port())
    cmd = [
        spamd, f"--listen=127.0.0.1:{daemon.port}", "--allowed-ips=127.0.0.1",
        f"--siteconfigpath={site}", "--configpath=/usr/share/spamassassin", "--local",
        "--nouser-config", f"--helper-home-dir={home}", f"--pidfile={root / 'spamd.pid'}",
        "--max-children=2", "--min-children=1", "--syslog=stderr",
    ]
    if os.geteuid() == 0:  # spamd refuses to run its children as root
        for path in (root, site, home, *site.iterdir()):
            shutil.chown(path, "debian-spamd", "debian-spamd")
        cmd += ["--username=debian-spamd", "--groupname=debian-spamd"]
    log = root / "spamd.out"
    try:
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait(proc, daemon.ping, log, 60)
            yield daemon
        finally:
            _stop(proc)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def scanner_dns() -> Iterator[DnsTestServer]:
    """The DNS server rspamd asks: a small test zone, NXDOMAIN for everything else."""
    with DnsTestServer(ZONE) as server:
        yield server


@dataclass(frozen=True)
class Rspamd:
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ping(self) -> bool:
        request = b"GET /ping HTTP/1.0\r\nHost: localhost\r\n\r\n"
        return b"pong" in _ask(socket.AF_INET, ("127.0.0.1", self.port), request, b"pong")


# rspamd settings the tests select with the plugin's settings_id: they move the action
# thresholds so that an ordinary message gets "add header" or "rewrite subject".
RSPAMD_SETTINGS = """
always_add_header {
  id = "always_add_header";
  apply { actions { "add header" = -1000.0; "rewrite subject" = null; greylist = null; } }
}
always_rewrite_subject {
  id = "always_rewrite_subject";
  apply { actions { "rewrite subject" = -1000.0; greylist = null; } }
}
"""


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = base / "gateway-tests" / "rspamd-hs"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def rspamd_daemon(tmp_path_factory: pytest.TempPathFactory, scanner_dns: DnsTestServer) -> Iterator[Rspamd]:
    """rspamd's normal worker only (controller and proxy off), offline."""
    rspamd = _need("rspamd")
    root = tmp_path_factory.mktemp("rspamd")
    for sub in ("local.d", "override.d", "db", "run", "log"):
        (root / sub).mkdir()
    daemon = Rspamd(free_port())
    (root / "override.d" / "worker-normal.inc").write_text(f'bind_socket = "127.0.0.1:{daemon.port}";\ncount = 1;\n')
    (root / "override.d" / "worker-controller.inc").write_text("enabled = false;\n")
    (root / "override.d" / "worker-proxy.inc").write_text("enabled = false;\n")
    (root / "override.d" / "logging.inc").write_text('type = "console";\nlevel = "notice";\n')
    (root / "local.d" / "options.inc").write_text(
        f'dns {{ nameserver = ["127.0.0.1:{scanner_dns.port}"]; timeout = 0.5s; retransmits = 1; }}\n'
        f'hs_cache_dir = "{_cache_dir()}";\n'
    )
    (root / "local.d" / "fuzzy_check.conf").write_text("enabled = false;\n")  # no fuzzy1.rspamd.com
    (root / "local.d" / "settings.conf").write_text(RSPAMD_SETTINGS)
    (root / "local.d" / "milter_headers.conf").write_text(
        'use = ["x-spamd-result", "x-rspamd-queue-id"];\nskip_local = false;\nskip_authenticated = false;\n'
    )
    cmd = [
        rspamd, "-f", "-c", "/etc/rspamd/rspamd.conf", f"--var=LOCAL_CONFDIR={root}",
        f"--var=DBDIR={root / 'db'}", f"--var=RUNDIR={root / 'run'}", f"--var=LOGDIR={root / 'log'}",
    ]
    if os.geteuid() == 0:
        cmd.append("--insecure")  # stay root: the cache under ~ may be unreadable for _rspamd
    log = root / "rspamd.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait(proc, daemon.ping, log, 120)  # a cold hyperscan cache takes 10-15 s
        yield daemon
    finally:
        _stop(proc)
