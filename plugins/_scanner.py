"""Shared parts of the content-scanner plugins: ``data_clamav``, ``data_spamd``, ``data_rspamd``.

Each scanner speaks its own protocol, but they share how a daemon is addressed, how a
connection is opened and closed under a time limit, what happens when the daemon is
down, and (for the two spam scanners) the ``X-Spam-*`` headers and score thresholds.
The Dovecot client (``plugins/_dovecot.py``) uses the same addressing, connection and
start-up checks.

All network I/O here is native asyncio with an explicit timeout: no blocking socket
ever runs on the event loop, and no thread of the gateway's pool is held while a
daemon takes its time. A message goes to a daemon as it is read
(:func:`send_content`): a message spooled to disk is never whole in memory, and a
daemon that reads slowly holds back the reading.

The three scanners' ``gateway_data`` hooks are :func:`gateway.hooks.independent`: next
to one another in a chain they scan a message at the same time, and each makes its
changes after ``await wait_for_turn()``, in chain order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Literal

from gateway.content import CHUNK, Content
from gateway.context import Gateway
from gateway.model import Message
from gateway.verdicts import Reply, Verdict

__all__ = [
    "OnScannerError",
    "check_entries",
    "ScannerError",
    "SpamResult",
    "close_stream",
    "format_score",
    "open_stream",
    "parse_address",
    "scanner_unavailable",
    "send_content",
    "skip_if_too_big",
    "spam_headers",
    "unavailable_consequence",
    "threshold_verdict",
]

OnScannerError = Literal["tempfail", "continue"]

REPLY_SPAM = Reply(550, "5.7.1", "Message rejected as spam")

# Names of rules/symbols come from the daemon: keep them to what rule names look like,
# and bound how many go into a header (RFC 5322 §2.1.1: lines of at most 998 octets).
_SYMBOL = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_MAX_TESTS = 60
_FOLD_AT = 72


class ScannerError(Exception):
    """The scanner could not give an answer: down, slow, or an answer we cannot read."""


def parse_address(address: str, default_port: int | None, what: str = "scanner") -> str | tuple[str, int]:
    """Where a daemon listens: a Unix socket path or a TCP host and port.

    ``/run/clamav/clamd.ctl`` and ``unix:/path`` are Unix sockets; ``127.0.0.1:3310``,
    ``[::1]:783``, ``scanner.example`` (with ``default_port``) are TCP.

    :param address: the setting's value
    :param default_port: the port when ``address`` names none; None: a TCP address
        must name its port (a daemon with no standard port, such as Dovecot's auth)
    :param what: the daemon, as the error messages name it
    :returns: the socket path, or ``(host, port)``
    :raises ValueError: an empty address, a missing or a bad port
    """
    text = address.strip()
    if text.startswith("unix:"):
        text = text[5:]
        if not text:
            raise ValueError(f"no socket path in {what} address {address!r}")
        return text
    if text.startswith("/"):
        return text
    if not text:
        raise ValueError(f"empty {what} address")
    host, port = text, None if default_port is None else str(default_port)
    if text.startswith("["):  # [IPv6]:port
        end = text.find("]")
        if end < 0:
            raise ValueError(f"unclosed '[' in {what} address {address!r}")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"expected ':port' after ']' in {what} address {address!r}")
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    if port is None:
        raise ValueError(f"no port in {what} address {address!r} (a socket path starts with /)")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port in {what} address {address!r}")
    return host, int(port)


def check_entries(
    gateway: Gateway, name: str, settings_cls: type, default_port: int | None, *,
    answer_timeout: str = "scan_timeout", what: str = "scanner",
) -> None:
    """Refuse a policy whose daemon entries cannot work as written.

    Every entry of plugin ``name``, with each override's settings for it, must have a
    well-formed ``address``, and ``connect_timeout`` plus its answer timeout below the
    entry's ``timeout``: otherwise a slow daemon would hit the hook runner's limit first
    and get its generic 451 4.3.0 (or the entry's ``on_error``) instead of the plugin's
    own answer for a daemon that cannot answer.

    :param gateway: the gateway being started, with its policy
    :param name: the plugin's name
    :param settings_cls: the plugin's ``Settings`` class
    :param default_port: the daemon's port when an address names none (see
        :func:`parse_address`)
    :param answer_timeout: the setting that bounds the wait for the daemon's answer
    :param what: the daemon, as the error messages name it
    :raises ValueError: naming the entry and the problem
    """
    policy = gateway.policy
    for entry in policy.plugins:
        if entry.name != name:
            continue
        found: list[Any] = [entry.settings]
        found += [o.plugins.get(entry.id) for o in policy.overrides]
        for settings in found:
            if not isinstance(settings, settings_cls):
                continue
            try:
                parse_address(settings.address, default_port, what)  # type: ignore[attr-defined]
            except ValueError as exc:
                raise ValueError(f"plugin {entry.id} ({name}): {exc}") from None
            budget = settings.connect_timeout + getattr(settings, answer_timeout)  # type: ignore[attr-defined]
            if budget >= entry.timeout:
                raise ValueError(
                    f"plugin {entry.id} ({name}): connect_timeout + {answer_timeout} ({budget:g}s)"
                    f" must be shorter than the entry's timeout {entry.timeout:g}s"
                )


async def open_stream(
    address: str, default_port: int | None, timeout: float, *,
    limit: int = 2**16, error: type[Exception] = ScannerError, what: str = "scanner",
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to a daemon within ``timeout`` seconds.

    :param address: the daemon's address (see :func:`parse_address`)
    :param default_port: the port when ``address`` names none
    :param timeout: the longest wait for the connection
    :param limit: the stream reader's buffer limit (the longest line it reads)
    :param error: the exception raised when the daemon cannot be reached
    :param what: the daemon, as the error messages name it
    :raises ScannerError: (or ``error``) the daemon cannot be reached in time, or
        ``address`` is malformed
    """
    try:
        where = parse_address(address, default_port, what)
    except ValueError as exc:
        raise error(str(exc)) from None
    try:
        async with asyncio.timeout(timeout):
            if isinstance(where, str):
                return await asyncio.open_unix_connection(where, limit=limit)
            return await asyncio.open_connection(where[0], where[1], limit=limit)
    except TimeoutError:
        raise error(f"connect to {address} timed out after {timeout:g}s") from None
    except OSError as exc:
        raise error(f"cannot connect to {address}: {exc.strerror or exc}") from None


async def close_stream(writer: asyncio.StreamWriter) -> None:
    """Close a connection without waiting long or raising (the answer is already in)."""
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(1.0):
            await writer.wait_closed()


async def send_content(
    writer: asyncio.StreamWriter, content: Content, *, frame: Callable[[int], bytes] | None = None,
    chunk_size: int = CHUNK,
) -> None:
    """Write ``content`` to a daemon as it is read, a chunk at a time.

    A spooled message is read from its file on a thread, chunk by chunk, and each chunk
    is drained before the next is read: memory holds a chunk and the socket's buffer,
    never the message.

    :param writer: the daemon's connection (the caller's timeout bounds the whole send)
    :param content: the octets to send (:attr:`gateway.message.Message.content`)
    :param frame: what goes before each chunk, given its length (clamd's INSTREAM
        length prefix); ``None``: nothing
    :param chunk_size: the largest chunk
    :raises OSError: the connection failed (the daemon may have closed it)
    """
    async for chunk in content.stream(chunk_size):
        if frame is not None:
            writer.write(frame(len(chunk)))
        writer.write(chunk)
        await writer.drain()


def scanner_unavailable(
    log: logging.Logger, plugin: str, error: Exception, on_error: OnScannerError, reply: Reply
) -> Verdict | None:
    """The answer when a scanner failed: tempfail (fail closed) or go on (fail open).

    :param log: the plugin's logger; the failure is logged at WARNING with its name
    :param plugin: the plugin's name
    :param error: what went wrong
    :param on_error: the plugin's ``on_scanner_error`` setting
    :param reply: the 4xx reply for ``tempfail``
    :returns: a tempfail verdict, or ``None`` to let the message through unscanned
    """
    if on_error == "continue":
        log.warning("%s: scanner unavailable, message passed unscanned: %s", plugin, error)
        return None
    log.warning("%s: scanner unavailable, message deferred: %s", plugin, error)
    return Verdict.tempfail(reply, reason=f"scanner unavailable: {error}")


def unavailable_consequence(on_error: OnScannerError, reply: Reply) -> str:
    """What a scanner that does not answer means for mail, for the start-up WARNING.

    :param on_error: the plugin's ``on_scanner_error`` setting
    :param reply: its 4xx reply for ``tempfail``
    """
    if on_error == "continue":
        return 'every message will pass unscanned (on_scanner_error = "continue")'
    return f'every message will get {reply.code} {reply.status} (on_scanner_error = "tempfail")'


def skip_if_too_big(log: logging.Logger, plugin: str, message: Message, max_size: int) -> bool:
    """True (and logged) when ``message`` is over the scanner's ``max_size``."""
    if message.size <= max_size:
        return False
    log.info("%s: message of %d octets is over max_size %d, not scanned", plugin, message.size, max_size)
    return True


def format_score(score: float) -> str:
    """A score the way spam headers write it: one decimal."""
    return f"{score:.1f}"


def _fold_tests(tests: list[str]) -> str:
    """``tests=A,B,...`` folded into header continuation lines (RFC 5322 §2.2.3)."""
    clean = [t for t in tests if _SYMBOL.match(t)][:_MAX_TESTS]
    if not clean:
        return "tests=none"
    lines, line = [], "tests="
    for i, test in enumerate(clean):
        piece = test + ("," if i < len(clean) - 1 else "")
        if len(line) + len(piece) > _FOLD_AT and line.strip() not in ("", "tests="):
            lines.append(line)
            line = "\t"
        line += piece
    lines.append(line)
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class SpamResult:
    """What a spam scanner said about one message."""

    score: float
    required: float
    tests: tuple[str, ...] = ()
    is_spam: bool = False


def spam_headers(message: Message, result: SpamResult, extra: str = "") -> None:
    """Add ``X-Spam-Status`` and ``X-Spam-Score``, dropping any the client sent.

    A sender could forge these headers to fool a filter further down (a mail client
    rule on ``X-Spam-Status: No``), so the received ones are removed first; headers
    added by earlier plugins are kept.

    :param message: the message to annotate
    :param result: the scanner's finding
    :param extra: more ``key=value`` words for the status line (e.g. ``action=reject``)
    """
    message.remove_headers("X-Spam-Status")
    message.remove_headers("X-Spam-Score")
    message.remove_headers("X-Spam-Flag")
    words = [
        "Yes," if result.is_spam else "No,",
        f"score={format_score(result.score)}",
        f"required={format_score(result.required)}",
    ]
    if extra:
        words.append(extra)
    status = " ".join(words) + "\n\t" + _fold_tests(list(result.tests))
    message.prepend_header("X-Spam-Score", format_score(result.score))
    message.prepend_header("X-Spam-Status", status)
    if result.is_spam:
        message.prepend_header("X-Spam-Flag", "YES")


def threshold_verdict(
    score: float, quarantine_score: float | None, reject_score: float | None, who: str
) -> Verdict | None:
    """The verdict the plugin's own score thresholds give (reject before quarantine).

    :param score: the scanner's score
    :param quarantine_score: quarantine at or above; ``None`` is off
    :param reject_score: reject with 550 5.7.1 at or above; ``None`` is off
    :param who: the scanner's name for the log reason
    """
    if reject_score is not None and score >= reject_score:
        return Verdict.reject(
            REPLY_SPAM, reason=f"{who} score {format_score(score)} >= {reject_score:g}"
        )
    if quarantine_score is not None and score >= quarantine_score:
        return Verdict.quarantine(f"{who} score {format_score(score)} >= {quarantine_score:g}")
    return None
