"""RemoteDeliveryAgent end to end: test DNS zone, real SMTP peers on 127.0.0.1 and 127.0.0.2.

MX names in the zone resolve to the two loopback addresses; every peer of a test listens
on the same port, which the policy names as ``delivery.smtp_port``.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.delivery.remote import RemoteDeliveryAgent
from gateway.delivery.types import MxRoute, Outcome, SmarthostRoute
from gateway.dns import make_resolver
from gateway.model import Envelope, QueuedRecipient
from gateway.policy.model import DeliverySettings, Policy
from tests.dnsserver import DnsTestServer, dns_settings
from tests.smtppeer import SmtpPeer, free_port

HOSTNAME = "gw.test.example"
MESSAGE = b"From: a@src.example\r\nTo: b@dst.example\r\nSubject: agent test\r\n\r\nSecret body text.\r\n"
SINK = shutil.which("smtp-sink", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/usr/libexec/postfix")

ZONE = """
$ORIGIN test.example.
$TTL 300
@        IN SOA ns1.test.example. hostmaster.test.example. 1 3600 600 86400 300
@        IN NS  ns1.test.example.
ns1      IN A   127.0.0.1
mx1      IN A   127.0.0.1
mx2      IN A   127.0.0.2
two      IN MX  10 mx1.test.example.
two      IN MX  20 mx2.test.example.
one      IN MX  10 mx1.test.example.
onlytwo  IN MX  10 mx2.test.example.
nullmx   IN MX  0 .
mirror   IN MX  10 mx1.test.example.
mirror   IN MX  50 gw.test.example.
gw       IN A   127.0.0.9
"""


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DnsTestServer]:
    with DnsTestServer(ZONE) as server:
        yield server


@pytest.fixture
def port() -> int:
    return free_port("127.0.0.1", "127.0.0.2")


def make_agent(dns_server: DnsTestServer, port: int, **delivery: Any) -> RemoteDeliveryAgent:
    backoff = delivery.pop("backoff", 60.0)
    delivery.setdefault("tls", "opportunistic")
    settings = DeliverySettings(
        smtp_port=port, connect_timeout=2.0, command_timeout=5.0, data_timeout=5.0, **delivery
    )
    policy = Policy(source="<test>", delivery=settings, dns=dns_settings(dns_server.port, 1.0))
    return RemoteDeliveryAgent(policy, make_resolver(policy.dns), hostname=HOSTNAME, backoff=backoff)


def rcpts(*addresses: str) -> list[QueuedRecipient]:
    return [QueuedRecipient(a) for a in addresses]


def deliver(agent: RemoteDeliveryAgent, route: Any, *addresses: str) -> dict[str, Outcome]:
    async def main() -> dict[str, Outcome]:
        try:
            return await agent.deliver(Envelope("a@src.example", []), rcpts(*addresses), route, MESSAGE)
        finally:
            await agent.close()

    return asyncio.run(main())


def status_of(outcomes: dict[str, Outcome]) -> set[tuple[str, int, str]]:
    return {(o.status, o.reply.code, o.reply.status) for o in outcomes.values()}


# -- MX hosts in order, back-off ------------------------------------------------------------


def test_421_greeting_moves_to_the_next_mx_and_backs_off(dns_server: DnsTestServer, port: int) -> None:
    agent = make_agent(dns_server, port, backoff=0.4)
    with SmtpPeer(host="127.0.0.1", port=port) as mx1, SmtpPeer(host="127.0.0.2", port=port) as mx2:
        mx1.script("greeting", "421 4.3.2 too busy, try later")

        async def main() -> None:
            envelope = Envelope("a@src.example", [])
            first = await agent.deliver(envelope, rcpts("b@two.test.example"), MxRoute("two.test.example"), MESSAGE)
            assert first["b@two.test.example"].status == "delivered"
            assert first["b@two.test.example"].remote == "mx2.test.example"
            # mx1 is backed off: the next message goes straight to mx2, no connection to mx1.
            await agent.deliver(envelope, rcpts("c@two.test.example"), MxRoute("two.test.example"), MESSAGE)
            assert mx1.connections == 1
            # A destination with only the backed-off host: deferred without connecting.
            only = await agent.deliver(envelope, rcpts("d@one.test.example"), MxRoute("one.test.example"), MESSAGE)
            assert status_of(only) == {("deferred", 451, "4.4.5")}
            assert "too busy" in only["d@one.test.example"].reply.text
            assert mx1.connections == 1
            await asyncio.sleep(0.5)  # back-off over
            again = await agent.deliver(envelope, rcpts("e@one.test.example"), MxRoute("one.test.example"), MESSAGE)
            assert again["e@one.test.example"].status == "delivered"
            await agent.close()

        asyncio.run(main())
        assert [m.rcpt_tos for m in mx2.messages] == [["b@two.test.example"], ["c@two.test.example"]]
        assert [m.rcpt_tos for m in mx1.messages] == [["e@one.test.example"]]


def test_all_hosts_down_defers_with_the_last_reply(dns_server: DnsTestServer, port: int) -> None:
    agent = make_agent(dns_server, port)
    with SmtpPeer(host="127.0.0.1", port=port) as mx1:
        mx1.script("greeting", "554 5.3.2 not accepting mail")  # and mx2 is not listening at all
        got = deliver(agent, MxRoute("two.test.example"), "b@two.test.example", "c@two.test.example")
    assert {o.status for o in got.values()} == {"deferred"}
    assert got["b@two.test.example"].reply.status == "4.4.1"  # mx2's connection refusal came last


def test_permanent_dns_answers_fail_without_connecting(dns_server: DnsTestServer, port: int) -> None:
    agent = make_agent(dns_server, port)
    assert status_of(deliver(agent, MxRoute("nullmx.test.example"), "b@nullmx.test.example")) == {
        ("failed", 556, "5.1.10")
    }
    assert status_of(deliver(agent, MxRoute("nosuch.test.example"), "b@nosuch.test.example")) == {
        ("failed", 550, "5.1.2")
    }
    dns_server.fail("one.test.example", "MX")
    try:
        assert status_of(deliver(agent, MxRoute("one.test.example"), "b@one.test.example")) == {
            ("deferred", 451, "4.4.3")
        }
    finally:
        dns_server.heal()


def test_loops_are_permanent(dns_server: DnsTestServer, port: int) -> None:
    agent = make_agent(dns_server, port)
    with SmtpPeer(host="127.0.0.1", port=port, hostname=HOSTNAME) as us:
        got = deliver(agent, MxRoute("one.test.example"), "b@one.test.example")
        assert status_of(got) == {("failed", 554, "5.4.6")}
        assert us.messages == []
    # We are a lower-preference MX: only the better host is used.
    with SmtpPeer(host="127.0.0.1", port=port) as mx1:
        assert deliver(agent, MxRoute("mirror.test.example"), "b@mirror.test.example")["b@mirror.test.example"].status == "delivered"
        assert len(mx1.messages) == 1


# -- TLS -----------------------------------------------------------------------------------


def test_opportunistic_tls_is_used_when_offered(dns_server: DnsTestServer, port: int) -> None:
    agent = make_agent(dns_server, port, tls="opportunistic")
    with SmtpPeer(host="127.0.0.1", port=port, tls=True) as mx1:
        assert deliver(agent, MxRoute("one.test.example"), "b@one.test.example")["b@one.test.example"].status == "delivered"
        assert mx1.messages[0].has_tls
    with SmtpPeer(host="127.0.0.1", port=port) as plain:
        assert deliver(agent, MxRoute("one.test.example"), "b@one.test.example")["b@one.test.example"].status == "delivered"
        assert not plain.messages[0].has_tls


def test_opportunistic_tls_failure_retries_in_clear(dns_server: DnsTestServer, port: int) -> None:
    agent = make_agent(dns_server, port, tls="opportunistic")
    with SmtpPeer(host="127.0.0.1", port=port, tls=True, tls_max_version=ssl.TLSVersion.TLSv1_1) as old:
        got = deliver(agent, MxRoute("one.test.example"), "b@one.test.example")
        assert got["b@one.test.example"].status == "delivered"
        assert old.connections == 2 and not old.messages[0].has_tls
    with SmtpPeer(host="127.0.0.1", port=port, tls=True) as refusing:
        refusing.script("starttls", "454 4.7.0 TLS not available due to temporary reason")
        assert deliver(agent, MxRoute("one.test.example"), "b@one.test.example")["b@one.test.example"].status == "delivered"
        assert refusing.connections == 2 and not refusing.messages[0].has_tls


def test_required_tls_without_starttls_tries_next_then_defers(dns_server: DnsTestServer, port: int) -> None:
    agent = make_agent(dns_server, port, tls="required")
    with SmtpPeer(host="127.0.0.1", port=port) as mx1, SmtpPeer(host="127.0.0.2", port=port, tls=True) as mx2:
        got = deliver(agent, MxRoute("two.test.example"), "b@two.test.example")
        assert got["b@two.test.example"].remote == "mx2.test.example"
        assert mx1.messages == [] and mx2.messages[0].has_tls
    with SmtpPeer(host="127.0.0.1", port=port) as plain:
        got = deliver(agent, MxRoute("one.test.example"), "b@one.test.example")
        assert status_of(got) == {("deferred", 451, "4.7.5")}
        assert plain.messages == []


def _make_ca(directory: Path) -> tuple[Path, tuple[Path, Path]]:
    """A CA and a server certificate it signs for localhost and 127.0.0.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    (directory / "cert.pem").write_bytes(cert.public_bytes(pem))
    (directory / "key.pem").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return directory / "ca.pem", (directory / "cert.pem", directory / "key.pem")


def test_verify_tls_with_a_test_ca(dns_server: DnsTestServer, port: int, tmp_path: Path) -> None:
    ca_file, certificate = _make_ca(tmp_path)
    agent = make_agent(dns_server, port, tls="verify", tls_ca_file=ca_file)
    ip_route = SmarthostRoute(host="127.0.0.1", port=port, tls="verify")
    with SmtpPeer(host="127.0.0.1", port=port, tls=True, certificate=certificate) as signed:
        assert deliver(agent, ip_route, "b@dst.example")["b@dst.example"].status == "delivered"
        assert signed.messages[0].has_tls
        # The MX name is not in the certificate: verification fails, the mail waits.
        got = deliver(agent, MxRoute("one.test.example"), "b@one.test.example")
        assert status_of(got) == {("deferred", 451, "4.7.5")}
        assert "mx1.test.example" in got["b@one.test.example"].reply.text
    with SmtpPeer(host="127.0.0.1", port=port, tls=True) as self_signed:
        got = deliver(agent, ip_route, "b@dst.example")
        assert status_of(got) == {("deferred", 451, "4.7.5")}
        assert self_signed.messages == [] and self_signed.connections == 1  # no clear-text retry


# -- smarthost AUTH --------------------------------------------------------------------------


def test_smarthost_auth_after_tls(dns_server: DnsTestServer, port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    agent = make_agent(dns_server, port)
    route = SmarthostRoute(host="mx1.test.example", port=port, tls="opportunistic", auth_user="relay",
                           auth_password_env="TEST_RELAY_PASSWORD")
    with SmtpPeer(host="127.0.0.1", port=port, tls=True, auth={"relay": "s3cret"}) as relay:
        monkeypatch.delenv("TEST_RELAY_PASSWORD", raising=False)
        assert status_of(deliver(agent, route, "b@far.example")) == {("deferred", 451, "4.3.5")}
        assert relay.connections == 0
        monkeypatch.setenv("TEST_RELAY_PASSWORD", "wrong")
        got = deliver(agent, route, "b@far.example")
        assert got["b@far.example"].status == "deferred" and "535" in got["b@far.example"].reply.text
        monkeypatch.setenv("TEST_RELAY_PASSWORD", "s3cret")
        assert deliver(agent, route, "b@far.example")["b@far.example"].status == "delivered"
        assert relay.messages[0].has_tls
        clear = SmarthostRoute(host="127.0.0.1", port=port, tls="none", auth_user="relay",
                               auth_password_env="TEST_RELAY_PASSWORD")
        before = relay.connections
        assert status_of(deliver(agent, clear, "b@far.example")) == {("deferred", 451, "4.7.0")}
        assert relay.connections == before
    with SmtpPeer(host="127.0.0.1", port=port) as no_tls:  # opportunistic, but no STARTTLS: no AUTH
        got = deliver(agent, route, "b@far.example")
        assert got["b@far.example"].status == "deferred" and no_tls.messages == []


# -- reuse and concurrency ----------------------------------------------------------------------


def test_connection_reuse(dns_server: DnsTestServer, port: int) -> None:
    agent = make_agent(dns_server, port)
    with SmtpPeer(host="127.0.0.1", port=port, tls=True) as mx1:

        async def main() -> None:
            for n in range(3):
                got = await agent.deliver(Envelope("a@src.example", []), rcpts(f"r{n}@one.test.example"),
                                          MxRoute("one.test.example"), MESSAGE)
                assert got[f"r{n}@one.test.example"].status == "delivered"
            await agent.close()

        asyncio.run(main())
        assert len(mx1.messages) == 3 and mx1.connections == 1
        assert all(m.has_tls for m in mx1.messages)


def test_a_pooled_connection_refusing_rset_is_replaced(dns_server: DnsTestServer, port: int) -> None:
    """The RSET of a reused connection travels with the next transaction (PIPELINING);
    when it fails, that transaction is sent again on a new connection, not deferred."""
    agent = make_agent(dns_server, port, tls="none")
    with SmtpPeer(host="127.0.0.1", port=port) as mx1:

        async def main() -> list[str]:
            got = []
            for n in range(2):
                if n == 1:
                    mx1.script("rset", "421 4.4.2 idle too long, closing")
                result = await agent.deliver(Envelope("a@src.example", []), rcpts(f"r{n}@one.test.example"),
                                             MxRoute("one.test.example"), MESSAGE)
                got.append(result[f"r{n}@one.test.example"].status)
            await agent.close()
            return got

        assert asyncio.run(main()) == ["delivered", "delivered"]
        assert [m.rcpt_tos for m in mx1.messages] == [["r0@one.test.example"], ["r1@one.test.example"]]
        assert mx1.connections == 2


def test_a_pooled_connection_the_server_dropped_is_replaced(dns_server: DnsTestServer, port: int) -> None:
    """A server that hangs up on an idle connection: the next message still goes out at
    once, on a new connection, and exactly once."""
    delivered: list[bytes] = []
    connections = 0

    async def one_message_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.write(b"220 mx1.test.example ESMTP\r\n")
        await reader.readline()
        writer.write(b"250-mx1.test.example\r\n250 PIPELINING\r\n")
        for _ in range(3):  # MAIL, RCPT, DATA
            line = await reader.readline()
            writer.write(b"354 go\r\n" if line == b"DATA\r\n" else b"250 ok\r\n")
        body = b""
        while (line := await reader.readline()) != b".\r\n":
            body += line
        delivered.append(body)
        writer.write(b"250 2.0.0 queued\r\n")
        await writer.drain()
        writer.close()  # and gone, without a word, while the client keeps the connection

    async def main() -> list[str]:
        server = await asyncio.start_server(one_message_per_connection, "127.0.0.1", port)
        got = []
        try:
            for n in range(2):
                result = await agent.deliver(Envelope("a@src.example", []), rcpts(f"r{n}@one.test.example"),
                                             MxRoute("one.test.example"), MESSAGE)
                got.append(result[f"r{n}@one.test.example"].status)
                await asyncio.sleep(0.05)  # the close has reached the client
            await agent.close()
        finally:
            server.close()
            await server.wait_closed()
        return got

    agent = make_agent(dns_server, port, tls="none")
    assert asyncio.run(main()) == ["delivered", "delivered"]
    assert len(delivered) == 2 and connections == 2


def test_destination_concurrency(dns_server: DnsTestServer, port: int) -> None:
    agent = make_agent(dns_server, port, destination_concurrency=2)
    with SmtpPeer(host="127.0.0.1", port=port, delay=0.2) as mx1:

        async def main() -> list[dict[str, Outcome]]:
            jobs = [
                agent.deliver(Envelope("a@src.example", []), rcpts(f"r{n}@one.test.example"),
                              MxRoute("one.test.example"), MESSAGE)
                for n in range(6)
            ]
            results = await asyncio.gather(*jobs)
            await agent.close()
            return results

        started = time.monotonic()
        results = asyncio.run(main())
        assert all(o.status == "delivered" for r in results for o in r.values())
        assert mx1.max_active == 2  # parallel, but never more than the limit
        assert len(mx1.messages) == 6 and time.monotonic() - started >= 0.55


@pytest.mark.parametrize(("primary", "expected"), [(True, 3), (False, 2)], ids=["master", "worker"])
def test_workers_split_the_destination_limit(dns_server: DnsTestServer, port: int, primary: bool,
                                             expected: int) -> None:
    """With ``workers = 2`` a limit of 5 becomes 3 for the master and 2 for the worker:
    together never more than the policy's limit, and no slot lost to rounding."""
    backoff_free = make_agent(dns_server, port, destination_concurrency=5)
    agent = RemoteDeliveryAgent(backoff_free.policy, backoff_free.resolver, hostname=HOSTNAME,
                                share=2, primary=primary)
    with SmtpPeer(host="127.0.0.1", port=port, delay=0.2) as mx1:

        async def main() -> None:
            await asyncio.gather(*(
                agent.deliver(Envelope("a@src.example", []), rcpts(f"r{n}@one.test.example"),
                              MxRoute("one.test.example"), MESSAGE)
                for n in range(8)
            ))
            await agent.close()

        asyncio.run(main())
        assert len(mx1.messages) == 8 and mx1.max_active == expected


# -- Postfix smtp-sink ------------------------------------------------------------------------


@pytest.fixture
def sink(port: int) -> Iterator[int]:
    if SINK is None:
        pytest.skip("Postfix smtp-sink is not installed")
    proc = subprocess.Popen([SINK, "-u", "root", "-c", f"127.0.0.1:{port}", "100"], stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                with socket.create_connection(("127.0.0.1", port), 0.1):
                    break
            except OSError:
                time.sleep(0.01)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=5)


def test_smtp_sink_delivery_and_required_tls(dns_server: DnsTestServer, sink: int,
                                             caplog: pytest.LogCaptureFixture) -> None:
    agent = make_agent(dns_server, sink, tls="opportunistic")
    with caplog.at_level(logging.INFO, logger="gateway.delivery.remote"):
        got = deliver(agent, MxRoute("one.test.example"), "b@one.test.example", "c@one.test.example")
    assert {o.status for o in got.values()} == {"delivered"}
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.delivery.remote"]
    assert any("mx1.test.example[127.0.0.1]" in line and "delivered=2" in line for line in lines)
    assert not any("Secret body" in line for line in lines)
    required = make_agent(dns_server, sink, tls="required")
    got = deliver(required, SmarthostRoute(host="127.0.0.1", port=sink, tls="required"), "b@far.example")
    assert status_of(got) == {("deferred", 451, "4.7.5")}
