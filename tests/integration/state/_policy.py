"""Policy texts and SMTP helpers shared by the state integration tests."""

from __future__ import annotations

from gateway.hooks import PluginSpec
from plugins import connect_limits, mail_rate_limit, rcpt_greylist
from tests.conftest import MESSAGE, plugin_specs, smtp

HEAD = """
[server]
hostname = "mx.test.example"

[[listeners]]
name = "smtp"
address = "127.0.0.1"
port = 2525
tls = "none"

[local]
domains = ["local.example"]
users = ["alice", "bob", "carol", "dave"]

[delivery]
enabled = false
"""

# The filters come before rcpt_relay / rcpt_local_users: those accept, ending the chain.
TAIL = """
[[plugins]]
name = "rcpt_relay"
[[plugins]]
name = "rcpt_local_users"
"""


def specs() -> dict[str, PluginSpec]:
    return plugin_specs(
        rcpt_greylist=rcpt_greylist, connect_limits=connect_limits, mail_rate_limit=mail_rate_limit
    )


def policy(*entries: str) -> str:
    """The test policy with these ``[[plugins]]`` bodies before the accepting plugins."""
    return HEAD + "".join(f"\n[[plugins]]\n{entry.strip()}\n" for entry in entries) + TAIL


def attempt(port: int, rcpt: str = "alice@local.example", sender: str = "a@example.org") -> tuple[int, bytes]:
    """One delivery attempt; the RCPT reply, and the message sent if it was accepted."""
    with smtp(port) as client:
        client.ehlo()
        client.mail(sender)
        code, text = client.rcpt(rcpt)
        if code == 250:
            data_code, _ = client.data(MESSAGE)
            assert data_code == 250
        return code, text
