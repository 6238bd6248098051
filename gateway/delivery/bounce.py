"""Delivery status notifications: bounces, delay warnings and success reports.

:func:`wants_notice` decides from a recipient's NOTIFY parameter (RFC 3461 §4.1)
whether a notice is owed; :func:`build_dsn` writes one ``multipart/report``
message (RFC 6522) for any number of recipients that share a fate, in three parts:

1. a human-readable ``text/plain`` explanation in the qmail/Postfix tradition;
2. the machine-readable ``message/delivery-status`` (RFC 3464), or
   ``message/global-delivery-status`` (RFC 6533) when an address is UTF-8;
3. the original message (``message/rfc822``) or only its header block
   (``text/rfc822-headers``), per RET and the size limit: above ``max_original``
   (256 KiB) only the header block goes back, whatever RET asks (RFC 3461 §4.3 lets an
   MTA return less), and of a message on disk only that much is read.

The result is a :class:`Notice` with the null reverse-path, ready to queue. The
caller picks its recipient: the original sender by default, the postmaster (via
``to``) for a double bounce. Everything that came from a client or a remote
server is forced onto one line before it reaches a header or status field.
"""

from __future__ import annotations

import quopri
import re
import time
import uuid
from dataclasses import dataclass
from email.utils import formatdate
from typing import Literal, Sequence

from gateway.content import Content
from gateway.delivery.types import Outcome
from gateway.model import Envelope, QueuedRecipient

__all__ = ["Kind", "Notice", "build_dsn", "wants_notice"]

Kind = Literal["failure", "delay", "success"]

_ACTIONS: dict[str, str] = {"failure": "failed", "delay": "delayed", "success": "delivered"}
_SUBJECTS: dict[str, str] = {
    "failure": "Undelivered Mail Returned to Sender",
    "delay": "Delayed Mail (still being retried)",
    "success": "Successful Mail Delivery Report",
}
_INTROS: dict[str, str] = {
    "failure": (
        "I'm sorry to have to inform you that your message could not\r\n"
        "be delivered to one or more recipients. It's attached below.\r\n\r\n"
        "For further assistance, please send mail to postmaster.\r\n\r\n"
        "If you do so, please include this problem report. You can\r\n"
        "delete your own text from the attached returned message."
    ),
    "delay": (
        "####################################################################\r\n"
        "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #\r\n"
        "####################################################################\r\n\r\n"
        "Your message could not be delivered for {age} to one or more\r\n"
        "recipients. It will be retried until it is {limit}."
    ),
    "success": (
        "Your message was successfully delivered to the destination(s)\r\n"
        "listed below (\"relayed\": handed to a server that will not report\r\n"
        "further on its delivery)."
    ),
}
_PART3 = {"failure": "Undelivered Message", "delay": "Delayed Message", "success": "Delivered Message"}

# Anything that could end a header line or smuggle a control character; non-ASCII
# survives (RFC 6532) and is dealt with by choosing the global types.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]+")
_NON_ASCII_PRINTABLE_RE = re.compile(r"[^\x20-\x7e]+")
_HEADER_END_RE = re.compile(rb"\r?\n\r?\n")
_MESSAGE_ID_RE = re.compile(rb"^message-id:[ \t]*(<[\x21-\x3b\x3d\x3f-\x7e]{1,250}>)", re.I | re.M)
# RFC 5322 §2.1.1: 998 octets a line; keep a margin for the field name.
_MAX_TOKEN_OCTETS = 900
_FOLD_WIDTH = 78


@dataclass(frozen=True, slots=True)
class Notice:
    """A ready-to-queue DSN.

    ``sender`` is always the null reverse-path (RFC 5321 §4.5.5), so a notice can
    never cause another. ``body`` is the BODY parameter to send it with and
    ``smtputf8`` whether it needs SMTPUTF8.
    """

    sender: str
    recipient: str
    message: bytes
    body: Literal["7BIT", "8BITMIME"]
    smtputf8: bool


def wants_notice(recipient: QueuedRecipient, kind: Kind) -> bool:
    """Whether ``recipient``'s NOTIFY parameter asks for a notice of ``kind``.

    RFC 3461 §4.1: NEVER suppresses every notice; an explicit list asks for exactly
    the listed kinds; without NOTIFY, failures and delays are reported and
    successes are not.

    :param recipient: the queued recipient, with its NOTIFY keywords
    :param kind: ``failure``, ``delay`` or ``success``
    :returns: True when a notice should be sent
    """
    notify = {n.upper() for n in recipient.notify}
    if "NEVER" in notify:
        return False
    if not notify:
        return kind in ("failure", "delay")
    return kind.upper() in notify


def build_dsn(
    kind: Kind,
    envelope: Envelope,
    items: Sequence[tuple[QueuedRecipient, Outcome]],
    original: bytes | Content,
    *,
    reporting_mta: str,
    queue_id: str,
    now: float | None = None,
    retry_until: float | None = None,
    to: str | None = None,
    max_original: int = 256 * 1024,
) -> Notice:
    """Build one delivery status notification for the recipients in ``items``.

    :param kind: which notice: ``failure``, ``delay`` or ``success``
    :param envelope: the original message's envelope (arrival, ENVID, RET, SMTPUTF8)
    :param items: each reported recipient with the outcome that decided it
    :param original: the original message as queued (CRLF line ends); on disk, only
        as much is read as the notice returns (blocking: call this in a thread then)
    :param reporting_mta: our host name, for From, Message-ID and Reporting-MTA
    :param queue_id: the original's queue id, for the postmaster's benefit
    :param now: the time of the last attempt (defaults to the current time)
    :param retry_until: for delay notices, when the queue will give up
    :param to: the notice's recipient (defaults to the envelope sender)
    :param max_original: above this size only the original's headers are returned
    :returns: the notice, with the null sender
    :raises ValueError: when there is nobody to report on or nobody to tell
    """
    if not items:
        raise ValueError("a DSN needs at least one recipient to report on")
    rcpt_to = _one_line(envelope.sender if to is None else to)
    if not rcpt_to:
        raise ValueError("a DSN is never sent to the null reverse-path")
    now = time.time() if now is None else now
    mta = _ascii(reporting_mta) or "localhost"
    qid = _ascii(queue_id)
    addresses = [rcpt_to] + [r.address for r, _ in items] + [r.orcpt or "" for r, _ in items]
    is_utf8 = envelope.smtputf8 or not all(a.isascii() for a in addresses)
    boundary = f"{qid}.{int(now)}.{uuid.uuid4().hex}/{mta}"
    boundary = re.sub(r"[^0-9A-Za-z'()+_,./:=?-]", "_", boundary)[:70]

    size = len(original)
    if isinstance(original, Content):
        # Only the header block of a large message goes back: it ends within the limit.
        original = original.read() if size <= max_original else original.head(max_original + 4)
    original = re.sub(rb"\r?\n", b"\r\n", original)
    full = (
        envelope.ret == "FULL" if kind == "success" else envelope.ret != "HDRS"
    ) and size <= max_original
    included = original if full else _header_block(original, max_original)
    if included and not included.endswith(b"\r\n"):
        included += b"\r\n"
    if full:
        part3_type = "message/global" if envelope.smtputf8 else "message/rfc822"
    else:
        part3_type = "message/global-headers" if envelope.smtputf8 else "text/rfc822-headers"

    headers = [
        _field("From", f"Mail Delivery System <MAILER-DAEMON@{mta}>"),
        _field("To", f"<{rcpt_to}>"),
        _field("Subject", _SUBJECTS[kind]),
        _field("Date", formatdate(now, localtime=True)),
        _field("Message-ID", f"<{int(now)}.{uuid.uuid4().hex}.{qid or 'dsn'}@{mta}>"),
        _field("Auto-Submitted", "auto-replied"),
    ]
    match = _MESSAGE_ID_RE.search(_header_block(original, max_original))
    if match:  # RFC 3834 §3.1.3/§5.2: thread the notice under the original
        msgid = match.group(1).decode("ascii")
        headers += [_field("In-Reply-To", msgid), _field("References", msgid)]
    headers += [
        "MIME-Version: 1.0\r\n",
        "Content-Type: multipart/report; report-type=delivery-status;\r\n"
        f'\tboundary="{boundary}"\r\n',
    ]
    parts = [
        _human_part(kind, items, mta, qid, envelope.arrived, now, retry_until),
        _status_part(kind, envelope, items, mta, now, retry_until, is_utf8),
        _part_headers(_PART3[kind], part3_type, included) + b"\r\n" + included,
    ]
    body = b"This is a MIME-encapsulated message.\r\n"
    for part in parts:
        body += f"\r\n--{boundary}\r\n".encode("ascii") + part
    body += f"\r\n--{boundary}--\r\n".encode("ascii")
    is_8bit = not body.isascii()
    if is_8bit:  # RFC 2045 §6.4: a multipart is no more 7bit than its parts
        headers.append("Content-Transfer-Encoding: 8bit\r\n")
    message = "".join(headers).encode("utf-8") + b"\r\n" + body
    return Notice(
        sender="",
        recipient=rcpt_to,
        message=message,
        body="8BITMIME" if not message.isascii() else "7BIT",
        smtputf8=is_utf8,
    )


def _human_part(
    kind: Kind,
    items: Sequence[tuple[QueuedRecipient, Outcome]],
    mta: str,
    qid: str,
    arrived: float,
    now: float,
    retry_until: float | None,
) -> bytes:
    """Part 1: the explanation a person reads, one paragraph per recipient."""
    intro = _INTROS[kind].format(
        age=_duration(now - arrived),
        limit=_duration(retry_until - arrived) + " old" if retry_until else "too old",
    )
    lines = [f"This is the mail system at host {mta}.", "", intro, "", "", "                   The mail system", ""]
    for rcpt, outcome in items:
        reply = " ".join(outcome.reply.lines())
        address = _one_line(rcpt.address)
        if outcome.expired:
            # The expiry is the reason; the last real error, and who gave it, the detail.
            lifetime = _duration(retry_until - arrived) if retry_until else "the queue lifetime"
            where = f": host {_one_line(outcome.remote)} said" if outcome.remote else (
                " (our own words: no remote host said it)"
            )
            lines += [f"<{address}>: delivery time expired: not delivered within {lifetime}.",
                      f"Last error{where}: {reply}", ""]
            continue
        where = f"host {_one_line(outcome.remote)} said" if outcome.remote else "the answer was"
        lines += [f"<{address}>: {where}: {reply}", ""]
    if qid:
        lines.append(f"(queue id {qid} at {mta})")
    text = "\r\n".join(lines) + "\r\n"
    data = text.encode("utf-8")
    if data.isascii() and all(len(line) <= 998 for line in data.split(b"\r\n")):
        return _part_headers("Notification", "text/plain; charset=us-ascii", b"") + b"\r\n" + data
    # quoted-printable keeps the part 7-bit and every line short, whatever the text
    encoded = quopri.encodestring(data).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    head = _part_headers("Notification", "text/plain; charset=utf-8", b"")
    return head + b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + encoded


def _status_part(
    kind: Kind,
    envelope: Envelope,
    items: Sequence[tuple[QueuedRecipient, Outcome]],
    mta: str,
    now: float,
    retry_until: float | None,
    is_utf8: bool,
) -> bytes:
    """Part 2: the RFC 3464 per-message fields, then one block per recipient."""
    blocks = [_field("Reporting-MTA", f"dns; {mta}")]
    if envelope.envid:
        blocks.append(_field("Original-Envelope-Id", _ascii(envelope.envid)))
    blocks.append(_field("Arrival-Date", formatdate(envelope.arrived, localtime=True)))
    for rcpt, outcome in items:
        fields = []
        if rcpt.orcpt:
            addr_type, _, addr = _one_line(rcpt.orcpt).partition(";")
            fields.append(_field("Original-Recipient", f"{_address_type(addr, addr_type)};{addr.strip()}"))
        address = _one_line(rcpt.address)
        fields.append(_field("Final-Recipient", f"{_address_type(address)}; {address}"))
        # RFC 3464 §2.3.3: handed to a next hop that does not do DSN (one that does
        # reports for itself, and we send nothing) is "relayed", not "delivered".
        relayed = kind == "success" and bool(outcome.remote)
        fields.append(_field("Action", "relayed" if relayed else _ACTIONS[kind]))
        reply = outcome.reply
        # RFC 3463 X.4.7: the queue lifetime decided; Diagnostic-Code keeps the last error.
        status = "4.4.7" if outcome.expired else reply.status or f"{reply.code // 100}.0.0"
        fields.append(_field("Status", status))
        if outcome.remote:
            # a host name is one token: "mx.example.net[192.0.2.1]" -> the name
            host = _ascii((_one_line(outcome.remote).split() or ["unknown"])[0])
            if not host.startswith("["):
                host = host.split("[", 1)[0]
            fields.append(_field("Remote-MTA", f"dns; {host}"))
        fields.append(_field("Diagnostic-Code", _one_line(outcome.diagnostic)))
        fields.append(_field("Last-Attempt-Date", formatdate(now, localtime=True)))
        if kind == "delay" and retry_until is not None:
            fields.append(_field("Will-Retry-Until", formatdate(retry_until, localtime=True)))
        blocks.append("\r\n" + "".join(fields))
    content = "".join(blocks).encode("utf-8")
    # RFC 6533 §3: UTF-8 addresses need the global type, which may carry 8bit.
    ctype = "message/global-delivery-status" if is_utf8 else "message/delivery-status"
    return _part_headers("Delivery report", ctype, content) + b"\r\n" + content


def _part_headers(description: str, ctype: str, content: bytes) -> bytes:
    """A body part's header block; declares 8bit when ``content`` needs it."""
    head = f"Content-Description: {description}\r\nContent-Type: {ctype}\r\n"
    if not content.isascii():
        head += "Content-Transfer-Encoding: 8bit\r\n"
    return head.encode("ascii")


def _header_block(original: bytes, limit: int) -> bytes:
    """The original's header block (RFC 6522 §4), cut at a line end within ``limit``."""
    match = _HEADER_END_RE.search(original, 0, limit + 4)
    head = original[: match.start()] if match else original
    if len(head) > limit:
        head = head[: head.rfind(b"\n", 0, limit) + 1]
    return head + b"\r\n" if head and not head.endswith(b"\n") else head


def _address_type(address: str, given: str = "rfc822") -> str:
    """RFC 6533 §3: an address that is not ASCII is of type ``utf-8``."""
    return given.strip() or "rfc822" if address.isascii() else "utf-8"


def _one_line(value: str) -> str:
    """``value`` with every control character (CR and LF included) made a space."""
    return _CONTROL_RE.sub(" ", value).strip()


def _ascii(value: str) -> str:
    """``value`` as one line of printable ASCII, for fields that allow nothing else."""
    return _NON_ASCII_PRINTABLE_RE.sub("?", value).strip()


def _field(name: str, value: str) -> str:
    """``Name: value`` folded at spaces to short lines, no line over 998 octets."""
    line = f"{name}:"
    lines: list[str] = []
    for i, word in enumerate(_one_line(value).split()):
        word = word.encode("utf-8")[:_MAX_TOKEN_OCTETS].decode("utf-8", "ignore")
        if i and len(line) + 1 + len(word) > _FOLD_WIDTH:
            lines.append(line)
            line = " "  # RFC 5322 §2.2.3: a continuation line starts with whitespace
        line += (" " if line != " " else "") + word
    lines.append(line)
    return "\r\n".join(lines) + "\r\n"


def _duration(seconds: float) -> str:
    """A coarse human duration: ``3 hours``, ``5 days``."""
    seconds = max(0.0, seconds)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{int(seconds)} seconds"
