"""A Dovecot that is not there: ``gateway check --probe`` and the start-up WARNING."""

from __future__ import annotations

import logging
from pathlib import Path

from tests.conftest import BASE_POLICY
from tests.dnsserver import DnsTestServer
from tests.integration._probe import ZONE, daemons, probe, probe_policy
from tests.integration.dovecot.conftest import Dovecot
from tests.processes import free_port


def test_probe_reports_dovecot_reachable_and_a_closed_port_unreachable(tmp_path: Path, dovecot: Dovecot) -> None:
    closed = f"127.0.0.1:{free_port()}"
    with DnsTestServer(ZONE) as dns:
        policy = probe_policy(tmp_path, dns.port, f"""
[[plugins]]
name = "auth_dovecot"
address = "{dovecot.auth_socket}"
[[plugins]]
name = "auth_users_file"
[[plugins]]
name = "rcpt_dovecot_users"
address = "{dovecot.userdb_socket}"
[[overrides]]
match = {{ listener = "smtp" }}
[overrides.plugins.auth_dovecot]
address = "{closed}"
""")
        result = probe(policy)
    assert result.returncode == 1, result.stdout + result.stderr
    found = daemons(result)
    line = found[f"Dovecot auth at {dovecot.auth_socket}"]
    assert line.startswith("reachable") and "PLAIN" in line
    assert found[f"Dovecot auth at {closed}"].startswith("UNREACHABLE")
    line = found[f"Dovecot auth-userdb at {dovecot.userdb_socket}"]
    assert line.startswith("reachable") and "(rcpt_dovecot_users)" in line


def test_start_up_warns_what_a_missing_dovecot_means(gateway_factory, caplog) -> None:
    closed = f"127.0.0.1:{free_port()}"
    with caplog.at_level(logging.WARNING):
        gateway_factory(BASE_POLICY + f'[[plugins]]\nname = "auth_dovecot"\naddress = "{closed}"\n')
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        w.startswith(f"auth_dovecot: Dovecot auth not reachable at {closed}")
        and 'every AUTH will get the on_dovecot_error answer ("tempfail")' in w
        for w in warnings
    ), warnings
