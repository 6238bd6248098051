"""SMTP TLS reporting (RFC 8460) end to end, against real parts on loopback.

A zone signed here (``rpt.example``) is served and validated by real unbound
(:class:`tests.dnssec.DnssecLab`); it publishes three recipient domains, each with an
``_smtp._tls`` record naming a local mailbox of the gateway (``tlsrpt@gw.test.example``)
and, for one, an ``https:`` destination served by a real HTTPS server here:

- ``sts.rpt.example``: an MTA-STS ``enforce`` policy (a real HTTPS policy server) and an MX
  host with a certificate from the test CA: a successful ``sts`` session;
- ``dane.rpt.example``: its MX host has a DNSSEC-valid TLSA record its certificate does
  not match: a ``tlsa-invalid`` failure (the mail waits);
- ``strip.rpt.example``: ``enforce`` again, but its MX host offers no STARTTLS: a
  ``starttls-not-supported`` failure (the mail waits).

The gateway delivers, counts, and the report it sends comes back through its own queue
into the Maildir, where it is parsed and checked against the deliveries made.
"""

from __future__ import annotations

import base64
import email
import email.policy
import gzip
import hashlib
import http.server
import json
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.dnssec import DnssecLab, has_tools
from tests.smtppeer import SmtpPeer, free_port
from tests.testca import PolicyServer, TestCA

HOSTNAME = "gw.test.example"
ADDRESS = {"mx-sts": "127.0.0.11", "mx-dane": "127.0.0.12", "mx-strip": "127.0.0.13"}
REPORT_KEYS = {"organization-name", "date-range", "contact-info", "report-id", "policies"}


class _Receiver(http.server.BaseHTTPRequestHandler):
    server: Any

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with self.server.owner.lock:
            self.server.owner.posts.append((self.path, self.headers.get("Content-Type", ""), body))
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


class ReportServer:
    """A real HTTPS server on loopback that keeps every POST: (path, Content-Type, body)."""

    def __init__(self, certificate: tuple[Path, Path]) -> None:
        self.port = free_port()
        self.posts: list[tuple[str, str, bytes]] = []
        self.lock = threading.Lock()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(certificate[0]), str(certificate[1]))
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), _Receiver)
        self._server.owner = self  # type: ignore[attr-defined]
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, name="tlsrpt-https", daemon=True)

    def __enter__(self) -> ReportServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@dataclass
class World:
    lab: DnssecLab
    port: int
    ca: TestCA
    https: PolicyServer
    reports: ReportServer
    dkim_key: Path
    dkim_public: str
    certs: dict[str, tuple[Path, Path]] = field(default_factory=dict)

    def dnsfunc(self, name: bytes, timeout: float = 5) -> bytes | None:
        if name.rstrip(b".") == b"s1._domainkey.gw.test.example":
            return f"v=DKIM1; k=rsa; p={self.dkim_public}".encode()
        return None


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    if not has_tools():
        pytest.skip("unbound or bind9-utils is not installed (scripts/install-system-deps.sh)")
    base = tmp_path_factory.mktemp("tlsrpt")
    port = free_port(*ADDRESS.values())
    ca = TestCA(base / "ca")
    nobody = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    dkim_key = base / "dkim.pem"
    dkim_key.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    public = base64.b64encode(key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )).decode()
    https = PolicyServer(ca.issue("mta-sts.sts.rpt.example", "mta-sts.strip.rpt.example"))
    https.policies["sts.rpt.example"] = "version: STSv1\nmode: enforce\nmx: mx-sts.rpt.example\nmax_age: 86400\n"
    https.policies["strip.rpt.example"] = "version: STSv1\nmode: enforce\nmx: mx-strip.rpt.example\nmax_age: 86400\n"
    reports = ReportServer(ca.issue("reports.rpt.example"))
    mailto = f"mailto:tlsrpt@{HOSTNAME}"
    zone = f"""$ORIGIN rpt.example.
$TTL 300
@ IN SOA ns1.rpt.example. hostmaster.rpt.example. 1 3600 600 86400 300
@ IN NS ns1.rpt.example.
ns1 IN A 127.0.0.1
reports IN A 127.0.0.1
sts IN MX 10 mx-sts.rpt.example.
_mta-sts.sts IN TXT "v=STSv1; id=1;"
mta-sts.sts IN A 127.0.0.1
_smtp._tls.sts IN TXT "v=TLSRPTv1; rua={mailto}"
dane IN MX 10 mx-dane.rpt.example.
_{port}._tcp.mx-dane IN TLSA 3 1 1 {hashlib.sha256(nobody).hexdigest()}
_smtp._tls.dane IN TXT "v=TLSRPTv1; rua={mailto},https://reports.rpt.example:{reports.port}/tlsrpt"
strip IN MX 10 mx-strip.rpt.example.
_mta-sts.strip IN TXT "v=STSv1; id=1;"
mta-sts.strip IN A 127.0.0.1
_smtp._tls.strip IN TXT "v=TLSRPTv1; rua={mailto}"
""" + "".join(f"{h} IN A {a}\n" for h, a in ADDRESS.items())
    lab = DnssecLab(base / "dns")
    lab.sign("rpt.example", zone)
    certs = {h: ca.issue(f"{h}.rpt.example") for h in ADDRESS}
    with lab, https, reports:
        yield World(lab, port, ca, https, reports, dkim_key, public, certs)


def gateway_policy(world: World, period: str = "1d") -> str:
    return f"""
[server]
hostname = "{HOSTNAME}"
[[listeners]]
name = "smtp"
tls = "none"
[local]
domains = ["{HOSTNAME}"]
users = ["postmaster", "tlsrpt"]
[relay]
clients = ["127.0.0.0/8"]
[dns]
nameservers = ["127.0.0.1:{world.lab.port}"]
timeout = "3s"
[delivery]
smtp_port = {world.port}
tls_ca_file = "{world.ca.ca_file}"
mta_sts_https_port = {world.https.port}
mta_sts_timeout = "5s"
retry_base = "1h"
poll_interval = "200ms"
[tls_reporting]
enabled = true
period = "{period}"
report_from = "tlsrpt-noreply@{HOSTNAME}"
org_name = "Test Sender"
https_ca_file = "{world.ca.ca_file}"
[[plugins]]
name = "rcpt_relay"
[[plugins]]
name = "rcpt_local_users"
[[plugins]]
name = "queue_dkim_sign"
[plugins.domains."{HOSTNAME}"]
selector = "s1"
key_file = "{world.dkim_key}"
"""


def peers(world: World) -> list[SmtpPeer]:
    """mx-sts and mx-dane with STARTTLS and CA-signed certificates; mx-strip without STARTTLS."""
    return [
        SmtpPeer(host=ADDRESS["mx-sts"], port=world.port, hostname="mx-sts.rpt.example", tls=True,
                 certificate=world.certs["mx-sts"]),
        SmtpPeer(host=ADDRESS["mx-dane"], port=world.port, hostname="mx-dane.rpt.example", tls=True,
                 certificate=world.certs["mx-dane"]),
        SmtpPeer(host=ADDRESS["mx-strip"], port=world.port, hostname="mx-strip.rpt.example"),
    ]


def mailbox(gw: Any, user: str) -> list[bytes]:
    new = Path(gw.policy.local.mail_root) / user / "Maildir" / "new"
    return [p.read_bytes() for p in sorted(new.glob("*"))] if new.exists() else []


def run_cli(policy_file: Path, *args: str) -> tuple[int, str]:
    import contextlib
    import io

    from gateway.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["tls", "report", "--policy", str(policy_file), *args])
    return status, out.getvalue()


def check_schema(document: dict[str, Any]) -> None:
    """The fields and types RFC 8460 §4.4 requires."""
    assert set(document) == REPORT_KEYS
    assert set(document["date-range"]) == {"start-datetime", "end-datetime"}
    for entry in document["policies"]:
        policy = entry["policy"]
        assert policy["policy-type"] in ("sts", "tlsa", "no-policy-found")
        assert isinstance(policy["policy-domain"], str)
        if policy["policy-type"] != "no-policy-found":
            assert all(isinstance(s, str) for s in policy["policy-string"])
        assert set(entry["summary"]) == {"total-successful-session-count", "total-failure-session-count"}
        failed = sum(d["failed-session-count"] for d in entry.get("failure-details", []))
        assert failed == entry["summary"]["total-failure-session-count"]
        for detail in entry.get("failure-details", []):
            assert {"result-type", "sending-mta-ip", "receiving-mx-hostname", "receiving-ip",
                    "failed-session-count", "failure-reason-code"} <= set(detail)


def summary(document: dict[str, Any]) -> dict[tuple[str, str], tuple[int, int, list[tuple[str, str, str, str]]]]:
    """(domain, type) -> (successes, failures, [(result, sending ip, mx host, receiving ip)])."""
    found = {}
    for entry in document["policies"]:
        details = [
            (d["result-type"], d["sending-mta-ip"], d["receiving-mx-hostname"], d["receiving-ip"])
            for d in entry.get("failure-details", [])
        ]
        found[(entry["policy"]["policy-domain"], entry["policy"]["policy-type"])] = (
            entry["summary"]["total-successful-session-count"], entry["summary"]["total-failure-session-count"], details,
        )
    return found


EXPECTED = {
    ("sts.rpt.example", "sts"): (1, 0, []),
    ("dane.rpt.example", "tlsa"): (0, 1, [("tlsa-invalid", "127.0.0.1", "mx-dane.rpt.example", ADDRESS["mx-dane"])]),
    ("strip.rpt.example", "sts"): (
        0, 1, [("starttls-not-supported", "127.0.0.1", "mx-strip.rpt.example", ADDRESS["mx-strip"])]
    ),
}


def test_the_report_reaches_the_mailbox_and_the_https_destination(
    world: World, gateway_factory: Any, tmp_path: Path
) -> None:
    from tests.conftest import MESSAGE, smtp, wait_for

    text = gateway_policy(world)
    gw = gateway_factory(text)
    policy_file = tmp_path / "policy.toml"
    server = gw.policy.server
    policy_file.write_text(text.replace(
        "[server]\n", f'[server]\nqueue_dir = "{server.queue_dir}"\nvar_dir = "{server.var_dir}"\n', 1
    ))
    mx_sts, mx_dane, mx_strip = peers(world)
    with mx_sts, mx_dane, mx_strip:
        with smtp(gw.port) as client:
            for rcpt in ("b@sts.rpt.example", "c@dane.rpt.example", "d@strip.rpt.example"):
                assert client.sendmail("a@src.example", [rcpt], MESSAGE) == {}

        def previewed() -> dict[str, Any]:
            status, out = run_cli(policy_file, "--preview")
            return {d["policies"][0]["policy"]["policy-domain"]: d for d in json.loads(out)} if status == 0 else {}

        # Counted (in the gateway's memory, then its store) once the three first attempts are done.
        assert wait_for(lambda: len(previewed()) == 3, timeout=30)
        assert len(mx_sts.messages) == 1 and mx_sts.messages[0].has_tls
        assert mx_dane.messages == [] and mx_strip.messages == []
    shown = previewed()
    for domain, document in shown.items():
        check_schema(document)
        assert document["organization-name"] == "Test Sender"
        assert document["contact-info"] == f"tlsrpt-noreply@{HOSTNAME}"
    assert {k: v for d in shown.values() for k, v in summary(d).items()} == EXPECTED
    assert shown["sts.rpt.example"]["policies"][0]["policy"]["policy-string"] == [
        "version: STSv1", "mode: enforce", "mx: mx-sts.rpt.example", "max_age: 86400",
    ]
    assert shown["dane.rpt.example"]["policies"][0]["policy"]["mx-host"] == ["mx-dane.rpt.example"]

    status, out = run_cli(policy_file, "--send", "--period", "current")
    assert status == 0 and "3 report(s) sent" in out
    assert wait_for(lambda: len(mailbox(gw, "tlsrpt")) == 3, timeout=20)
    mailed: dict[str, dict[str, Any]] = {}
    for raw in mailbox(gw, "tlsrpt"):
        assert dkim.verify(raw, dnsfunc=world.dnsfunc), "report mail not DKIM-signed"
        message = email.message_from_bytes(raw, policy=email.policy.default)
        domain = str(message["TLS-Report-Domain"])
        assert message["TLS-Report-Submitter"] == "Test Sender"
        assert str(message["Subject"]).startswith(f"Report Domain: {domain} Submitter: Test Sender Report-ID: <")
        assert message.get_content_type() == "multipart/report" and message.get_param("report-type") == "tlsrpt"
        (part,) = list(message.iter_attachments())
        assert part.get_content_type() == "application/tlsrpt+gzip"
        assert str(part.get_filename()).startswith(f"{HOSTNAME}!{domain}!")
        mailed[domain] = json.loads(gzip.decompress(part.get_content()))
    assert mailed == shown
    # dane.rpt.example also named an https: destination: the same report, POSTed gzip'd.
    ((path, content_type, body),) = world.reports.posts
    assert (path, content_type) == ("/tlsrpt", "application/tlsrpt+gzip")
    assert json.loads(gzip.decompress(body)) == shown["dane.rpt.example"]
    # Sent once: a second --send finds every report sent.
    status, out = run_cli(policy_file, "--send", "--period", "current")
    assert status == 0 and "0 report(s) sent" in out
    world.reports.posts.clear()


def test_the_master_sends_each_period_report_by_itself(world: World, gateway_factory: Any) -> None:
    """With a short period, the running gateway's timer sends the ended period's report
    without any command, and the sessions it counts are the deliveries made."""
    from tests.conftest import MESSAGE, smtp, wait_for

    gw = gateway_factory(gateway_policy(world, period="3s"))
    mx_sts = peers(world)[0]
    with mx_sts:
        with smtp(gw.port) as client:
            for i in range(2):
                assert client.sendmail("a@src.example", [f"b{i}@sts.rpt.example"], MESSAGE) == {}
        assert wait_for(lambda: len(mx_sts.messages) == 2, timeout=20)

        def successes() -> int:
            total = 0
            for raw in mailbox(gw, "tlsrpt"):
                message = email.message_from_bytes(raw, policy=email.policy.default)
                (part,) = list(message.iter_attachments())
                document = json.loads(gzip.decompress(part.get_content()))
                check_schema(document)
                total += sum(e["summary"]["total-successful-session-count"] for e in document["policies"])
            return total

        assert wait_for(lambda: successes() == 2, timeout=30)
    assert world.reports.posts == []


def test_the_counts_of_every_worker_add_up(world: World, tmp_path: Path) -> None:
    """With [server] workers = 2 each process counts the sessions it delivers and adds them
    to the shared store: the report has every delivery, whichever process made it."""
    import re
    import smtplib

    from tests.conftest import MESSAGE, wait_for
    from tests.processes import start_gateway, stop_gateway, write_policy

    port = free_port()
    extra = gateway_policy(world).split("[relay]", 1)[1].split("[[plugins]]", 1)[0]
    policy_file = write_policy(tmp_path, port, workers=2, extra="[relay]" + extra)
    log_path = tmp_path / "gateway.log"
    sent = 24
    mx_sts = peers(world)[0]
    with mx_sts, log_path.open("wb") as log_file:
        proc = start_gateway(policy_file, port, stderr=log_file, timeout=60)
        try:
            for i in range(sent):  # one connection each: the kernel spreads them over the processes
                with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test.example", timeout=10) as client:
                    assert client.sendmail("a@src.example", [f"r{i}@sts.rpt.example"], MESSAGE) == {}
            assert wait_for(lambda: len(mx_sts.messages) == sent, timeout=60)

            def counted() -> int:
                status, out = run_cli(policy_file, "--preview", "sts.rpt.example")
                if status != 0:
                    return 0
                return int(json.loads(out)["policies"][0]["summary"]["total-successful-session-count"])

            assert wait_for(lambda: counted() == sent, timeout=30)
        finally:
            assert stop_gateway(proc) == 0
    delivering = set(re.findall(rb"gateway\[(\d+)\] INFO gateway\.delivery\.remote .*policy=sts-enforce", log_path.read_bytes()))
    assert len(delivering) >= 2, "every delivery was made by one process: the test proves nothing"


def test_a_restarted_master_reports_what_the_run_before_counted(world: World, tmp_path: Path) -> None:
    """The report timer runs from start-up, not from the first remote delivery: a gateway
    restarted before the period ended, that delivers nothing remotely, still sends the
    report of the sessions its previous run counted (kept in the state store)."""
    from gateway.testing import running_gateway
    from tests.conftest import MESSAGE, smtp, wait_for

    text = gateway_policy(world, period="8s")
    mx_sts = peers(world)[0]

    def successes(gw: Any) -> int:
        total = 0
        for raw in mailbox(gw, "tlsrpt"):
            message = email.message_from_bytes(raw, policy=email.policy.default)
            (part,) = list(message.iter_attachments())
            document = json.loads(gzip.decompress(part.get_content()))
            total += sum(e["summary"]["total-successful-session-count"] for e in document["policies"])
        return total

    with mx_sts:
        with running_gateway(text, tmp_path) as gw:
            with smtp(gw.port) as client:
                for i in range(2):
                    assert client.sendmail("a@src.example", [f"c{i}@sts.rpt.example"], MESSAGE) == {}
            assert wait_for(lambda: len(mx_sts.messages) == 2, timeout=20)
        assert mailbox(gw, "tlsrpt") == []  # the period had not ended: nothing sent yet
        with running_gateway(text, tmp_path) as again:
            assert wait_for(lambda: successes(again) == 2, timeout=40)
        assert len(mx_sts.messages) == 2  # the second run delivered nothing remotely
