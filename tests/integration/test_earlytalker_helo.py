"""connect_earlytalker and helo_checks in real SMTP sessions, and the bad-command limit.

Clients connect from different loopback addresses (127.0.0.2 .. 127.0.0.6) so that one
gateway per plugin can show relay clients, allow lists and network overrides side by
side. DNS answers for the ``unresolvable`` check come from a real DNS server on loopback.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Callable, Iterator

import pytest

from gateway.testing import RunningGateway, running_gateway
from plugins import connect_earlytalker, helo_checks
from tests.conftest import BASE_POLICY, RawClient, plugin_specs
from tests.dnsserver import DnsTestServer

SPECS = plugin_specs(connect_earlytalker=connect_earlytalker, helo_checks=helo_checks)

EARLY = (554, "5.5.1")
SYNTAX = (501, "5.5.2")
POLICY_REFUSAL = (550, "5.7.1")
TOO_MANY_ERRORS = (421, "4.7.0")

RELAY_CLIENT = "127.0.0.3"
ALLOWED = "127.0.0.4"
SCORED = "127.0.0.5"
UNDELAYED = "127.0.0.6"

EARLYTALKER_POLICY = BASE_POLICY + f"""
[relay]
clients = ["{RELAY_CLIENT}"]

[[plugins]]
name = "connect_earlytalker"
delay = "0.3s"
allow = ["{ALLOWED}"]

[[overrides]]
match = {{ network = "{SCORED}" }}
[overrides.plugins.connect_earlytalker]
action = "score"
score = 7.0

[[overrides]]
match = {{ network = "{UNDELAYED}" }}
[overrides.plugins.connect_earlytalker]
delay = "0s"
"""

ZONE = """
$ORIGIN test.example.
$TTL 300
@        IN SOA ns1.test.example. hostmaster.test.example. 1 3600 600 86400 300
@        IN NS  ns1.test.example.
ns1      IN A    127.0.0.1
client   IN A    127.0.0.2
v6only   IN AAAA 2001:db8::25
noaddr   IN TXT  "exists, but has no address"
broken   IN A    127.0.0.7
slow     IN A    127.0.0.8
"""


def helo_policy(dns_port: int) -> str:
    return BASE_POLICY + f"""
[dns]
nameservers = ["127.0.0.1:{dns_port}"]
timeout = "0.5s"

[relay]
clients = ["{RELAY_CLIENT}"]

[[plugins]]
name = "helo_checks"
unresolvable = "reject"
dns_timeout = "1s"

[[overrides]]
match = {{ network = "{SCORED}" }}
[overrides.plugins.helo_checks]
invalid_name = "score"
score = 3.0
"""


class Client(RawClient):
    """A raw client connecting from a chosen loopback address."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        self.file = self.sock.makefile("rb")

    def status(self, line: str) -> tuple[int, str]:
        """Send a command; the reply's code and enhanced status code."""
        code, text = self.cmd(line)
        return code, text[-1].split(" ", 1)[0]


@pytest.fixture
def connect() -> Iterator[Callable[..., Client]]:
    clients: list[Client] = []

    def make(port: int, source: str = "127.0.0.1") -> Client:
        client = Client(port, source)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture(scope="module")
def early_gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    with running_gateway(EARLYTALKER_POLICY, tmp_path_factory.mktemp("early"), specs=SPECS) as gw:
        yield gw


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DnsTestServer]:
    with DnsTestServer(ZONE) as server:
        server.fail("broken.test.example")
        server.drop("slow.test.example")
        yield server


@pytest.fixture(scope="module")
def helo_gw(tmp_path_factory: pytest.TempPathFactory, dns_server: DnsTestServer) -> Iterator[RunningGateway]:
    policy = helo_policy(dns_server.port)
    with running_gateway(policy, tmp_path_factory.mktemp("helo"), specs=SPECS) as gw:
        yield gw


def send_mail(client: Client) -> str:
    """MAIL .. DATA on a greeted session; the queue id from the 250 reply."""
    assert client.cmd("MAIL FROM:<sender@example.org>")[0] == 250
    assert client.cmd("RCPT TO:<alice@local.example>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    code, text = client.cmd(b"Subject: early\r\n\r\nHello.\r\n.")
    assert code == 250
    return text[0].rsplit(" ", 1)[-1]


def notes_of(gw: RunningGateway, qid: str) -> list[tuple[str, float]]:
    return [(n["plugin"], n["score"]) for n in gw.queue.load(qid).envelope.notes]


# -- connect_earlytalker ---------------------------------------------------------------


def test_early_talker_is_refused_with_554_and_closed(early_gw: RunningGateway, connect) -> None:
    client = connect(early_gw.port)
    client.send(b"EHLO x\r\n")  # without waiting for the greeting
    code, text = client.reply()
    assert (code, text[0].split(" ", 1)[0]) == EARLY
    assert "before the greeting" in text[0]
    assert client.is_closed()


def test_polite_client_is_greeted_and_mails(early_gw: RunningGateway, connect) -> None:
    client = connect(early_gw.port)
    assert client.reply()[0] == 220
    assert client.cmd("EHLO client.test.example")[0] == 250
    qid = send_mail(client)
    assert qid in early_gw.queue_ids()
    assert notes_of(early_gw, qid) == []


@pytest.mark.parametrize("source", [RELAY_CLIENT, ALLOWED, UNDELAYED], ids=["relay-client", "allow-list", "delay-0s"])
def test_exempt_early_talker_is_greeted(early_gw: RunningGateway, connect, source: str) -> None:
    client = connect(early_gw.port, source)
    client.send(b"EHLO x\r\n")
    assert client.reply()[0] == 220
    assert client.reply()[0] == 250  # its early EHLO, answered in turn


def test_score_mode_lets_the_early_talker_on_and_records_the_score(early_gw: RunningGateway, connect) -> None:
    client = connect(early_gw.port, SCORED)
    client.send(b"EHLO x\r\n")
    assert client.reply()[0] == 220
    assert client.reply()[0] == 250
    qid = send_mail(client)
    assert notes_of(early_gw, qid) == [("connect_earlytalker", 7.0)]


@pytest.mark.parametrize(
    "settings",
    [
        'delay = "2s"\ntimeout = "1s"',
        'timeout = "5s"\n[[overrides]]\nmatch = { listener = "smtp" }\n'
        '[overrides.plugins.connect_earlytalker]\ndelay = "5s"',
    ],
    ids=["base", "override"],
)
def test_a_delay_not_below_the_entry_timeout_stops_start_up(gateway_factory, settings: str) -> None:
    policy = BASE_POLICY + f'\n[[plugins]]\nname = "connect_earlytalker"\n{settings}\n'
    with pytest.raises(ValueError, match="connect_earlytalker.*shorter than the entry's timeout"):
        gateway_factory(policy, specs=SPECS)


# -- helo_checks -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("EHLO 192.0.2.1", SYNTAX),  # bare IP
        ("EHLO localhost", SYNTAX),  # not fully qualified
        ("HELO bad_name.test.example", SYNTAX),
        ("EHLO -dash.test.example", SYNTAX),
        ("EHLO [192.0.2.1", SYNTAX),  # broken literal
        ("EHLO mx.test.example", POLICY_REFUSAL),  # our hostname
        ("EHLO LOCAL.example", POLICY_REFUSAL),  # one of our local domains
        ("EHLO [127.0.0.1]", POLICY_REFUSAL),  # the address the client connected to
        ("EHLO [127.0.0.2]", POLICY_REFUSAL),  # a literal that is not the client's
        ("EHLO [IPv6:2001:db8::1]", POLICY_REFUSAL),
        ("EHLO nx.test.example", POLICY_REFUSAL),  # NXDOMAIN
        ("EHLO noaddr.test.example", POLICY_REFUSAL),  # exists without A/AAAA
        ("EHLO client.test.example", (250, "")),
        ("EHLO v6only.test.example", (250, "")),
        ("EHLO broken.test.example", (250, "")),  # SERVFAIL: no opinion
        ("EHLO slow.test.example", (250, "")),  # timeout: no opinion
    ],
)
def test_helo_checks_reply(helo_gw: RunningGateway, connect, command: str, expected: tuple[int, str]) -> None:
    client = connect(helo_gw.port)
    assert client.reply()[0] == 220
    code, status = client.status(command)
    assert code == expected[0]
    if expected[1]:
        assert status == expected[1]


def test_refused_helo_leaves_the_session_ungreeted_until_a_good_one(helo_gw: RunningGateway, connect) -> None:
    client = connect(helo_gw.port)
    client.reply()
    assert client.status("EHLO mx.test.example") == POLICY_REFUSAL
    assert client.cmd("MAIL FROM:<sender@example.org>")[0] == 503
    assert client.cmd("EHLO client.test.example")[0] == 250
    qid = send_mail(client)
    assert helo_gw.queue.load(qid).envelope.helo == "client.test.example"


def test_address_literal_of_the_client_itself_is_accepted(helo_gw: RunningGateway, connect) -> None:
    client = connect(helo_gw.port, "127.0.0.2")
    client.reply()
    assert client.cmd("EHLO [127.0.0.2]")[0] == 250
    qid = send_mail(client)
    assert helo_gw.queue.load(qid).envelope.helo == "[127.0.0.2]"


@pytest.mark.parametrize("command", ["EHLO localhost", "EHLO mx.test.example", "HELO 192.0.2.1", "EHLO [192.0.2.1]"])
def test_relay_client_is_not_checked(helo_gw: RunningGateway, connect, command: str) -> None:
    client = connect(helo_gw.port, RELAY_CLIENT)
    client.reply()
    assert client.cmd(command)[0] == 250


def test_score_mode_accepts_and_records_the_score(helo_gw: RunningGateway, connect) -> None:
    client = connect(helo_gw.port, SCORED)
    client.reply()
    assert client.cmd("EHLO localhost")[0] == 250
    assert client.cmd("EHLO localhost")[0] == 250  # counted once per session
    qid = send_mail(client)
    assert notes_of(helo_gw, qid) == [("helo_checks", 3.0)]
    # Checks left at "reject" still refuse from the scored network.
    assert client.status("EHLO mx.test.example") == POLICY_REFUSAL


# -- the core's bad-command limit ------------------------------------------------------


def test_bad_command_limit_follows_a_network_override(gateway_factory, connect) -> None:
    """[limits] max_bad_commands set by a network override: out-of-order commands count too.

    tests/integration/test_smtp_session.py covers the global setting with unknown verbs.
    """
    policy = BASE_POLICY + (
        '\n[[overrides]]\nmatch = { network = "127.0.0.2" }\nlimits = { max_bad_commands = 2 }\n'
    )
    gw = gateway_factory(policy)
    strict = connect(gw.port, "127.0.0.2")
    strict.reply()
    assert strict.cmd("MAIL FROM:<a@example.org>")[0] == 503  # before EHLO
    strict.send(b"FOO\r\n")
    assert strict.reply()[0] == 500
    code, text = strict.reply()
    assert (code, text[0].split(" ", 1)[0]) == TOO_MANY_ERRORS
    assert strict.is_closed()
    # Other clients keep the global limit (10).
    lenient = connect(gw.port, "127.0.0.1")
    lenient.reply()
    assert lenient.cmd("MAIL FROM:<a@example.org>")[0] == 503
    assert lenient.cmd("FOO")[0] == 500
    assert lenient.cmd("NOOP")[0] == 250
