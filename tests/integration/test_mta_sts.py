"""MTA-STS (RFC 8461) in remote delivery, against real parts on loopback.

A test DNS server publishes the ``_mta-sts`` TXT records and ``mta-sts.<domain>``; a real
HTTPS server (:class:`tests.testca.PolicyServer`, certificates from a CA made here) serves
the policies on the port ``delivery.mta_sts_https_port`` names; the MX hosts are real SMTP
peers on 127.0.0.1 and 127.0.0.2 with STARTTLS and certificates from the same CA (or a
wrong, expired or self-signed one). Each mode is tested with what it must do, including
the downgrades (STARTTLS stripped or refused, a wrong certificate) that ``enforce`` must
now defer instead of sending in clear.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.delivery.remote import RemoteDeliveryAgent
from gateway.delivery.types import MxRoute, Outcome, SmarthostRoute
from gateway.dns import make_resolver
from gateway.metrics import Counters
from gateway.model import Envelope, QueuedRecipient
from gateway.policy.model import DeliverySettings, Policy
from tests.dnsserver import DnsTestServer, dns_settings
from tests.smtppeer import SmtpPeer, free_port
from tests.testca import PolicyServer, TestCA

HOSTNAME = "gw.test.example"
MESSAGE = b"From: a@src.example\r\nTo: b@dst.example\r\nSubject: sts test\r\n\r\nBody.\r\n"

ZONE = """
$ORIGIN test.example.
$TTL 300
@        IN SOA ns1.test.example. hostmaster.test.example. 1 3600 600 86400 300
@        IN NS  ns1.test.example.
mx1      IN A   127.0.0.1
mx2      IN A   127.0.0.2
sts      IN MX  10 mx1.test.example.
_mta-sts.sts IN TXT "v=STSv1; id=20261205;"
mta-sts.sts  IN A   127.0.0.1
two      IN MX  10 mx1.test.example.
two      IN MX  20 mx2.test.example.
_mta-sts.two IN TXT "v=STSv1; id=1"
mta-sts.two  IN A   127.0.0.1
plain    IN MX  10 mx1.test.example.
xn--bcher-kva IN MX 10 mx1.test.example.
_mta-sts.xn--bcher-kva IN TXT "v=STSv1; id=7;"
mta-sts.xn--bcher-kva  IN A   127.0.0.1
"""

MX_NAMES = ("mx1.test.example", "mx2.test.example")
POLICY_NAMES = ("mta-sts.sts.test.example", "mta-sts.two.test.example", "mta-sts.xn--bcher-kva.test.example")


def policy_text(mode: str, *mx: str, max_age: int = 86400) -> str:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), f"max_age: {max_age}"]
    return "\r\n".join(lines) + "\r\n"


@pytest.fixture
def dns_server() -> Iterator[DnsTestServer]:
    with DnsTestServer(ZONE) as server:
        yield server


@pytest.fixture
def port() -> int:
    return free_port("127.0.0.1", "127.0.0.2")


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "ca")


@pytest.fixture
def https(ca: TestCA) -> Iterator[PolicyServer]:
    with PolicyServer(ca.issue(*POLICY_NAMES)) as server:
        yield server


class Harness:
    """An agent for the test's DNS, HTTPS port and CA, with its counters and cache."""

    def __init__(self, dns_server: DnsTestServer, port: int, https_port: int, ca: TestCA, cache: Path) -> None:
        self.counters = Counters()
        settings = DeliverySettings(
            smtp_port=port, connect_timeout=2.0, command_timeout=5.0, data_timeout=5.0,
            tls="opportunistic", tls_ca_file=ca.ca_file, mta_sts_https_port=https_port, mta_sts_timeout=3.0,
        )
        self.policy = Policy(source="<test>", delivery=settings, dns=dns_settings(dns_server.port, 1.0))
        self.cache = cache

    def agent(self) -> RemoteDeliveryAgent:
        return RemoteDeliveryAgent(
            self.policy, make_resolver(self.policy.dns), hostname=HOSTNAME, counters=self.counters,
            cache_dir=self.cache,
        )

    def deliver(self, route: Any, *addresses: str) -> dict[str, Outcome]:
        agent = self.agent()

        async def main() -> dict[str, Outcome]:
            try:
                rcpts = [QueuedRecipient(a) for a in addresses]
                return await agent.deliver(Envelope("a@src.example", []), rcpts, route, MESSAGE)
            finally:
                await agent.close()

        return asyncio.run(main())


@pytest.fixture
def harness(dns_server: DnsTestServer, port: int, https: PolicyServer, ca: TestCA, tmp_path: Path) -> Harness:
    return Harness(dns_server, port, https.port, ca, tmp_path / "mta-sts")


def status_of(outcomes: dict[str, Outcome]) -> set[tuple[str, int, str]]:
    return {(o.status, o.reply.code, o.reply.status) for o in outcomes.values()}


def mx_peer(port: int, host: str = "127.0.0.1", **kwargs: Any) -> SmtpPeer:
    return SmtpPeer(host=host, port=port, hostname=kwargs.pop("hostname", "mx1.test.example"), **kwargs)


# -- enforce ----------------------------------------------------------------------------------


def test_enforce_delivers_over_verified_tls_and_says_so(
    harness: Harness, https: PolicyServer, ca: TestCA, port: int, caplog: pytest.LogCaptureFixture
) -> None:
    https.policies["sts.test.example"] = policy_text("enforce", "mx1.test.example")
    caplog.set_level(logging.INFO, logger="gateway.delivery.remote")
    with mx_peer(port, tls=True, certificate=ca.issue(*MX_NAMES)) as mx1:
        got = harness.deliver(MxRoute("sts.test.example"), "b@sts.test.example")
        assert got["b@sts.test.example"].status == "delivered"
        assert mx1.messages[0].has_tls
    line = next(r.getMessage() for r in caplog.records if "recipient(s) delivered=1" in r.getMessage())
    assert "tls=TLSv1.3 policy=sts-enforce id=20261205 result=success" in line
    assert https.requests == [("mta-sts.sts.test.example", "/.well-known/mta-sts.txt")]
    assert harness.counters.tls_failures == {}


@pytest.mark.parametrize("downgrade", ["no STARTTLS", "STARTTLS refused"])
def test_enforce_defers_when_starttls_is_stripped(
    harness: Harness, https: PolicyServer, ca: TestCA, port: int, downgrade: str
) -> None:
    https.policies["sts.test.example"] = policy_text("enforce", "mx1.test.example")
    tls = downgrade != "no STARTTLS"
    with mx_peer(port, tls=tls, certificate=ca.issue(*MX_NAMES) if tls else None) as mx1:
        if tls:
            mx1.script("starttls", "454 4.7.0 TLS not available")
        got = harness.deliver(MxRoute("sts.test.example"), "b@sts.test.example")
        assert status_of(got) == {("deferred", 451, "4.7.5")}
        assert "requires verified TLS" in got["b@sts.test.example"].reply.text
        assert mx1.messages == [] and mx1.connections == 1  # no second try in clear
    assert harness.counters.tls_failures == {("sts-enforce", "starttls-not-supported"): 1}


@pytest.mark.parametrize(
    ("certificate", "result"),
    [
        ("wrong name", "certificate-host-mismatch"),
        ("expired", "certificate-expired"),
        ("other CA", "certificate-not-trusted"),
    ],
)
def test_enforce_defers_on_a_bad_certificate(
    harness: Harness, https: PolicyServer, ca: TestCA, port: int, tmp_path: Path, certificate: str, result: str
) -> None:
    https.policies["sts.test.example"] = policy_text("enforce", "mx1.test.example")
    if certificate == "wrong name":
        pair = ca.issue("mail.elsewhere.example")
    elif certificate == "expired":
        pair = ca.issue(*MX_NAMES, expired=True)
    else:
        pair = TestCA(tmp_path / "other", "Other CA").issue(*MX_NAMES)
    with mx_peer(port, tls=True, certificate=pair) as mx1:
        got = harness.deliver(MxRoute("sts.test.example"), "b@sts.test.example")
        assert status_of(got) == {("deferred", 451, "4.7.5")}
        assert mx1.messages == [] and mx1.connections == 1
    assert harness.counters.tls_failures == {("sts-enforce", result): 1}


def test_enforce_goes_only_to_the_mx_hosts_the_policy_names(
    harness: Harness, https: PolicyServer, ca: TestCA, port: int
) -> None:
    pair = ca.issue(*MX_NAMES)
    https.policies["two.test.example"] = policy_text("enforce", "mx2.test.example")
    with mx_peer(port, tls=True, certificate=pair) as mx1, \
            mx_peer(port, "127.0.0.2", tls=True, certificate=pair, hostname="mx2.test.example") as mx2:
        got = harness.deliver(MxRoute("two.test.example"), "b@two.test.example")
        assert got["b@two.test.example"].status == "delivered"
        assert got["b@two.test.example"].remote == "mx2.test.example"
        assert mx1.connections == 0 and len(mx2.messages) == 1
    assert harness.counters.tls_failures == {("sts-enforce", "mx-mismatch"): 1}


def test_enforce_with_a_wrong_mx_policy_defers_without_connecting(
    harness: Harness, https: PolicyServer, ca: TestCA, port: int
) -> None:
    https.policies["sts.test.example"] = policy_text("enforce", "*.elsewhere.example")
    with mx_peer(port, tls=True, certificate=ca.issue(*MX_NAMES)) as mx1:
        got = harness.deliver(MxRoute("sts.test.example"), "b@sts.test.example")
        assert status_of(got) == {("deferred", 451, "4.7.5")}
        assert "not named by the MTA-STS policy" in got["b@sts.test.example"].reply.text
        assert mx1.connections == 0


def test_smarthost_routes_are_not_subject_to_mta_sts(harness: Harness, https: PolicyServer, port: int) -> None:
    https.policies["sts.test.example"] = policy_text("enforce", "mx1.test.example")
    with mx_peer(port) as relay:  # no TLS at all
        got = harness.deliver(SmarthostRoute(host="127.0.0.1", port=port, tls="opportunistic"), "b@sts.test.example")
        assert got["b@sts.test.example"].status == "delivered"
        assert not relay.messages[0].has_tls
    assert https.requests == []


# -- testing ----------------------------------------------------------------------------------


def test_testing_delivers_and_logs_what_enforce_would_refuse(
    harness: Harness, https: PolicyServer, ca: TestCA, port: int, caplog: pytest.LogCaptureFixture
) -> None:
    https.policies["sts.test.example"] = policy_text("testing", "mx1.test.example")
    caplog.set_level(logging.INFO, logger="gateway.delivery.remote")
    with mx_peer(port) as plain:  # STARTTLS stripped
        assert harness.deliver(MxRoute("sts.test.example"), "b@sts.test.example")["b@sts.test.example"].status == "delivered"
        assert not plain.messages[0].has_tls
    with mx_peer(port, tls=True, certificate=ca.issue("mail.elsewhere.example")) as wrong:
        assert harness.deliver(MxRoute("sts.test.example"), "c@sts.test.example")["c@sts.test.example"].status == "delivered"
        assert wrong.messages[0].has_tls  # still encrypted, as opportunistic TLS would
    assert harness.counters.tls_failures == {
        ("sts-testing", "starttls-not-supported"): 1, ("sts-testing", "certificate-host-mismatch"): 1,
    }
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("MTA-STS testing for sts.test.example" in w and "delivering anyway" in w for w in warnings)
    lines = [r.getMessage() for r in caplog.records if "recipient(s) delivered=1" in r.getMessage()]
    assert "tls=none policy=sts-testing id=20261205 result=starttls-not-supported" in lines[0]
    assert "policy=sts-testing id=20261205 result=certificate-host-mismatch" in lines[1]


# -- policy discovery: malformed, unreachable, cached, refreshed ------------------------------


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("this is not a policy\n", "sts-policy-invalid"),
        ("version: STSv1\nmode: enforce\nmax_age: 86400\n", "sts-policy-invalid"),  # no mx
        ("version: STSv1\nmode: strict\nmx: mx1.test.example\nmax_age: 86400\n", "sts-policy-invalid"),
        (None, "sts-policy-fetch-error"),  # 404
    ],
)
def test_a_policy_that_fails_to_parse_is_as_if_none(
    harness: Harness, https: PolicyServer, port: int, caplog: pytest.LogCaptureFixture, body: str | None,
    problem: str,
) -> None:
    if body is not None:
        https.policies["sts.test.example"] = body
    caplog.set_level(logging.INFO, logger="gateway.delivery.remote")
    with mx_peer(port) as plain:
        got = harness.deliver(MxRoute("sts.test.example"), "b@sts.test.example")
        assert got["b@sts.test.example"].status == "delivered"
    assert harness.counters.tls_failures == {("none", problem): 1}
    assert any(
        f"MTA-STS of sts.test.example: {problem}" in r.getMessage() and "as if it had no policy" in r.getMessage()
        for r in caplog.records if r.levelno == logging.WARNING
    )
    assert not list(harness.cache.glob("*.json"))


def test_an_expired_https_certificate_is_no_policy(
    dns_server: DnsTestServer, port: int, ca: TestCA, tmp_path: Path
) -> None:
    with PolicyServer(ca.issue(*POLICY_NAMES, expired=True)) as expired:
        expired.policies["sts.test.example"] = policy_text("enforce", "mx1.test.example")
        harness = Harness(dns_server, port, expired.port, ca, tmp_path / "cache")
        with mx_peer(port) as plain:
            assert harness.deliver(MxRoute("sts.test.example"), "b@sts.test.example")["b@sts.test.example"].status == "delivered"
    assert harness.counters.tls_failures == {("none", "sts-webpki-invalid"): 1}


def test_a_redirect_is_not_followed(harness: Harness, https: PolicyServer, port: int) -> None:
    https.policies["sts.test.example"] = policy_text("enforce", "mx1.test.example")
    https.status = 301
    https.headers["Location"] = f"https://mta-sts.two.test.example:{https.port}/.well-known/mta-sts.txt"
    with mx_peer(port):
        assert harness.deliver(MxRoute("sts.test.example"), "b@sts.test.example")["b@sts.test.example"].status == "delivered"
    assert len(https.requests) == 1
    assert harness.counters.tls_failures == {("none", "sts-policy-fetch-error"): 1}


def test_the_policy_is_cached_on_disk_and_refreshed_when_the_id_changes(
    harness: Harness, https: PolicyServer, dns_server: DnsTestServer, ca: TestCA, port: int
) -> None:
    https.policies["sts.test.example"] = policy_text("enforce", "mx1.test.example")
    with mx_peer(port) as plain:
        assert status_of(harness.deliver(MxRoute("sts.test.example"), "b@sts.test.example")) == {
            ("deferred", 451, "4.7.5")
        }
        assert (harness.cache / "sts.test.example.json").exists()
        # Another agent (a restart, another worker), the HTTPS server now saying 404: the
        # cached policy, same id, still enforces; no new fetch is even tried.
        https.policies.clear()
        assert status_of(harness.deliver(MxRoute("sts.test.example"), "b@sts.test.example")) == {
            ("deferred", 451, "4.7.5")
        }
        assert len(https.requests) == 1
        # RFC 8461 §5.1: a new id whose policy cannot be fetched keeps the cached one.
        dns_server.set_zone(ZONE.replace("id=20261205", "id=2"))
        assert status_of(harness.deliver(MxRoute("sts.test.example"), "b@sts.test.example")) == {
            ("deferred", 451, "4.7.5")
        }
        assert len(https.requests) == 2
        # A new id with a fetchable policy replaces it: mode none now.
        https.policies["sts.test.example"] = policy_text("none")
        dns_server.set_zone(ZONE.replace("id=20261205", "id=3"))
        assert harness.deliver(MxRoute("sts.test.example"), "b@sts.test.example")["b@sts.test.example"].status == "delivered"
        assert len(https.requests) == 3 and len(plain.messages) == 1


def test_a_domain_without_a_record_is_not_fetched(harness: Harness, https: PolicyServer, port: int) -> None:
    with mx_peer(port) as plain:
        assert harness.deliver(MxRoute("plain.test.example"), "b@plain.test.example")["b@plain.test.example"].status == "delivered"
        assert not plain.messages[0].has_tls
    assert https.requests == [] and harness.counters.tls_failures == {}


def test_the_fetch_is_bounded_to_64_kib(harness: Harness, https: PolicyServer, dns_server: DnsTestServer) -> None:
    from gateway.delivery.remote.mta_sts import MAX_POLICY_SIZE, PolicyFetchError, fetch_policy, parse_policy

    resolver = make_resolver(harness.policy.dns)
    base = policy_text("enforce", "mx1.test.example")

    async def fetch() -> str:
        return await fetch_policy(
            "sts.test.example", resolver, port=https.port, ca_file=harness.policy.delivery.tls_ca_file, timeout=3.0
        )

    https.policies["sts.test.example"] = base + "x: " + "y" * (MAX_POLICY_SIZE - len(base) - 4) + "\n"
    assert parse_policy(asyncio.run(fetch())).mode == "enforce"  # exactly 64 KiB: fine
    https.policies["sts.test.example"] += "z"
    with pytest.raises(PolicyFetchError, match="larger than"):
        asyncio.run(fetch())


# -- gateway tls check --------------------------------------------------------------------------


def test_tls_check_prints_the_mx_hosts_the_policy_and_the_verdict(
    dns_server: DnsTestServer, https: PolicyServer, ca: TestCA, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli import main
    from tests.processes import write_policy

    extra = f"""
[dns]
nameservers = ["127.0.0.1:{dns_server.port}"]
timeout = "2s"
[delivery]
tls_ca_file = "{ca.ca_file}"
mta_sts_https_port = {https.port}
"""
    policy = write_policy(tmp_path, free_port(), extra=extra)
    https.policies["two.test.example"] = policy_text("enforce", "mx2.test.example")
    assert main(["tls", "check", "two.test.example", "--policy", str(policy)]) == 0
    out = capsys.readouterr().out
    assert " 10 mx1.test.example [127.0.0.1]" in out and " 20 mx2.test.example [127.0.0.2]" in out
    assert "MTA-STS: id=1 mode=enforce (fetched)" in out
    assert "verdict: mx1.test.example: skip: not named by the policy" in out
    assert "verdict: mx2.test.example: deliver only over STARTTLS with a certificate valid for mx2.test.example" in out
    assert not (tmp_path / "var" / "mta-sts").exists()  # a check writes nothing

    https.policies["sts.test.example"] = policy_text("enforce", "*.elsewhere.example")
    assert main(["tls", "check", "sts.test.example", "--policy", str(policy)]) == 1
    assert "mail would wait (451 4.7.5)" in capsys.readouterr().out

    https.policies["sts.test.example"] = "garbage"
    dns_server.set_zone(ZONE.replace("id=20261205", "id=9"))
    assert main(["tls", "check", "sts.test.example", "--policy", str(policy)]) == 0
    out = capsys.readouterr().out
    assert "MTA-STS: sts-policy-invalid: line 1 is not 'key: value'" in out
    assert "verdict: mx1.test.example: deliver, tls = opportunistic" in out
    assert main(["tls", "check", "plain.test.example", "--policy", str(policy)]) == 0
    assert "MTA-STS: none (no _mta-sts TXT record)" in capsys.readouterr().out


# -- in the running gateway ----------------------------------------------------------------------


def test_the_gateway_holds_mail_for_an_enforce_domain_and_counts_why(
    gateway_factory: Any, dns_server: DnsTestServer, https: PolicyServer, ca: TestCA, port: int
) -> None:
    """The scheduler's agent has the policy cache in var_dir and the process's counters:
    mail to an enforce domain whose MX lost STARTTLS stays queued, and /metrics says why."""
    from tests.conftest import MESSAGE as TEXT
    from tests.conftest import smtp, wait_for
    from tests.metrics import metric_sum

    https.policies["sts.test.example"] = policy_text("enforce", "mx1.test.example")
    policy = f"""
[server]
hostname = "gw.test.example"
[[listeners]]
name = "smtp"
tls = "none"
[local]
domains = ["gw.test.example"]
users = ["postmaster"]
[relay]
clients = ["127.0.0.0/8"]
[dns]
nameservers = ["127.0.0.1:{dns_server.port}"]
timeout = "2s"
[delivery]
smtp_port = {port}
tls_ca_file = "{ca.ca_file}"
mta_sts_https_port = {https.port}
retry_base = "200ms"
retry_max = "500ms"
poll_interval = "200ms"
[metrics]
enabled = true
port = 0
[[plugins]]
name = "rcpt_relay"
"""
    with mx_peer(port) as stripped:  # no STARTTLS: a downgrade
        gw = gateway_factory(policy)
        with smtp(gw.port) as client:
            assert client.sendmail("a@src.example", ["b@sts.test.example"], TEXT) == {}

        def failures() -> float:
            return metric_sum(gw, "gateway_tls_policy_failures_total", {"mode": "sts-enforce", "result": "starttls-not-supported"})

        assert wait_for(lambda: failures() >= 2, timeout=15)  # the first attempt and a retry
        assert stripped.messages == [] and len(gw.queue_ids()) == 1
        assert (Path(gw.policy.server.var_dir) / "mta-sts" / "sts.test.example.json").exists()
        assert len(https.requests) == 1  # the retry used the cached policy


def test_an_internationalized_domain_is_looked_up_by_its_a_labels(
    harness: Harness, https: PolicyServer, port: int
) -> None:
    https.policies["xn--bcher-kva.test.example"] = policy_text("enforce", "mx1.test.example")
    with mx_peer(port) as stripped:
        got = harness.deliver(MxRoute("bücher.test.example"), "b@bücher.test.example")
        assert status_of(got) == {("deferred", 451, "4.7.5")}
        assert stripped.messages == []
    assert https.requests == [("mta-sts.xn--bcher-kva.test.example", "/.well-known/mta-sts.txt")]


def test_a_cached_policy_is_refreshed_before_it_runs_out(harness: Harness, https: PolicyServer, port: int) -> None:
    """RFC 8461 §5.1: a policy a day old (or half its max_age) is fetched again with the same
    id, so a renewed max_age keeps it in force; until then the cache answers."""
    import json
    import time

    https.policies["sts.test.example"] = policy_text("enforce", "mx1.test.example", max_age=604800)
    with mx_peer(port) as stripped:
        harness.deliver(MxRoute("sts.test.example"), "b@sts.test.example")
        harness.deliver(MxRoute("sts.test.example"), "b@sts.test.example")
        assert len(https.requests) == 1
        entry = harness.cache / "sts.test.example.json"
        record = json.loads(entry.read_text())
        record["fetched"] = time.time() - 86400 - 60  # fetched a day ago
        entry.write_text(json.dumps(record))
        https.policies["sts.test.example"] = policy_text("testing", "mx1.test.example", max_age=604800)
        assert harness.deliver(MxRoute("sts.test.example"), "b@sts.test.example")["b@sts.test.example"].status == "delivered"
        assert len(https.requests) == 2 and len(stripped.messages) == 1
        assert json.loads(entry.read_text())["fetched"] > time.time() - 60


# -- the test DNS server is a plain authoritative server --------------------------------------


def test_tlsa_records_from_a_server_that_does_not_validate_are_ignored(
    harness: Harness, dns_server: DnsTestServer, port: int
) -> None:
    """tests/dnsserver.py answers as a non-validating authoritative server does, without AD,
    so ``[dns] dnssec = "auto"`` (loopback) never takes its TLSA records for validated ones:
    a TLSA record that matches nothing must not make mail to a host without STARTTLS wait."""
    dns_server.set_zone(ZONE + f"_{port}._tcp.mx1 IN TLSA 3 1 1 {'ab' * 32}\n")
    with mx_peer(port) as mx1:  # no STARTTLS: DANE would defer (4.7.5)
        got = harness.deliver(MxRoute("plain.test.example"), "b@plain.test.example")
        assert got["b@plain.test.example"].status == "delivered"
        assert not mx1.messages[0].has_tls
    assert harness.counters.tls_failures == {}


# -- background refresh (RFC 8461 §5.1) -------------------------------------------------------


def test_the_master_refreshes_cached_policies_in_the_background(
    harness: Harness, dns_server: DnsTestServer, https: PolicyServer, ca: TestCA, port: int, tmp_path: Path
) -> None:
    """Once a policy is cached, the primary agent looks at it again every mta_sts_refresh
    without any delivery: a new TXT id gets the new policy fetched and cached (and used);
    a refresh that cannot fetch keeps the cached policy in force until it expires."""
    import dataclasses
    import json

    settings = dataclasses.replace(harness.policy.delivery, mta_sts_refresh=0.1)
    policy = dataclasses.replace(harness.policy, delivery=settings)
    agent = RemoteDeliveryAgent(
        policy, make_resolver(policy.dns), hostname=HOSTNAME, counters=harness.counters, cache_dir=harness.cache
    )
    cached = harness.cache / "sts.test.example.json"
    https.policies["sts.test.example"] = policy_text("testing", "mx1.test.example")

    async def until(predicate: Any) -> bool:
        for _ in range(300):  # a bound on the wait, not a speed requirement
            if predicate():
                return True
            await asyncio.sleep(0.05)
        return predicate()

    async def main() -> None:
        try:
            with mx_peer(port, tls=True, certificate=ca.issue(*MX_NAMES)):
                got = await agent.deliver(
                    Envelope("a@src.example", []), [QueuedRecipient("b@sts.test.example")],
                    MxRoute("sts.test.example"), MESSAGE,
                )
            assert got["b@sts.test.example"].status == "delivered"
            assert json.loads(cached.read_text())["id"] == "20261205"
            # The domain publishes a new policy: no mail goes there meanwhile.
            https.policies["sts.test.example"] = policy_text("enforce", "mx2.test.example")
            dns_server.set_zone(ZONE.replace("id=20261205;", "id=2;"))
            assert await until(lambda: json.loads(cached.read_text())["id"] == "2")
            assert "mode: enforce" in json.loads(cached.read_text())["policy"]
            known = await agent.security.policy_for("sts.test.example")
            assert (known.mode, known.policy_id, known.mx) == ("sts-enforce", "2", ("mx2.test.example",))
            # Its server fails now and the id changes again: the cached policy stays in force.
            https.status = 500
            fetches = len(https.requests)
            dns_server.set_zone(ZONE.replace("id=20261205;", "id=3;"))
            assert await until(lambda: len(https.requests) > fetches)
            await asyncio.sleep(0.3)  # more refresh passes, each failing
            assert json.loads(cached.read_text())["id"] == "2"
            known = await agent.security.policy_for("sts.test.example")
            assert (known.mode, known.policy_id) == ("sts-enforce", "2")
        finally:
            await agent.close()

    async def bounded() -> None:
        task = asyncio.ensure_future(main())
        done, _ = await asyncio.wait({task}, timeout=60)
        if not done:
            import io
            out = io.StringIO()
            for t in asyncio.all_tasks():
                t.print_stack(file=out)
            raise AssertionError("HUNG:\n" + out.getvalue())
        task.result()

    asyncio.run(bounded())
    assert https.requests[:2] == [("mta-sts.sts.test.example", "/.well-known/mta-sts.txt")] * 2
