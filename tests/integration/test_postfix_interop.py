"""Delivery to a real Postfix smtpd (a private instance on loopback): the remote client's
pipelined groups (MAIL, RCPTs and DATA in one write; the RSET of a reused connection at
their head) as the most common MTA on the other end takes them.

Postfix is the Debian package ``postfix`` (scripts/install-system-deps.sh); its
``smtpd`` runs from a configuration of its own in a temporary directory and throws the
mail away (``discard``) after logging each message's Message-ID, which is what the test
counts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.conftest import smtp, wait_for
from tests.postfix import PrivatePostfix, private_postfix


@pytest.fixture(scope="module")
def postfix() -> Iterator[PrivatePostfix]:
    """A private Postfix accepting for anyone on 127.0.0.0/8 and refusing one recipient."""
    with private_postfix(
        "smtpd_recipient_restrictions = check_recipient_access inline:{ "
        "{ refused@far.example = 550 5.1.1 no such user } }, permit_mynetworks, reject\n"
        "default_transport = discard\nrelay_transport = discard"
    ) as instance:
        yield instance


def test_relayed_mail_reaches_postfix_once_each_over_reused_pipelined_connections(
    gateway_factory, postfix: PrivatePostfix,
) -> None:
    port = postfix.port
    gw = gateway_factory(f"""
[server]
hostname = "gw.test.example"
[[listeners]]
name = "smtp"
tls = "none"
[local]
domains = ["localhost"]
users = ["postmaster"]
[relay]
clients = ["127.0.0.0/8"]
[delivery]
retry_base = "1h"
[[routes]]
domain = "far.example"
host = "127.0.0.1"
port = {port}
tls = "none"
[[plugins]]
name = "rcpt_relay"
[[plugins]]
name = "rcpt_local_users"
""")
    sent = [f"<interop-{n}@gw.test.example>" for n in range(20)]
    with smtp(gw.port) as client:
        for mid in sent:
            message = f"Message-ID: {mid}\r\nSubject: interop\r\n\r\nbody\r\n".encode()
            # Two recipients Postfix takes and one it refuses at RCPT, in one transaction.
            client.sendmail("sender@far.example", ["a@far.example", "b@far.example", "refused@far.example"], message)

    assert wait_for(lambda: set(sent) <= set(postfix.message_ids()), timeout=30), (
        f"not every message reached Postfix: {postfix.log_text()[-1500:]}"
    )
    assert wait_for(lambda: gw.queue_ids() == [], timeout=15), "the refused recipient's bounce is still queued"
    counts = postfix.message_ids()
    assert all(counts[mid] == 1 for mid in sent), "a message reached Postfix twice"
    text = postfix.log_text()
    # Each message went out in one transaction for a and b; the bounces for refused@
    # went back to the sender through Postfix too (its domain is routed there).
    assert len(re.findall(r"to=<a@far\.example>.*status=sent", text)) == 20
    assert len(re.findall(r"to=<b@far\.example>.*status=sent", text)) == 20
    assert "refused@far.example" in text and "550 5.1.1" in text
    assert len(re.findall(r"to=<sender@far\.example>.*status=sent", text)) == 20
    sessions = len(re.findall(r"postfix/smtpd\[\d+\]: connect from", text))
    assert sessions < 20, f"{sessions} sessions for 20 messages: connections were not reused"
