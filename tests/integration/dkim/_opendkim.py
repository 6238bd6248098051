"""OpenDKIM's ``opendkim-testmsg`` as an independent verifier, offline.

opendkim-testmsg has no option for a key or a DNS server: it asks glibc's resolver on
port 53. So :func:`opendkim_verify` runs it in a private network and mount namespace
(``unshare --net --mount``, root only): there the loopback interface is ours, a private
``resolv.conf`` is bind-mounted over ``/etc/resolv.conf`` (the host's file is untouched)
and this module, run as a script, serves the test zone on 127.0.0.1:53 and verifies each
message file, printing one exit status per file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
TESTMSG = "opendkim-testmsg"


def unavailable() -> str | None:
    """Why the verifier cannot run here, or ``None``."""
    for tool in (TESTMSG, "unshare", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian opendkim-tools, util-linux, iproute2)"
    probe = subprocess.run(
        ["unshare", "--net", "--mount", "true"], capture_output=True, text=True, timeout=30
    )
    if probe.returncode != 0:
        return f"unshare --net --mount is not permitted: {probe.stderr.strip()[:200]}"
    return None


def opendkim_verify(zone: str, messages: list[bytes]) -> list[int]:
    """opendkim-testmsg's exit status for each message (0: the signature is good).

    :param zone: the zone-file text with the key records
    :param messages: the signed messages
    """
    with tempfile.TemporaryDirectory(prefix="odkim-") as tmp:
        work = Path(tmp)
        (work / "test.zone").write_text(zone)
        (work / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        files = []
        for i, message in enumerate(messages):
            path = work / f"msg{i}.eml"
            path.write_bytes(message)
            files.append(str(path))
        script = (
            "ip link set lo up && mount --bind \"$1/resolv.conf\" /etc/resolv.conf && "
            'shift && exec "$@"'
        )
        command = [
            "unshare", "--net", "--mount", "sh", "-c", script, "sh", str(work),
            sys.executable, "-m", "tests.integration.dkim._opendkim", str(work / "test.zone"), *files,
        ]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
        if done.returncode != 0:
            raise RuntimeError(f"namespace verifier failed: {done.stderr[-2000:]}")
        statuses: list[int] = json.loads(done.stdout.strip().splitlines()[-1])
        return statuses


def _serve_and_verify(zone_file: str, files: list[str]) -> list[int]:
    """Inside the namespace: DNS on 127.0.0.1:53, then opendkim-testmsg per file."""
    import dns.message
    import dns.query
    from dnslib.server import DNSServer

    from tests.dnsserver import TestZoneResolver, _QuietLogger

    resolver = TestZoneResolver(Path(zone_file).read_text())
    servers = [
        DNSServer(resolver, address="127.0.0.1", port=53, tcp=tcp, logger=_QuietLogger()) for tcp in (False, True)
    ]
    for server in servers:
        server.start_thread()
    query = dns.message.make_query("example.", "SOA")
    for _ in range(100):
        try:
            dns.query.udp(query, "127.0.0.1", port=53, timeout=0.1)
            break
        except Exception:
            time.sleep(0.02)
    statuses = []
    for name in files:
        with open(name, "rb") as message:
            statuses.append(subprocess.run([TESTMSG], stdin=message, capture_output=True, timeout=30).returncode)
    for server in servers:
        server.stop()
    return statuses


if __name__ == "__main__":
    print(json.dumps(_serve_and_verify(sys.argv[1], sys.argv[2:])))
