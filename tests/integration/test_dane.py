"""DANE (RFC 7672) in remote delivery, against real parts on loopback.

A zone signed here (``dane.example``) is served by one unbound and validated by another
(:class:`tests.dnssec.DnssecLab`, started once per session), which the gateway asks as
its resolver (on loopback, so ``[dns] dnssec = "auto"`` trusts its AD bit). The zone
publishes TLSA records for MX hosts on 127.0.0.2-10: DANE-EE (3 1 1) for a certificate
nothing else would accept, DANE-TA (2 0 1) for a test CA, records that match nothing,
records whose signature was broken or has expired, PKIX-only records, and MX hosts that
are aliases (CNAMEs) with records at their target, their own name, or both; an unsigned
zone (``unsigned.example``) publishes a TLSA record that must be ignored. The MX hosts are
real SMTP peers with STARTTLS and certificates made here.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.delivery.remote import RemoteDeliveryAgent
from gateway.delivery.types import MxRoute, Outcome
from gateway.dns import make_resolver
from gateway.metrics import Counters
from gateway.model import Envelope, QueuedRecipient
from gateway.policy.model import DeliverySettings, DnsSettings, Policy, RouteSettings
from tests.dnssec import DnssecLab, has_tools
from tests.smtppeer import SmtpPeer, free_port
from tests.testca import PolicyServer, TestCA

HOSTNAME = "gw.test.example"
MESSAGE = b"From: a@src.example\r\nTo: b@dst.example\r\nSubject: dane test\r\n\r\nBody.\r\n"

ADDRESS = {
    "mx-ee": "127.0.0.2",
    "mx-ta": "127.0.0.3",
    "mx-ta-name": "127.0.0.4",
    "mx-wrong": "127.0.0.5",
    "mx-bogus": "127.0.0.6",
    "mx-expired": "127.0.0.7",
    "mx-notlsa": "127.0.0.8",
    "mx.unsigned.example": "127.0.0.9",
    "mx-unusable": "127.0.0.10",
    # the targets of MX hosts that are aliases (RFC 7672 §2.2.2)
    "mx-target": "127.0.0.11",
    "mx-wtarget": "127.0.0.12",
    "mx-itarget": "127.0.0.13",
    "mx-tatarget": "127.0.0.14",
}

DEFERRED = ("deferred", 451, "4.7.5")


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def spki_sha256(path: Path) -> str:
    spki = _cert(path).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def cert_sha256(path: Path) -> str:
    return hashlib.sha256(_cert(path).public_bytes(serialization.Encoding.DER)).hexdigest()


def with_chain(pair: tuple[Path, Path], ca: TestCA) -> tuple[Path, Path]:
    """The certificate file followed by the CA's: the server presents both (RFC 7672 §3.1.2)."""
    chained = pair[0].with_suffix(".chain.pem")
    chained.write_bytes(pair[0].read_bytes() + ca.ca_file.read_bytes())
    return chained, pair[1]


@dataclass
class World:
    lab: DnssecLab
    port: int  # the MX hosts' SMTP port, in the TLSA names (_<port>._tcp.<host>)
    ca: TestCA
    certs: dict[str, tuple[Path, Path]]


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    if not has_tools():
        pytest.skip("unbound or bind9-utils is not installed (scripts/install-system-deps.sh)")
    base = tmp_path_factory.mktemp("dane")
    port = free_port(*ADDRESS.values())
    ca = TestCA(base / "ca")
    other = TestCA(base / "other", "Other CA")
    certs = {
        # DANE-EE: a certificate no PKIX client would take (expired, wrong name, unknown CA).
        "ee": other.issue("unrelated.example", expired=True),
        "ta": with_chain(ca.issue("mx-ta.dane.example"), ca),
        "ta-name": with_chain(ca.issue("elsewhere.example"), ca),
        "ta-target": with_chain(ca.issue("mx-tatarget.dane.example"), ca),
        "valid": ca.issue(*(f"{h}.dane.example" for h in ADDRESS if h.startswith("mx-")), "mx.unsigned.example"),
    }
    stranger = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    ee, ta, nobody = spki_sha256(certs["ee"][0]), cert_sha256(ca.ca_file), hashlib.sha256(stranger).hexdigest()
    t = f"_{port}._tcp"
    zone = f"""$ORIGIN dane.example.
$TTL 300
@ IN SOA ns1.dane.example. hostmaster.dane.example. 1 3600 600 86400 300
@ IN NS ns1.dane.example.
ns1 IN A 127.0.0.1
ee IN MX 10 mx-ee.dane.example.
ta IN MX 10 mx-ta.dane.example.
ta-name IN MX 10 mx-ta-name.dane.example.
wrong IN MX 10 mx-wrong.dane.example.
bogus IN MX 10 mx-bogus.dane.example.
expired IN MX 10 mx-expired.dane.example.
notlsa IN MX 10 mx-notlsa.dane.example.
unusable IN MX 10 mx-unusable.dane.example.
sts IN MX 10 mx-ee.dane.example.
sts IN MX 20 mx-notlsa.dane.example.
_mta-sts.sts IN TXT "v=STSv1; id=1;"
mta-sts.sts IN A 127.0.0.1
{t}.mx-ee IN TLSA 3 1 1 {ee}
{t}.mx-ta IN TLSA 2 0 1 {ta}
{t}.mx-ta-name IN TLSA 2 0 1 {ta}
{t}.mx-wrong IN TLSA 3 1 1 {nobody}
{t}.mx-bogus IN TLSA 3 1 1 {ee}
{t}.mx-expired IN TLSA 3 1 1 {ee}
{t}.mx-unusable IN TLSA 1 1 1 {ee}
alias IN MX 10 mx-alias.dane.example.
mx-alias IN CNAME mx-target.dane.example.
{t}.mx-target IN TLSA 3 1 1 {ee}
walias IN MX 10 mx-walias.dane.example.
mx-walias IN CNAME mx-wtarget.dane.example.
{t}.mx-wtarget IN TLSA 3 1 1 {nobody}
{t}.mx-walias IN TLSA 3 1 1 {ee}
ialias IN MX 10 mx-ialias.dane.example.
mx-ialias IN CNAME mx-itarget.dane.example.
{t}.mx-ialias IN TLSA 3 1 1 {ee}
taalias IN MX 10 mx-taalias.dane.example.
mx-taalias IN CNAME mx-tatarget.dane.example.
{t}.mx-tatarget IN TLSA 2 0 1 {ta}
""" + "".join(f"{h} IN A {a}\n" for h, a in ADDRESS.items() if h.startswith("mx-"))
    unsigned = f"""$ORIGIN unsigned.example.
$TTL 300
@ IN SOA ns1.unsigned.example. hostmaster.unsigned.example. 1 3600 600 86400 300
@ IN NS ns1.unsigned.example.
ns1 IN A 127.0.0.1
@ IN MX 10 mx.unsigned.example.
mx IN A {ADDRESS["mx.unsigned.example"]}
{t}.mx IN TLSA 3 1 1 {nobody}
"""
    lab = DnssecLab(base / "dns")
    lab.sign(
        "dane.example", zone,
        bad_signature=(f"{t}.mx-bogus.dane.example",), expired=(f"{t}.mx-expired.dane.example",),
    )
    lab.serve("unsigned.example", unsigned)
    with lab:
        yield World(lab, port, ca, certs)


class Harness:
    """An agent asking the validating unbound, with its counters."""

    def __init__(
        self, world: World, *, dnssec: Any = "auto", dane: Any = "dane", routes: Any = (), https_port: int = 0
    ) -> None:
        self.counters = Counters()
        sts: dict[str, Any] = {"mta_sts": False}
        if https_port:
            sts = {"mta_sts_https_port": https_port, "tls_ca_file": world.ca.ca_file, "mta_sts_timeout": 3.0}
        settings = DeliverySettings(
            smtp_port=world.port, connect_timeout=2.0, command_timeout=5.0, data_timeout=5.0,
            tls="opportunistic", dane=dane, **sts,
        )
        dns = DnsSettings(nameservers=(f"127.0.0.1:{world.lab.port}",), timeout=3.0, dnssec=dnssec)
        self.policy = Policy(source="<test>", delivery=settings, dns=dns, routes=tuple(routes))

    def deliver(self, domain: str) -> Outcome:
        agent = RemoteDeliveryAgent(
            self.policy, make_resolver(self.policy.dns), hostname=HOSTNAME, counters=self.counters,
            cache_dir=None,
        )

        async def main() -> dict[str, Outcome]:
            try:
                rcpt = QueuedRecipient(f"b@{domain}")
                return await agent.deliver(Envelope("a@src.example", []), [rcpt], MxRoute(domain), MESSAGE)
            finally:
                await agent.close()

        return asyncio.run(main())[f"b@{domain}"]


def peer(world: World, host: str, certificate: str | None = "valid", **kwargs: Any) -> SmtpPeer:
    name = host if "." in host else f"{host}.dane.example"
    pair = world.certs[certificate] if certificate else None
    return SmtpPeer(host=ADDRESS[host], port=world.port, hostname=name, tls=pair is not None, certificate=pair, **kwargs)


def status(outcome: Outcome) -> tuple[str, int, str]:
    return outcome.status, outcome.reply.code, outcome.reply.status


# -- DNSSEC-valid TLSA records that match ---------------------------------------------------------


def delivered_by_dane(world: World, caplog: pytest.LogCaptureFixture, domain: str, host: str, certificate: str) -> None:
    """Mail for ``domain`` reaches ``host`` (serving ``certificate``) over TLS that its
    TLSA record authenticated, and the delivery's log line says so."""
    harness = Harness(world)
    caplog.set_level(logging.INFO, logger="gateway.delivery.remote")
    with peer(world, host, certificate) as mx:
        got = harness.deliver(domain)
        assert got.status == "delivered", got.reply
        assert mx.messages[0].has_tls
    line = next(r.getMessage() for r in caplog.records if "recipient(s) delivered=1" in r.getMessage())
    assert "policy=dane tlsa=1 result=success" in line
    assert harness.counters.tls_failures == {}


def test_dane_ee_authenticates_the_key_alone_and_the_log_says_so(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    # Expired, for another name, from an unknown CA: DANE-EE checks none of that (RFC 7672 §3.1.1).
    delivered_by_dane(world, caplog, "ee.dane.example", "mx-ee", "ee")


def test_dane_ta_accepts_a_chain_to_the_published_ca(world: World) -> None:
    harness = Harness(world)
    with peer(world, "mx-ta", "ta") as mx:
        assert harness.deliver("ta.dane.example").status == "delivered"
        assert mx.messages[0].has_tls
    assert harness.counters.tls_failures == {}


@pytest.mark.parametrize(("domain", "host", "certificate"), [
    ("alias.dane.example", "mx-target", "ee"),  # DANE-EE at the target
    ("ialias.dane.example", "mx-itarget", "ee"),  # none at the target: the alias's own
    ("taalias.dane.example", "mx-tatarget", "ta-target"),  # DANE-TA, a certificate for the target's name
], ids=["records at the target", "records at the alias only", "DANE-TA for the expanded name"])
def test_an_mx_host_that_is_an_alias_is_authenticated_by_its_targets_records_or_its_own(
    world: World, caplog: pytest.LogCaptureFixture, domain: str, host: str, certificate: str
) -> None:
    """RFC 7672 §2.2.2: mx-*alias is a CNAME for its target: TLSA records at the fully
    expanded name first, then at the alias; both names identify the host for DANE-TA."""
    delivered_by_dane(world, caplog, domain, host, certificate)


def test_the_targets_records_come_before_the_alias_own(world: World) -> None:
    """mx-walias's own TLSA record would take the certificate; its target's, first in
    line, names another key: the mail waits rather than go over TLS they do not vouch for."""
    harness = Harness(world)
    with peer(world, "mx-wtarget", "ee") as mx:
        got = harness.deliver("walias.dane.example")
        assert status(got) == DEFERRED
        assert mx.messages == [] and mx.connections == 1
    assert harness.counters.tls_failures == {("dane", "tlsa-invalid"): 1}


def test_dane_ta_defers_a_certificate_that_does_not_name_the_mx_host(world: World) -> None:
    harness = Harness(world)
    with peer(world, "mx-ta-name", "ta-name") as mx:
        got = harness.deliver("ta-name.dane.example")
        assert status(got) == DEFERRED
        assert "DANE" in got.reply.text
        assert mx.messages == [] and mx.connections == 1
    assert harness.counters.tls_failures == {("dane", "certificate-host-mismatch"): 1}


# -- downgrades: never in clear, never over TLS the records do not authenticate ------------------


def test_a_certificate_matching_no_tlsa_record_defers(world: World) -> None:
    harness = Harness(world)
    # A certificate any PKIX client would accept for the name; the TLSA record names another key.
    with peer(world, "mx-wrong") as mx:
        got = harness.deliver("wrong.dane.example")
        assert status(got) == DEFERRED
        assert "require authenticated TLS" in got.reply.text
        assert mx.messages == [] and mx.connections == 1  # no second try in clear
    assert harness.counters.tls_failures == {("dane", "tlsa-invalid"): 1}


@pytest.mark.parametrize("downgrade", ["no STARTTLS", "STARTTLS refused"])
def test_starttls_stripped_at_a_host_with_tlsa_records_defers(world: World, downgrade: str) -> None:
    harness = Harness(world)
    tls = downgrade != "no STARTTLS"
    with peer(world, "mx-ee", "ee" if tls else None) as mx:
        if tls:
            mx.script("starttls", "454 4.7.0 TLS not available")
        got = harness.deliver("ee.dane.example")
        assert status(got) == DEFERRED
        assert mx.messages == [] and mx.connections == 1
    assert harness.counters.tls_failures == {("dane", "starttls-not-supported"): 1}


@pytest.mark.parametrize("broken", ["bogus", "expired"])
def test_bogus_tlsa_records_defer_without_connecting(world: World, broken: str) -> None:
    """A TLSA RRset whose signature does not verify (altered, or expired RRSIG): the
    validator answers SERVFAIL, and the host's TLS requirement is unknown."""
    harness = Harness(world)
    with peer(world, f"mx-{broken}", "ee") as mx:
        got = harness.deliver(f"{broken}.dane.example")
        assert status(got) == DEFERRED
        assert "dnssec-invalid" in got.reply.text
        assert mx.connections == 0
    assert harness.counters.tls_failures == {("dane", "dnssec-invalid"): 1}


def test_dane_takes_precedence_over_mta_sts(world: World, tmp_path: Path) -> None:
    """RFC 8461 §2: an MX host with usable TLSA records gets DANE, although the domain's
    MTA-STS enforce policy does not name it; the host without them still gets MTA-STS."""
    with PolicyServer(world.ca.issue("mta-sts.sts.dane.example")) as https:
        https.policies["sts.dane.example"] = "version: STSv1\r\nmode: enforce\r\nmx: other.example\r\nmax_age: 86400\r\n"
        harness = Harness(world, https_port=https.port)
        with peer(world, "mx-ee", "ee") as mx:
            assert harness.deliver("sts.dane.example").status == "delivered"
            assert mx.messages[0].has_tls
        # Without its DANE host the domain's MTA-STS policy decides: mx-notlsa is not named.
        with peer(world, "mx-notlsa") as mx:
            got = harness.deliver("sts.dane.example")
            assert status(got) == DEFERRED
            assert mx.connections == 0
        assert harness.counters.tls_failures == {("sts-enforce", "mx-mismatch"): 1}


# -- where DANE does not apply ---------------------------------------------------------------------


def test_tlsa_records_of_an_unsigned_zone_are_ignored(world: World) -> None:
    harness = Harness(world)
    # The unsigned zone's TLSA record matches nothing; unvalidated, it must not matter.
    with peer(world, "mx.unsigned.example") as mx:
        assert harness.deliver("unsigned.example").status == "delivered"
        assert mx.messages[0].has_tls
    assert harness.counters.tls_failures == {}


def test_without_a_trusted_resolver_tlsa_records_are_not_used(world: World) -> None:
    harness = Harness(world, dnssec="off")
    with peer(world, "mx-wrong") as mx:
        assert harness.deliver("wrong.dane.example").status == "delivered"
        assert mx.messages[0].has_tls
    assert harness.counters.tls_failures == {}


def test_a_secure_host_without_tlsa_records_gets_the_configured_tls(world: World) -> None:
    harness = Harness(world)
    with peer(world, "mx-notlsa", None) as mx:  # no STARTTLS at all: tls = "opportunistic"
        assert harness.deliver("notlsa.dane.example").status == "delivered"
        assert not mx.messages[0].has_tls


@pytest.mark.parametrize("dnssec", ["auto", "off"])
def test_dane_only_defers_a_host_without_secure_tlsa_records(world: World, dnssec: str) -> None:
    route = RouteSettings(domain=".dane.example", dane="dane-only")
    harness = Harness(world, dnssec=dnssec, routes=[route])
    with peer(world, "mx-notlsa") as mx:
        got = harness.deliver("notlsa.dane.example")
        assert status(got) == DEFERRED
        assert "dane-required" in got.reply.text
        assert mx.connections == 0
    assert harness.counters.tls_failures == {("dane-only", "dane-required"): 1}
    # The route is for its domain only: elsewhere the default (dane) applies.
    with peer(world, "mx.unsigned.example") as mx:
        assert harness.deliver("unsigned.example").status == "delivered"


def test_only_unusable_tlsa_records_still_require_tls(world: World) -> None:
    """PKIX-EE(1) is unusable for SMTP (RFC 7672 §3.1.3), but published TLSA records
    still mean encryption is required (§2.2): no clear text, no authentication."""
    harness = Harness(world)
    with peer(world, "mx-unusable", None) as mx:
        assert status(harness.deliver("unusable.dane.example")) == DEFERRED
        assert mx.messages == []
    with peer(world, "mx-unusable", "ee") as mx:
        assert harness.deliver("unusable.dane.example").status == "delivered"
        assert mx.messages[0].has_tls


# -- gateway tls check ---------------------------------------------------------------------------


def test_tls_check_shows_the_tlsa_records_their_state_and_the_verdict(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli import main
    from tests.processes import write_policy

    extra = f"""
[dns]
nameservers = ["127.0.0.1:{world.lab.port}"]
timeout = "3s"
[delivery]
smtp_port = {world.port}
mta_sts = false
"""
    policy = write_policy(tmp_path, free_port(), extra=extra)
    t = f"_{world.port}._tcp"
    assert main(["tls", "check", "ee.dane.example", "--policy", str(policy)]) == 0
    out = capsys.readouterr().out
    assert "DNSSEC: the resolver's validation is trusted" in out
    assert "MX mx-ee.dane.example: DNSSEC-secure" in out
    assert f"TLSA {t}.mx-ee.dane.example: secure: 3 1 1 {spki_sha256(world.certs['ee'][0])} (DANE-EE SPKI SHA2-256)" in out
    assert "verdict: mx-ee.dane.example: deliver only over STARTTLS with a certificate its TLSA records authenticate (DANE)" in out

    assert main(["tls", "check", "bogus.dane.example", "--policy", str(policy)]) == 1
    out = capsys.readouterr().out
    assert f"TLSA {t}.mx-bogus.dane.example: bogus" in out
    assert "verdict: mx-bogus.dane.example: skip: dnssec-invalid" in out
    assert "mail would wait (451 4.7.5)" in out

    assert main(["tls", "check", "alias.dane.example", "--policy", str(policy)]) == 0
    out = capsys.readouterr().out
    assert "MX mx-alias.dane.example: DNSSEC-secure (an alias of mx-target.dane.example)" in out
    assert f"TLSA {t}.mx-target.dane.example: secure: 3 1 1 {spki_sha256(world.certs['ee'][0])}" in out

    assert main(["tls", "check", "unsigned.example", "--policy", str(policy)]) == 0
    out = capsys.readouterr().out
    assert "MX mx.unsigned.example: not DNSSEC-secure: no DANE" in out
    assert "verdict: mx.unsigned.example: deliver, tls = opportunistic" in out


# -- in the running gateway ----------------------------------------------------------------------


def test_the_gateway_holds_mail_for_a_host_whose_certificate_fails_dane(world: World, gateway_factory: Any) -> None:
    """Through a real gateway: mail relayed to a DANE host that shows a certificate its
    TLSA records do not match stays queued, /metrics counts why by DANE mode and RFC 8460
    type, and it goes out once the host shows the certificate the records name."""
    from tests.conftest import MESSAGE as TEXT
    from tests.conftest import smtp, wait_for
    from tests.metrics import metric_sum

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
nameservers = ["127.0.0.1:{world.lab.port}"]
timeout = "3s"
[delivery]
smtp_port = {world.port}
mta_sts = false
retry_base = "200ms"
retry_max = "500ms"
poll_interval = "200ms"
[metrics]
enabled = true
port = 0
[[plugins]]
name = "rcpt_relay"
"""
    with peer(world, "mx-ee", "valid") as impostor:  # a CA-signed certificate, but not the key in DNS
        gw = gateway_factory(policy)
        with smtp(gw.port) as client:
            assert client.sendmail("a@src.example", ["b@ee.dane.example"], TEXT) == {}

        def failures() -> float:
            return metric_sum(gw, "gateway_tls_policy_failures_total", {"mode": "dane", "result": "tlsa-invalid"})

        assert wait_for(lambda: failures() >= 2, timeout=15)  # the first attempt and a retry
        assert impostor.messages == [] and len(gw.queue_ids()) == 1
    with peer(world, "mx-ee", "ee") as genuine:
        assert wait_for(lambda: len(genuine.messages) == 1, timeout=15)
        assert genuine.messages[0].has_tls
        assert wait_for(lambda: gw.queue_ids() == [], timeout=5)
