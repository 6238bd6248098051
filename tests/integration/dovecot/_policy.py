"""Policies for the Dovecot tests: the gateway's users and mailboxes live in Dovecot."""

from __future__ import annotations


def dovecot_policy(
    auth_address: str,
    userdb_address: str,
    *,
    auth_extra: str = "",
    rcpt_extra: str = "",
    after_auth: str = "",
    auth: str = "max_failures = 5",
) -> str:
    """A submission-style policy: STARTTLS, AUTH and recipients checked by Dovecot.

    Dovecot's failure penalty is off (``penalty = false``): every test connects from
    127.0.0.1, and the penalty would slow each failure after the first by seconds.
    """
    return f"""
[server]
hostname = "mx.test.example"

[[listeners]]
name = "smtp"
address = "127.0.0.1"
port = 2525
tls = "starttls"

[local]
domains = ["localhost", "local.example"]
users = ["postmaster"]

[auth]
{auth}

[delivery]
enabled = false

[[plugins]]
name = "auth_dovecot"
address = "{auth_address}"
penalty = false
{auth_extra}
{after_auth}
[[plugins]]
name = "rcpt_relay"

[[plugins]]
name = "rcpt_dovecot_users"
address = "{userdb_address}"
{rcpt_extra}

[[plugins]]
name = "queue_received_header"
"""
