"""Scanners that are not there: ``gateway check --probe`` and the start-up WARNING.

Real clamd, spamd and rspamd (the session's daemons), a real DNS server on loopback,
and closed ports for the daemons that are down.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from gateway.probe import STARTUP_TIMEOUT
from plugins import data_clamav, data_rspamd, data_spamd
from tests.dnsserver import DnsTestServer
from tests.integration.scanners._mail import clean, send, start
from tests.integration.scanners.conftest import Clamd, Rspamd, Spamd
from tests.integration._probe import daemons, probe, probe_policy
from tests.processes import free_port, start_gateway, stop_gateway, write_policy


def test_probe_reports_running_daemons_as_reachable(
    tmp_path: Path, clamd_daemon: Clamd, spamd_daemon: Spamd, rspamd_daemon: Rspamd, scanner_dns: DnsTestServer,
) -> None:
    policy = probe_policy(tmp_path, scanner_dns.port, f"""
[[plugins]]
name = "data_clamav"
address = "{clamd_daemon.socket}"
[[plugins]]
name = "data_spamd"
address = "{spamd_daemon.address}"
[[plugins]]
name = "data_rspamd"
address = "{rspamd_daemon.address}"
""")
    result = probe(policy)
    assert result.returncode == 0, result.stdout + result.stderr
    found = daemons(result)
    assert found[f"clamd at {clamd_daemon.socket}"].startswith("reachable")
    assert found[f"spamd at {spamd_daemon.address}"].startswith("reachable")
    assert found[f"rspamd at {rspamd_daemon.address}"].startswith("reachable")
    assert found[f"DNS resolver at 127.0.0.1:{scanner_dns.port}"].startswith("reachable")


def test_probe_reports_a_closed_port_as_unreachable_and_exits_non_zero(
    tmp_path: Path, clamd_daemon: Clamd, scanner_dns: DnsTestServer,
) -> None:
    closed = f"127.0.0.1:{free_port()}"
    policy = probe_policy(tmp_path, scanner_dns.port, f"""
[[plugins]]
name = "data_clamav"
address = "{clamd_daemon.socket}"
[[plugins]]
name = "data_spamd"
address = "{closed}"
""")
    result = probe(policy)
    assert result.returncode == 1, result.stdout + result.stderr
    found = daemons(result)
    assert found[f"clamd at {clamd_daemon.socket}"].startswith("reachable")
    line = found[f"spamd at {closed}"]
    assert line.startswith("UNREACHABLE") and "(data_spamd)" in line and "cannot connect" in line


def test_probe_tries_a_scanner_an_override_names(tmp_path: Path, scanner_dns: DnsTestServer) -> None:
    closed = f"127.0.0.1:{free_port()}"
    policy = probe_policy(tmp_path, scanner_dns.port, f"""
[[plugins]]
name = "data_clamav"
address = "{tmp_path / 'no-clamd.sock'}"
[[overrides]]
match = {{ listener = "smtp" }}
[overrides.plugins.data_clamav]
address = "{closed}"
""")
    result = probe(policy, 5)
    assert result.returncode == 1
    found = daemons(result)
    assert found[f"clamd at {tmp_path / 'no-clamd.sock'}"].startswith("UNREACHABLE")
    assert found[f"clamd at {closed}"].startswith("UNREACHABLE")


def test_probe_reports_a_dns_server_that_does_not_answer(tmp_path: Path) -> None:
    # Nothing listens on this UDP port: the query goes unanswered until the time limit.
    port = free_port()
    result = probe(probe_policy(tmp_path, port, ""), 1)
    assert result.returncode == 1
    assert daemons(result)[f"DNS resolver at 127.0.0.1:{port}"].startswith("UNREACHABLE")


@pytest.mark.parametrize(
    ("module", "daemon", "reply"),
    [(data_clamav, "clamd", "451 4.7.1"), (data_spamd, "spamd", "451 4.7.1"), (data_rspamd, "rspamd", "451 4.7.1")],
)
def test_start_up_warns_that_every_message_will_be_deferred(gateway_factory, caplog, module, daemon, reply) -> None:
    closed = f"127.0.0.1:{free_port()}"
    with caplog.at_level(logging.WARNING):
        gw = start(gateway_factory, module, address=closed)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == f"plugins.{module.NAME}"]
    assert any(
        f"{daemon} not reachable at {closed}" in w and f"every message will get {reply}" in w for w in warnings
    ), warnings
    # And it is true: the fail-closed default defers the message.
    assert send(gw, clean())[0] == 451


def test_start_up_warns_that_messages_pass_unscanned_when_failing_open(gateway_factory, caplog) -> None:
    closed = f"127.0.0.1:{free_port()}"
    with caplog.at_level(logging.WARNING):
        gw = start(gateway_factory, data_clamav, address=closed, on_scanner_error="continue")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"clamd not reachable at {closed}" in w and "pass unscanned" in w for w in warnings), warnings
    assert send(gw, clean())[0] == 250


def test_gateway_process_logs_the_warning_and_starts(tmp_path: Path) -> None:
    # The operator's view: `gateway run` with clamd down says so in its log, and listens.
    port, closed = free_port(), f"127.0.0.1:{free_port()}"
    policy = write_policy(
        tmp_path, port, plugins=("rcpt_relay", "rcpt_local_users", "data_clamav"),
        extra='[delivery]\nenabled = false\n',
    )
    policy.write_text(policy.read_text() + f'address = "{closed}"\n')
    log = tmp_path / "gateway.log"
    with open(log, "wb") as stderr:
        proc = start_gateway(policy, port, stderr=stderr)
        try:
            text = log.read_text()
        finally:
            assert stop_gateway(proc) == 0
    assert "WARNING" in text and f"clamd not reachable at {closed}" in text, text
    assert "every message will get 451 4.7.1" in text


def test_start_up_waits_for_a_hung_scanner_only_briefly(gateway_factory, caplog) -> None:
    # A daemon that accepts and never answers: start-up gives up after its own short
    # limit (STARTUP_TIMEOUT), not after the plugin's scan_timeout of 20 s.
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        address = f"127.0.0.1:{hung.getsockname()[1]}"
        with caplog.at_level(logging.WARNING):
            start(gateway_factory, data_clamav, address=address, scan_timeout="20s")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        f"clamd not reachable at {address} (no answer within {STARTUP_TIMEOUT:g}s)" in w for w in warnings
    ), warnings
