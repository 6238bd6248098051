"""Quarantine digests: a mail to each recipient of newly quarantined messages, listing
them, each with a release link that works once and until it expires.

Every ``[console] digest_interval`` (the console's timer, so in the master or single
process only; or ``gateway console digest --send``) the messages quarantined since the
last digest (``var_dir/console/digest.last``) are grouped by recipient, for recipients
in the local, virtual and relay domains. Each recipient gets one plain-text mail from
``digest_from`` through this gateway's own queue, listing date, sender, subject and
reason, and a link ``<public_url>digest/release?t=TOKEN``.

The token names the queue id, the recipient and the expiry (``digest_link_lifetime``),
signed with HMAC-SHA256 under a key kept in ``var_dir/console/digest.key`` (32 random
octets, mode 0600, made when first needed). Following the link shows the message's
summary and a Release button (a plain GET never releases: mail scanners that fetch
links would release everything); the POST checks the signature and the expiry, claims
the token in the lists' state store (once only; a second use says "already
released"), and releases the message if it is still quarantined and the recipient is
one of its own.
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.commands import quarantine as commands
from gateway.console.listing import head_of
from gateway.queue.damage import CorruptQueueFile

__all__ = ["Digest", "TokenError", "build_digests", "digest_key", "last_run", "make_token", "read_token", "set_last_run"]

AREA = "quarantine"
MAX_LISTED = 200
"""Most messages listed in one digest; the rest are counted."""


class TokenError(ValueError):
    """A release link that is forged, malformed or expired (its text says which)."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def digest_key(var_dir: Path) -> bytes:
    """The signing key in ``var_dir/console/digest.key``, made (mode 0600) if missing."""
    directory = Path(var_dir) / "console"
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / "digest.key"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) < 32:
            raise ValueError(f"{path}: shorter than 32 octets; remove it to make a new key") from None
        return key
    key = secrets.token_bytes(32)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
    return key


def _mac(key: bytes, payload: str) -> str:
    return _b64(hmac.new(key, payload.encode("ascii"), hashlib.sha256).digest())


def make_token(key: bytes, qid: str, recipient: str, expires: float) -> str:
    """A signed release token for ``qid`` on behalf of ``recipient``, good until ``expires``."""
    payload = f"{qid}.{int(expires)}.{_b64(recipient.lower().encode('utf-8'))}"
    return f"{payload}.{_mac(key, payload)}"


def read_token(key: bytes, token: str, now: float | None = None) -> tuple[str, str]:
    """The (queue id, recipient) of a valid token.

    :raises TokenError: malformed, not signed with ``key``, or expired
    """
    parts = token.split(".")
    if len(token) > 600 or len(parts) != 4:
        raise TokenError("this link is not a release link")
    qid, expires, recipient, mac = parts
    if not hmac.compare_digest(mac, _mac(key, ".".join(parts[:3]))):
        raise TokenError("this link is not valid (it was changed, or made by another gateway)")
    if not expires.isdigit() or int(expires) < (time.time() if now is None else now):
        raise TokenError("this link has expired")
    try:
        return qid, _unb64(recipient).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        raise TokenError("this link is not a release link") from None


def _stamp(var_dir: Path) -> Path:
    return Path(var_dir) / "console" / "digest.last"


def last_run(var_dir: Path) -> float:
    """When the last digest run started (0 if never)."""
    try:
        return float(_stamp(var_dir).read_text().strip())
    except (OSError, ValueError):
        return 0.0


def set_last_run(var_dir: Path, when: float) -> None:
    path = _stamp(var_dir)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{when:.3f}\n")
    os.replace(tmp, path)


@dataclass
class Digest:
    """One digest: to whom, its sender, and the message as queued."""

    recipient: str
    sender: str
    message: bytes
    count: int


def _is_ours(policy: Any, recipient: str) -> bool:
    domain = recipient.rpartition("@")[2].lower().rstrip(".")
    return domain in policy.local.domains or domain in policy.local.virtual or any(
        domain == d or (d.startswith(".") and domain.endswith(d)) for d in policy.relay.domains
    )


def base_url(policy: Any, port: int) -> str:
    """Where users reach the console: ``public_url``, or ``https://<hostname>:<port>/``."""
    url = policy.console.public_url or f"https://{policy.server.hostname}:{port}/"
    return url if url.endswith("/") else url + "/"


def build_digests(store: Any, policy: Any, key: bytes, since: float, until: float, url: str) -> list[Digest]:
    """The digests owed for messages quarantined in ``[since, until)`` (thread pool).

    :param url: the console's base URL (:func:`base_url`), ending in ``/``
    """
    found: dict[str, list[dict[str, Any]]] = {}
    for qid in store.ids(AREA):
        try:
            item = store.load(qid, AREA)
            if not since <= item.envelope.arrived < until:
                continue
            row = commands.describe(store, qid)
            row.update(head_of(store, qid, AREA))
        except (FileNotFoundError, CorruptQueueFile):
            continue
        row["epoch"] = item.envelope.arrived
        for recipient in dict.fromkeys(r.lower() for r in row["recipients"]):
            if _is_ours(policy, recipient):
                found.setdefault(recipient, []).append(row)
    sender = policy.console.digest_from or f"postmaster@{policy.server.hostname}"
    expires = until + float(policy.console.digest_link_lifetime)
    out = []
    for recipient, rows in sorted(found.items()):
        rows.sort(key=lambda r: r["epoch"])
        out.append(Digest(recipient, sender, _compose(policy, sender, recipient, rows, key, expires, url), len(rows)))
    return out


def _clean(text: str, limit: int = 200) -> str:
    return " ".join(str(text).split())[:limit]


def _compose(policy: Any, sender: str, recipient: str, rows: list[dict[str, Any]], key: bytes,
             expires: float, url: str) -> bytes:
    until = datetime.datetime.fromtimestamp(expires).strftime("%Y-%m-%d %H:%M")
    lines = [
        f"{len(rows)} message{'' if len(rows) == 1 else 's'} to {recipient} {'was' if len(rows) == 1 else 'were'} "
        "held in quarantine.",
        f"To have one delivered, open its release link (it works once, until {until}).",
        "",
    ]
    for row in rows[:MAX_LISTED]:
        token = make_token(key, row["id"], recipient, expires)
        lines += [
            f"Date:    {row['arrived'].replace('T', ' ')}",
            f"From:    {_clean(row['From'] or row['sender'] or '<>')}",
            f"Subject: {_clean(row['Subject'] or '(no subject)')}",
            f"Reason:  {_clean(row['reason'])}",
            f"Release: {url}digest/release?t={token}",
            "",
        ]
    if len(rows) > MAX_LISTED:
        lines.append(f"... and {len(rows) - MAX_LISTED} more, not listed here.")
    lines.append(f"-- \r\nThe mail gateway {policy.server.hostname}")
    body = "\r\n".join(lines) + "\r\n"
    host = policy.server.hostname
    head = [
        f"From: {sender}",
        f"To: {recipient}",
        f"Subject: Quarantine digest: {len(rows)} message{'' if len(rows) == 1 else 's'} held for you",
        f"Date: {email.utils.formatdate(localtime=True)}",
        f"Message-ID: <digest.{int(time.time())}.{secrets.token_hex(6)}@{host}>",
        "Auto-Submitted: auto-generated",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
    ]
    return ("\r\n".join(head) + "\r\n\r\n" + body).encode("utf-8")
