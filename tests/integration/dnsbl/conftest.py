"""A real DNS server serving test DNS lists, once per test session, and policy helpers.

The gateway sees the test client as 127.0.0.1 (or 127.0.0.2, 127.0.0.3 when the client
binds that source address: all of 127.0.0.0/8 is loopback on Linux). The zones:

- ``bl.test`` lists 127.0.0.1 (code 127.0.0.2, with a TXT lookup URL);
- ``clean.test`` lists only 127.0.0.2, so the usual client is not listed there;
- ``zen.test`` lists 127.0.0.1 as 127.0.0.10, 127.0.0.2 as 127.0.0.2 (with TXT) and
  127.0.0.3 as 127.0.0.4: one zone, several codes for per-code actions;
- ``wl.test`` is an allow list with 127.0.0.1 in it;
- ``refusing.test`` answers 127.255.255.254 (a list's "you may not query" code);
- ``dbl.test`` is a domain list: ``spam.example`` (127.0.1.2, TXT), ``grey.example``
  (127.0.1.10), ``badhelo.example`` and ``evil.example`` (127.0.1.2);
- ``v6bl.test`` lists ::1 (RFC 5782 §2.4 nibbles);
- ``broken.test`` and ``slow.test`` are made to fail (SERVFAIL, no answer) per test.
"""

from __future__ import annotations

import smtplib
from pathlib import Path
from typing import Any, Iterator

import pytest

import plugins.connect_dnsbl as connect_dnsbl
from tests.conftest import plugin_specs
from tests.dnsserver import DnsTestServer

ZONE = """
$TTL 300
test.                        IN SOA ns.test. hostmaster.test. 1 3600 600 86400 60
1.0.0.127.bl.test.           IN A   127.0.0.2
1.0.0.127.bl.test.           IN TXT "https://bl.test/lookup?ip=127.0.0.1"
2.0.0.127.clean.test.        IN A   127.0.0.2
1.0.0.127.zen.test.          IN A   127.0.0.10
2.0.0.127.zen.test.          IN A   127.0.0.2
2.0.0.127.zen.test.          IN TXT "https://zen.test/query/ip/127.0.0.2"
3.0.0.127.zen.test.          IN A   127.0.0.4
1.0.0.127.wl.test.           IN A   127.0.10.2
1.0.0.127.refusing.test.     IN A   127.255.255.254
spam.example.dbl.test.       IN A   127.0.1.2
spam.example.dbl.test.       IN TXT "https://dbl.test/lookup/spam.example"
grey.example.dbl.test.       IN A   127.0.1.10
badhelo.example.dbl.test.    IN A   127.0.1.2
evil.example.dbl.test.       IN A   127.0.1.2
1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.v6bl.test. IN A 127.0.0.2
"""

SPECS = plugin_specs(connect_dnsbl=connect_dnsbl)

# What a client sees (RFC 5321 §3.1 before the greeting; RFC 3463 enhanced codes).
REFUSED_AT_CONNECT = (554, "5.7.1")
REFUSED = (550, "5.7.1")
DEFERRED = (451, "4.7.1")
DNS_FAILURE = (451, "4.4.3")
DNS_FAILURE_AT_CONNECT = (421, "4.4.3")
SENT = 250

USERS = ["postmaster", "abuse", "alice", "bob"]


@pytest.fixture(scope="session")
def dnsbl_dns() -> Iterator[DnsTestServer]:
    """The test DNS server with the lists above (started once per test session)."""
    with DnsTestServer(ZONE) as server:
        yield server


@pytest.fixture
def dns(dnsbl_dns: DnsTestServer) -> Iterator[DnsTestServer]:
    """The shared server, with any SERVFAIL or silence a test asked for undone after it."""
    yield dnsbl_dns
    dnsbl_dns.heal()


def policy(
    dns_port: int, plugin: str, extra: str = "", tls: str = "none", address: str = "127.0.0.1"
) -> str:
    """A policy with ``connect_dnsbl`` first in the chain (its RCPT verdict comes first).

    :param dns_port: the test DNS server's port
    :param plugin: the plugin's settings and ``[[plugins.zones]]`` tables, as TOML
    :param extra: further top-level sections (``[scoring]``, ``[relay]``, ``[auth]``)
    :param tls: the listener's ``tls``
    :param address: the listener's address
    """
    users = ", ".join(f'"{u}"' for u in USERS)
    return f"""
[server]
hostname = "mx.test.example"

[[listeners]]
name = "smtp"
address = "{address}"
port = 2525
tls = "{tls}"

[local]
domains = ["localhost", "local.example"]
users = [{users}]

[delivery]
enabled = false

[dns]
nameservers = ["127.0.0.1:{dns_port}"]
timeout = "2s"
{extra}

[[plugins]]
name = "connect_dnsbl"
{plugin}

[[plugins]]
name = "auth_users_file"
[[plugins]]
name = "rcpt_relay"
[[plugins]]
name = "rcpt_local_users"
[[plugins]]
name = "queue_received_header"
"""


def zone(name: str, **fields: object) -> str:
    """One ``[[plugins.zones]]`` table; values are written as TOML literals given as text."""
    lines = ["[[plugins.zones]]", f'zone = "{name}"']
    lines += [f"{key} = {value}" for key, value in fields.items()]
    return "\n".join(lines) + "\n"


def count(server: DnsTestServer, name: str, qtype: str = "A") -> int:
    """How often ``name`` was asked for ``qtype`` so far."""
    return sum(1 for q in server.queries if q == (name, qtype))


def users_file(tmp_path: Path) -> Path:
    from gateway.passwords import hash_password

    path = tmp_path / "users"
    path.write_text(f"alice:{hash_password('s3cret', ln=4)}\n")
    return path


def client(port: int, source: str = "127.0.0.1", helo: str = "client.test.example") -> smtplib.SMTP:
    """An SMTP client from ``source`` (any 127.0.0.0/8 address) that has sent EHLO ``helo``."""
    c = smtplib.SMTP("127.0.0.1", port, local_hostname=helo, timeout=10, source_address=(source, 0))
    c.ehlo()
    return c


def split(reply: tuple[int, bytes]) -> tuple[tuple[int, str], str]:
    """((code, enhanced code), text) of an smtplib reply."""
    code, raw = reply
    status, _, text = raw.decode().partition(" ")
    return (code, status), text


def envelope_notes(gw: Any, qid: str) -> list[str]:
    """The reasons of the results saved with a queued message."""
    return [note["reason"] for note in gw.queue.load(qid).envelope.notes]
