"""clamd, spamd and rspamd scan one message at the same time (the scanners' hooks are
gateway.hooks.independent), through a real SMTP session against the real daemons, and the
outcome is the chain's: the first verdict in chain order, headers stacked in chain order."""

from __future__ import annotations

from typing import Iterator

import pytest

from plugins import data_clamav, data_rspamd, data_spamd
from tests.conftest import BASE_POLICY, plugin_specs
from tests.integration.scanners._mail import clean, eicar_attached, queued, send
from tests.integration.scanners._proxy import HoldingProxy
from tests.integration.scanners.conftest import Clamd, Rspamd, Spamd

HOLD = 0.4  # each daemon's answer is held back this long by its proxy


@pytest.fixture
def proxies(clamd_daemon: Clamd, spamd_daemon: Spamd, rspamd_daemon: Rspamd) -> Iterator[dict[str, HoldingProxy]]:
    made = {
        "data_clamav": HoldingProxy(("127.0.0.1", clamd_daemon.port), HOLD),
        "data_spamd": HoldingProxy(("127.0.0.1", spamd_daemon.port), HOLD),
        "data_rspamd": HoldingProxy(("127.0.0.1", rspamd_daemon.port), HOLD),
    }
    yield made
    for proxy in made.values():
        proxy.close()


def three_scanners(gateway_factory, proxies: dict[str, HoldingProxy], **extra: str):
    chain = "".join(
        f'\n[[plugins]]\nname = "{name}"\naddress = "{proxy.address}"\n{extra.get(name, "")}\n'
        for name, proxy in proxies.items()
    )
    specs = plugin_specs(data_clamav=data_clamav, data_spamd=data_spamd, data_rspamd=data_rspamd)
    return gateway_factory(BASE_POLICY + chain, specs=specs)


def _scans(proxies: dict[str, HoldingProxy]) -> dict[str, tuple[float, float]]:
    """Each daemon's message scan: (the gateway connected, the answer went back)."""
    found = {}
    for name, proxy in proxies.items():
        scans = [e for e in proxy.exchanges if e.answered is not None][-1:]  # the start-up pings came first
        (scan,) = scans
        assert scan.answered is not None
        found[name] = (scan.connected, scan.answered)
    return found


def test_the_three_daemons_scan_one_message_at_the_same_time(gateway_factory, proxies) -> None:
    gw = three_scanners(gateway_factory, proxies, data_clamav="add_header = true")
    for proxy in proxies.values():
        proxy.exchanges.clear()  # the start-up probes
    assert send(gw, clean())[0] == 250
    scans = _scans(proxies)
    # Every daemon had the message before any of them answered: the intervals overlap.
    latest_start = max(connected for connected, _ in scans.values())
    earliest_answer = min(answered for _, answered in scans.values())
    assert latest_start < earliest_answer, scans
    # The changes are the chain's, in its order: clamav's header, then spamd's, then
    # rspamd's X-Spam-Status above it (each prepends).
    msg = queued(gw)
    statuses = msg.get_all("X-Spam-Status")
    assert len(statuses) == 2 and "action=" in statuses[0] and "action=" not in statuses[1]
    assert msg["X-Virus-Scanned"] == "ClamAV at mx.test.example"
    names = [name.lower() for name in msg.keys()]
    assert names.index("x-spam-status") < names.index("x-virus-scanned")


def test_a_virus_stops_the_chain_though_the_spam_scanners_were_running(gateway_factory, proxies) -> None:
    gw = three_scanners(gateway_factory, proxies)
    for proxy in proxies.values():
        proxy.exchanges.clear()
    code, text = send(gw, eicar_attached())
    assert code == 554 and text.startswith("5.7.1 Virus found: ")
    assert gw.queue_ids() == [] and gw.queue_ids("quarantine") == []
    # spamd and rspamd had been asked (in parallel) and were dropped unanswered or ignored.
    assert all(proxy.exchanges for proxy in proxies.values())
