"""Corpus mode: records made from ``.eml`` files and mboxes, for testing a policy before
any traffic (spam and ham corpora).

Each message becomes a one-transaction session from an assumed client (address, EHLO
name) with an assumed envelope: MAIL FROM the given sender or the message's ``From:``
address, RCPT TO the given recipients. There is no old outcome to compare with.
"""

from __future__ import annotations

import email.utils
import mailbox
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any, Iterable, Iterator

from gateway.capture import CAPTURE_VERSION
from gateway.replay.records import Damaged
from gateway.sendmail import to_crlf

__all__ = ["corpus_records"]

_MAX_MESSAGE = 256 * 1024 * 1024


def _messages(paths: Iterable[str]) -> Iterator[tuple[str, bytes] | Damaged]:
    for item in paths:
        path = Path(item)
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        for file in files:
            try:
                with open(file, "rb") as f:
                    head = f.read(5)
                if head == b"From ":
                    box = mailbox.mbox(file, create=False)
                    for i, key in enumerate(box.iterkeys(), 1):
                        yield f"{file}#{i}", box.get_bytes(key)
                    box.close()
                    continue
                with open(file, "rb") as f:
                    yield str(file), f.read(_MAX_MESSAGE)
            except (OSError, mailbox.Error) as exc:
                yield Damaged(str(file), f"cannot read: {exc}")


def _from_address(raw: bytes) -> str:
    headers = BytesHeaderParser().parsebytes(raw)
    return email.utils.parseaddr(str(headers.get("From", "")))[1]


def corpus_records(
    paths: Iterable[str], policy: Any, *, client_ip: str, helo: str, sender: str | None,
    recipients: list[str] | None,
) -> Iterator[dict[str, Any] | Damaged]:
    """A capture-shaped record for each message of the files, directories and mboxes."""
    if not recipients:
        domains = policy.local.domains
        recipients = [f"postmaster@{domains[0]}" if domains else "postmaster"]
    listener = policy.listeners[0].name
    for item in _messages(paths):
        if isinstance(item, Damaged):
            yield item
            continue
        where, raw = item
        raw = to_crlf(raw)
        mail_from = sender if sender is not None else _from_address(raw)
        params = " BODY=8BITMIME" if any(b > 127 for b in raw) else ""
        if not (mail_from.isascii() and all(r.isascii() for r in recipients)):
            params += " SMTPUTF8"
        yield {
            "v": CAPTURE_VERSION, "session": "", "_where": where, "client": client_ip, "port": 0,
            "listener": listener, "local": ["", 0], "helo": helo, "esmtp": True, "tls": None,
            "auth": None, "dns": [], "verdicts": [],
            "txns": [{
                "mail": f"FROM:<{mail_from}>{params}", "rcpts": [{"rcpt": f"TO:<{r}>"} for r in recipients],
                "data": {"message": raw},
            }],
        }
