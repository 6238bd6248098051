"""A real SMTP receiving server for delivery tests, scriptable per stage and per recipient.

:class:`SmtpPeer` runs aiosmtpd in its own thread on a loopback address and records every
message it accepts (:class:`Received`), every connection, and the most sessions open at
once. Replies can be scripted::

    peer = SmtpPeer(dsn=True, tls=True).start()
    peer.script("greeting", "421 4.3.2 busy")          # next connection only
    peer.script_rcpt("bob@x.example", "451 4.2.0 later")  # next RCPT for bob only
    peer.always_rcpt("eve@x.example", "550 5.1.1 no such user")
    ...
    peer.stop()

Stages: ``greeting``, ``ehlo``, ``starttls``, ``mail``, ``rcpt``, ``data`` (reply to the DATA command),
``eom`` (reply after the final dot), ``rset``. A scripted 421 closes the connection, as
RFC 5321 §3.8 says. Options: STARTTLS with a given or self-signed certificate, DSN
(RFC 3461 parameters accepted and recorded), 8BITMIME and PIPELINING advertised or not,
SMTPUTF8, a SIZE limit, AUTH PLAIN with a user table, and a delay before the final reply
(so concurrent sessions overlap) or before each RCPT reply.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import tempfile
import threading
import warnings
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from tests.processes import free_port

__all__ = ["Received", "SmtpPeer", "free_port"]

_DSN_MAIL = {"RET", "ENVID"}
_DSN_RCPT = {"NOTIFY", "ORCPT"}
_PATH_RE = re.compile(r"^((?:FROM|TO):\s*<[^>]*>)\s*(.*)$", re.IGNORECASE | re.DOTALL)


@dataclass
class Received:
    """One accepted message as the peer saw it (parameters as sent, case kept)."""

    mail_from: str
    rcpt_tos: list[str]
    mail_options: list[str]
    rcpt_options: list[list[str]]
    content: bytes
    has_tls: bool
    helo: str
    connection: int


@dataclass
class _Script:
    stages: dict[str, deque[str]] = field(default_factory=lambda: defaultdict(deque))
    rcpt_once: dict[str, deque[str]] = field(default_factory=lambda: defaultdict(deque))
    rcpt_always: dict[str, str] = field(default_factory=dict)


def _split_params(arg: str, strip: set[str]) -> tuple[str, list[str]]:
    """``FROM:<a> P1 P2`` -> (the argument without the ``strip`` keywords, all raw params)."""
    match = _PATH_RE.match(arg)
    if not match:
        return arg, []
    path, rest = match.groups()
    raw = rest.split()
    kept = [p for p in raw if p.split("=", 1)[0].upper() not in strip]
    return " ".join([path, *kept]), raw


class _PeerSMTP(SMTP):
    """aiosmtpd's SMTP with the peer's scripting, DSN parameters and bookkeeping."""

    def __init__(self, handler: Any, peer: SmtpPeer, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.peer = peer
        self.number = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self.number:  # called again after STARTTLS with the TLS transport
            self.number = self.peer._opened()
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self.number > 0:
            self.peer._closed()
            self.number = -self.number
        super().connection_lost(error)

    async def push(self, status: Any) -> None:
        await super().push(status)
        text = status.decode() if isinstance(status, bytes) else str(status)
        if text.startswith("421") and self.transport is not None:
            self.transport.close()  # RFC 5321 §3.8: 421 closes the channel

    async def _handle_client(self) -> None:
        reply = self.peer._pop("greeting")
        if reply is not None:
            await self.push(reply)
            if self.transport is not None:
                self.transport.close()
            return
        await super()._handle_client()

    async def smtp_MAIL(self, arg: str | None) -> None:
        raw: list[str] = []
        if arg:
            arg, raw = _split_params(arg, _DSN_MAIL if self.peer.dsn else set())
        await super().smtp_MAIL(arg)
        if self.envelope is not None and self.envelope.mail_from is not None:
            self.envelope.raw_mail_options = raw  # type: ignore[attr-defined]

    async def smtp_RCPT(self, arg: str | None) -> None:
        raw: list[str] = []
        if arg:
            arg, raw = _split_params(arg, _DSN_RCPT if self.peer.dsn else set())
        assert self.envelope is not None
        before = len(self.envelope.rcpt_tos)
        await super().smtp_RCPT(arg)
        if len(self.envelope.rcpt_tos) > before:
            options = getattr(self.envelope, "raw_rcpt_options", [])
            options.append(raw)
            self.envelope.raw_rcpt_options = options  # type: ignore[attr-defined]

    async def smtp_DATA(self, arg: str) -> None:
        reply = self.peer._pop("data")
        if reply is not None and self.envelope is not None and self.envelope.rcpt_tos:
            await self.push(reply)
            return
        await super().smtp_DATA(arg)

    async def smtp_STARTTLS(self, arg: str) -> None:
        reply = self.peer._pop("starttls")
        if reply is not None:
            await self.push(reply)
            return
        await super().smtp_STARTTLS(arg)

    async def smtp_RSET(self, arg: str) -> None:
        reply = self.peer._pop("rset")
        if reply is not None:
            await self.push(reply)
            return
        await super().smtp_RSET(arg)


class _Handler:
    def __init__(self, peer: SmtpPeer) -> None:
        self.peer = peer

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        reply = self.peer._pop("ehlo")
        if reply is not None:
            return [reply]
        session.host_name = hostname
        lines = [r for r in responses if r != "250-8BITMIME"]
        if self.peer.eightbitmime:
            lines.insert(1, "250-8BITMIME")
        if self.peer.pipelining:
            lines.insert(1, "250-PIPELINING")
        if self.peer.dsn:
            lines.insert(1, "250-DSN")
        return lines

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self.peer._pop("mail")
        if reply is not None:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.peer.rcpt_delay:
            await asyncio.sleep(self.peer.rcpt_delay)
        reply = self.peer._pop_rcpt(address)
        if reply is not None and not reply.startswith("2"):
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return reply or "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.peer.delay:
            await asyncio.sleep(self.peer.delay)
        reply = self.peer._pop("eom")
        if reply is not None and not reply.startswith("2"):
            return reply
        content = envelope.original_content or b""
        self.peer._record(
            Received(
                mail_from=str(envelope.mail_from),
                rcpt_tos=list(envelope.rcpt_tos),
                mail_options=list(getattr(envelope, "raw_mail_options", [])),
                rcpt_options=list(getattr(envelope, "raw_rcpt_options", [])),
                content=content,
                has_tls=session.ssl is not None,
                helo=str(session.host_name),
                connection=getattr(server, "number", 0),
            )
        )
        return reply or "250 2.0.0 OK queued"


class _Controller(Controller):
    def __init__(self, peer: SmtpPeer, **kwargs: Any) -> None:
        self.peer = peer
        super().__init__(_Handler(peer), **kwargs)

    def factory(self) -> SMTP:
        return _PeerSMTP(self.handler, self.peer, **self.SMTP_kwargs)


class SmtpPeer:
    """A scriptable receiving SMTP server on ``host``:``port`` (see the module docstring).

    :param tls: offer STARTTLS (with ``certificate`` = (cert, key) paths, or self-signed)
    :param auth: user -> password for AUTH PLAIN/LOGIN (offered after STARTTLS only)
    :param size_limit: the SIZE limit announced (0: no SIZE extension)
    :param delay: seconds to wait before answering the final dot
    :param rcpt_delay: seconds to wait before answering each RCPT (a host stalling
        mid-transaction)
    """

    __test__ = False

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        hostname: str = "peer.test.example",
        tls: bool = False,
        certificate: tuple[Path, Path] | None = None,
        tls_max_version: ssl.TLSVersion | None = None,
        dsn: bool = False,
        eightbitmime: bool = True,
        pipelining: bool = True,
        smtputf8: bool = False,
        size_limit: int = 10_000_000,
        auth: dict[str, str] | None = None,
        delay: float = 0.0,
        rcpt_delay: float = 0.0,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.hostname = hostname
        self.dsn, self.eightbitmime, self.pipelining = dsn, eightbitmime, pipelining
        self.delay, self.rcpt_delay = delay, rcpt_delay
        self.messages: list[Received] = []
        self.connections = 0
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()
        self._script = _Script()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        kwargs: dict[str, Any] = dict(
            hostname=host, port=self.port, server_hostname=hostname, data_size_limit=size_limit,
            enable_SMTPUTF8=smtputf8, decode_data=False, ready_timeout=5.0,
        )
        if tls:
            if certificate is None:
                from gateway.smtp.tls import ensure_self_signed

                self._tmp = tempfile.TemporaryDirectory()
                certificate = ensure_self_signed(Path(self._tmp.name), hostname)
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(certificate[0]), str(certificate[1]))
            if tls_max_version is not None:  # e.g. TLSv1_1: a handshake no modern client completes
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
                    context.maximum_version = tls_max_version
            kwargs.update(tls_context=context, require_starttls=False)
        if auth is not None:
            users = dict(auth)

            def authenticator(
                server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
            ) -> AuthResult:
                ok = isinstance(data, LoginPassword) and users.get(data.login.decode()) == data.password.decode()
                return AuthResult(success=ok, handled=False)

            kwargs.update(authenticator=authenticator, auth_require_tls=True)
        self._controller = _Controller(self, **kwargs)

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> SmtpPeer:
        self._controller.start()
        self.reset_counts()  # forget the controller's own readiness probe
        return self

    def stop(self) -> None:
        self._controller.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> SmtpPeer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset_counts(self) -> None:
        with self._lock:
            self.connections = 0
            self.max_active = self.active

    # -- scripting ---------------------------------------------------------------------

    def script(self, stage: str, *replies: str) -> None:
        """Answer the next uses of ``stage`` with ``replies``, one each, then as usual."""
        with self._lock:
            self._script.stages[stage].extend(replies)

    def script_rcpt(self, address: str, *replies: str) -> None:
        """Answer the next RCPTs for ``address`` with ``replies``, one each."""
        with self._lock:
            self._script.rcpt_once[address.lower()].extend(replies)

    def always_rcpt(self, address: str, reply: str) -> None:
        """Answer every RCPT for ``address`` with ``reply``."""
        with self._lock:
            self._script.rcpt_always[address.lower()] = reply

    def _pop(self, stage: str) -> str | None:
        with self._lock:
            queue = self._script.stages.get(stage)
            return queue.popleft() if queue else None

    def _pop_rcpt(self, address: str) -> str | None:
        with self._lock:
            queue = self._script.rcpt_once.get(address.lower())
            if queue:
                return queue.popleft()
            fixed = self._script.rcpt_always.get(address.lower())
        return fixed if fixed is not None else self._pop("rcpt")

    # -- bookkeeping (called from the server thread) -------------------------------------

    def _opened(self) -> int:
        with self._lock:
            self.connections += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            return self.connections

    def _closed(self) -> None:
        with self._lock:
            self.active -= 1

    def _record(self, message: Received) -> None:
        with self._lock:
            self.messages.append(message)
