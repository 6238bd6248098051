"""DKIM and DMARC fixtures: keys made once per session, a real DNS server serving them.

Keys come from ``gateway dkim keygen`` (run in-process): ``sel1`` (RSA 2048) and ``ed1``
(Ed25519) sign *inbound* test mail as a remote sender would; ``rsa1`` and ``ed1`` of
``out.example`` are the gateway's own signing keys. The zone publishes them with the
DMARC and SPF records the tests need; ``_dmarc.servfail.example`` answers SERVFAIL for
the whole session.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import dns.resolver
import pytest

from gateway.commands import dkim as dkim_command
from tests.dnsserver import DnsTestServer

# Every name is absolute: one zone file text serves several test domains.
DMARC_RECORDS = {
    "reject.example": "v=DMARC1; p=reject",
    "quarantine.example": "v=DMARC1; p=quarantine",
    "none.example": "v=DMARC1; p=none; rua=mailto:dmarc@none.example",
    "relaxed.example": "v=DMARC1; p=reject",
    "strict.example": "v=DMARC1; p=reject; adkim=s; aspf=s",
    "parent.example": "v=DMARC1; p=none; sp=reject",
    "pct0.example": "v=DMARC1; p=reject; pct=0",
    "servfail.example": "v=DMARC1; p=reject",
}
# (name the key is published at, key file made by keygen)
INBOUND_KEY_NAMES = ("reject.example", "mail.relaxed.example", "mail.strict.example", "quarantine.example")


@dataclass(frozen=True)
class DkimWorld:
    """What the tests need: the DNS server, key files and the zone text."""

    dns: DnsTestServer
    zone: str
    inbound_rsa: Path  # signs as sel1 for every INBOUND_KEY_NAMES domain
    inbound_ed25519: Path  # signs as ed1._domainkey.reject.example
    out_rsa: Path  # rsa1._domainkey.out.example
    out_ed25519: Path  # ed1._domainkey.out.example

    @property
    def port(self) -> int:
        return self.dns.port

    def dnsfunc(self, name: bytes, timeout: float = 5) -> bytes | None:
        """A dkimpy ``dnsfunc`` asking this server (for the tests' own, independent checks)."""
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = self.dns.port
        resolver.lifetime = 2
        try:
            answer = resolver.resolve(name.decode().rstrip("."), "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b"".join(answer[0].strings)


def keygen(out: Path, domain: str, selector: str, algorithm: str) -> tuple[Path, str]:
    """Run ``gateway dkim keygen``; the key file and the printed record line."""
    args = argparse.Namespace(domain=domain, selector=selector, algorithm=algorithm, bits=2048, out=out)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        assert dkim_command.main(args) == 0, stderr.getvalue()
    return out / f"{domain}.{selector}.key", stdout.getvalue().strip()


def _republish(record: str, name: str) -> str:
    """The same key record published under ``sel1._domainkey.<name>``."""
    return re.sub(r"^\S+", f"sel1._domainkey.{name}.", record)


def build_zone(tmp: Path) -> tuple[str, dict[str, Path]]:
    keys: dict[str, Path] = {}
    lines = [
        "$TTL 300",
        "example. IN SOA ns.example. hostmaster.example. 1 3600 600 86400 300",
    ]
    keys["inbound_rsa"], rsa_record = keygen(tmp, "reject.example", "sel1", "rsa")
    lines += [_republish(rsa_record, name) for name in INBOUND_KEY_NAMES]
    keys["inbound_ed25519"], ed_record = keygen(tmp, "reject.example", "ed1", "ed25519")
    keys["out_rsa"], out_rsa = keygen(tmp, "out.example", "rsa1", "rsa")
    keys["out_ed25519"], out_ed = keygen(tmp, "out.example", "ed1", "ed25519")
    lines += [ed_record, out_rsa, out_ed]
    lines.append('sel1._domainkey.revoked.example. IN TXT "v=DKIM1; k=rsa; p="')
    for domain, record in DMARC_RECORDS.items():
        lines.append(f'_dmarc.{domain}. IN TXT "{record}"')
    # SPF: the test client is 127.0.0.1; "bounce" subdomains test SPF alignment.
    for name in ("reject.example", "mail.relaxed.example", "mail.strict.example", "quarantine.example"):
        lines.append(f'{name}. IN TXT "v=spf1 ip4:127.0.0.0/8 -all"')
    return "\n".join(lines) + "\n", keys


@pytest.fixture(scope="session")
def dkim_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DkimWorld]:
    tmp = tmp_path_factory.mktemp("dkim")
    zone, keys = build_zone(tmp / "keys")
    (tmp / "test.zone").write_text(zone)
    server = DnsTestServer(zone)
    server.fail("_dmarc.servfail.example")
    try:
        yield DkimWorld(server, zone, **keys)
    finally:
        server.stop()


# -- policies, messages and the queued result ------------------------------------------

AUTHSERV_ID = "mx.test.example"


def policy(
    world: DkimWorld,
    *,
    relay_client: bool = False,
    users_file: Path | None = None,
    dmarc: str = "",
    sign: str = "rsa",
    sign_extra: str = "",
) -> str:
    """A policy with the whole authentication chain, in the documented order.

    :param relay_client: make 127.0.0.1 a ``[relay] clients`` network (outbound mail)
    :param users_file: enable AUTH with this users file
    :param dmarc: extra settings lines for ``data_dmarc``
    :param sign: the out.example key ``queue_dkim_sign`` uses: ``rsa`` or ``ed25519``
    :param sign_extra: extra settings lines for ``queue_dkim_sign``
    """
    selector, key, algorithm = (
        ("rsa1", world.out_rsa, "rsa-sha256") if sign == "rsa" else ("ed1", world.out_ed25519, "ed25519-sha256")
    )
    text = f"""
[server]
hostname = "{AUTHSERV_ID}"

[[listeners]]
name = "smtp"
address = "127.0.0.1"
port = 2525
tls = "starttls"

[local]
domains = ["localhost", "local.example"]
users = ["postmaster", "alice", "bob"]

[delivery]
enabled = false

[dns]
nameservers = ["127.0.0.1:{world.port}"]
timeout = "2s"

[relay]
clients = [{'"127.0.0.1/32"' if relay_client else ''}]
"""
    if users_file is not None:
        text += f'\n[auth]\nusers_file = "{users_file}"\n'
    text += f"""
[[plugins]]
name = "auth_users_file"
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
{dmarc}
[[plugins]]
name = "queue_authentication_results"
[[plugins]]
name = "queue_dkim_sign"
{sign_extra}
[plugins.domains."out.example"]
selector = "{selector}"
key_file = "{key}"
algorithm = "{algorithm}"
[[plugins]]
name = "queue_received_header"
"""
    return text


def specs() -> dict[str, object]:
    """The stock plugins plus this task's (not registered in plugins/__init__.py yet)."""
    from plugins import (
        data_dkim_verify,
        data_dmarc,
        mail_spf,
        queue_authentication_results,
        queue_dkim_sign,
    )
    from tests.conftest import plugin_specs

    return plugin_specs(
        mail_spf=mail_spf,
        data_dkim_verify=data_dkim_verify,
        data_dmarc=data_dmarc,
        queue_authentication_results=queue_authentication_results,
        queue_dkim_sign=queue_dkim_sign,
    )


def make_message(author: str, subject: str = "test", body: bytes = b"Hello, world.\r\n", to: str = "alice@local.example") -> bytes:
    return (
        f"From: Author <{author}>\r\n"
        f"To: {to}\r\n"
        f"Subject: {subject}\r\n"
        "Date: Tue, 25 Nov 2026 10:00:00 +0000\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}@test.example>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    ).encode() + body


def sender_sign(message: bytes, domain: str, selector: str, key_file: Path, algorithm: str = "rsa-sha256") -> bytes:
    """Sign as a remote sender would (dkimpy directly, relaxed/simple)."""
    import dkim

    from plugins._dkim_sync import load_key_in_thread

    key = load_key_in_thread(key_file, algorithm)
    field = dkim.sign(
        message, selector.encode(), domain.encode(), key,
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
        signature_algorithm=algorithm.encode(),
    )
    return field + message


def send(port: int, sender: str, message: bytes, rcpt: str = "alice@local.example") -> tuple[int, str]:
    """One transaction; the reply to MAIL, RCPT or DATA, whichever refused first."""
    from tests.conftest import smtp

    with smtp(port) as client:
        client.ehlo()
        code, text = client.mail(sender)
        if code == 250:
            code, text = client.rcpt(rcpt)
            if code == 250:
                code, text = client.data(message)
        return code, text.decode()


def header_values(raw: bytes, name: str) -> list[str]:
    """Unfolded values of every ``name`` field of a queued message."""
    import email
    import email.policy

    parsed = email.message_from_bytes(raw, policy=email.policy.compat32)
    return [" ".join(str(v).split()) for v in parsed.get_all(name, [])]


def auth_results(raw: bytes) -> str:
    """Our single Authentication-Results value (the test asserts there is one)."""
    ours = [v for v in header_values(raw, "Authentication-Results") if v.split(";")[0].strip() == AUTHSERV_ID]
    assert len(ours) == 1, ours
    return ours[0]
