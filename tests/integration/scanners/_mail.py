"""Test messages and a real SMTP round trip for the scanner tests."""

from __future__ import annotations

import email
import email.policy
import email.utils
import os
import subprocess
import sys
from email.message import EmailMessage, Message
from pathlib import Path
from types import ModuleType

from gateway.testing import RunningGateway
from tests.conftest import BASE_POLICY, plugin_specs, smtp
from tests.integration.scanners.conftest import EICAR, GTUBE

ROOT = Path(__file__).resolve().parents[3]


def policy(name: str, **settings: object) -> str:
    """The base test policy with one scanner entry after the stock plugins."""
    lines = [f'name = "{name}"']
    for key, value in settings.items():
        if isinstance(value, str):
            lines.append(f'{key} = "{value}"')
        elif isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        else:
            lines.append(f"{key} = {value}")
    return BASE_POLICY + "\n[[plugins]]\n" + "\n".join(lines) + "\n"


def start(gateway_factory: object, module: ModuleType, extra: str = "", **settings: object) -> RunningGateway:
    specs = plugin_specs(**{module.NAME: module})
    return gateway_factory(policy(module.NAME, **settings) + extra, specs=specs)  # type: ignore[operator]


def _base(subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Sender Name <sender@example.org>"
    msg["To"] = "Alice <alice@localhost>"
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate(localtime=True)
    msg["Message-ID"] = email.utils.make_msgid(domain="example.org")
    return msg


def _wire(msg: EmailMessage) -> bytes:
    return msg.as_bytes(policy=email.policy.SMTP)


def clean() -> bytes:
    msg = _base("Lunch on Thursday")
    msg.set_content("Hello Alice,\n\nshall we have lunch on Thursday at noon?\n\nRegards,\nSender\n")
    return _wire(msg)


def eicar_attached() -> bytes:
    msg = _base("The report")
    msg.set_content("Please find the file attached.\n")
    msg.add_attachment(EICAR, maintype="application", subtype="octet-stream", filename="report.com")
    return _wire(msg)


def eicar_inline() -> bytes:
    msg = _base("Test")
    msg.set_content(EICAR.decode("ascii") + "\n", cte="7bit")
    return _wire(msg)


def gtube(extra_headers: bytes = b"") -> bytes:
    msg = _base("Test spam")
    msg.set_content(GTUBE.decode("ascii") + "\n", cte="7bit")
    return extra_headers + _wire(msg)


def send(gw: RunningGateway, data: bytes, sender: str = "sender@example.org") -> tuple[int, str]:
    """Send ``data`` to alice@localhost; the reply to the final dot."""
    with smtp(gw.port) as client:
        client.ehlo()
        client.mail(sender)
        assert client.rcpt("alice@localhost")[0] == 250
        code, text = client.data(data)
    return code, text.decode("utf-8", "replace")


def queued(gw: RunningGateway, area: str = "msg") -> Message:
    """The single message in ``area``, parsed."""
    (qid,) = gw.queue_ids(area)
    return email.message_from_bytes(gw.queue.read_message(qid, area), policy=email.policy.default)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``gateway`` as an operator runs it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, timeout=60, env=env
    )


def policy_file(gw: RunningGateway, tmp_path: Path) -> str:
    """A policy file naming the gateway's queue directory, for the command line."""
    path = tmp_path / "cli-policy.toml"
    path.write_text(f'[server]\nqueue_dir = "{gw.policy.server.queue_dir}"\n')
    return str(path)
