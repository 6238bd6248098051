"""A real Dovecot (Debian's dovecot-core) as the user database for the gateway's tests.

Dovecot runs with a private configuration in a temporary directory: its own
``base_dir`` and ``state_dir``, a log file, no IMAP/POP/LMTP listeners
(``protocols =``), and only its ``auth`` service with

- ``auth-client`` (the protocol Postfix uses for SASL) on a Unix socket and a TCP port,
- ``auth-userdb`` (user lookups) on a Unix socket and a TCP port,

all on 127.0.0.1 with ports picked at run time. Users come from a passwd-file with a
``{PLAIN}`` and a ``{SHA512-CRYPT}`` password (hashed by ``doveadm pw`` at start); the
userdb gives each a home under the directory (``home/<user>``).
A checkpassword passdb and userdb after it answers "temporary failure" (exit 111) for
the user ``broken@local.example``, the way Dovecot reports its own database being
down, and notes what each request it sees carried (service, client address, TLS).
All Dovecot processes run as the current user (``default_internal_user`` and
``default_login_user`` set to it), so this works as root and as an ordinary user.

The session's Dovecot is shared and must stay up: a test that stops Dovecot starts
its own with :func:`start_dovecot`.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from tests.processes import free_port

USERS = {
    "alice@local.example": "s3cret",
    "bob@local.example": "hunter2 with spaces",
    "mary-ann@local.example": "m4ry",
    "carol": "c4rol",
    # Known only to Dovecot, in the delivery tests' local domain; erin's userdb entry
    # names her Maildir (mail=), dan's does not (the default, <home>/Maildir/); fred's
    # mail belongs to another uid (nobody's).
    "dan@localhost": "d4n",
    "erin@localhost": "3rin",
    "fred@localhost": "fr3d",
}
OTHER_UID = 65534
#: extra userdb fields of a passwd-file line (its last field)
USER_FIELDS = {
    "erin@localhost": "userdb_mail=maildir:~/mail/inbox",
    "fred@localhost": f"userdb_uid={OTHER_UID} userdb_gid={OTHER_UID}",
}
BROKEN_USER = "broken@local.example"

_CHECKPASSWORD = """#!/bin/sh
# Dovecot writes "user\\0password\\0" on fd 3 and describes the request in the
# environment (AUTHORIZED is set for a userdb lookup). Each call is noted, without the
# password, so tests can see what the gateway told Dovecot.
user=$(head -c 512 <&3 | tr '\\0' '\\n' | head -n 1)
echo "user=$user service=$AUTH_SERVICE rip=$REMOTE_IP lip=$AUTH_LOCAL_IP secured=$AUTH_SECURED session=$AUTH_SESSION" >> "$0.log"
# 111: a temporary failure (Dovecot's database is down); 1: login failed; 3: no such user
[ "$user" = "{broken}" ] && exit 111
[ -n "$AUTHORIZED" ] && exit 3
exit 1
"""


def _binary(name: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )
    if path is None:
        pytest.skip(f"{name} is not installed (dovecot-core)")
    return path


@dataclass
class Dovecot:
    """One running Dovecot and where to reach it."""

    root: Path
    process: subprocess.Popen[bytes]
    client_port: int
    userdb_port: int

    @property
    def auth_socket(self) -> str:
        return str(self.root / "run" / "auth-client")

    @property
    def userdb_socket(self) -> str:
        return str(self.root / "run" / "auth-userdb")

    @property
    def auth_tcp(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def userdb_tcp(self) -> str:
        return f"127.0.0.1:{self.userdb_port}"

    def home(self, user: str) -> Path:
        """The home Dovecot's userdb gives ``user`` (``home=``)."""
        return self.root / "home" / user

    @property
    def log(self) -> str:
        return (self.root / "dovecot.log").read_text(errors="replace")

    def requests(self) -> list[str]:
        """What the checkpassword script noted, one line per request it saw."""
        path = self.root / "checkpassword.log"
        return path.read_text(errors="replace").splitlines() if path.exists() else []

    def _greeting(self) -> bytes:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(self.auth_socket)
            s.sendall(b"VERSION\t1\t2\nCPID\t1\n")
            data = b""
            while b"DONE\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        return data

    def is_ready(self) -> bool:
        try:
            return b"DONE\n" in self._greeting()
        except OSError:
            return False

    def auth_pid(self) -> int:
        """The pid of Dovecot's auth process (its ``SPID`` line)."""
        for line in self._greeting().decode().splitlines():
            if line.startswith("SPID\t"):
                return int(line.split("\t")[1])
        raise RuntimeError("Dovecot sent no SPID")

    def stop(self) -> None:
        """Stop Dovecot and wait until it is gone (sockets closed)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def _config(root: Path, client_port: int, userdb_port: int) -> str:
    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    return f"""
base_dir = {root}/run
state_dir = {root}/state
instance_name = gateway-test-{root.name}
log_path = {root}/dovecot.log
protocols =
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_verbose = yes
auth_failure_delay = 0
default_internal_user = {user}
default_internal_group = {group}
default_login_user = {user}
passdb {{
  driver = passwd-file
  args = username_format=%u {root}/users
}}
passdb {{
  driver = checkpassword
  args = {root}/checkpassword
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {root}/users
  default_fields = uid={os.getuid()} gid={os.getgid()} home={root}/home/%u
}}
userdb {{
  driver = checkpassword
  args = {root}/checkpassword
}}
service auth {{
  unix_listener auth-client {{
    mode = 0600
  }}
  unix_listener auth-userdb {{
    mode = 0600
  }}
  inet_listener auth-client {{
    address = 127.0.0.1
    port = {client_port}
  }}
  inet_listener auth-userdb {{
    address = 127.0.0.1
    port = {userdb_port}
  }}
}}
service auth-worker {{
  user = $default_internal_user
}}
# An ordinary user cannot chroot; anvil (the failure penalty's memory) runs unconfined.
service anvil {{
  chroot =
}}
"""


def start_dovecot(root: Path) -> Dovecot:
    """Write a private configuration under ``root`` and start Dovecot in the foreground."""
    dovecot, doveadm = _binary("dovecot"), _binary("doveadm")
    for sub in ("run", "state", "home"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    lines = []
    for name, password in USERS.items():
        if name.startswith("bob"):
            hashed = subprocess.run(
                [doveadm, "-c", "/dev/null", "pw", "-s", "SHA512-CRYPT", "-p", password],
                capture_output=True, text=True, check=True,
            ).stdout.strip()
        else:
            hashed = "{PLAIN}" + password
        lines.append(f"{name}:{hashed}::::::{USER_FIELDS.get(name, '')}")
    (root / "users").write_text("\n".join(lines) + "\n")
    script = root / "checkpassword"
    script.write_text(_CHECKPASSWORD.replace("{broken}", BROKEN_USER))
    script.chmod(0o755)
    client_port, userdb_port = free_port(), free_port()
    conf = root / "dovecot.conf"
    conf.write_text(_config(root, client_port, userdb_port))
    out = open(root / "dovecot.out", "wb")
    with out:
        process = subprocess.Popen([dovecot, "-F", "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    daemon = Dovecot(root, process, client_port, userdb_port)
    deadline = time.monotonic() + 30
    while not daemon.is_ready():
        if process.poll() is not None or time.monotonic() > deadline:
            daemon.stop()
            output = (root / "dovecot.out").read_text(errors="replace")
            log = (root / "dovecot.log").read_text(errors="replace") if (root / "dovecot.log").exists() else ""
            raise RuntimeError(f"dovecot did not start (rc {process.returncode}):\n{output}\n{log[-3000:]}")
        time.sleep(0.05)
    return daemon


@pytest.fixture(scope="session")
def dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    """The session's Dovecot; tests must not stop it."""
    daemon = start_dovecot(tmp_path_factory.mktemp("dovecot"))
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def private_dovecot(tmp_path: Path) -> Iterator[Dovecot]:
    """A Dovecot for one test, which the test may stop."""
    daemon = start_dovecot(tmp_path / "dovecot")
    try:
        yield daemon
    finally:
        daemon.stop()
