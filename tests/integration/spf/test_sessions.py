"""``mail_spf`` in real SMTP sessions against a real gateway and the test DNS server."""

from __future__ import annotations

import smtplib
from pathlib import Path
from typing import Callable

import pytest

import plugins.mail_spf as mail_spf
from gateway.passwords import hash_password
from gateway.policy import PolicyError
from gateway.testing import RunningGateway
from tests.conftest import BASE_POLICY, MESSAGE, no_verify_context, plugin_specs
from tests.dnsserver import DnsTestServer

SPF_FAIL = (550, "5.7.23")  # RFC 7372
SPF_ERROR = (550, "5.7.24")
SPF_TEMPERROR = (451, "4.7.24")

Factory = Callable[..., RunningGateway]


def policy(dns: DnsTestServer, settings: str = "", extra: str = "") -> str:
    """The base test policy, resolving at ``dns``, with ``mail_spf`` last in the chain."""
    return BASE_POLICY + f"""
[[plugins]]
name = "mail_spf"
{settings}

[dns]
nameservers = ["127.0.0.1:{dns.port}"]
timeout = "1s"

[scoring]
reject = 5.0
{extra}
"""


def start(gateway_factory: Factory, dns: DnsTestServer, settings: str = "", extra: str = "") -> RunningGateway:
    return gateway_factory(policy(dns, settings, extra), specs=plugin_specs(mail_spf=mail_spf))


def client(gw: RunningGateway, helo: str = "client.test.example") -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", gw.port, local_hostname=helo, timeout=10)


def mail_from(gw: RunningGateway, sender: str, helo: str = "client.test.example") -> tuple[int, str]:
    """(code, enhanced status and text) of MAIL FROM in a fresh session."""
    with client(gw, helo) as c:
        c.ehlo()
        code, text = c.mail(sender)
    return code, text.decode()


def send(gw: RunningGateway, sender: str, helo: str = "client.test.example") -> bytes:
    """Send MESSAGE to a local user; return the message as queued."""
    with client(gw, helo) as c:
        c.ehlo()
        assert c.sendmail(sender, ["alice@localhost"], MESSAGE) == {}
    (qid,) = gw.queue_ids()
    return gw.queue.read_message(qid)


def test_fail_is_refused_at_mail_from_with_5_7_23(gateway_factory: Factory, spf_dns: DnsTestServer) -> None:
    gw = start(gateway_factory, spf_dns)
    code, text = mail_from(gw, "someone@fail.spf.example")
    assert (code, text.split()[0]) == SPF_FAIL
    assert "fail.spf.example" in text


def test_fail_reply_quotes_the_domains_explanation(gateway_factory: Factory, spf_dns: DnsTestServer) -> None:
    gw = start(gateway_factory, spf_dns)
    code, text = mail_from(gw, "someone@fail-exp.spf.example")
    assert (code, text.split()[0]) == SPF_FAIL
    assert "127.0.0.1 may not send mail for fail-exp.spf.example, see https://spf.example/why" in text


def test_softfail_is_accepted_scored_and_gets_a_received_spf_header(
    gateway_factory: Factory, spf_dns: DnsTestServer
) -> None:
    gw = start(gateway_factory, spf_dns)
    stored = send(gw, "someone@softfail.spf.example")
    headers = stored.split(b"\r\n\r\n", 1)[0].decode()
    assert headers.startswith("Received-SPF: softfail (mx.test.example: domain of transitioning")
    # RFC 7208 §9.1: above our own Received header.
    assert headers.index("Received-SPF:") < headers.index("Received: from")
    assert "client-ip=127.0.0.1;" in headers
    assert 'envelope-from="someone@softfail.spf.example";' in headers
    assert "identity=mailfrom;" in headers
    notes = gw.queue.load(gw.queue_ids()[0]).envelope.notes
    assert [(n["plugin"], n["score"]) for n in notes] == [("mail_spf", 2.0)]


def test_pass_is_accepted_with_a_pass_header(gateway_factory: Factory, spf_dns: DnsTestServer) -> None:
    gw = start(gateway_factory, spf_dns)
    stored = send(gw, "someone@pass.spf.example")
    assert stored.startswith(b"Received-SPF: pass (mx.test.example: domain of someone@pass.spf.example")


def test_softfail_score_can_reach_the_reject_threshold(gateway_factory: Factory, spf_dns: DnsTestServer) -> None:
    gw = start(gateway_factory, spf_dns, "softfail_score = 6.0")
    with client(gw) as c:
        c.ehlo()
        with pytest.raises(smtplib.SMTPDataError) as refused:
            c.sendmail("someone@softfail.spf.example", ["alice@localhost"], MESSAGE)
    assert refused.value.smtp_code == 550
    assert gw.queue_ids() == []


def test_dns_failure_is_a_temporary_refusal(gateway_factory: Factory, spf_dns: DnsTestServer) -> None:
    gw = start(gateway_factory, spf_dns)
    code, text = mail_from(gw, "someone@servfail.spf.example")
    assert (code, text.split()[0]) == SPF_TEMPERROR


def test_permerror_is_scored_by_default_and_refused_when_configured(
    gateway_factory: Factory, spf_dns: DnsTestServer
) -> None:
    lenient = start(gateway_factory, spf_dns)
    assert mail_from(lenient, "someone@syntax.spf.example")[0] == 250
    strict = start(gateway_factory, spf_dns, 'permerror_action = "reject"')
    code, text = mail_from(strict, "someone@syntax.spf.example")
    assert (code, text.split()[0]) == SPF_ERROR


def test_null_sender_is_judged_by_its_helo_name(gateway_factory: Factory, spf_dns: DnsTestServer) -> None:
    gw = start(gateway_factory, spf_dns)
    code, text = mail_from(gw, "", helo="badhelo.spf.example")
    assert (code, text.split()[0]) == SPF_FAIL
    stored = send(gw, "", helo="mta.spf.example")
    headers = stored.split(b"\r\n\r\n", 1)[0].decode()
    assert headers.startswith("Received-SPF: pass")
    assert "identity=helo;" in headers and "helo=mta.spf.example;" in headers


def test_relay_client_is_not_checked(gateway_factory: Factory, spf_dns: DnsTestServer) -> None:
    gw = start(gateway_factory, spf_dns, extra='[relay]\nclients = ["127.0.0.0/8"]')
    stored = send(gw, "someone@fail.spf.example")
    assert b"Received-SPF:" not in stored


def test_authenticated_user_is_not_checked(
    gateway_factory: Factory, spf_dns: DnsTestServer, tmp_path: Path
) -> None:
    users = tmp_path / "users"
    users.write_text(f"alice:{hash_password('s3cret', ln=4)}\n")
    gw = start(gateway_factory, spf_dns, extra=f'[auth]\nusers_file = "{users}"')
    with client(gw) as c:
        c.ehlo()
        c.starttls(context=no_verify_context())
        c.ehlo()
        c.login("alice", "s3cret")
        assert c.sendmail("alice@fail.spf.example", ["bob@localhost"], MESSAGE) == {}
    assert b"Received-SPF:" not in gw.queue.read_message(gw.queue_ids()[0])


def test_two_gateways_in_one_process_use_their_own_dns(
    gateway_factory: Factory, spf_dns: DnsTestServer, other_dns: DnsTestServer
) -> None:
    ours = start(gateway_factory, spf_dns)
    theirs = start(gateway_factory, other_dns)  # says pass.spf.example is "-all"
    assert mail_from(ours, "someone@pass.spf.example")[0] == 250
    assert mail_from(theirs, "someone@pass.spf.example")[0] == 550
    assert mail_from(ours, "someone@pass.spf.example")[0] == 250


def test_unknown_action_stops_startup(gateway_factory: Factory, spf_dns: DnsTestServer) -> None:
    with pytest.raises(PolicyError, match="fail_action"):
        start(gateway_factory, spf_dns, 'fail_action = "bounce"')
