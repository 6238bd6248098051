"""Local delivery in tests: a policy with the local users alice and bob (and postmaster)
at ``localhost`` and fast retries, and helpers to read their Maildirs and write their
``.qmail`` files."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def local_policy(*plugins: str) -> str:
    """The policy: ``rcpt_relay``, ``rcpt_local_users``, then ``plugins``, then
    ``queue_received_header``."""
    chain = ["rcpt_relay", "rcpt_local_users", *plugins, "queue_received_header"]
    entries = "".join(f'[[plugins]]\nname = "{name}"\n' for name in chain)
    return f"""
[server]
hostname = "mx.test.example"

[[listeners]]
name = "smtp"
tls = "none"

[local]
domains = ["localhost"]
users = ["postmaster", "alice", "bob"]

[delivery]
retry_base = "200ms"
retry_max = "1s"
poll_interval = "200ms"

{entries}"""


LOCAL_POLICY = local_policy()


def maildir(gw: Any, user: str) -> Path:
    return Path(gw.policy.local.mail_root) / user / "Maildir"


def messages(gw: Any, user: str) -> list[bytes]:
    """What ``user``'s ``Maildir/new`` holds, oldest name first."""
    new = maildir(gw, user) / "new"
    return [p.read_bytes() for p in sorted(new.glob("*"))] if new.exists() else []


def home(gw: Any, user: str) -> Path:
    path = Path(gw.policy.local.mail_root) / user
    path.mkdir(parents=True, exist_ok=True)
    return path


def dot_qmail(gw: Any, user: str, name: str, text: str) -> None:
    """Write ``user``'s instruction file ``name`` (``.qmail``, ``.qmail-ext``)."""
    path = home(gw, user) / name
    path.write_text(text)
    path.chmod(0o644)
