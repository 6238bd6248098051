"""The shipped ``policies/edge-relay.toml`` as an operator runs it, from fresh state.

Only addresses, ports, paths and routes differ from the shipped file (see
:func:`edge_relay_policy`), and ``workers = 2``. Around it, all real:

- the office: a private Postfix on 127.0.0.2 (the example's office network, 192.0.2.0/24,
  becomes 127.0.0.2/32) that relays through the gateway (``relayhost``);
- the inside: a private Postfix with STARTTLS, ``mail.internal.example.com`` of the
  example's routes (``tls = "required"``), which logs every Message-ID it accepts;
- clamd and spamd (this directory's session daemons), and a DNS server on loopback that
  serves the two DNS lists the example names: zen.spamhaus.org lists 127.0.0.1, and
  nothing else is listed;
- strangers: SMTP clients from 127.0.0.1 (listed) and 127.0.0.3 (not listed).

The public Internet is the one thing not here: the example's DNS list zones are served
by the test DNS server, and no route leads off this machine.
"""

from __future__ import annotations

import smtplib
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.dnsserver import DnsTestServer
from tests.integration.scanners.conftest import Clamd, Spamd
from tests.postfix import PrivatePostfix, private_postfix
from tests.processes import ROOT, free_port, gateway_env, port_open, start_gateway, stop_gateway

pytestmark = pytest.mark.slow

OFFICE, LISTED, STRANGER = "127.0.0.2", "127.0.0.1", "127.0.0.3"

# The two DNS lists of the example. 127.0.0.1 is on zen (127.0.0.2: "reject").
DNSBL_ZONE = """
$TTL 60
zen.spamhaus.org.             IN SOA ns.zen.spamhaus.org. hostmaster.zen.spamhaus.org. 1 3600 600 86400 60
1.0.0.127.zen.spamhaus.org.   IN A   127.0.0.2
1.0.0.127.zen.spamhaus.org.   IN TXT "listed for the test"
list.dnswl.org.               IN SOA ns.list.dnswl.org. hostmaster.list.dnswl.org. 1 3600 600 86400 60
"""


def _cert(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    key.chmod(0o644)  # Postfix's smtpd reads it as user postfix
    return cert, key


def _gateway(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], env=gateway_env(),
                          input=stdin, capture_output=True, text=True, timeout=60)


@dataclass
class Site:
    """Everything around the gateway, and the edited example's text."""

    tmp: Path
    inside: PrivatePostfix
    office: PrivatePostfix
    dns: DnsTestServer
    ports: dict[str, int]
    policy_text: str

    @property
    def mx(self) -> int:
        return self.ports["mx"]

    def write(self, var: str, text: str | None = None) -> Path:
        """The policy with queue and state under ``tmp/var``; returns its path."""
        state = self.tmp / var
        text = (text or self.policy_text).replace("/var/spool/gateway/queue", str(state / "queue"))
        text = text.replace("/var/lib/gateway", str(state / "var"))
        path = self.tmp / f"{var}.toml"
        path.write_text(text)
        return path


def edge_relay_policy(tmp: Path, ports: dict[str, int], inside: int, dns: int,
                      clamd: Clamd, spamd: Spamd) -> str:
    """The shipped example with only addresses, ports, paths and routes changed."""
    text = (ROOT / "policies" / "edge-relay.toml").read_text()
    cert, key = _cert(tmp, "mx1.example.com")
    users = tmp / "users"
    users.write_text(_gateway("passwd", "office-user", stdin="secret\n").stdout)
    keys = tmp / "dkim"
    keys.mkdir()
    made = _gateway("dkim", "keygen", "--domain", "example.com", "--selector", "2026a", "--out", str(keys))
    assert made.returncode == 0, made.stderr
    changes = [
        ("workers = 4", "workers = 2"),
        ('address = "0.0.0.0"', 'address = "127.0.0.1"'),
        ('port = 25\ntls = "starttls"', f'port = {ports["mx"]}\ntls = "starttls"'),
        ("port = 587", f"port = {ports['submission']}"),
        ("port = 465", f"port = {ports['submissions']}"),
        ("/etc/gateway/tls/fullchain.pem", str(cert)),
        ("/etc/gateway/tls/privkey.pem", str(key)),
        ("/etc/gateway/users", str(users)),
        ('"192.0.2.0/24"', f'"{OFFICE}/32"'),
        ("/var/run/clamav/clamd.ctl", clamd.socket),
        ('"127.0.0.1:783"', f'"{spamd.address}"'),
        ("/etc/gateway/dkim/example.com.2026a.key", str(keys / "example.com.2026a.key")),
        ('host = "mail.internal.example.com"\nport = 25', f'host = "127.0.0.1"\nport = {inside}'),
    ]
    for old, new in changes:
        assert old in text, f"the shipped example no longer has {old!r}: update this test's edits"
        text = text.replace(old, new)
    # Paths and addresses the example leaves to their defaults: the mailboxes and the
    # resolver (the test DNS server instead of /etc/resolv.conf).
    text = text.replace("[local]\n", f'[local]\nmail_root = "{tmp / "mail"}"\n', 1)
    return text + f'\n[dns]\nnameservers = ["127.0.0.1:{dns}"]\n'


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, clamd_daemon: Clamd, spamd_daemon: Spamd) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("edge")
    tmp.chmod(0o755)
    cert, key = _cert(tmp, "mail.internal.example.com")
    ports = {name: free_port() for name in ("mx", "submission", "submissions")}
    inside_cf = f"""\
relay_domains = example.com, example.org
smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination
relay_transport = discard
default_transport = discard
smtpd_tls_security_level = may
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_tls_loglevel = 1"""
    office_cf = f"""\
relayhost = [127.0.0.1]:{ports['mx']}
smtp_bind_address = {OFFICE}
default_transport = smtp
relay_transport = smtp
smtp_tls_security_level = may
minimal_backoff_time = 2s
maximal_backoff_time = 4s
queue_run_delay = 2s
smtpd_recipient_restrictions = permit_mynetworks, reject"""
    with DnsTestServer(DNSBL_ZONE) as dns, \
            private_postfix(inside_cf, hostname="mail.internal.example.com") as inside, \
            private_postfix(office_cf, hostname="office.example.com") as office:
        text = edge_relay_policy(tmp, ports, inside.port, dns.port, clamd_daemon, spamd_daemon)
        yield Site(tmp, inside, office, dns, ports, text)


def _client(port: int, source: str) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source, 0))
    client.ehlo("client.example.net")
    return client


def _rcpt(port: int, source: str, sender: str, recipient: str) -> tuple[int, bytes]:
    """One session from ``source``: MAIL, then the RCPT reply for ``recipient``."""
    with _client(port, source) as client:
        code, _ = client.mail(sender)
        assert code == 250
        return client.rcpt(recipient)


def _message(mid: str, recipient: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = "colleague@example.com"
    msg["To"] = recipient
    msg["Subject"] = "quarterly figures"
    msg["Message-ID"] = mid
    msg.set_content("The figures are attached in spirit.\n")
    return msg.as_bytes(policy=SMTP)


def test_first_starts_on_empty_state_with_two_workers_all_come_up(site: Site) -> None:
    # The example's own certificate, then (its [tls] paths taken out) a self-signed one
    # that the workers of a first start must not make twice.
    own = site.policy_text
    start = own.index("[tls]\n")
    self_signed = own[:start] + "[tls]\n" + own[own.index("min_version", start):]
    for n, text in enumerate([own, self_signed, self_signed, self_signed]):
        proc = start_gateway(site.write(f"fresh{n}", text), site.mx, timeout=60)
        try:
            for port in site.ports.values():
                assert wait_for(lambda: port_open(port), timeout=20)
            with _client(site.mx, STRANGER) as client:
                assert client.noop()[0] == 250
        finally:
            assert stop_gateway(proc) == 0


@pytest.fixture(scope="module")
def gateway(site: Site) -> Iterator[Path]:
    """One gateway on the example for the tests below; yields its policy file."""
    policy = site.write("run")
    log = open(site.tmp / "gateway.log", "w")
    proc = start_gateway(policy, site.mx, stderr=log, timeout=60)
    try:
        yield policy
    finally:
        stop_gateway(proc)
        log.close()


def test_office_bulk_relays_inward_exactly_once(site: Site, gateway: Path) -> None:
    sent = [f"<bulk-{n}@office.example.com>" for n in range(120)]
    with smtplib.SMTP("127.0.0.1", site.office.port, timeout=30) as office:
        for n, mid in enumerate(sent):
            rcpt = f"user{n % 7}@example.{'com' if n % 2 else 'org'}"
            office.sendmail("colleague@example.com", [rcpt], _message(mid, rcpt))
    assert wait_for(lambda: set(sent) <= set(site.inside.message_ids()), timeout=180), (
        f"{len(set(sent) - set(site.inside.message_ids()))} messages missing inside; "
        f"office log: {site.office.log_text()[-1500:]}"
    )
    queue = site.tmp / "run" / "queue" / "msg"
    assert wait_for(lambda: list(queue.iterdir()) == [], timeout=30), "delivered mail is still queued"
    counts = site.inside.message_ids()
    assert [mid for mid in sent if counts[mid] != 1] == []
    inside_log = site.inside.log_text()
    # The example's routes say tls = "required": every session inward was encrypted.
    assert "TLS connection established from" in inside_log
    office_log = site.office.log_text()
    assert "status=deferred" not in office_log, "the gateway deferred office mail"


def test_relay_attempt_from_a_stranger_is_refused_at_first_contact(site: Site, gateway: Path) -> None:
    for source in (STRANGER, LISTED):
        code, text = _rcpt(site.mx, source, "someone@example.net", "victim@elsewhere.example")
        assert code == 550 and text.startswith(b"5.7.1"), (source, code, text)


def test_strangers_are_greylisted_and_listed_clients_refused(site: Site, gateway: Path) -> None:
    code, text = _rcpt(site.mx, STRANGER, "someone@example.net", "user1@example.com")
    assert code == 451, (code, text)
    code, text = _rcpt(site.mx, LISTED, "someone@example.net", "user1@example.com")
    assert code == 554 or (code // 100 == 5 and b"listed" in text.lower()), (code, text)


def test_postmaster_is_reachable_at_first_contact(site: Site, gateway: Path) -> None:
    # From a client on a DNS list, with greylisting in the chain: RFC 5321 §4.5.1.
    for recipient in ("postmaster@mx1.example.com", "abuse@mx1.example.com", "postmaster@example.com"):
        mid = f"<pm-{recipient.split('@')[1]}-{recipient[0]}@example.net>"
        with _client(site.mx, LISTED) as client:
            refused = client.sendmail("someone@example.net", [recipient], _message(mid, recipient))
            assert refused == {}
    # Delivered: the local ones into their Maildirs, the relayed one inward.
    assert wait_for(lambda: "<pm-example.com-p@example.net>" in site.inside.message_ids(), timeout=60)
    for user in ("postmaster", "abuse"):
        assert wait_for(lambda: list((site.tmp / "mail" / user).glob("**/new/*")) != [], timeout=60), user


def test_reload_reaches_every_worker(site: Site, gateway: Path) -> None:
    # A stranger's address becomes a relay client: before the reload a relay attempt from
    # it is refused, after it every new connection (spread over both workers) may relay.
    newcomer = "127.0.0.4"
    code, _ = _rcpt(site.mx, newcomer, "someone@example.net", "far@elsewhere.example")
    assert code == 550
    text = gateway.read_text().replace(f'clients = ["{OFFICE}/32"', f'clients = ["{OFFICE}/32", "{newcomer}/32"', 1)
    assert text != gateway.read_text()
    gateway.write_text(text)
    done = _gateway("reload", "--policy", str(gateway))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every gateway process (2)" in done.stdout, done.stdout
    with ThreadPoolExecutor(8) as pool:  # the early-talker pause makes each session 2 s
        replies = list(pool.map(
            lambda _: _rcpt(site.mx, newcomer, "someone@example.net", "far@elsewhere.example")[0], range(24)
        ))
    assert replies == [250] * 24, replies
