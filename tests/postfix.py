"""A private Postfix instance on loopback, as a real SMTP peer for tests.

Postfix is the Debian package ``postfix`` (scripts/install-system-deps.sh). Each
instance runs from a configuration, queue and log of its own in a temporary directory
and listens on one port picked at run time; nothing touches the system's Postfix.

    with private_postfix(extra="relay_transport = discard") as pf:
        ...  # pf.port, pf.log_text(), pf.message_ids()
"""

from __future__ import annotations

import collections
import contextlib
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.processes import free_port, port_open

__all__ = ["POSTFIX", "PrivatePostfix", "private_postfix"]

POSTFIX = shutil.which("postfix", path="/usr/sbin:/usr/bin:/sbin:/bin")

_MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {d}/spool
data_directory = {d}/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = {address}
inet_protocols = ipv4
myhostname = {hostname}
mydestination =
mynetworks = 127.0.0.0/8
maillog_file_prefixes = {d}
maillog_file = {d}/maillog
"""


@dataclass(frozen=True)
class PrivatePostfix:
    """A running instance: its SMTP port, its directory and its log."""

    port: int
    top: Path

    @property
    def maillog(self) -> Path:
        return self.top / "maillog"

    def log_text(self) -> str:
        return self.maillog.read_text() if self.maillog.exists() else ""

    def message_ids(self) -> collections.Counter[str]:
        """How often each Message-ID went through this Postfix's cleanup (was accepted)."""
        return collections.Counter(
            re.findall(r"postfix/cleanup\[\d+\]: \w+: message-id=(<[^>]+>)", self.log_text())
        )


@contextlib.contextmanager
def private_postfix(extra: str = "", *, hostname: str = "postfix.test.example",
                    address: str = "127.0.0.1") -> Iterator[PrivatePostfix]:
    """Start Postfix with ``extra`` appended to its main.cf; stop and remove it at the end.

    :param extra: main.cf lines (``{d}`` stands for the instance's directory)
    """
    if POSTFIX is None:
        pytest.skip("Postfix is not installed (scripts/install-system-deps.sh installs it)")
    # Postfix's daemons run as user postfix: the directory must be open to them, which
    # pytest's own temporary directories are not.
    top = Path(tempfile.mkdtemp(prefix="gw-postfix-"))
    top.chmod(0o755)
    etc, data = top / "etc", top / "data"
    for d in (etc, top / "spool", data):
        d.mkdir()
    shutil.chown(data, user="postfix")
    port = free_port(address)
    (etc / "main.cf").write_text(
        _MAIN_CF.format(d=top, address=address, hostname=hostname) + extra.replace("{d}", str(top)) + "\n"
    )
    master = Path("/etc/postfix/master.cf").read_text().splitlines()
    master = [f"{address}:{port} " + line.split(None, 1)[1] if line.startswith("smtp ") and " inet " in line
              else line for line in master]
    (etc / "master.cf").write_text("\n".join(master) + "\n")
    started = subprocess.run([POSTFIX, "-c", str(etc), "start"], capture_output=True, text=True, timeout=60)
    instance = PrivatePostfix(port, top)
    try:
        assert started.returncode == 0, f"postfix start: {started.stderr} {instance.log_text()[-500:]}"
        assert wait_for(lambda: port_open(port, address), timeout=20)
        yield instance
    finally:
        subprocess.run([POSTFIX, "-c", str(etc), "stop"], capture_output=True, timeout=60)
        time.sleep(0.5)
        shutil.rmtree(top, ignore_errors=True)
