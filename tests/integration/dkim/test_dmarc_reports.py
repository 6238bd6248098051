"""DMARC aggregate reports end to end: a day of mixed traffic over SMTP, then the report
as ``gateway dmarc report`` shows it and as it reaches a local mailbox.

The DNS server on loopback serves the DKIM test zone plus ``rpt.example`` (reports to
``dmarc@reports.test``, a size-limited ``tiny@reports.test!1k`` and ``agg@unauth.example``,
which never authorised them, RFC 7489 §7.1) and ``lax.example`` (``pct=0``). The gateway
delivers ``reports.test`` into Maildirs; ``queue_dkim_sign`` signs for ``out.example``,
the domain of the reporting address.
"""

from __future__ import annotations

import email
import email.policy
import gzip
import re
import subprocess
import sys
import time
from pathlib import Path

import dkim
import pytest
import xmlschema

from tests.conftest import wait_for
from tests.dnsserver import DnsTestServer
from tests.integration.dkim.conftest import DkimWorld, make_message, send, sender_sign
from tests.processes import gateway_env

SCHEMA = Path(__file__).parents[2] / "fixtures" / "dmarc" / "rua.xsd"
HOSTNAME = "mx.test.example"
RUA = "mailto:dmarc@reports.test!10m,mailto:tiny@reports.test!1k,mailto:agg@unauth.example"


@pytest.fixture
def report_dns(dkim_world: DkimWorld):
    key_record = next(l for l in dkim_world.zone.splitlines() if l.startswith("sel1._domainkey.reject.example."))
    zone = dkim_world.zone + "\n".join([
        f'_dmarc.rpt.example. IN TXT "v=DMARC1; p=quarantine; rua={RUA}; ruf=mailto:forensic@reports.test; fo=1"',
        '_dmarc.ruf.example. IN TXT "v=DMARC1; p=reject; ruf=mailto:forensic@reports.test,mailto:f@unauth.example"',
        'ruf.example._report._dmarc.reports.test. IN TXT "v=DMARC1"',
        '_dmarc.lax.example. IN TXT "v=DMARC1; p=reject; pct=0; rua=mailto:dmarc@reports.test"',
        'rpt.example._report._dmarc.reports.test. IN TXT "v=DMARC1"',
        'lax.example._report._dmarc.reports.test. IN TXT "v=DMARC1"',
        'rpt.example. IN TXT "v=spf1 ip4:127.0.0.0/8 -all"',
        key_record.replace("sel1._domainkey.reject.example.", "sel1._domainkey.rpt.example."),
    ]) + "\n"
    server = DnsTestServer(zone)
    try:
        yield server
    finally:
        server.stop()


def report_policy(world: DkimWorld, dns_port: int, root: Path, period: str = "1d", extra: str = "") -> str:
    return f"""
[server]
hostname = "{HOSTNAME}"
queue_dir = "{root / 'queue'}"
var_dir = "{root / 'var'}"

[[listeners]]
name = "smtp"
address = "127.0.0.1"
port = 2525
tls = "none"

[local]
domains = ["local.example", "reports.test"]
users = ["alice", "dmarc", "tiny", "forensic"]
mail_root = "{root / 'mail'}"

[delivery]
poll_interval = "200ms"

[dns]
nameservers = ["127.0.0.1:{dns_port}"]
timeout = "2s"

[[plugins]]
name = "rcpt_relay"
[[plugins]]
name = "rcpt_local_users"
[[plugins]]
name = "mail_spf"
add_header = false
[[plugins]]
name = "data_dkim_verify"
[[plugins]]
name = "data_dmarc"
aggregate_reports = true
report_period = "{period}"
report_from = "dmarc-reports@out.example"
report_org_name = "Test Receiver"
{extra}
[[plugins]]
name = "queue_authentication_results"
[[plugins]]
name = "queue_dkim_sign"
[plugins.domains."out.example"]
selector = "rsa1"
key_file = "{world.out_rsa}"
[[plugins]]
name = "queue_received_header"
"""


def mailbox(root: Path, user: str) -> list[bytes]:
    new = root / "mail" / user / "Maildir" / "new"
    return [p.read_bytes() for p in sorted(new.glob("*"))] if new.exists() else []


def cli(policy: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "dmarc", "report", "--policy", str(policy), *args],
        env=gateway_env(), capture_output=True, text=True, timeout=60,
    )


def rows(xml: str) -> dict[tuple[str, str, str], int]:
    """(disposition, dkim, spf) -> count, after validating against the RFC's schema."""
    schema = xmlschema.XMLSchema(str(SCHEMA))
    schema.validate(xml)
    doc = schema.to_dict(xml)
    out: dict[tuple[str, str, str], int] = {}
    for record in doc["record"]:
        evaluated = record["row"]["policy_evaluated"]
        key = (evaluated["disposition"], evaluated["dkim"], evaluated["spf"])
        out[key] = out.get(key, 0) + record["row"]["count"]
    return out


def report_of(raw: bytes) -> tuple[email.message.EmailMessage, str, str]:
    """The message, its attachment's file name and the XML in it."""
    message = email.message_from_bytes(raw, policy=email.policy.default)
    (part,) = list(message.iter_attachments())
    assert part.get_content_type() == "application/gzip"
    return message, part.get_filename(), gzip.decompress(part.get_content()).decode()


def mixed_traffic(port: int, world: DkimWorld) -> None:
    """Seven messages from rpt.example (3 aligned SPF, 2 aligned DKIM, 2 failing), one
    failing lax.example one (pct=0) and one of a domain without a record."""
    for i in range(3):
        assert send(port, "bounce@rpt.example", make_message("ceo@rpt.example", f"spf {i}"))[0] == 250
    for i in range(2):
        signed = sender_sign(make_message("ceo@rpt.example", f"dkim {i}"), "rpt.example", "sel1", world.inbound_rsa)
        assert send(port, "list@elsewhere.example", signed)[0] == 250
    for i in range(2):  # quarantined, still reported
        assert send(port, "spoof@elsewhere.example", make_message("ceo@rpt.example", f"fail {i}"))[0] == 250
    assert send(port, "spoof@elsewhere.example", make_message("ceo@lax.example", "lax"))[0] == 250
    assert send(port, "x@elsewhere.example", make_message("x@nodmarc.example", "none"))[0] == 250


def test_a_day_of_traffic_gives_a_valid_report_that_reaches_the_mailbox(
    gateway_factory, dkim_world, report_dns, tmp_path: Path
) -> None:
    text = report_policy(dkim_world, report_dns.port, tmp_path)
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(text)
    gw = gateway_factory(text)
    mixed_traffic(gw.port, dkim_world)

    shown = cli(policy_file, "--preview", "rpt.example")
    assert shown.returncode == 0, shown.stderr
    assert rows(shown.stdout) == {("none", "fail", "pass"): 3, ("none", "pass", "fail"): 2, ("quarantine", "fail", "fail"): 2}
    lax = cli(policy_file, "--preview", "lax.example")
    assert "<type>sampled_out</type>" in lax.stdout and rows(lax.stdout) == {("none", "fail", "fail"): 1}
    assert cli(policy_file, "--preview", "nodmarc.example").returncode == 1

    sent = cli(policy_file, "--send", "--period", "current")
    assert sent.returncode == 0 and "2 report(s) queued" in sent.stdout, sent.stderr
    assert wait_for(lambda: len(mailbox(tmp_path, "dmarc")) == 2, 15)
    reports = {}
    for raw in mailbox(tmp_path, "dmarc"):
        message, filename, xml = report_of(raw)
        domain = re.match(r"Report Domain: (\S+) Submitter: Test Receiver Report-ID: <\S+>$", message["Subject"])
        assert domain is not None, message["Subject"]
        begin = int(time.time() // 86400 * 86400)
        assert filename == f"{HOSTNAME}!{domain.group(1)}!{begin}!{begin + 86399}.xml.gz"
        assert message["From"] == "dmarc-reports@out.example"
        # Signed by queue_dkim_sign's key for the reporting address's domain.
        assert dkim.verify(raw, dnsfunc=dkim_world.dnsfunc), "report mail not DKIM-signed"
        reports[domain.group(1)] = xml
    assert rows(reports["rpt.example"]) == {
        ("none", "fail", "pass"): 3, ("none", "pass", "fail"): 2, ("quarantine", "fail", "fail"): 2,
    }
    assert rows(reports["lax.example"]) == {("none", "fail", "fail"): 1}
    # Too big for tiny's 1k limit; never authorised by unauth.example: not sent there.
    assert mailbox(tmp_path, "tiny") == []
    assert all(b"agg@unauth.example" not in raw for raw in mailbox(tmp_path, "dmarc"))
    # Failure reports are off by default, though rpt.example asks for them (ruf=, fo=1).
    assert mailbox(tmp_path, "forensic") == []
    # Sent once: asking again queues nothing.
    again = cli(policy_file, "--send", "--period", "current")
    assert again.returncode == 0 and "0 report(s) queued" in again.stdout


def test_the_running_gateway_sends_each_period_once_across_restarts(
    gateway_factory, dkim_world, report_dns, tmp_path: Path
) -> None:
    text = report_policy(dkim_world, report_dns.port, tmp_path, period="2s")
    gw = gateway_factory(text)
    assert send(gw.port, "bounce@rpt.example", make_message("ceo@rpt.example", "timed"))[0] == 250
    # The period ends within 2 s, the timer checks every 0.5 s: no command involved.
    assert wait_for(lambda: len(mailbox(tmp_path, "dmarc")) == 1, 15)
    _, _, xml = report_of(mailbox(tmp_path, "dmarc")[0])
    assert rows(xml) == {("none", "fail", "pass"): 1}
    assert wait_for(lambda: gw.app.counters.dmarc_reports.get("sent") == 1, 5)
    assert gw.app.counters.dmarc_reports.get("too_big") == 1
    assert gw.app.counters.dmarc_reports.get("unauthorized") == 1
    gw.stop()
    # A restart on the same state finds the period sent.
    again = gateway_factory(text)
    time.sleep(3)
    assert len(mailbox(tmp_path, "dmarc")) == 1
    assert again.app.counters.dmarc_reports.get("sent") is None


def test_failure_reports_are_redacted_and_limited(gateway_factory, dkim_world, report_dns, tmp_path: Path) -> None:
    extra = "failure_reports = true\nfailure_report_limit = 2"
    gw = gateway_factory(report_policy(dkim_world, report_dns.port, tmp_path, extra=extra))
    body = b"Secret body text.\r\n"
    for i in range(3):
        message = make_message("ceo@ruf.example", f"forged {i}", body=body, to="alice@local.example")
        code, _ = send(gw.port, "spoof@elsewhere.example", message)
        assert code == 550  # p=reject
    assert wait_for(lambda: len(mailbox(tmp_path, "forensic")) == 2, 15)
    time.sleep(1)
    assert len(mailbox(tmp_path, "forensic")) == 2  # failure_report_limit: 2 an hour
    assert gw.app.counters.dmarc_reports.get("failure_limited") == 1
    raw = mailbox(tmp_path, "forensic")[0]
    report = email.message_from_bytes(raw, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "feedback-report"
    parts = list(report.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/feedback-report", "text/rfc822-headers"]
    feedback = parts[1].as_bytes().decode()
    for field in ("Feedback-Type: auth-failure", "Auth-Failure: dmarc", "Reported-Domain: ruf.example",
                  "Source-IP: 127.0.0.1", "Delivery-Result: reject", "Identity-Alignment: none"):
        assert field in feedback, (field, feedback)
    headers = parts[2].as_bytes()
    assert b"From: Author <redacted@ruf.example>" in headers and b"To: redacted@local.example" in headers
    assert b"ceo@" not in raw and b"alice@" not in raw and b"spoof@" not in raw
    assert b"Secret body text" not in raw
    # Never to an address that did not authorise it (RFC 7489 §7.1).
    assert b"f@unauth.example" not in raw and gw.app.counters.dmarc_reports.get("unauthorized") == 2
    assert dkim.verify(raw, dnsfunc=dkim_world.dnsfunc)
