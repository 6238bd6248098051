"""Virus scanning through a ClamAV daemon (clamd), with the INSTREAM command.

Hooks: ``gateway_startup`` (pings clamd, for at most 3 s; if it does not answer, a
WARNING says what that means: every message will get 451, or pass unscanned with
``on_scanner_error = "continue"``; start-up goes on), ``gateway_probe`` (the same ping
for ``gateway check --probe``) and ``gateway_data`` (scans each message).

The message, as received, is streamed to clamd at ``address`` (a Unix socket path, or
``host:port`` for TCP) within ``connect_timeout`` and ``scan_timeout``, a chunk at a time
as it is read (a message spooled to disk is never loaded whole). clamd parses the
MIME structure itself, so attachments and inline parts are both scanned. The hook is
:func:`~gateway.hooks.independent`: next to ``data_spamd`` or ``data_rspamd`` in the
chain, the scans run at the same time, and the verdict still follows the chain's order.

- Infected: with ``action = "reject"`` (the default) the message is refused with
  ``554 5.7.1 Virus found: <signature>``; with ``action = "quarantine"`` it is accepted
  and stored in the quarantine (see ``gateway quarantine``).
- Clean: no opinion; the next plugin runs. With ``add_header`` the message gets
  ``X-Virus-Scanned: ClamAV at <our hostname>``.
- Over ``max_size`` octets: not scanned (logged at INFO). Keep it at or below clamd's
  ``StreamMaxLength``, or clamd cuts the stream off and the scan counts as failed.
- clamd down, too slow, or answering ``ERROR``: ``on_scanner_error`` decides:
  ``tempfail`` (the default) answers ``451 4.7.1 Virus scanner unavailable, try again
  later``, ``continue`` lets the message through unscanned. Either way a WARNING names
  the plugin. (The chain entry's own ``on_error`` still covers a hook that fails
  unexpectedly.) Start-up refuses a policy where ``connect_timeout`` plus
  ``scan_timeout`` is not below the entry's ``timeout`` (30 s by default), or where
  ``address`` is malformed, in the entry or in an override.

Why a native asyncio client rather than the ``clamd`` package in the thread pool: the
protocol is a dozen lines, an asyncio stream honours the timeouts exactly and is dropped
at once when the session ends, and a slow clamd then holds no thread of the pool that
SPF, DKIM and password checks share.

Settings: ``address``, ``connect_timeout``, ``scan_timeout``, ``max_size``, ``action``,
``add_header``, ``on_scanner_error``. Needs nothing from other plugins; put it before the
spam scanners (a virus need not be scored).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from dataclasses import dataclass
from typing import Literal

from gateway.content import Content
from gateway.context import Gateway
from gateway.hooks import hookimpl, independent, wait_for_turn
from gateway.model import Message
from gateway.policy import Duration, Size, setting
from gateway.probe import Probes, startup_probe
from gateway.verdicts import Reply, Verdict
from plugins._scanner import (
    OnScannerError,
    ScannerError,
    check_entries,
    close_stream,
    open_stream,
    scanner_unavailable,
    send_content,
    skip_if_too_big,
    unavailable_consequence,
)

__all__ = ["Settings", "ClamdAnswer", "clamd_instream", "clamd_ping", "parse_clamd_reply"]

NAME = "data_clamav"
log = logging.getLogger(f"plugins.{NAME}")

REPLY_UNAVAILABLE = Reply(451, "4.7.1", "Virus scanner unavailable, try again later")
DEFAULT_PORT = 3310
_CHUNK = 256 * 1024  # INSTREAM chunks; clamd takes any size up to its StreamMaxLength
_MAX_REPLY = 4096  # "stream: <signature> FOUND" is short; bound what we read


@dataclass(frozen=True)
class Settings:
    """Settings of ``data_clamav``."""

    address: str = setting(
        "/var/run/clamav/clamd.ctl", "clamd's socket: a Unix socket path, or host:port for TCP"
    )
    connect_timeout: Duration = setting(5.0, "longest wait to connect to clamd", min=0.001)
    scan_timeout: Duration = setting(20.0, "longest wait for clamd's answer once connected", min=0.001)
    max_size: Size = setting(
        25 * 1024**2, "larger messages are not scanned (at most clamd's StreamMaxLength)", min=1
    )
    action: Literal["reject", "quarantine"] = setting(
        "reject", "what to do with an infected message: reject (554 5.7.1) or quarantine"
    )
    add_header: bool = setting(False, "add X-Virus-Scanned to messages clamd has scanned")
    on_scanner_error: OnScannerError = setting(
        "tempfail", "clamd down or failing: tempfail (451 4.7.1) or continue (pass unscanned)"
    )


@dataclass(frozen=True, slots=True)
class ClamdAnswer:
    """clamd's verdict on one stream: ``signature`` is set when it found something."""

    signature: str | None


def parse_clamd_reply(reply: bytes) -> ClamdAnswer:
    """Read clamd's answer to INSTREAM (``stream: OK``, ``stream: <sig> FOUND``).

    :param reply: the answer without its terminating NUL
    :raises ScannerError: clamd reported an error (``... ERROR``) or said something else
    """
    text = reply.decode("utf-8", "replace").strip()
    body = text.partition(": ")[2] if text.startswith("stream:") else text
    if body == "OK":
        return ClamdAnswer(None)
    if body.endswith(" FOUND"):
        signature = body[: -len(" FOUND")].strip()
        return ClamdAnswer(signature or "unknown")
    raise ScannerError(f"clamd answered {text[:200]!r}")


def _length_prefix(length: int) -> bytes:
    return struct.pack("!L", length)


async def _exchange(address: str, settings: Settings, command: bytes, payload: Content | None) -> bytes:
    """Send one ``z``-command (NUL-terminated, RFC-less clamd protocol) and read the answer."""
    reader, writer = await open_stream(address, DEFAULT_PORT, settings.connect_timeout)
    try:
        async with asyncio.timeout(settings.scan_timeout):
            writer.write(command)
            if payload is not None:
                # INSTREAM: <length:uint32 big-endian><data> chunks as they are read, then
                # a zero length.
                await send_content(writer, payload, frame=_length_prefix, chunk_size=_CHUNK)
                writer.write(_length_prefix(0))
            await writer.drain()
            answer = await reader.readuntil(b"\0")
    except TimeoutError:
        raise ScannerError(f"clamd at {address} gave no answer within {settings.scan_timeout:g}s") from None
    except asyncio.LimitOverrunError:
        raise ScannerError("clamd's answer is too long") from None
    except asyncio.IncompleteReadError as exc:
        # clamd closes the connection on a stream over StreamMaxLength.
        partial = exc.partial.decode("utf-8", "replace").strip()[:200]
        raise ScannerError(f"clamd closed the connection ({partial or 'no answer'})") from None
    except OSError as exc:
        raise ScannerError(f"clamd connection failed: {exc.strerror or exc}") from None
    finally:
        await close_stream(writer)
    return answer[:-1][:_MAX_REPLY]


async def clamd_instream(data: bytes | Content, settings: Settings) -> ClamdAnswer:
    """Scan ``data`` with clamd's INSTREAM command.

    :param data: what to scan (the whole message: ``message.content``), sent as it is read
    :param settings: where clamd is and how long to wait
    :raises ScannerError: clamd is unreachable, too slow, or reported an error
    """
    payload = data if isinstance(data, Content) else Content.of_bytes(data)
    return parse_clamd_reply(await _exchange(settings.address, settings, b"zINSTREAM\0", payload))


async def clamd_ping(settings: Settings) -> str:
    """Check that clamd answers ``PONG``.

    :returns: its answer, ``"PONG"``
    :raises ScannerError: it does not
    """
    answer = await _exchange(settings.address, settings, b"zPING\0", None)
    if answer.strip() != b"PONG":
        raise ScannerError(f"clamd answered {answer[:100]!r} to PING")
    return "PONG"


@hookimpl
async def gateway_startup(gateway: Gateway, settings: Settings) -> None:
    check_entries(gateway, NAME, Settings, DEFAULT_PORT)  # a policy that cannot work stops start-up
    consequence = unavailable_consequence(settings.on_scanner_error, REPLY_UNAVAILABLE)
    await startup_probe(log, NAME, "clamd", settings.address, lambda: clamd_ping(settings), consequence)


@hookimpl
async def gateway_probe(settings: Settings, probes: Probes) -> None:
    await probes.add(NAME, "clamd", settings.address, lambda: clamd_ping(settings))


@hookimpl
@independent
async def gateway_data(message: Message, gateway: Gateway, settings: Settings) -> Verdict | None:
    if skip_if_too_big(log, NAME, message, settings.max_size):
        return None
    try:
        answer = await clamd_instream(message.content, settings)
    except ScannerError as exc:
        await wait_for_turn()
        return scanner_unavailable(log, NAME, exc, settings.on_scanner_error, REPLY_UNAVAILABLE)
    await wait_for_turn()  # changes and decisions in chain order (gateway.hooks.independent)
    if answer.signature is None:
        log.debug("%s: clean", NAME)
        if settings.add_header:
            message.prepend_header("X-Virus-Scanned", f"ClamAV at {gateway.hostname}")
        return None
    signature = answer.signature[:100]
    if settings.action == "quarantine":
        if settings.add_header:
            message.prepend_header("X-Virus-Scanned", f"ClamAV at {gateway.hostname}")
        return Verdict.quarantine(f"virus {signature}")
    return Verdict.reject(Reply(554, "5.7.1", f"Virus found: {signature}"), reason=f"virus {signature}")
