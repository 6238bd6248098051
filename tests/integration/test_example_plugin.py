"""The example plugin package: installed with pip, found through its entry point, and
refusing a message in a real session."""

from __future__ import annotations

import smtplib
import subprocess
import sys
from pathlib import Path

from tests.processes import ROOT, free_port, gateway_env, start_gateway, stop_gateway

EXAMPLE = ROOT / "examples" / "gateway-subject-filter"


def test_example_plugin_installs_and_refuses(tmp_path: Path) -> None:
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(EXAMPLE)],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr
    port = free_port()
    policy = tmp_path / "policy.toml"
    policy.write_text(f"""
[server]
queue_dir = "{tmp_path / 'queue'}"
var_dir = "{tmp_path / 'var'}"
[[listeners]]
name = "smtp"
port = {port}
tls = "none"
[delivery]
enabled = false
[[plugins]]
name = "rcpt_relay"
[[plugins]]
name = "rcpt_local_users"
[[plugins]]
name = "data_subject_filter"
blocked = ["lottery"]
""")
    env = gateway_env(site)
    check = subprocess.run([sys.executable, "-m", "gateway.cli", "check", str(policy)],
                           capture_output=True, text=True, env=env, timeout=60)
    assert check.returncode == 0, check.stderr
    assert "data_subject_filter" in check.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(policy.read_text().replace('blocked = ["lottery"]', 'blocked = ["lottery"]\nblockd = 1'))
    typo = subprocess.run([sys.executable, "-m", "gateway.cli", "check", str(bad)],
                          capture_output=True, text=True, env=env, timeout=60)
    assert typo.returncode == 2 and "plugins[2].blockd" in typo.stderr

    proc = start_gateway(policy, port, env=env)
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo()
            client.mail("a@example.org")
            client.rcpt("postmaster@localhost")
            assert client.data(b"Subject: You won the LOTTERY\r\n\r\nx\r\n") == (550, b"5.7.1 Message refused by content policy")
            client.mail("a@example.org")
            client.rcpt("postmaster@localhost")
            assert client.data(b"Subject: minutes\r\n\r\nx\r\n")[0] == 250
    finally:
        stop_gateway(proc)
