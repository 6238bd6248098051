"""A Redis state store that is not there: ``gateway check --probe`` and the start-up WARNING."""

from __future__ import annotations

import logging
from pathlib import Path

from tests.conftest import smtp
from tests.dnsserver import DnsTestServer
from tests.integration._probe import ZONE, daemons, probe, probe_policy
from tests.integration.state._policy import policy, specs
from tests.processes import free_port


def test_probe_reports_redis_reachable_and_a_closed_port_unreachable(tmp_path: Path, redis_url: str) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"
    with DnsTestServer(ZONE) as dns:
        running = probe_policy(tmp_path, dns.port, f'[[plugins]]\nname = "rcpt_greylist"\nstate = "{redis_url}"\n')
        result = probe(running)
        assert result.returncode == 0, result.stdout + result.stderr
        served = redis_url.split("?", 1)[0]  # the timeout parameter is ours, not an address
        line = daemons(result)[f"Redis at {served}"]
        assert line.startswith("reachable") and "(rcpt_greylist)" in line and "PONG" in line

        down = probe_policy(tmp_path, dns.port, f"""
[[plugins]]
name = "rcpt_greylist"
state = "{closed}"
[[plugins]]
name = "mail_rate_limit"
state = "{closed}"
""")
        result = probe(down)
    assert result.returncode == 1
    # One line for one server, naming both plugins that use it.
    assert daemons(result)[f"Redis at {closed}"].startswith(f"UNREACHABLE Redis at {closed} (rcpt_greylist, mail_rate_limit)")


def test_start_up_warns_what_a_missing_redis_means_for_each_plugin(gateway_factory, caplog) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"
    with caplog.at_level(logging.WARNING):
        gw = gateway_factory(
            policy(
                f'name = "rcpt_greylist"\nstate = "{closed}"',
                f'name = "mail_rate_limit"\nstate = "{closed}"\nmessages_per_ip = 100\non_state_error = "tempfail"',
            ),
            specs=specs(),
        )
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        w.startswith(f"rcpt_greylist: Redis not reachable at {closed}") and "skipped" in w for w in warnings
    ), warnings
    assert any(
        w.startswith(f"mail_rate_limit: Redis not reachable at {closed}") and "temporary failure" in w
        for w in warnings
    ), warnings
    # As warned: mail_rate_limit fails closed at MAIL.
    with smtp(gw.port) as client:
        client.ehlo()
        assert client.mail("a@example.org")[0] == 451


def test_probe_tries_the_redis_of_dmarc_reports(tmp_path: Path) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"
    with DnsTestServer(ZONE) as dns:
        down = probe_policy(
            tmp_path, dns.port, f'[[plugins]]\nname = "data_dmarc"\naggregate_reports = true\nstate = "{closed}"\n'
        )
        result = probe(down)
    assert result.returncode == 1
    assert daemons(result)[f"Redis at {closed}"].startswith(f"UNREACHABLE Redis at {closed} (data_dmarc)")
