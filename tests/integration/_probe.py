"""``gateway check --probe`` as an operator runs it, for the daemon tests that use it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.integration.test_cli import gateway

__all__ = ["ZONE", "daemons", "probe", "probe_policy"]

#: Enough for a DNS server to answer the probe's query.
ZONE = """
$ORIGIN test.example.
@ IN SOA ns1.test.example. hostmaster.test.example. 1 3600 600 86400 300
"""


def probe_policy(tmp_path: Path, dns_port: int, entries: str) -> Path:
    """A policy file with state under ``tmp_path``, the test DNS server as its resolver
    (never the host's), then ``entries`` (TOML: plugins, overrides)."""
    path = tmp_path / "probe.toml"
    path.write_text(
        f'[server]\nvar_dir = "{tmp_path / "var"}"\nqueue_dir = "{tmp_path / "queue"}"\n'
        f'[dns]\nnameservers = ["127.0.0.1:{dns_port}"]\n{entries}'
    )
    return path


def probe(policy: Path, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """``gateway check --probe --probe-timeout <timeout> <policy>``."""
    return gateway("check", "--probe", "--probe-timeout", str(timeout), str(policy))


def daemons(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """``<daemon> at <address>`` -> its whole line, from the ``daemons:`` section."""
    lines = result.stdout.split("daemons:\n", 1)[1].splitlines()
    return {line.split(" (", 1)[0].split(None, 1)[1]: line.strip() for line in lines}
