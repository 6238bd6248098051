"""End to end over real SMTP: two gateway instances, MX from a real DNS server on
loopback, a smarthost route, and a scriptable peer for 4xx/5xx answers."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

import pytest

from tests.conftest import MESSAGE, smtp, wait_for
from tests.dnsserver import DnsTestServer
from tests.smtppeer import SmtpPeer

ZONE = """
$ORIGIN test.example.
$TTL 300
@          IN SOA ns1.test.example. hostmaster.test.example. 1 3600 600 86400 300
@          IN NS  ns1.test.example.
ns1        IN A   127.0.0.1
remote     IN MX  10 mx.remote.test.example.
mx.remote  IN A   127.0.0.1
nullmx     IN MX  0 .
noaddr     IN MX  10 nohost.test.example.
"""

RECEIVER = """
[server]
hostname = "b.test.example"
[[listeners]]
name = "smtp"
tls = "starttls"
[local]
domains = ["remote.test.example"]
users = ["postmaster", "bob"]
[delivery]
poll_interval = "200ms"
[[plugins]]
name = "rcpt_relay"
[[plugins]]
name = "rcpt_local_users"
[[plugins]]
name = "queue_received_header"
"""


def sender_policy(dns_port: int, smtp_port: int, extra: str = "") -> str:
    return f"""
[server]
hostname = "a.test.example"
[[listeners]]
name = "smtp"
tls = "none"
[local]
domains = ["a.test.example"]
users = ["postmaster", "alice"]
[relay]
clients = ["127.0.0.0/8"]
[dns]
nameservers = ["127.0.0.1:{dns_port}"]
timeout = "2s"
[delivery]
smtp_port = {smtp_port}
retry_base = "200ms"
retry_max = "500ms"
poll_interval = "200ms"
{extra}
[[plugins]]
name = "rcpt_relay"
[[plugins]]
name = "rcpt_local_users"
[[plugins]]
name = "queue_received_header"
"""


@pytest.fixture(scope="module")
def dns():
    server = DnsTestServer(ZONE)
    yield server
    server.stop()


def inbox(gw, user: str) -> list[bytes]:
    new = Path(gw.policy.local.mail_root) / user / "Maildir" / "new"
    return [p.read_bytes() for p in sorted(new.glob("*"))] if new.exists() else []


def send(gw, sender: str, rcpts: list[str], data: bytes = MESSAGE, options: list[str] = ()) -> None:
    with smtp(gw.port) as client:
        client.ehlo()
        assert client.sendmail(sender, rcpts, data, rcpt_options=list(options)) == {}


def test_relay_through_mx_to_a_second_gateway_over_starttls(gateway_factory, dns) -> None:
    receiver = gateway_factory(RECEIVER)
    relay = gateway_factory(sender_policy(dns.port, receiver.port))
    send(relay, "alice@a.test.example", ["bob@remote.test.example"])
    assert wait_for(lambda: inbox(receiver, "bob"), timeout=15)
    (data,) = inbox(receiver, "bob")
    received = [line for line in data.split(b"\r\n") if line.startswith(b"Received:")]
    # The receiver's own trace header first (over TLS), then the relay's.
    assert received[0].startswith(b"Received: from a.test.example ([127.0.0.1])")
    assert b"with ESMTPS id" in data.split(b"\r\n\r\n")[0]
    assert data.endswith(MESSAGE)
    assert wait_for(lambda: relay.queue_ids() == [], timeout=5)


def test_smarthost_route_needs_no_dns(gateway_factory) -> None:
    receiver = gateway_factory(RECEIVER)
    route = f'[[routes]]\ndomain = "*"\nhost = "127.0.0.1"\nport = {receiver.port}\ntls = "required"\n'
    relay = gateway_factory(sender_policy(1, 25, extra=route))
    send(relay, "alice@a.test.example", ["bob@remote.test.example"])
    assert wait_for(lambda: inbox(receiver, "bob"), timeout=15)


def test_remote_5xx_bounces_to_the_local_sender(gateway_factory, dns) -> None:
    with SmtpPeer(dsn=True) as peer:
        peer.always_rcpt("carol@peer.test.example", "550 5.1.1 carol is unknown here")
        route = f'[[routes]]\ndomain = "peer.test.example"\nhost = "127.0.0.1"\nport = {peer.port}\n'
        relay = gateway_factory(sender_policy(dns.port, 25, extra=route))
        send(relay, "alice@a.test.example", ["carol@peer.test.example"])
        assert wait_for(lambda: inbox(relay, "alice"), timeout=15)
    (raw,) = inbox(relay, "alice")
    dsn = email.message_from_bytes(raw.split(b"\r\n", 2)[2], policy=email.policy.default)
    assert dsn.get_content_type() == "multipart/report"
    fields = dsn.get_payload()[1].get_payload()[1]
    assert fields["Action"] == "failed" and fields["Status"] == "5.1.1"
    assert "carol is unknown here" in fields["Diagnostic-Code"]
    assert fields["Remote-MTA"] == "dns; 127.0.0.1"


def test_remote_4xx_then_250_is_retried(gateway_factory, dns) -> None:
    with SmtpPeer() as peer:
        peer.script_rcpt("dave@peer.test.example", "451 4.2.0 greylisted, try later")
        route = f'[[routes]]\ndomain = "peer.test.example"\nhost = "127.0.0.1"\nport = {peer.port}\n'
        relay = gateway_factory(sender_policy(dns.port, 25, extra=route))
        send(relay, "alice@a.test.example", ["dave@peer.test.example"])
        assert wait_for(lambda: len(peer.messages) == 1, timeout=15)
        assert peer.messages[0].rcpt_tos == ["dave@peer.test.example"]
        assert wait_for(lambda: relay.queue_ids() == [], timeout=5)
    assert inbox(relay, "alice") == []  # no bounce


def test_dsn_parameters_are_passed_on(gateway_factory, dns) -> None:
    with SmtpPeer(dsn=True) as peer:
        route = f'[[routes]]\ndomain = "peer.test.example"\nhost = "127.0.0.1"\nport = {peer.port}\n'
        relay = gateway_factory(sender_policy(dns.port, 25, extra=route))
        send(relay, "alice@a.test.example", ["erin@peer.test.example"],
             options=["NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;erin+40peer.test.example"])
        assert wait_for(lambda: len(peer.messages) == 1, timeout=15)
        (options,) = peer.messages[0].rcpt_options
        options = " ".join(options).upper()
        assert "NOTIFY=FAILURE,DELAY" in options
        # xtext (RFC 3461 §4) may carry "@" as is.
        assert "ORCPT=RFC822;ERIN@PEER.TEST.EXAMPLE" in options


def test_null_mx_bounces_at_once(gateway_factory, dns) -> None:
    relay = gateway_factory(sender_policy(dns.port, 25))
    send(relay, "alice@a.test.example", ["x@nullmx.test.example"])
    assert wait_for(lambda: inbox(relay, "alice"), timeout=15)
    assert b"5.1.10" in inbox(relay, "alice")[0]


def test_success_notice_only_when_the_next_hop_cannot_send_one(gateway_factory, dns) -> None:
    for dsn_capable, expect_notice in ((True, False), (False, True)):
        with SmtpPeer(dsn=dsn_capable) as peer:
            route = f'[[routes]]\ndomain = "peer.test.example"\nhost = "127.0.0.1"\nport = {peer.port}\n'
            relay = gateway_factory(sender_policy(dns.port, 25, extra=route))
            send(relay, "alice@a.test.example", ["frank@peer.test.example"], options=["NOTIFY=SUCCESS"])
            assert wait_for(lambda: len(peer.messages) == 1, timeout=15)
            assert wait_for(lambda: relay.queue_ids() == [], timeout=10)
            if expect_notice:
                assert wait_for(lambda: inbox(relay, "alice"), timeout=10)
                assert b"Action: relayed" in inbox(relay, "alice")[0]
            else:
                assert inbox(relay, "alice") == []


def _dsn_of(raw: bytes) -> tuple[str, email.message.Message]:
    """The human-readable text (on one line) and the recipient's status block of a DSN."""
    dsn = email.message_from_bytes(raw.split(b"\r\n", 2)[2], policy=email.policy.default)
    text = " ".join(dsn.get_payload()[0].get_content().split())
    return text, dsn.get_payload()[1].get_payload()[1]


def test_expiry_bounce_keeps_the_last_real_error_and_who_said_it(gateway_factory, dns) -> None:
    """Past queue_lifetime the DSN says 4.4.7 (expired) but keeps the last real error: the
    peer's 451 text with the peer as Remote-MTA, or, for a port nobody listens on, our
    own words about the refused connection, no remote host blamed."""
    from tests.processes import free_port

    with SmtpPeer() as peer:
        peer.always_rcpt("carol@peer.test.example", "451 4.3.0 mailbox locked, try later")
        routes = (f'[[routes]]\ndomain = "peer.test.example"\nhost = "127.0.0.1"\nport = {peer.port}\n'
                  f'[[routes]]\ndomain = "closed.test.example"\nhost = "127.0.0.1"\nport = {free_port()}\n')
        relay = gateway_factory(sender_policy(dns.port, 25, extra='queue_lifetime = "2s"\n' + routes))
        send(relay, "alice@a.test.example", ["carol@peer.test.example"])
        send(relay, "alice@a.test.example", ["dan@closed.test.example"])
        assert wait_for(lambda: len(inbox(relay, "alice")) == 2, timeout=30)
    dsns = dict(
        (fields["Final-Recipient"], (text, fields)) for text, fields in map(_dsn_of, inbox(relay, "alice"))
    )
    text, carol = dsns["rfc822; carol@peer.test.example"]
    assert carol["Action"] == "failed" and carol["Status"] == "4.4.7"
    assert carol["Diagnostic-Code"] == "smtp; 451 4.3.0 mailbox locked, try later"
    assert carol["Remote-MTA"] == "dns; 127.0.0.1"
    assert "delivery time expired" in text
    assert "host 127.0.0.1 said: 451 4.3.0 mailbox locked, try later" in text
    text, dan = dsns["rfc822; dan@closed.test.example"]
    assert dan["Status"] == "4.4.7"
    assert dan["Diagnostic-Code"].startswith("smtp; 451 4.4.1 cannot connect to 127.0.0.1")
    assert "Remote-MTA" not in dan
    assert "delivery time expired" in text and "no remote host said it" in text
    assert "said: 451 4.4.1" not in text


def test_failures_decided_before_connecting_count_as_remote(gateway_factory, dns, caplog) -> None:
    """Null MX, no such domain, and an MX host without an address are remote deliveries
    that no host answered: logged relay=none and counted kind="remote", not local."""
    import logging
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    relay = gateway_factory(sender_policy(dns.port, 25, extra="") + "\n[metrics]\nenabled = true\nport = 0\n")
    rcpts = ["x@nullmx.test.example", "y@nosuch.test.example", "z@noaddr.test.example"]
    with caplog.at_level(logging.INFO, logger="gateway.delivery.scheduler"):
        send(relay, "alice@a.test.example", rcpts)
        assert wait_for(lambda: inbox(relay, "alice"), timeout=15)  # the bounce for x and y
    port = relay.app.metrics_server.server_address[1]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        families = text_string_to_metric_families(response.read().decode())
    counts = {(s.labels["status"], s.labels["kind"]): s.value
              for f in families if f.name == "gateway_deliveries" for s in f.samples if s.name.endswith("_total")}
    assert counts[("failed", "remote")] == 2
    assert counts[("deferred", "remote")] >= 1
    assert ("failed", "local") not in counts and ("deferred", "local") not in counts
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("delivery to=")]
    for rcpt in rcpts:
        mine = [line for line in lines if f"to=<{rcpt}>" in line]
        assert mine and all(" relay=none " in line for line in mine), mine
