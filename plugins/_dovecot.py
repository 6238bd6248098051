"""A native asyncio client for Dovecot's two authentication protocols.

Used by ``auth_dovecot`` (password checks) and ``rcpt_dovecot_users`` (does a mailbox
exist?). Both talk to Dovecot's ``auth`` service, the same process Postfix asks with
``smtpd_sasl_type = dovecot``:

- the *client* protocol (``unix_listener auth-client``, or any listener of ``service
  auth`` not named ``auth-userdb``/``auth-master``): the client sends ``VERSION`` and
  ``CPID``; Dovecot answers with its ``VERSION``, one ``MECH`` line per mechanism,
  ``SPID``, ``CUID``, ``COOKIE`` and ``DONE``; then ``AUTH <id> PLAIN service=smtp ...
  resp=<base64>`` gets ``OK``, ``FAIL`` (``temp`` or ``code=temp_fail`` when Dovecot's
  own backend failed) or ``CONT``.
- the *master* protocol on ``unix_listener auth-userdb``: both sides send ``VERSION``;
  ``USER <id> <name> service=smtp`` gets ``USER`` (the user's fields), ``NOTFOUND`` or
  ``FAIL``.

Every call opens its own connection and closes it after the answer. An AUTH happens
once per submission session and recipient lookups are cached by their plugin, so the
cost (a local connect and a few short lines, well under a millisecond on a Unix socket)
is small; in exchange nothing is shared between sessions, no reader task has to
outlive a request, and a restarted Dovecot never leaves a stale connection that
would fail the next request. Every wait is bounded: ``connect_timeout`` for the
connection, ``timeout`` for the handshake and the answer together. Any failure to get
a clear answer raises :class:`DovecotError`, which callers turn into the policy's
fail-open or fail-closed answer; it never means "accepted".

Lines are tab-separated; values are escaped the Dovecot way (``\\x01`` then ``1``,
``t``, ``r``, ``n``). Passwords only ever travel inside the base64 ``resp=`` field and
are never logged or put in an exception.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.context import Gateway
from gateway.probe import Probes, startup_probe

from plugins import _scanner

__all__ = [
    "AuthAnswer",
    "DovecotError",
    "add_probe",
    "authenticate",
    "check_address",
    "check_entries",
    "escape",
    "lookup_user",
    "parse_address",
    "parse_fields",
    "probe",
    "start_up",
    "unescape",
]

_MAX_LINE = 16 * 1024
_MAX_HANDSHAKE_LINES = 64
_MAX_STRAY_LINES = 16
_REQUEST_ID = "1"


class DovecotError(Exception):
    """Dovecot gave no usable answer: down, slow, refusing the protocol, or failing."""


@dataclass(frozen=True, slots=True)
class AuthAnswer:
    """Dovecot's answer to one password check.

    :ivar ok: the password is right
    :ivar user: the user name Dovecot resolved (``user=``), or the login if none
    :ivar reason: Dovecot's ``reason=`` text for a failure, empty if none
    """

    ok: bool
    user: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class _Handshake:
    mechanisms: frozenset[str] = field(default_factory=frozenset)


def escape(value: str) -> str:
    """Escape a value for a Dovecot protocol line (its ``str_tabescape``)."""
    return (
        value.replace("\x01", "\x011").replace("\t", "\x01t").replace("\r", "\x01r").replace("\n", "\x01n")
    )


def unescape(value: str) -> str:
    """Undo :func:`escape`; an unknown escape keeps the character after ``\\x01``."""
    if "\x01" not in value:
        return value
    out, i = [], 0
    table = {"1": "\x01", "t": "\t", "r": "\r", "n": "\n"}
    while i < len(value):
        char = value[i]
        if char == "\x01" and i + 1 < len(value):
            out.append(table.get(value[i + 1], value[i + 1]))
            i += 2
            continue
        out.append(char)
        i += 1
    return "".join(out)


def parse_fields(words: list[str]) -> dict[str, str]:
    """``key=value`` words (and bare flags such as ``temp``, mapped to ``""``) as a dict."""
    fields: dict[str, str] = {}
    for word in words:
        key, _, value = word.partition("=")
        fields[key] = unescape(value)
    return fields


def parse_address(address: str) -> str | tuple[str, int]:
    """Where a Dovecot listener is: a Unix socket path or a TCP host and port.

    ``/run/dovecot/auth-client`` and ``unix:/path`` are Unix sockets; ``127.0.0.1:12345``
    and ``[::1]:12345`` are TCP. Dovecot's auth listeners have no standard port, so a
    TCP address must name one.

    :raises ValueError: empty, no port, or a bad port
    """
    return _scanner.parse_address(address, None, "Dovecot")


def check_address(address: str) -> None:
    """Refuse an auth socket address that cannot work (see :func:`parse_address`).

    :raises ValueError: naming the problem
    """
    parse_address(address)


async def _connect(address: str, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await _scanner.open_stream(address, None, timeout, limit=_MAX_LINE, error=DovecotError, what="Dovecot")


async def _read_line(reader: asyncio.StreamReader) -> list[str]:
    try:
        line = await reader.readline()
    except (asyncio.LimitOverrunError, ValueError):
        raise DovecotError("Dovecot sent an over-long line") from None
    if not line.endswith(b"\n"):
        raise DovecotError("Dovecot closed the connection without an answer")
    return line[:-1].decode("utf-8", "replace").split("\t")


def _check_version(words: list[str], what: str) -> None:
    if len(words) < 3 or words[0] != "VERSION" or words[1] != "1":
        raise DovecotError(f"Dovecot's {what} speaks {' '.join(words)[:60]!r}, not version 1")


async def _client_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> _Handshake:
    """Greet an auth-client socket and read what it offers, which must include PLAIN."""
    writer.write(f"VERSION\t1\t2\nCPID\t{os.getpid()}\n".encode())
    mechanisms: set[str] = set()
    for number in range(_MAX_HANDSHAKE_LINES):
        words = await _read_line(reader)
        if number == 0:
            _check_version(words, "auth socket")
        elif words[0] == "MECH" and len(words) >= 2:
            mechanisms.add(words[1].upper())
        elif words[0] == "DONE":
            if "PLAIN" not in mechanisms:
                raise DovecotError("Dovecot does not offer the PLAIN mechanism (auth_mechanisms)")
            return _Handshake(frozenset(mechanisms))
    raise DovecotError("Dovecot's handshake does not end")


@contextlib.asynccontextmanager
async def _exchange(
    address: str, connect_timeout: float, timeout: float, waiting_for: str = "answer",
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """One connection to Dovecot for one request: connected within ``connect_timeout``,
    the whole exchange within ``timeout``, closed at the end; a timeout or a broken
    connection is a :class:`DovecotError`."""
    reader, writer = await _connect(address, connect_timeout)
    try:
        async with asyncio.timeout(timeout):
            yield reader, writer
    except TimeoutError:
        raise DovecotError(f"Dovecot gave no {waiting_for} within {timeout:g}s") from None
    except OSError as exc:
        raise DovecotError(f"connection to Dovecot failed: {exc.strerror or exc}") from None
    finally:
        await _scanner.close_stream(writer)


async def _answer_for(reader: asyncio.StreamReader, commands: tuple[str, ...]) -> list[str]:
    """The first line that answers our request; other lines (SPID, ...) are skipped."""
    for _ in range(_MAX_STRAY_LINES):
        words = await _read_line(reader)
        if words[0] in commands and len(words) >= 2 and words[1] == _REQUEST_ID:
            return words
    raise DovecotError("Dovecot did not answer the request")


async def authenticate(
    address: str,
    login: str,
    password: str,
    *,
    remote_ip: str = "",
    local_ip: str = "",
    remote_port: int = 0,
    local_port: int = 0,
    secured: bool = False,
    session_id: str = "",
    penalty: bool = True,
    service: str = "smtp",
    connect_timeout: float = 5.0,
    timeout: float = 20.0,
) -> AuthAnswer:
    """Check ``login``/``password`` with Dovecot's passdb, as Postfix does.

    The credentials go as a PLAIN response (RFC 4616, empty authorization identity)
    whatever mechanism the SMTP client used: the gateway has already decoded them.

    :param address: the auth-client socket: a Unix socket path or ``host:port``
    :param login: the authentication identity
    :param password: the password; never logged
    :param remote_ip: the SMTP client's address (``rip``: Dovecot logs it and applies its
        failure penalty per address)
    :param local_ip: the address the client connected to (``lip``)
    :param remote_port: the client's port (``rport``)
    :param local_port: the listener's port (``lport``)
    :param secured: the SMTP session is on TLS
    :param session_id: the gateway's session id, shown in Dovecot's log lines
    :param penalty: let Dovecot delay repeated failures from ``remote_ip``
    :param service: the service name Dovecot's passdb sees (``%s``)
    :param connect_timeout: longest wait for the connection
    :param timeout: longest wait for the handshake and the answer
    :raises DovecotError: no answer, a temporary failure inside Dovecot, no PLAIN
        mechanism offered, or an answer that cannot be read
    """
    if "\0" in login or "\0" in password:
        # A NUL would split the PLAIN response differently (RFC 4616 §2).
        return AuthAnswer(False, login, "NUL in credentials")
    response = base64.b64encode(b"\0" + login.encode() + b"\0" + password.encode()).decode()
    words = [f"AUTH\t{_REQUEST_ID}\tPLAIN\tservice={escape(service)}\tnologin"]
    for key, value in (("lip", local_ip), ("rip", remote_ip), ("session", session_id)):
        if value:
            words.append(f"{key}={escape(value)}")
    for key, port in (("lport", local_port), ("rport", remote_port)):
        if port:
            words.append(f"{key}={port}")
    if secured:
        words.append("secured")
    if not penalty:
        words.append("no-penalty")
    words.append(f"resp={response}")
    async with _exchange(address, connect_timeout, timeout) as (reader, writer):
        await _client_handshake(reader, writer)
        writer.write(("\t".join(words) + "\n").encode())
        await writer.drain()
        answer = await _answer_for(reader, ("OK", "FAIL", "CONT"))
    fields = parse_fields(answer[2:])
    user = fields.get("user", login)
    if answer[0] == "OK":
        return AuthAnswer(True, user)
    if answer[0] == "CONT":
        raise DovecotError("Dovecot asked for more than a PLAIN response")
    reason = fields.get("reason", "")
    if "temp" in fields or fields.get("code") == "temp_fail":
        raise DovecotError(f"Dovecot's passdb failed temporarily{': ' + reason if reason else ''}")
    return AuthAnswer(False, user, reason)


async def lookup_user(
    address: str,
    user: str,
    *,
    service: str = "smtp",
    connect_timeout: float = 5.0,
    timeout: float = 10.0,
) -> dict[str, str] | None:
    """Ask Dovecot's userdb whether ``user`` exists (the ``USER`` master request).

    :param address: the auth-userdb socket: a Unix socket path or ``host:port``
    :param user: the user name, as the userdb knows it (often the full address)
    :param service: the service name the userdb sees
    :param connect_timeout: longest wait for the connection
    :param timeout: longest wait for the handshake and the answer
    :returns: the user's fields (``uid``, ``home``, ...) or ``None`` when not found
    :raises DovecotError: no answer, a ``FAIL`` (the userdb backend failed), or an
        answer that cannot be read
    """
    async with _exchange(address, connect_timeout, timeout) as (reader, writer):
        writer.write(f"VERSION\t1\t0\nUSER\t{_REQUEST_ID}\t{escape(user)}\tservice={escape(service)}\n".encode())
        await writer.drain()
        _check_version(await _read_line(reader), "auth-userdb socket")
        answer = await _answer_for(reader, ("USER", "NOTFOUND", "FAIL"))
    if answer[0] == "NOTFOUND":
        return None
    if answer[0] == "FAIL":
        reason = parse_fields(answer[2:]).get("reason", "")
        raise DovecotError(f"Dovecot's userdb failed{': ' + reason[:200] if reason else ''}")
    return parse_fields(answer[3:])


async def probe(address: str, *, master: bool, connect_timeout: float, timeout: float) -> str:
    """Connect and read Dovecot's greeting, for a start-up check.

    :param address: the socket to check
    :param master: ``True`` for an auth-userdb socket, ``False`` for an auth-client one
    :param connect_timeout: longest wait for the connection
    :param timeout: longest wait for the greeting
    :returns: what Dovecot offers (its mechanisms, or its master version), for the log
    :raises DovecotError: no greeting, or an auth-client socket without PLAIN
    """
    async with _exchange(address, connect_timeout, timeout, "greeting") as (reader, writer):
        if master:
            writer.write(b"VERSION\t1\t0\n")
            words = await _read_line(reader)
            _check_version(words, "auth-userdb socket")
            return f"master protocol {words[1]}.{words[2]}"
        handshake = await _client_handshake(reader, writer)
    return "mechanisms " + " ".join(sorted(handshake.mechanisms))


def check_entries(gateway: Gateway, name: str, settings_cls: type) -> None:
    """Refuse a policy whose entries of plugin ``name`` cannot work as written.

    Each entry, and each override's settings for it, needs a well-formed ``address``
    and ``connect_timeout + answer_timeout`` below the entry's ``timeout``: otherwise
    the hook runner's limit would cut a slow Dovecot off first, with its generic answer
    (or the entry's ``on_error``) instead of the plugin's ``on_dovecot_error``.

    :raises ValueError: naming the entry and the problem
    """
    _scanner.check_entries(gateway, name, settings_cls, None, answer_timeout="answer_timeout", what="Dovecot")


async def start_up(
    gateway: Gateway, name: str, settings: Any, log: logging.Logger, *, master: bool, request: str,
) -> None:
    """The start-up of a Dovecot plugin: refuse a policy whose entries cannot work
    (:func:`check_entries`), then try Dovecot once and log what it offers; a Dovecot that
    does not answer (within :data:`gateway.probe.STARTUP_TIMEOUT`) is only a warning
    saying what each ``request`` will get meanwhile; each will try again.

    :param settings: the entry's settings (``address``, ``connect_timeout``, ``answer_timeout``)
    :param log: the plugin's logger
    :param master: an auth-userdb socket, else an auth-client one (see :func:`probe`)
    :raises ValueError: a policy that cannot work
    """
    check_entries(gateway, name, type(settings))
    consequence = f'every {request} will get the on_dovecot_error answer ("{settings.on_dovecot_error}")'
    await startup_probe(log, name, _daemon(master), settings.address, _check(settings, master), consequence)


def _daemon(master: bool) -> str:
    return "Dovecot auth-userdb" if master else "Dovecot auth"


def _check(settings: Any, master: bool) -> Callable[[], Awaitable[str]]:
    return lambda: probe(
        settings.address, master=master, connect_timeout=settings.connect_timeout, timeout=settings.answer_timeout,
    )


async def add_probe(probes: Probes, name: str, settings: Any, *, master: bool) -> None:
    """``gateway_probe`` of a Dovecot plugin: try its socket (see :func:`probe`).

    :param probes: the command's :class:`~gateway.probe.Probes`
    :param name: the plugin's name
    :param settings: the entry's settings (``address``, ``connect_timeout``, ``answer_timeout``)
    :param master: an auth-userdb socket, else an auth-client one
    """
    await probes.add(name, _daemon(master), settings.address, _check(settings, master))
