"""Spam scoring through SpamAssassin's daemon (spamd), with its SPAMC/1.5 protocol.

Hooks: ``gateway_startup`` (sends PING, for at most 3 s; if spamd does not answer, a
WARNING says what that means: every message will get 451, or pass unscanned with
``on_scanner_error = "continue"``; start-up goes on), ``gateway_probe`` (the same PING
for ``gateway check --probe``) and ``gateway_data`` (scores each message).

The message goes to spamd at ``address`` (``host:port``, or a Unix socket path) with the
``SYMBOLS`` command, under ``connect_timeout`` and ``scan_timeout``; ``user`` is passed
as spamd's ``User`` header when set. SpamAssassin learns the client's address from the
topmost ``Received:`` header, which this gateway only adds at queue time, so the copy
sent to spamd carries the same ``Received:`` line ``queue_received_header`` will write
(the queued message is not changed by it). The message is sent as it is read, a chunk
at a time, after that line (a message spooled to disk is never loaded whole). The hook
is :func:`~gateway.hooks.independent`: beside ``data_clamav`` or ``data_rspamd`` in the
chain, the scans run at the same time and the outcome follows the chain's order. With
spamd's answer (score, its ``required_score``, the rules that hit):

- ``add_headers`` (default true): ``X-Spam-Status: Yes|No, score=.. required=..
  tests=..`` and ``X-Spam-Score``, plus ``X-Spam-Flag: YES`` for spam; copies of these
  headers sent by the client are removed. "Yes" means a score at or above
  ``tag_score`` (default: spamd's own ``required_score``).
- ``reject_score``: at or above it the message is refused with 550 5.7.1;
  ``quarantine_score``: at or above it the message is quarantined. Both are off by
  default, so by default the plugin only tags.
- ``scoring_weight`` (default 0: off): ``score × scoring_weight`` is added to the
  transaction's results, so the policy's ``[scoring]`` thresholds can combine it with
  other plugins' findings.

Messages over ``max_size`` (default 512 KiB, like ``spamc``: SpamAssassin is slow on big
messages, and spam is small) are not scanned. spamd down, too slow or answering an
error: ``on_scanner_error`` decides, ``tempfail`` (default, ``451 4.7.1 Spam scanner
unavailable, try again later``) or ``continue`` (pass unscanned); a WARNING names the
plugin. Start-up refuses a policy where ``connect_timeout`` plus ``scan_timeout`` is
not below the chain entry's ``timeout`` (30 s by default), or ``address`` is malformed.

Settings: ``address``, ``connect_timeout``, ``scan_timeout``, ``max_size``, ``user``,
``tag_score``, ``quarantine_score``, ``reject_score``, ``add_headers``,
``scoring_weight``, ``on_scanner_error``. Put it after ``data_clamav``.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass

from gateway.content import Content
from gateway.context import Gateway
from gateway.hooks import hookimpl, independent, wait_for_turn
from gateway.model import Message, Session, Transaction
from gateway.policy import Duration, Size, setting
from gateway.probe import Probes, startup_probe
from gateway.verdicts import Reply, Verdict
from plugins import queue_received_header
from plugins._scanner import (
    OnScannerError,
    ScannerError,
    SpamResult,
    check_entries,
    close_stream,
    format_score,
    open_stream,
    scanner_unavailable,
    send_content,
    skip_if_too_big,
    spam_headers,
    threshold_verdict,
    unavailable_consequence,
)

__all__ = ["Settings", "parse_spamd_response", "spamd_ping", "spamd_symbols"]

NAME = "data_spamd"
log = logging.getLogger(f"plugins.{NAME}")

REPLY_UNAVAILABLE = Reply(451, "4.7.1", "Spam scanner unavailable, try again later")
DEFAULT_PORT = 783
_MAX_BODY = 64 * 1024  # the SYMBOLS answer is a comma-separated rule list
_STATUS = re.compile(r"^SPAMD/(\d+\.\d+) (\d+) (.*)$")
_SPAM = re.compile(r"^\s*(True|False|Yes|No)\s*;\s*(-?[\d.]+)\s*/\s*(-?[\d.]+)\s*$", re.I)


@dataclass(frozen=True)
class Settings:
    """Settings of ``data_spamd``."""

    address: str = setting("127.0.0.1:783", "spamd's address: host:port, or a Unix socket path")
    connect_timeout: Duration = setting(5.0, "longest wait to connect to spamd", min=0.001)
    scan_timeout: Duration = setting(20.0, "longest wait for spamd's answer once connected", min=0.001)
    max_size: Size = setting(512 * 1024, "larger messages are not scanned", min=1)
    user: str = setting("", "user name to pass to spamd (its per-user settings); empty: none")
    tag_score: float | None = setting(None, "X-Spam-Status says Yes at or above; default: spamd's required_score")
    quarantine_score: float | None = setting(None, "quarantine at or above this score; default: off")
    reject_score: float | None = setting(None, "reject (550 5.7.1) at or above this score; default: off")
    add_headers: bool = setting(True, "add X-Spam-Status and X-Spam-Score headers")
    scoring_weight: float = setting(0.0, "add score x weight to the transaction's results; 0: off")
    on_scanner_error: OnScannerError = setting(
        "tempfail", "spamd down or failing: tempfail (451 4.7.1) or continue (pass unscanned)"
    )


def parse_spamd_response(head: bytes, body: bytes) -> SpamResult:
    """Read spamd's answer to SYMBOLS.

    :param head: the status line and headers (``SPAMD/1.1 0 EX_OK``, ``Spam: True ;
        5.2 / 5.0``), CRLF-separated
    :param body: the rule names, comma-separated
    :raises ScannerError: an error status or an answer without a ``Spam`` header
    """
    lines = head.decode("utf-8", "replace").split("\r\n")
    status = _STATUS.match(lines[0].strip())
    if status is None:
        raise ScannerError(f"spamd answered {lines[0][:100]!r}")
    if status.group(2) != "0":
        raise ScannerError(f"spamd error {status.group(2)} {status.group(3)[:100]}")
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() != "spam":
            continue
        found = _SPAM.match(value)
        if found is None:
            raise ScannerError(f"spamd sent a bad Spam header {value[:100]!r}")
        tests = tuple(t.strip() for t in body.decode("ascii", "replace").split(",") if t.strip())
        return SpamResult(
            score=float(found.group(2)),
            required=float(found.group(3)),
            tests=tests,
            is_spam=found.group(1).lower() in ("true", "yes"),
        )
    raise ScannerError("spamd's answer has no Spam header")


async def _exchange(request: bytes, settings: Settings, message: Content | None = None) -> tuple[bytes, bytes]:
    """Send ``request`` (the command and its headers) and ``message`` as it is read; the
    answer's head and body."""
    reader, writer = await open_stream(settings.address, DEFAULT_PORT, settings.connect_timeout)
    try:
        async with asyncio.timeout(settings.scan_timeout):
            writer.write(request)
            if message is not None:
                await send_content(writer, message)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip() or b"0")
            if not 0 <= length <= _MAX_BODY:
                raise ScannerError(f"spamd announced {length} octets")
            body = await reader.readexactly(length)
    except TimeoutError:
        raise ScannerError(f"spamd gave no answer within {settings.scan_timeout:g}s") from None
    except asyncio.IncompleteReadError as exc:
        # An error status (``SPAMD/1.0 76 Bad header line``) comes without the blank line.
        if exc.partial.startswith(b"SPAMD/"):
            return exc.partial, b""
        raise ScannerError("spamd closed the connection without an answer") from None
    except asyncio.LimitOverrunError:
        raise ScannerError("spamd's answer headers are too long") from None
    except ValueError:
        raise ScannerError("spamd sent a bad Content-length") from None
    except OSError as exc:
        raise ScannerError(f"spamd connection failed: {exc.strerror or exc}") from None
    finally:
        await close_stream(writer)
    return head, body


async def spamd_symbols(data: bytes | Content, settings: Settings) -> SpamResult:
    """Score ``data`` with spamd's SYMBOLS command.

    :param data: the message as spamd should see it (CRLF line ends), sent as it is read
    :param settings: where spamd is, the user, and how long to wait
    :raises ScannerError: spamd is unreachable, too slow, or reported an error
    """
    content = data if isinstance(data, Content) else Content.of_bytes(data)
    head = b"SYMBOLS SPAMC/1.5\r\nContent-length: %d\r\n" % content.size
    user = re.sub(r"[^A-Za-z0-9@._+\-]", "", settings.user)
    if user:
        head += b"User: %s\r\n" % user.encode("ascii")
    answer_head, body = await _exchange(head + b"\r\n", settings, content)
    return parse_spamd_response(answer_head, body)


async def spamd_ping(settings: Settings) -> str:
    """Check that spamd answers PING with PONG.

    :returns: its status line (``SPAMD/1.5 0 PONG``)
    :raises ScannerError: it does not
    """
    head, _ = await _exchange(b"PING SPAMC/1.5\r\n\r\n", settings)
    status = head.split(b"\r\n", 1)[0]
    if b" PONG" not in status:
        raise ScannerError(f"spamd answered {head[:100]!r} to PING")
    return status.decode("ascii", "replace")


@hookimpl
async def gateway_startup(gateway: Gateway, settings: Settings) -> None:
    check_entries(gateway, NAME, Settings, DEFAULT_PORT)  # a policy that cannot work stops start-up
    consequence = unavailable_consequence(settings.on_scanner_error, REPLY_UNAVAILABLE)
    await startup_probe(log, NAME, "spamd", settings.address, lambda: spamd_ping(settings), consequence)


@hookimpl
async def gateway_probe(settings: Settings, probes: Probes) -> None:
    await probes.add(NAME, "spamd", settings.address, lambda: spamd_ping(settings))


@hookimpl
@independent
async def gateway_data(
    session: Session, txn: Transaction, message: Message, gateway: Gateway, settings: Settings
) -> Verdict | None:
    if skip_if_too_big(log, NAME, message, settings.max_size):
        return None
    received = queue_received_header.received_header(
        session, txn, gateway.hostname, queue_received_header.Settings()
    )
    trace = ("Received: " + received.replace("\n", "\r\n") + "\r\n").encode("utf-8", "replace")
    try:
        result = await spamd_symbols(Content.join(trace, message.content), settings)
    except ScannerError as exc:
        await wait_for_turn()
        return scanner_unavailable(log, NAME, exc, settings.on_scanner_error, REPLY_UNAVAILABLE)
    await wait_for_turn()  # changes and decisions in chain order (gateway.hooks.independent)
    required = result.required if settings.tag_score is None else settings.tag_score
    log.info("%s: score=%s required=%s tests=%s", NAME, format_score(result.score),
             format_score(required), ",".join(result.tests[:20]))
    if settings.scoring_weight:
        txn.results.add(NAME, result.score * settings.scoring_weight, f"spamd score {format_score(result.score)}")
    if settings.add_headers:
        tagged = SpamResult(result.score, required, result.tests, result.score >= required)
        spam_headers(message, tagged)
    return threshold_verdict(result.score, settings.quarantine_score, settings.reject_score, "spamd")
