"""Replay of ``mail_spf``: its lookups (made by pyspf in the thread pool) are recorded and
replayed like the asynchronous ones.

A gateway process enforcing SPF captures two real sessions, with the answers of a real
DNS server on loopback: mail from ``pass.spf.test`` (its ``a:`` host is the client) is
accepted, mail from ``fail.spf.test`` (``-all``, the client not listed) is refused at
MAIL FROM. Then the zone turns both around. A replay that answers from the record must
come to the same outcomes without missing a lookup; one that asks the live server sees
the new zone; a lookup cut from the record is missing, or asked live with
``record+live``.
"""

from __future__ import annotations

import asyncio
import json
import smtplib
from pathlib import Path
from typing import Any, Iterator

import pytest

from gateway.app import registry
from gateway.hooks import discover_plugins
from gateway.policy import load_policy_text
from gateway.replay.run import replay_capture
from tests.conftest import MESSAGE
from tests.dnsserver import DnsTestServer
from tests.processes import free_port, start_gateway, stop_gateway, write_policy

ZONE = """
$ORIGIN spf.test.
$TTL 300
@        IN SOA ns.spf.test. hostmaster.spf.test. 1 3600 600 86400 60
pass     IN TXT "v=spf1 a:out.pass.spf.test -all"
out.pass IN A   127.0.0.1
fail     IN TXT "v=spf1 ip4:192.0.2.0/24 -all"
"""
# After the capture: pass.spf.test's host moved away, fail.spf.test lists the client.
LATER_ZONE = """
$ORIGIN spf.test.
$TTL 300
@        IN SOA ns.spf.test. hostmaster.spf.test. 1 3600 600 86400 60
pass     IN TXT "v=spf1 a:out.pass.spf.test -all"
out.pass IN A   192.0.2.1
fail     IN TXT "v=spf1 ip4:127.0.0.0/8 -all"
"""
SPF_FAIL = (550, "5.7.23")  # RFC 7372
PASSING, FAILING = "someone@pass.spf.test", "someone@fail.spf.test"


def policy_text(tmp: Path, port: int, dns_port: int) -> str:
    extra = f'[dns]\nnameservers = ["127.0.0.1:{dns_port}"]\ntimeout = "2s"\n[capture]\nenabled = true\n'
    return write_policy(tmp, port, extra=extra, plugins=("mail_spf", "rcpt_relay", "rcpt_local_users")).read_text()


def send(port: int, sender: str) -> tuple[int, str]:
    """Send MESSAGE from ``sender`` to alice; the reply to MAIL FROM."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test.example", timeout=10) as client:
        client.ehlo()
        code, text = client.mail(sender)
        if code == 250:
            assert client.rcpt("alice@localhost")[0] == 250
            assert client.data(MESSAGE)[0] == 250
        return code, text.decode()


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsTestServer]:
    with DnsTestServer(ZONE) as server:
        yield server


@pytest.fixture(scope="module")
def recorded(dns: DnsTestServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """The policy and the capture directory of the two sessions; the zone changed since."""
    tmp = tmp_path_factory.mktemp("spf-capture")
    port = free_port()
    text = policy_text(tmp, port, dns.port)
    proc = start_gateway(tmp / "policy.toml", port)
    try:
        assert send(port, PASSING)[0] == 250
        code, reply = send(port, FAILING)
        assert (code, reply.split()[0]) == SPF_FAIL
    finally:
        assert stop_gateway(proc) == 0  # the capture is written by the time it exits
    dns.set_zone(LATER_ZONE)
    return text, tmp / "var" / "capture"


def replay(text: str, directory: Path, **options: Any) -> dict[str, Any]:
    specs = discover_plugins()
    policy = load_policy_text(text, source="policy.toml", registry=registry(specs))
    return asyncio.run(replay_capture(policy, specs, [directory], **options)).to_dict()


def test_the_capture_holds_the_spf_lookups(recorded: tuple[str, Path]) -> None:
    _, directory = recorded
    records = [json.loads(line) for path in sorted(directory.glob("*.jsonl")) for line in path.read_text().splitlines()]
    lookups = {(r["txns"][0]["mail"], name, rdtype, outcome) for r in records for name, rdtype, outcome, _ in r["dns"]}
    assert lookups == {
        (f"FROM:<{PASSING}>", "pass.spf.test", "TXT", "answer"),
        (f"FROM:<{PASSING}>", "out.pass.spf.test", "A", "answer"),
        (f"FROM:<{FAILING}>", "fail.spf.test", "TXT", "answer"),
    }


def test_the_recorded_answers_give_the_recorded_outcomes(recorded: tuple[str, Path]) -> None:
    text, directory = recorded
    result = replay(text, directory)
    assert result["messages"] == [] and result["damaged"] == []
    assert result["totals"]["unchanged"] == 2
    assert result["totals"]["outcomes"] == {"accept": 1, "reject": 1}
    assert result["dns_not_in_record"] == []


def test_live_dns_sees_the_changed_zone(recorded: tuple[str, Path]) -> None:
    text, directory = recorded
    result = replay(text, directory, dns="live")
    (message,) = result["messages"]
    assert (message["from"], message["change"], message["new"]["plugin"]) == (PASSING, "newly refused", "mail_spf")
    assert message["new"]["reply"].startswith("550 5.7.23 SPF fail: pass.spf.test")
    # fail.spf.test's MAIL FROM passes now, but its session sent nothing after the
    # refusal: no recipient, so still no message (refused), the same outcome.
    assert result["totals"]["outcomes"] == {"reject": 2}


def test_a_lookup_missing_from_the_record_fails_or_goes_live(recorded: tuple[str, Path], tmp_path: Path) -> None:
    text, directory = recorded
    # A capture without pass.spf.test's A answer (as when a session's lookups exceed
    # what capture keeps): replayed from the record alone, the lookup is missing.
    cut = tmp_path / "capture.jsonl"
    records = [json.loads(line) for path in sorted(directory.glob("*.jsonl")) for line in path.read_text().splitlines()]
    for record in records:
        record["dns"] = [entry for entry in record["dns"] if entry[0] != "out.pass.spf.test"]
    cut.write_text("".join(json.dumps(record) + "\n" for record in records))

    only_record = replay(text, cut)
    assert only_record["dns_not_in_record"] == ["out.pass.spf.test A"]
    (message,) = only_record["messages"]  # a timeout: SPF temperror, 451 4.7.24
    assert (message["from"], message["new"]["action"], message["new"]["plugin"]) == (PASSING, "tempfail", "mail_spf")

    # With record+live the missing answer comes from today's zone (192.0.2.1: fail);
    # fail.spf.test is still answered from the record.
    with_live = replay(text, cut, dns="record+live")
    assert with_live["dns_not_in_record"] == []
    (message,) = with_live["messages"]
    assert (message["from"], message["change"], message["new"]["action"]) == (PASSING, "newly refused", "reject")
