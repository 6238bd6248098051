"""Locally generated mail into the queue: ``gateway inject`` and the ``sendmail`` command.

Like qmail-inject (and ``sendmail -t``), a message read on standard input is completed
and committed to the queue directory of the policy, where the running gateway's
scheduler finds it at its next rescan (``[delivery] poll_interval``):

- Recipients come from the arguments and, with ``-t``, from the ``To:``, ``Cc:`` and
  ``Bcc:`` header fields (``Resent-To:``/``Resent-Cc:``/``Resent-Bcc:`` instead when the
  message has ``Resent-`` fields, RFC 5322 §3.6.6). A name without ``@`` gets
  ``@<first local domain>``.
- ``Bcc:`` and ``Resent-Bcc:`` are removed (RFC 5322 §3.6.3: the blind recipients must
  not be disclosed), as are ``Return-Path:`` (the delivery agent adds the real one, RFC
  5321 §4.4) and ``Content-Length:``, as qmail-inject does.
- Missing ``Date:``, ``Message-ID:`` (``<unique@hostname>``) and ``From:`` are added
  (RFC 5322 §3.6 requires Date and From). ``From:`` is ``-f``'s address, else
  ``$USER@<first local domain>``, with ``-F``'s full name.
- A ``Received:`` trace field names the invoking uid (RFC 5321 §4.4), as qmail-queue's does.
- Line ends become CRLF; a bare CR too, so no sequence can end the data early at an
  SMTP server further on (RFC 5321 §2.3.8).
- The envelope sender is ``-f`` (``-f ''`` or ``-f '<>'`` for the null sender), else
  the ``From:`` default address above.

Exit status, as sendmail's (sysexits.h): 0 queued, 64 usage error (bad option, bad or
no recipient), 65 message too big, 75 temporary failure (queue or policy unavailable):
the caller should try again later.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import pwd
import re
import secrets
import sys
import time
from dataclasses import dataclass
from typing import BinaryIO, Sequence

from gateway.address import AddressError, parse_path
from gateway.delivery.verp import DEFAULT_DELIMITERS, check_delimiters
from gateway.model import Envelope, Message, QueuedRecipient

__all__ = [
    "EX_DATAERR", "EX_TEMPFAIL", "EX_USAGE", "Injection", "UsageError",
    "main", "prepare", "queue_message", "read_message", "to_crlf",
]

EX_USAGE = 64
EX_DATAERR = 65
EX_TEMPFAIL = 75

_HEADER = re.compile(rb"^[!-9;-~]+:")
_DROPPED = frozenset({b"bcc", b"resent-bcc", b"return-path", b"content-length"})


class UsageError(ValueError):
    """Bad arguments or addresses: sendmail's EX_USAGE."""


@dataclass(frozen=True)
class Injection:
    """A message ready for the queue: envelope sender, recipients and the final bytes."""

    sender: str
    recipients: list[str]
    message: bytes


def to_crlf(data: bytes) -> bytes:
    """``data`` with CRLF line ends (lone CR and LF included), ending in CRLF."""
    data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    return data if data.endswith(b"\r\n") or not data else data + b"\r\n"


def read_message(stream: BinaryIO, limit: int, *, dot_ends: bool = False) -> bytes | None:
    """Read a message from ``stream``; ``None`` if it is longer than ``limit`` octets.

    :param dot_ends: a line holding a single dot ends the message (sendmail without ``-i``)
    """
    data = stream.read(limit + 1)
    if len(data) > limit:
        return None
    if dot_ends:
        m = re.search(rb"(?:^|\n)\.\r?(?:\n|$)", data)
        if m is not None:
            data = data[: m.start() + (1 if m.group().startswith(b"\n") else 0)]
    return data


def _split(data: bytes) -> tuple[list[bytes], bytes]:
    """The header fields (each with its folded lines, CRLF-terminated) and the body."""
    lines = data.split(b"\r\n")[:-1] if data else []
    if lines and lines[0].startswith(b"From ") and not _HEADER.match(lines[0]):
        lines = lines[1:]  # an mbox separator line, not a header field
    fields: list[bytes] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line + b"\r\n"
        elif _HEADER.match(line):
            fields.append(line + b"\r\n")
        else:
            break
        i += 1
    if i < len(lines) and lines[i] == b"":
        i += 1  # the blank line that ends the header section
    body = b"".join(line + b"\r\n" for line in lines[i:])
    return fields, body


def _name(field: bytes) -> bytes:
    return field.split(b":", 1)[0].strip().lower()


def _value(field: bytes) -> str:
    text = field.split(b":", 1)[1].decode("utf-8", "surrogateescape")
    return re.sub(r"\r\n[ \t]", " ", text).strip()


def _arguments(arg: str) -> list[str]:
    """The addresses in one argument: ``a@b``, ``Name <a@b>``, or a comma-separated list."""
    out = []
    for part in arg.split(","):
        part = part.strip()
        bracketed = re.search(r"<([^<>]*)>\s*$", part)
        if part:
            out.append(bracketed.group(1) if bracketed else part)
    return out


def _qualify(address: str, domain: str) -> str:
    return address if "@" in address else f"{address}@{domain}"


def _check(address: str, *, sender: bool) -> str:
    try:
        parse_path(f"<{address}>", allow_null=sender, allow_postmaster=not sender, utf8=True)
    except AddressError as exc:
        raise UsageError(f"bad address {address!r}: {exc}") from None
    return address


def prepare(
    data: bytes,
    *,
    recipients: Sequence[str],
    from_headers: bool,
    sender: str | None,
    full_name: str | None,
    domain: str,
    hostname: str,
    user: str,
) -> Injection:
    """Complete a locally submitted message and work out its envelope.

    :param data: the message as read (any line ends)
    :param recipients: recipients given as arguments (``a@b``, ``Name <a@b>``, ``a, b``)
    :param from_headers: also take recipients from To/Cc/Bcc (``-t``)
    :param sender: ``-f``: envelope sender and ``From:`` address; ``""`` is the null sender
    :param full_name: ``-F``: the full name for an added ``From:``
    :param domain: completes bare names (the policy's first local domain)
    :param hostname: for ``Message-ID:`` and ``Received:``
    :param user: the invoking user's login
    :raises UsageError: no recipient, or a malformed address
    """
    fields, body = _split(to_crlf(data))
    names = [_name(f) for f in fields]
    wanted = [address for arg in recipients for address in _arguments(arg)]
    if from_headers:
        is_resent = any(n.startswith(b"resent-") for n in names)
        kinds = (b"resent-to", b"resent-cc", b"resent-bcc") if is_resent else (b"to", b"cc", b"bcc")
        values = [_value(f) for f, n in zip(fields, names) if n in kinds]
        wanted += [address for _, address in email.utils.getaddresses(values) if address]
    found: dict[str, None] = {}
    for address in wanted:
        found.setdefault(_check(_qualify(address, domain), sender=False), None)
    if not found:
        raise UsageError("no recipients")
    default = f"{user}@{domain}"
    if sender is not None and sender.strip("<>") == "":
        envelope_sender = ""
    else:
        envelope_sender = _check(_qualify(sender.strip("<>"), domain) if sender else default, sender=True)
    now = email.utils.format_datetime(email.utils.localtime())
    head = [f"Received: (gateway inject invoked by uid {os.getuid()});\r\n\t{now}\r\n".encode()]
    head += [f for f, n in zip(fields, names) if n not in _DROPPED]
    if b"date" not in names:
        head.append(f"Date: {now}\r\n".encode())
    if b"message-id" not in names:
        unique = f"{time.strftime('%Y%m%d%H%M%S')}.{os.getpid()}.{secrets.token_hex(6)}"
        head.append(f"Message-ID: <{unique}@{hostname}>\r\n".encode())
    if b"from" not in names:
        address = envelope_sender or default
        head.append(f"From: {email.utils.formataddr((full_name or '', address))}\r\n".encode())
    return Injection(envelope_sender, list(found), b"".join(head) + b"\r\n" + body)


async def queue_message(queue_dir: str | os.PathLike[str], injection: Injection, *, verp: str | None = None) -> str:
    """Commit ``injection`` to the queue a running gateway opened; returns the queue id.

    :param verp: VERP delimiters (``-V``): each recipient gets its own envelope sender

    :raises FileNotFoundError: the queue directory was never opened by a gateway
    :raises gateway.verdicts.TemporaryFailure: the commit failed (disk full, ...)
    """
    from gateway.queue import QueueStore

    store = QueueStore(queue_dir)
    # Never QueueStore.open() here: that recovery empties tmp/, where the running
    # gateway's own commits are in flight.
    await asyncio.to_thread(store.attach)
    try:
        qid = store.new_id()
        message = injection.message
        envelope = Envelope(
            sender=injection.sender,
            recipients=[QueuedRecipient(address=a) for a in injection.recipients],
            body="8BITMIME" if any(b > 127 for b in message) else "7BIT",
            smtputf8=not all(a.isascii() for a in [injection.sender, *injection.recipients]),
            verp=verp,
        )
        await store.commit(qid, envelope, Message(message))
    finally:
        await store.close()
    return qid


def _login() -> str:
    for var in ("USER", "LOGNAME"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid{os.getuid()}"


def inject(
    policy_path: str | None,
    stream: BinaryIO,
    *,
    recipients: Sequence[str],
    from_headers: bool,
    sender: str | None,
    full_name: str | None,
    dot_ends: bool = False,
    verp: str | None = None,
) -> tuple[int, str]:
    """Read, complete and queue one message: (exit status, queue id or error text).

    :param verp: VERP delimiters (``-V``, ``-XV``): a return path per recipient
    """
    from gateway.commands._common import load
    from gateway.policy import PolicyError
    from gateway.verdicts import TemporaryFailure

    if verp is not None:
        try:
            check_delimiters(verp)
        except ValueError as exc:
            return EX_USAGE, str(exc)
    try:
        policy, _ = load(policy_path)
    except (PolicyError, OSError) as exc:
        return EX_TEMPFAIL, f"policy: {exc}"
    hostname = policy.server.hostname
    domain = policy.local.domains[0] if policy.local.domains else hostname
    data = read_message(stream, int(policy.limits.max_message_size), dot_ends=dot_ends)
    if data is None:
        return EX_DATAERR, f"message larger than {policy.limits.max_message_size} bytes"
    try:
        injection = prepare(
            data, recipients=recipients, from_headers=from_headers, sender=sender,
            full_name=full_name, domain=domain, hostname=hostname, user=_login(),
        )
    except UsageError as exc:
        return EX_USAGE, str(exc)
    try:
        return 0, asyncio.run(queue_message(policy.server.queue_dir, injection, verp=verp))
    except FileNotFoundError as exc:
        return EX_TEMPFAIL, f"queue not ready (has the gateway been started?): {exc}"
    except (TemporaryFailure, OSError) as exc:
        return EX_TEMPFAIL, f"cannot queue: {exc}"


def main(argv: Sequence[str] | None = None) -> int:
    """The ``sendmail`` command: ``sendmail [-t] [-i] [-f addr] [-F name] [rcpt ...]``.

    Also accepted: ``-oi`` (as ``-i``), ``-bm`` (the default mode), ``-r addr`` (as ``-f``),
    ``-C policy`` (else ``$GATEWAY_POLICY``, else the embedded default), ``-XV`` or
    ``-XVxy`` (VERP, Postfix's: a return path per recipient, delimiters ``-=`` or ``xy``);
    ignored:
    ``-odb``, ``-odq``, any other ``-oX``, ``-v``, ``-m``, ``-n``, ``-U`` and the
    valued ``-B``, ``-N``, ``-R``, ``-V``, ``-L``, ``-X``. Silent on success.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    recipients: list[str] = []
    opts: dict[str, str | None] = {"f": None, "F": None, "C": os.environ.get("GATEWAY_POLICY") or None}
    from_headers, dot_ends = False, True
    verp: str | None = None
    while args:
        arg = args.pop(0)
        if arg == "--":
            recipients += args
            break
        if not arg.startswith("-") or arg == "-":
            recipients.append(arg)
            continue
        flag, rest = arg[1:2], arg[2:]
        if arg.startswith("-XV"):
            verp = arg[3:] or DEFAULT_DELIMITERS
        elif arg == "-oi" or re.fullmatch(r"-[ti]+", arg):  # -t, -i, -ti, -it
            from_headers = from_headers or "t" in arg[1:]
            dot_ends = dot_ends and "i" not in arg
        elif flag in "frFCBNRVLX":
            if not rest:
                if not args:
                    return _usage(f"option -{flag} needs a value")
                rest = args.pop(0)
            if flag in "frFC":
                opts["f" if flag == "r" else flag] = rest
        elif flag == "o" or (flag in "vmnU" and not rest):
            pass  # -odb/-odq: we always queue; the rest change nothing here
        elif arg == "-bm":
            pass
        else:
            return _usage(f"unsupported option {arg}")
    status, text = inject(
        opts["C"], sys.stdin.buffer, recipients=recipients, from_headers=from_headers,
        sender=opts["f"], full_name=opts["F"], dot_ends=dot_ends, verp=verp,
    )
    if status:
        print(f"sendmail: {text}", file=sys.stderr)
    return status


def _usage(text: str) -> int:
    print(f"sendmail: {text}\nusage: sendmail [-t] [-i] [-f sender] [-F name] [recipient ...]", file=sys.stderr)
    return EX_USAGE


if __name__ == "__main__":
    sys.exit(main())
