"""An asynchronous SMTP client on asyncio streams (RFC 5321 and its ESMTP extensions).

:class:`SmtpConnection` speaks to one remote host: greeting, EHLO (HELO fallback),
STARTTLS (RFC 3207), AUTH PLAIN (RFC 4954), and mail transactions with PIPELINING
(RFC 2920), SIZE (RFC 1870), 8BITMIME (RFC 6152), SMTPUTF8 (RFC 6531) and DSN (RFC 3461).
Every network wait is bounded by the RFC 5321 §4.5.3.2 timeouts the policy sets.

Failures of the session itself (connect, greeting, EHLO, TLS, AUTH, a lost connection)
raise :class:`~gateway.delivery.remote.failures.HostFailure`, a temporary failure that means "try another host"; a mail
loop raises :class:`~gateway.verdicts.PermanentFailure`. A transaction never raises:
:meth:`SmtpConnection.send` returns one :class:`~gateway.delivery.types.Outcome` per
recipient, keeping the remote reply so a bounce can quote it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import ssl
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Literal, TypeVar

from gateway.content import CHUNK, Content
from gateway.delivery.remote.failures import HostFailure, StaleConnection, TlsFailure, as_temporary, tls_result_of
from gateway.delivery.remote.wire import DotStuffer, Outgoing, mail_command, outgoing, rcpt_command, xtext
from gateway.delivery.types import Outcome
from gateway.model import Envelope, QueuedRecipient
from gateway.verdicts import PermanentFailure, Reply
from gateway.watchdog import Watchdog

__all__ = ["HostFailure", "SmtpConnection", "StaleConnection", "TlsFailure", "as_temporary", "xtext"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# RFC 5321 §4.5.3.1.5 allows 512 octets per reply line; leave room for sloppy servers.
_MAX_LINE = 4096
_MAX_REPLY_LINES = 100
_MAX_TEXT = 1000
_QUIT_TIMEOUT = 5.0
_STATUS_RE = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?: +|$)")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_THROTTLE_RE = re.compile(r"too many|connection limit|rate limit|try again later", re.IGNORECASE)


class SmtpConnection:
    """One SMTP client session.

    :param helo_name: the name in our EHLO
    :param remote_name: the host's name, for outcomes and logs
    :param local_names: our own names; a remote greeting with one of them is a loop
    :param command_timeout: limit for each command reply and data block (RFC 5321 §4.5.3.2)
    :param data_timeout: limit for the reply after the final dot (§4.5.3.2.6)
    """

    def __init__(
        self,
        *,
        helo_name: str,
        remote_name: str = "",
        local_names: Collection[str] = (),
        command_timeout: float = 300.0,
        data_timeout: float = 600.0,
    ) -> None:
        self.helo_name = helo_name
        self.remote_name = remote_name
        self.local_names = {n.lower().rstrip(".") for n in (*local_names, helo_name) if n}
        self.command_timeout = command_timeout
        self.data_timeout = data_timeout
        self.extensions: dict[str, str] = {}
        self.is_esmtp = False
        self.has_tls = False
        self.tls_version = ""  # "TLSv1.3" once STARTTLS succeeded
        # What the agent's transport policy made of this session's TLS ("success", or an
        # RFC 8460 result type); kept with the connection when it is pooled.
        self.tls_verdict = ""
        self.is_throttled = False  # 421 or "too many connections": back off this host
        self.transactions = 0
        self.greeting: Reply | None = None
        self.last_reply: Reply | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._broken = False
        self._watchdog: Watchdog | None = None  # made on the event loop, at the first wait
        # A pooled connection's RSET, sent at the head of the next pipelined group
        # (:meth:`reuse`) instead of costing a round trip of its own.
        self._rset_pending = False

    # -- state ---------------------------------------------------------------------

    @property
    def is_usable(self) -> bool:
        """Open, in a clean state, and not asked to go away: fit for another transaction."""
        return (
            self._writer is not None
            and not self._writer.is_closing()
            and not self._broken
            and not self.is_throttled
        )

    def has_extension(self, keyword: str) -> bool:
        return keyword.upper() in self.extensions

    @property
    def size_limit(self) -> int:
        """The server's RFC 1870 SIZE limit; 0 means none announced."""
        value = self.extensions.get("SIZE", "").strip()
        return int(value) if value.isdigit() else 0

    # -- wire ----------------------------------------------------------------------

    def _lost(self, what: str) -> HostFailure:
        self._abort()
        return HostFailure(Reply(451, "4.4.2", f"{what} ({self.remote_name})"))

    def _abort(self) -> None:
        self._broken = True
        if self._writer is not None:
            self._writer.transport.abort()

    async def _write(self, data: bytes, timeout: float) -> None:
        if self._writer is None or self._writer.is_closing():
            raise self._lost("connection closed")
        try:
            self._writer.write(data)
            if self._writer.transport.get_write_buffer_size():  # else nothing to wait for
                await self._wait(self._writer.drain(), timeout)
        except TimeoutError:
            raise self._lost("timeout sending to remote") from None
        except (OSError, ssl.SSLError) as exc:
            raise self._lost(f"connection lost: {exc}") from None

    async def _read_lines(self, timeout: float) -> tuple[int, list[str]]:
        """One (multi-line) reply: its code and each line's text (RFC 5321 §4.2.1)."""
        if self._reader is None:
            raise self._lost("not connected")
        code = 0
        lines: list[str] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout  # for the whole reply, however many lines
        try:
            while True:
                raw = await self._wait(self._reader.readuntil(b"\n"), deadline - loop.time())
                line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
                if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in ("", " ", "-"):
                    raise self._lost(f"malformed reply {line[:64]!r}")
                if code and int(line[:3]) != code or not 200 <= int(line[:3]) <= 599:
                    raise self._lost(f"malformed reply {line[:64]!r}")
                code = int(line[:3])
                lines.append(line[4:])
                if line[3:4] != "-":
                    break
                if len(lines) >= _MAX_REPLY_LINES:
                    raise self._lost("reply too long")
        except TimeoutError:
            raise self._lost("timeout waiting for reply") from None
        except asyncio.IncompleteReadError:
            raise self._lost("connection closed by remote") from None
        except (asyncio.LimitOverrunError, ValueError):
            raise self._lost("reply line too long") from None
        except (OSError, ssl.SSLError) as exc:
            raise self._lost(f"connection lost: {exc}") from None
        return code, lines

    def _wait(self, awaitable: Awaitable[T], seconds: float) -> Awaitable[T]:
        """``awaitable`` within ``seconds`` (TimeoutError after), on the connection's one timer."""
        if self._watchdog is None:
            self._watchdog = Watchdog()
        return self._watchdog.wait(awaitable, seconds)

    async def _read_reply(self, timeout: float) -> Reply:
        code, lines = await self._read_lines(timeout)
        return self._to_reply(code, lines)

    def _to_reply(self, code: int, lines: list[str]) -> Reply:
        # RFC 2034: the enhanced status code leads each line's text.
        status = ""
        match = _STATUS_RE.match(lines[0]) if lines else None
        if match and match.group(1) == str(code)[0]:
            status = ".".join(match.groups())
            lines = [_STATUS_RE.sub("", line, count=1) for line in lines]
        reply = Reply(code, status, "\n".join(lines)[:_MAX_TEXT])
        self.last_reply = reply
        if code == 421:
            self.is_throttled = True  # RFC 5321 §3.8: the server is closing the channel
        return reply

    async def _command(self, line: str, timeout: float | None = None) -> Reply:
        if not line.startswith("AUTH"):
            log.debug("%s <- %s", self.remote_name, line[:200])
        await self._write(line.encode("utf-8") + b"\r\n", timeout or self.command_timeout)
        return await self._read_reply(timeout or self.command_timeout)

    def _check_loop(self, first_line: str) -> None:
        words = first_line.split()
        if words and words[0].lower().rstrip(".") in self.local_names:
            self._abort()
            raise PermanentFailure(
                Reply(554, "5.4.6", f"mail loops back to myself ({self.remote_name} is {words[0][:64]})")
            )

    # -- session -------------------------------------------------------------------

    async def connect(self, address: str, port: int, *, timeout: float) -> Reply:
        """Open the TCP connection and read the greeting (RFC 5321 §4.5.3.2.1).

        :raises HostFailure: no connection, or the greeting is not 2xx
        :raises PermanentFailure: the greeting names us (a mail loop)
        """
        try:
            async with asyncio.timeout(timeout):
                self._reader, self._writer = await asyncio.open_connection(address, port, limit=_MAX_LINE)
        except TimeoutError:
            raise HostFailure(Reply(451, "4.4.1", f"connection to {self.remote_name} timed out")) from None
        except OSError as exc:
            text = exc.strerror or str(exc)
            raise HostFailure(Reply(451, "4.4.1", f"cannot connect to {self.remote_name}: {text}")) from None
        code, lines = await self._read_lines(timeout)
        greeting = self._to_reply(code, lines)
        self.greeting = greeting
        if greeting.is_positive:
            self._check_loop(lines[0] if lines else "")
            return greeting
        if greeting.is_temporary and _THROTTLE_RE.search(greeting.text):
            self.is_throttled = True
        await self.quit()
        raise HostFailure(as_temporary(greeting, self.remote_name), greeting)

    async def ehlo(self) -> Reply:
        """EHLO, or HELO if EHLO is refused with 5xx (RFC 5321 §4.1.4); learns the extensions.

        :raises HostFailure: both refused, or a 4xx
        :raises PermanentFailure: the EHLO reply names us
        """
        self.extensions = {}
        code, lines = await self._read_after(f"EHLO {self.helo_name}")
        reply = self._to_reply(code, lines)
        if reply.is_positive:
            self._check_loop(lines[0] if lines else "")
            self.is_esmtp = True
            for line in lines[1:]:
                keyword, _, params = line.strip().partition(" ")
                if keyword:
                    self.extensions[keyword.upper()] = params.strip()
            return reply
        if reply.is_permanent:
            reply = await self._command(f"HELO {self.helo_name}")
            if reply.is_positive:
                self.is_esmtp = False
                return reply
        if reply.is_temporary and _THROTTLE_RE.search(reply.text):
            self.is_throttled = True
        await self.quit()
        raise HostFailure(as_temporary(reply, self.remote_name), reply)

    async def _read_after(self, line: str) -> tuple[int, list[str]]:
        log.debug("%s <- %s", self.remote_name, line)
        await self._write(line.encode("utf-8") + b"\r\n", self.command_timeout)
        return await self._read_lines(self.command_timeout)

    async def starttls(
        self,
        context: ssl.SSLContext,
        server_hostname: str | None,
        *,
        timeout: float,
        verify: Callable[[ssl.SSLObject], None] | None = None,
    ) -> None:
        """STARTTLS, the handshake, and a fresh EHLO (RFC 3207 §4.2 discards what we knew).

        :param verify: checks the session before anything is sent over it (DANE), raising
            :class:`TlsFailure` to drop the connection
        :raises TlsFailure: refused, or the handshake or certificate check failed
        """
        reply = await self._command("STARTTLS")
        if reply.code != 220:
            if reply.code == 421:
                self._abort()
            text = f"{self.remote_name} refused STARTTLS: {reply.code} {reply.text}"
            raise TlsFailure(Reply(451, "4.7.5", text[:_MAX_TEXT]), reply, result="starttls-not-supported")
        assert self._reader is not None and self._writer is not None
        # Anything already buffered was sent in clear before the handshake and must not be
        # taken as a reply protected by TLS (STARTTLS response injection, RFC 3207 §6).
        if getattr(self._reader, "_buffer", b""):
            self._abort()
            raise TlsFailure(Reply(451, "4.7.5", f"{self.remote_name} sent data before the TLS handshake"))
        try:
            async with asyncio.timeout(timeout):
                await self._writer.start_tls(
                    context, server_hostname=server_hostname, ssl_handshake_timeout=timeout
                )
        except (TimeoutError, OSError, ssl.SSLError, ssl.CertificateError) as exc:
            self._abort()
            detail = getattr(exc, "verify_message", None) or str(exc) or type(exc).__name__
            reply = Reply(451, "4.7.5", f"TLS with {self.remote_name} failed: {detail}")
            raise TlsFailure(reply, result=tls_result_of(exc)) from None
        ssl_object = self._writer.get_extra_info("ssl_object")
        if verify is not None:
            try:
                verify(ssl_object)
            except TlsFailure:
                self._abort()
                raise
        self.has_tls = True
        self.tls_version = (ssl_object.version() or "") if ssl_object is not None else ""
        await self.ehlo()

    async def auth_plain(self, user: str, password: str) -> None:
        """AUTH PLAIN (RFC 4954, RFC 4616). The credentials are never logged.

        :raises HostFailure: AUTH PLAIN not offered, or the credentials were refused
        """
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        if "PLAIN" not in mechanisms:
            raise HostFailure(Reply(451, "4.7.0", f"{self.remote_name} does not offer AUTH PLAIN"))
        token = base64.b64encode(b"\0" + user.encode("utf-8") + b"\0" + password.encode("utf-8"))
        reply = await self._command("AUTH PLAIN " + token.decode("ascii"))
        if reply.code != 235:
            text = f"AUTH at {self.remote_name} failed: {reply.code} {reply.text}"
            raise HostFailure(Reply(451, "4.7.0", text[:_MAX_TEXT]), reply)

    async def reuse(self) -> bool:
        """Make a pooled connection ready for a new transaction (RFC 5321 §4.1.1.5 RSET).

        With PIPELINING the RSET travels with the next transaction's commands, and
        :meth:`send` raises :class:`StaleConnection` if it fails; without, it is sent
        now. :returns: whether the connection can be used
        """
        if not self.is_usable:
            return False
        if self.has_extension("PIPELINING"):
            self._rset_pending = True
            return True
        try:
            reply = await self.rset()
        except asyncio.CancelledError:  # an attempt cut off (relay at once): never pooled again
            self._abort()
            raise
        return reply.code == 250 and self.is_usable

    async def rset(self) -> Reply:
        """RSET; a connection that does not answer 250 is marked unusable."""
        try:
            reply = await self._command("RSET")
        except HostFailure as exc:
            return exc.reply
        if reply.code != 250:
            self._broken = True
        return reply

    async def quit(self) -> None:
        """QUIT politely and close; never raises."""
        if self._writer is None:
            return
        if not self._writer.is_closing() and not self._broken:
            with contextlib.suppress(HostFailure):
                timeout = min(self.command_timeout, _QUIT_TIMEOUT)
                await self._write(b"QUIT\r\n", timeout)
                await self._read_lines(timeout)
        await self.close()

    async def close(self) -> None:
        """Close without QUIT; never raises."""
        writer, self._writer = self._writer, None
        self._broken = True
        if self._watchdog is not None:
            self._watchdog.close()
        if writer is None:
            return
        if writer.transport.is_closing():
            # Aborted (maybe mid-handshake, when the stream no longer owns the transport's
            # protocol and wait_closed() would never finish): nothing left to wait for.
            writer.transport.abort()
            return
        writer.close()
        try:
            async with asyncio.timeout(_QUIT_TIMEOUT):
                await writer.wait_closed()
        except (TimeoutError, OSError, ssl.SSLError):
            writer.transport.abort()

    # -- transaction ---------------------------------------------------------------

    async def send(
        self, envelope: Envelope, recipients: Sequence[QueuedRecipient], message: bytes | Content | Outgoing,
        *, before_dot: Callable[[], None] | None = None,
    ) -> dict[str, Outcome]:
        """One mail transaction; an outcome for every recipient.

        ``message`` is the whole message with CRLF line ends, not yet dot-stuffed: in
        memory, or on disk (a :class:`~gateway.content.Content`), which is then sent in
        chunks as it is read; :func:`~gateway.delivery.remote.wire.outgoing` makes it an
        :class:`Outgoing` (a file read through once) unless the caller did already.

        :param before_dot: called just before the final dot is written, with nothing
            awaited in between: until then, cancelling the transaction drops the
            connection and the server discards the message; from then on only its reply
            says whether it was delivered
        :raises StaleConnection: a pooled connection (:meth:`reuse`) turned out dead
            before the server saw any of this transaction
        :raises OSError: a message on disk that is not yet an :class:`Outgoing` could
            not be read, before anything was sent; nothing else is raised
        """
        recipients = list({r.address: r for r in recipients}.values())
        outcomes: dict[str, Outcome] = {}
        message = await outgoing(message)
        refusal = self._refusal(envelope, recipients, message)
        if refusal is not None:
            self._settle(outcomes, recipients, refusal)
            return outcomes
        self.transactions += 1
        try:
            await self._transaction(envelope, recipients, message, outcomes, before_dot)
        except HostFailure as exc:
            self._settle(outcomes, recipients, exc.reply)
        except asyncio.CancelledError:  # cut off mid-transaction: never used again
            self._abort()
            raise
        if self.is_throttled:
            await self.close()
        return outcomes

    def _settle(
        self,
        outcomes: dict[str, Outcome],
        rcpts: Sequence[QueuedRecipient],
        reply: Reply,
        *,
        final: bool = True,
    ) -> None:
        """Give ``reply`` to each of ``rcpts`` that has no outcome yet.

        2xx delivers only when ``final`` (the reply after the dot); 4xx defers; 5xx fails.
        """
        if reply.is_positive:
            status: Literal["delivered", "deferred", "failed"] = "delivered" if final else "deferred"
        else:
            status = "deferred" if reply.is_temporary else "failed"
        # RFC 3461 §6.2.2: once a DSN-capable next hop has the parameters, success
        # notices are its job, not ours.
        relayed = status == "delivered" and self.has_extension("DSN")
        for rcpt in rcpts:
            outcomes.setdefault(rcpt.address, Outcome(status, reply, self.remote_name, relayed))

    def _refusal(
        self, envelope: Envelope, recipients: Sequence[QueuedRecipient], message: Outgoing
    ) -> Reply | None:
        """Why this server cannot take this message at all, decided before sending anything."""
        words = [envelope.sender, *(r.address for r in recipients)]
        words += [n for r in recipients for n in r.notify]
        if any(_CONTROL_RE.search(word) for word in words):
            # Parsed at the edge already; never let a stray CRLF become an SMTP command.
            return Reply(501, "5.1.3", "control characters in the envelope")
        limit = self.size_limit
        if limit and message.size > limit:
            # RFC 1870 §6.1: do not send what the server already said it will refuse.
            text = f"message size {message.size} exceeds the limit of {self.remote_name} ({limit})"
            return Reply(552, "5.3.4", text)
        if message.is_8bit and not self.has_extension("8BITMIME"):
            # RFC 6152 §3: never send 8-bit data to a server without 8BITMIME.
            text = f"conversion to 7 bit required but not supported ({self.remote_name} lacks 8BITMIME)"
            return Reply(554, "5.6.3", text)
        needs_utf8 = not all(word.isascii() for word in words)
        if envelope.smtputf8 and not message.is_header_ascii:
            needs_utf8 = True
        if needs_utf8 and not self.has_extension("SMTPUTF8"):
            # RFC 6531 §3.2: without SMTPUTF8 at the server the message cannot go as it is.
            text = f"{self.remote_name} does not support SMTPUTF8, required for this message"
            return Reply(553, "5.6.7", text)
        return None

    async def _transaction(
        self,
        envelope: Envelope,
        recipients: list[QueuedRecipient],
        message: Outgoing,
        outcomes: dict[str, Outcome],
        before_dot: Callable[[], None] | None = None,
    ) -> None:
        mail = mail_command(envelope, message, self.extensions)
        rcpts = [rcpt_command(r, self.extensions) for r in recipients]
        timeout = self.command_timeout
        rcpt_replies: list[Reply] = []
        data_reply: Reply | None = None
        if self.has_extension("PIPELINING"):
            # RFC 2920 §3.1: MAIL, every RCPT and DATA in one write (DATA last), and
            # every reply read and checked in order; a pooled connection's RSET leads.
            group = [mail, *rcpts, "DATA"]
            stale_check, self._rset_pending = self._rset_pending, False
            if stale_check:
                group.insert(0, "RSET")
            try:
                await self._write("".join(f"{c}\r\n" for c in group).encode("utf-8"), timeout)
                if stale_check:
                    rset_reply = await self._read_reply(timeout)
            except HostFailure as exc:
                if stale_check:
                    raise StaleConnection(str(exc.reply)) from exc
                raise
            if stale_check and rset_reply.code != 250:
                # The server may still act on the rest of the group: never use this
                # connection again (a QUIT now would count as message text).
                self._broken = True
                raise StaleConnection(f"RSET answered {rset_reply.code} {rset_reply.text}")
            mail_reply = await self._read_reply(timeout)
            replies = [mail_reply]
            try:
                while mail_reply.code != 421 and len(replies) < len(rcpts) + 2:
                    replies.append(await self._read_reply(timeout))
                    if replies[-1].code == 421:
                        break
            except HostFailure:
                # A server may hang up at a pipelined DATA that has no recipient left to
                # take (RFC 2920 §3.1 lets clients expect that); otherwise it is a failure.
                if len(replies) != len(rcpts) + 1 or any(r.is_positive for r in replies[1:]):
                    raise
                self._broken = True
            rcpt_replies = replies[1:len(rcpts) + 1]
            if len(replies) == len(rcpts) + 2:
                data_reply = replies[-1]
        else:
            mail_reply = await self._command(mail)
            if mail_reply.is_positive:
                for line in rcpts:
                    rcpt_replies.append(await self._command(line))
                    if rcpt_replies[-1].code == 421:
                        break
        for reply in (mail_reply, *rcpt_replies, *([data_reply] if data_reply else [])):
            if reply.code == 421:  # RFC 5321 §3.8: everyone still open waits for another try
                self._settle(outcomes, recipients, reply)
                return
        if not mail_reply.is_positive:
            self._settle(outcomes, recipients, mail_reply)
        accepted = []
        for rcpt, reply in zip(recipients, rcpt_replies):
            if reply.is_positive and mail_reply.is_positive:
                accepted.append(rcpt)
            else:
                self._settle(outcomes, [rcpt], reply)
        if not accepted:
            if data_reply is not None and data_reply.code == 354:
                # A server that takes a pipelined DATA with no recipient gets an empty
                # message, ended at once; it delivers to nobody.
                await self._write(b".\r\n", timeout)
                await self._read_reply(self.data_timeout)
            if self.is_usable:
                await self.rset()
            return
        if data_reply is None:
            data_reply = await self._command("DATA")
        if data_reply.code != 354:
            self._settle(outcomes, accepted, data_reply, final=False)
            if data_reply.code != 421:
                await self.rset()
            return
        await self._send_data(message.content, timeout, before_dot)
        # RFC 5321 §4.5.3.2.6: the server may take long to answer the final dot.
        final = await self._read_reply(self.data_timeout)
        self._settle(outcomes, accepted, final)

    async def _send_data(self, content: Content, timeout: float, before_dot: Callable[[], None] | None = None) -> None:
        """The message, dot-stuffed chunk by chunk as it is read (from disk on a thread),
        each chunk written under ``timeout`` and drained, then the final dot.

        Once the first octet is out, nothing but the whole message may follow on this
        connection: if the message cannot be read, or the attempt is cancelled, the
        connection is dropped (never pooled, never ended with a dot that would deliver
        half a message)."""
        stuffer = DotStuffer()
        try:
            async for chunk in content.stream(CHUNK):
                await self._write(stuffer.feed(chunk), timeout)
            if before_dot is not None:
                before_dot()
        except OSError as exc:  # reading the queued message failed (the network's are HostFailure)
            self._abort()
            raise HostFailure(Reply(451, "4.3.0", f"cannot read the queued message: {exc.strerror or exc}")) from exc
        except BaseException:
            self._abort()
            raise
        await self._write(stuffer.end(), timeout)
