"""Delivery to a real Postfix smtpd (a private instance on loopback): the remote client's
pipelined groups (MAIL, RCPTs and DATA in one write; the RSET of a reused connection at
their head) as the most common MTA on the other end takes them.

Postfix is the Debian package ``postfix`` (scripts/install-system-deps.sh); its
``smtpd`` runs from a configuration of its own in a temporary directory and throws the
mail away (``discard``) after logging each message's Message-ID, which is what the test
counts.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import smtp, wait_for
from tests.processes import free_port, port_open

POSTFIX = shutil.which("postfix", path="/usr/sbin:/usr/bin:/sbin:/bin")

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {d}/spool
data_directory = {d}/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = postfix.test.example
mydestination =
mynetworks = 127.0.0.0/8
smtpd_recipient_restrictions = check_recipient_access inline:{{ {{ refused@far.example = 550 5.1.1 no such user }} }}, permit_mynetworks, reject
default_transport = discard
relay_transport = discard
maillog_file_prefixes = {d}
maillog_file = {d}/maillog
"""


@pytest.fixture(scope="module")
def postfix() -> Iterator[tuple[int, Path]]:
    """(port, maillog) of a private Postfix accepting for anyone on 127.0.0.0/8."""
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
    port = free_port()
    (etc / "main.cf").write_text(MAIN_CF.format(d=top))
    master = Path("/etc/postfix/master.cf").read_text().splitlines()
    master = [f"127.0.0.1:{port} " + line.split(None, 1)[1] if line.startswith("smtp ") and " inet " in line
              else line for line in master]
    (etc / "master.cf").write_text("\n".join(master) + "\n")
    started = subprocess.run([POSTFIX, "-c", str(etc), "start"], capture_output=True, text=True, timeout=60)
    try:
        assert started.returncode == 0, f"postfix start: {started.stderr} {(top / 'maillog').read_text()[-500:]}"
        assert wait_for(lambda: port_open(port), timeout=20)
        yield port, top / "maillog"
    finally:
        subprocess.run([POSTFIX, "-c", str(etc), "stop"], capture_output=True, timeout=60)
        time.sleep(0.5)
        shutil.rmtree(top, ignore_errors=True)


def test_relayed_mail_reaches_postfix_once_each_over_reused_pipelined_connections(
    gateway_factory, postfix: tuple[int, Path],
) -> None:
    port, maillog = postfix
    gw = gateway_factory(f"""
[server]
hostname = "gw.test.example"
[[listeners]]
name = "smtp"
tls = "none"
[local]
domains = ["localhost"]
users = ["postmaster"]
[relay]
clients = ["127.0.0.0/8"]
[delivery]
retry_base = "1h"
[[routes]]
domain = "far.example"
host = "127.0.0.1"
port = {port}
tls = "none"
[[plugins]]
name = "rcpt_relay"
[[plugins]]
name = "rcpt_local_users"
""")
    sent = [f"<interop-{n}@gw.test.example>" for n in range(20)]
    with smtp(gw.port) as client:
        for mid in sent:
            message = f"Message-ID: {mid}\r\nSubject: interop\r\n\r\nbody\r\n".encode()
            # Two recipients Postfix takes and one it refuses at RCPT, in one transaction.
            client.sendmail("sender@far.example", ["a@far.example", "b@far.example", "refused@far.example"], message)

    def logged() -> collections.Counter[str]:
        text = maillog.read_text() if maillog.exists() else ""
        return collections.Counter(re.findall(r"postfix/cleanup\[\d+\]: \w+: message-id=(<[^>]+>)", text))

    assert wait_for(lambda: set(sent) <= set(logged()), timeout=30), (
        f"not every message reached Postfix: {maillog.read_text()[-1500:] if maillog.exists() else 'no log'}"
    )
    assert wait_for(lambda: gw.queue_ids() == [], timeout=15), "the refused recipient's bounce is still queued"
    counts = logged()
    assert all(counts[mid] == 1 for mid in sent), "a message reached Postfix twice"
    text = maillog.read_text()
    # Each message went out in one transaction for a and b; the bounces for refused@
    # went back to the sender through Postfix too (its domain is routed there).
    assert len(re.findall(r"to=<a@far\.example>.*status=sent", text)) == 20
    assert len(re.findall(r"to=<b@far\.example>.*status=sent", text)) == 20
    assert "refused@far.example" in text and "550 5.1.1" in text
    assert len(re.findall(r"to=<sender@far\.example>.*status=sent", text)) == 20
    sessions = len(re.findall(r"postfix/smtpd\[\d+\]: connect from", text))
    assert sessions < 20, f"{sessions} sessions for 20 messages: connections were not reused"
