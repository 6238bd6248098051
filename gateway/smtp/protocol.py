"""The SMTP wire protocol: aiosmtpd's transport and TLS plumbing, our command loop.

aiosmtpd's :class:`~aiosmtpd.smtp.SMTP` gives us the asyncio protocol, STARTTLS
(including discarding anything pipelined before the handshake, RFC 3207 §4.2) and the
AUTH challenge exchange. The command loop and every command are ours, because the
gateway is stricter than aiosmtpd: a greeting only after the connect hooks, a total
session deadline, an error budget that ends with 421, RFC 5321 reply codes with
enhanced status codes, strict path syntax, DSN parameters and a chunked DATA reader
that defeats SMTP smuggling.

Decisions are not taken here: each command is parsed into typed objects and handed
to :class:`~gateway.smtp.handler.SmtpHandler`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from typing import Any, Awaitable, Callable

from aiosmtpd.smtp import SMTP, TLSSetupException

from gateway import capture
from gateway.address import AddressError, parse_params, parse_path
from gateway.logs import SESSION_ID, short
from gateway.model import Recipient, Transaction
from gateway.smtp.auth import auth_command
from gateway.smtp.data import read_data
from gateway.smtp.etrn import etrn, is_offered
from gateway.smtp.handler import Answer, SmtpHandler
from gateway.smtp.params import Refusal
from gateway.smtp.params import mail_params as parse_mail_params
from gateway.smtp.params import rcpt_params as parse_rcpt_params
from gateway.verdicts import Reply
from gateway.watchdog import Watchdog

__all__ = ["ConnectionTracker", "GatewaySMTP"]

log = logging.getLogger(__name__)

# RFC 3461 §5 and RFC 1870: parameters lengthen MAIL and RCPT command lines.
PARAMETER_ALLOWANCE = 500
_RECV_SIZE = 32 * 1024  # one socket read (asyncio's default is 256 KiB)

R_SYNTAX = Reply(500, "5.5.2", "Syntax error")
R_UNRECOGNISED = Reply(500, "5.5.1", "Command unrecognized")
R_TOO_LONG = Reply(500, "5.5.2", "Line too long")
R_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
R_NEED_HELO = Reply(503, "5.5.1", "Send HELO or EHLO first")
R_NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command first")
R_NESTED_MAIL = Reply(503, "5.5.1", "Nested MAIL command")
R_NEED_TLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
R_NEED_AUTH = Reply(530, "5.7.0", "Authentication required")
R_NO_VALID_RCPT = Reply(554, "5.5.1", "No valid recipients")
R_TOO_MANY_RCPT = Reply(452, "4.5.3", "Too many recipients")
R_TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
R_IDLE = Reply(421, "4.4.2", "Idle timeout, closing connection")
R_DEADLINE = Reply(421, "4.4.2", "Session time limit exceeded, closing connection")
R_TOO_MANY_CONN = Reply(421, "4.7.0", "Too many connections, try again later")
R_TOO_MANY_MSGS = Reply(421, "4.7.0", "Too many messages in one session, closing connection")
R_NO_TLS = Reply(502, "5.5.1", "STARTTLS not available")
R_OK = Reply(250, "2.0.0", "OK")
R_GO_AHEAD = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
R_BYE = Reply(221, "2.0.0", "Bye")

# RFC 3207 §4: before TLS on a listener that requires it, only these may pass.
ALLOWED_BEFORE_TLS = frozenset({"EHLO", "HELO", "NOOP", "QUIT", "STARTTLS", "RSET"})


@functools.lru_cache(maxsize=16)
def _greeting(hostname: str) -> Reply:
    return Reply(220, "", f"{hostname} ESMTP")


class ConnectionTracker:
    """Connections in total and per client IP, for one listener."""

    def __init__(self) -> None:
        self.total = 0
        self.per_ip: dict[str, int] = {}

    def admit(self, ip: str, max_total: int, max_per_ip: int | None) -> bool:
        """Count one more session, unless a limit is reached (``None``: no per-IP limit)."""
        if self.total >= max_total or (max_per_ip is not None and self.per_ip.get(ip, 0) >= max_per_ip):
            return False
        self.total += 1
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        return True

    def release(self, ip: str) -> None:
        self.total -= 1
        left = self.per_ip.get(ip, 1) - 1
        if left:
            self.per_ip[ip] = left
        else:
            self.per_ip.pop(ip, None)


class _NoHooks:
    """aiosmtpd wants a handler object; ours is called directly."""

    def __dir__(self) -> list[str]:  # no handle_*/auth_* hooks: nothing to introspect
        return []


class _Close(Exception):
    """End the session after the reply already sent."""


class GatewaySMTP(SMTP):
    """One SMTP connection."""

    # The stream buffer size; command lines are limited separately by the policy. The
    # reader stops taking data from the socket past twice this, so it also bounds what
    # a session holds while its DATA waits on the disk (the kernel keeps the rest).
    line_length_limit = 16 * 1024

    def __init__(
        self,
        handler: SmtpHandler,
        tracker: ConnectionTracker,
        tls_context: ssl.SSLContext | None,
        *,
        implicit_tls: bool = False,
        sessions: set[asyncio.Task[Any]] | None = None,
    ) -> None:
        listener = handler.listener
        starttls = tls_context if listener.tls == "starttls" else None
        self._is_building = True  # see __dir__
        super().__init__(
            _NoHooks(),
            data_size_limit=None,
            enable_SMTPUTF8=True,
            hostname=handler.gateway.hostname,
            ident="ESMTP",
            tls_context=starttls,
            require_starttls=False,
            timeout=86400,
            auth_require_tls=True,
            loop=asyncio.get_running_loop(),
        )
        self._is_building = False
        self.handler = handler
        self.listener = listener
        self.tracker = tracker
        self.implicit_tls = implicit_tls
        self.sessions = sessions
        self.gsession: Any = None
        self.scope: Any = None
        self.txn: Transaction | None = None
        self.errors = 0
        self.auth_failures = 0
        self.tap: Any = capture.NO_TAP
        self._task: asyncio.Task[Any]  # the session's, set when it starts

    # -- plumbing ----------------------------------------------------------

    def __dir__(self) -> list[str]:
        # aiosmtpd's __init__ builds tables of its own smtp_*/auth_* handlers with
        # inspect.getmembers(self), about a tenth of the event loop's time at one message
        # per connection. Our command loop and AUTH never look them up (smtp_STARTTLS is
        # called by name), so while it runs there is nothing for it to find.
        if self.__dict__.get("_is_building"):
            return []
        return list(super().__dir__())

    def _reset_timeout(self, duration: float | None = None) -> None:
        # Timeouts are enforced per read in the command loop (with a 421 reply);
        # aiosmtpd's silent timer is kept only as a far backstop.
        if self._timeout_handle is None:
            self._timeout_handle = self.loop.call_later(86400, self._timeout_cb)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        is_starttls = self._original_transport is not None and self.transport is not None
        if isinstance(getattr(transport, "max_size", None), int):
            # The socket transport's read size (256 KiB by default): one read may land
            # in the reader's buffer past its limit, so it is part of a session's memory.
            transport.max_size = _RECV_SIZE  # type: ignore[attr-defined]
        super().connection_made(transport)
        if is_starttls and self.gsession is not None:
            self.gsession.reset_for_tls()
            self.txn = None
            self._note_tls(transport)

    def _note_tls(self, transport: asyncio.BaseTransport) -> None:
        obj = transport.get_extra_info("ssl_object")
        if obj is not None and self.gsession is not None:
            self.gsession.tls_version = obj.version()
            cipher = obj.cipher()
            self.gsession.tls_cipher = cipher[0] if cipher else None
            log.info("tls version=%s cipher=%s", self.gsession.tls_version, self.gsession.tls_cipher)

    async def reply(self, reply: Reply, *, bad: bool = False) -> None:
        """Send a reply; a protocol error spends one unit of the error budget."""
        self.tap.reply(reply)
        self._writer.write(reply.wire())
        # StreamWriter.drain() (two coroutines) only when it has something to do: the
        # client is not reading (writing paused), or the connection is gone or going,
        # where it raises. We are the stream's protocol: these flags are ours.
        if (
            self._paused or self._connection_lost  # type: ignore[attr-defined]
            or self.transport is None or self.transport.is_closing()
        ):
            await self._writer.drain()
        if bad:
            self.errors += 1
            if self.errors >= self.scope.limits.max_bad_commands:
                log.info("too many errors (%d), closing", self.errors)
                await self.reply(R_TOO_MANY_ERRORS)
                raise _Close()

    async def answer(self, answer: Answer) -> None:
        await self.reply(answer.reply)
        if answer.close:
            raise _Close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- session -----------------------------------------------------------

    async def _handle_client(self) -> None:
        assert self.transport is not None
        task = asyncio.current_task()
        if self.sessions is not None and task is not None:
            self.sessions.add(task)
        peer = self.transport.get_extra_info("peername") or ("0.0.0.0", 0)
        local = self.transport.get_extra_info("sockname")
        session, scope = self.handler.open_session(peer, local)
        self.gsession, self.scope = session, scope
        session.has_early_data = lambda: bool(self._reader._buffer)  # type: ignore[attr-defined]
        counters = self.handler.gateway.counters
        if counters is not None:
            counters.bump(counters.sessions, session.listener)
        SESSION_ID.set(session.id)
        limits = scope.limits
        if self.implicit_tls:
            self._note_tls(self.transport)
        per_ip = limits.limit_per_ip(session.peer_ip, session.is_relay_client)
        if not self.tracker.admit(session.peer_ip, limits.max_connections, per_ip):
            log.info("connection refused client=%s: too many connections", session.peer_ip)
            try:
                await self.reply(R_TOO_MANY_CONN)
            finally:
                self._close()
                if self.sessions is not None and task is not None:
                    self.sessions.discard(task)
            return
        self.tap = capture.start(self.handler, session)
        self._watchdog = Watchdog()
        assert task is not None
        self._task = task
        try:
            async with asyncio.timeout(limits.session_timeout):
                refusal = await self.handler.connect(session, scope)
                if refusal is not None:
                    await self.reply(refusal.reply)
                    return
                await self.reply(_greeting(self.hostname))
                await self._command_loop()
        except _Close:
            pass
        except TimeoutError:
            log.info("session deadline reached client=%s", session.peer_ip)
            await self._try_reply(R_DEADLINE)
        except TLSSetupException:
            log.info("TLS handshake failed client=%s", session.peer_ip)
        except (ConnectionError, asyncio.IncompleteReadError):
            log.info("connection lost client=%s", session.peer_ip)
        except asyncio.CancelledError:
            pass
        finally:
            self._watchdog.close()
            self._close()
            self.tracker.release(session.peer_ip)
            try:
                await asyncio.shield(self.handler.disconnect(session, scope))
            except asyncio.CancelledError:
                pass
            self.tap.finish(session)
            if self.sessions is not None and task is not None:
                self.sessions.discard(task)

    async def _try_reply(self, reply: Reply) -> None:
        try:
            await asyncio.wait_for(self.reply(reply), 5)
        except Exception:  # the client may be gone already
            pass

    async def _read_line(self, timeout: float) -> bytes | None:
        """One command line; ``None`` when it was too long (already drained)."""
        # The watchdog's start/stop rather than its wait(): a coroutine less a command.
        dog, task = self._watchdog, self._task
        dog.start(task, timeout)
        try:
            return await self._reader.readuntil(b"\n")
        except asyncio.CancelledError:
            if dog.is_timeout(task):
                raise TimeoutError from None
            raise
        except asyncio.LimitOverrunError as exc:
            dog.stop()
            await self._reader.read(exc.consumed)
            wait = dog.wait
            while True:
                try:
                    await wait(self._reader.readuntil(b"\n"), timeout)
                    return None
                except asyncio.LimitOverrunError as more:
                    await self._reader.read(more.consumed)
        finally:
            dog.stop()

    async def _command_loop(self) -> None:
        limits = self.scope.limits
        while self.transport is not None:
            try:
                line = await self._read_line(limits.idle_timeout)
            except TimeoutError:
                log.info("idle timeout client=%s", self.gsession.peer_ip)
                await self._try_reply(R_IDLE)
                return
            if line is None:
                await self.reply(R_TOO_LONG, bad=True)
                continue
            verb_bytes, _, arg_bytes = line.rstrip(b"\r\n").partition(b" ")
            verb = verb_bytes.upper().decode("ascii", "replace")
            limit = limits.max_command_line
            if verb in ("MAIL", "RCPT"):
                limit += PARAMETER_ALLOWANCE
            if len(line) > limit:
                await self.reply(R_TOO_LONG, bad=True)
                continue
            if b"\x00" in line:
                await self.reply(Reply(501, "5.5.2", "NUL character in command"), bad=True)
                continue
            try:
                arg = arg_bytes.decode("utf-8").strip(" ")
            except UnicodeDecodeError:
                await self.reply(Reply(500, "5.5.2", "Invalid UTF-8 in command"), bad=True)
                continue
            self.tap.command(verb, arg)
            command = _COMMANDS.get(verb)
            if command is None:
                log.info("unrecognised command %s", short(verb, 20))
                await self.reply(R_UNRECOGNISED, bad=True)
                continue
            if self.listener.require_tls and not self.gsession.has_tls and verb not in ALLOWED_BEFORE_TLS:
                await self.reply(R_NEED_TLS, bad=True)
                continue
            await command(self, arg)

    # -- commands ----------------------------------------------------------

    def _valid_helo(self, name: str) -> bool:
        return bool(name) and " " not in name and len(name) <= 255 and name.isprintable()

    async def cmd_helo(self, arg: str) -> None:
        await self._greet(arg, esmtp=False)

    async def cmd_ehlo(self, arg: str) -> None:
        await self._greet(arg, esmtp=True)

    async def _greet(self, arg: str, *, esmtp: bool) -> None:
        if not self._valid_helo(arg):
            await self.reply(Reply(501, "5.5.4", f"Syntax: {'EHLO' if esmtp else 'HELO'} hostname"), bad=True)
            return
        self.txn = None
        self.gsession.is_esmtp = esmtp
        answer = await self.handler.helo(self.gsession, self.scope, arg)
        if answer.reply.code != 250 or not esmtp:
            await self.answer(answer)
            return
        await self.reply(Reply(250, "", "\n".join([self.hostname, *self._extensions()])))

    def _extensions(self) -> list[str]:
        # RFC 1870: the largest any recipient may get; RCPT and DATA apply each one's own.
        ext = ["PIPELINING", f"SIZE {self.scope.largest_message_size}", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "DSN"]
        if self.tls_context is not None and not self.gsession.has_tls:
            ext.append("STARTTLS")
        if self.listener.auth and self.gsession.has_tls:
            ext.append("AUTH PLAIN LOGIN")
        session = self.gsession
        if session.is_relay_client or session.is_authenticated or "AUTH PLAIN LOGIN" in ext:
            ext.append("XVERP")  # MAIL ... XVERP: our own users only (relay clients, after AUTH)
        if is_offered(self.handler.gateway.policy):
            ext.append("ETRN")
        return ext

    async def cmd_mail(self, arg: str) -> None:
        session = self.gsession
        if session.helo is None:
            await self.reply(R_NEED_HELO, bad=True)
            return
        if self.listener.require_auth and not session.is_authenticated:
            await self.reply(R_NEED_AUTH)
            return
        if self.txn is not None:
            await self.reply(R_NESTED_MAIL, bad=True)
            return
        if session.transactions >= self.scope.limits.max_transactions:
            await self.reply(R_TOO_MANY_MSGS)
            raise _Close()
        if arg[:5].upper() != "FROM:":
            await self.reply(Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>"), bad=True)
            return
        try:
            sender, rest = parse_path(arg[5:], allow_null=True, allow_postmaster=False, utf8=True)
            params = parse_params(rest)
        except AddressError as exc:
            await self.reply(Reply(501, "5.1.7", f"Bad sender address syntax: {exc}"), bad=True)
            return
        try:
            mail_params = parse_mail_params(
                params, esmtp=session.is_esmtp, max_size=self.scope.largest_message_size,
                allow_verp=session.is_relay_client or session.is_authenticated,
            )
        except Refusal as refusal:
            await self.reply(refusal.reply, bad=refusal.bad)
            return
        if not sender.is_ascii and not mail_params.smtputf8:
            await self.reply(Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8"))
            return
        txn = Transaction(sender=sender, params=mail_params)
        answer = await self.handler.mail(session, self.scope, txn)
        if answer.reply.is_positive:
            self.txn = txn
        await self.answer(answer)

    async def cmd_rcpt(self, arg: str) -> None:
        txn = self.txn
        if txn is None:
            await self.reply(R_NEED_MAIL, bad=True)
            return
        if arg[:3].upper() != "TO:":
            await self.reply(Reply(501, "5.5.4", "Syntax: RCPT TO:<address>"), bad=True)
            return
        if len(txn.recipients) >= self.scope.limits.max_recipients:
            await self.reply(R_TOO_MANY_RCPT)
            return
        try:
            address, rest = parse_path(arg[3:], allow_null=False, allow_postmaster=True, utf8=True)
            params = parse_params(rest)
        except AddressError as exc:
            await self.reply(Reply(501, "5.1.3", f"Bad recipient address syntax: {exc}"), bad=True)
            return
        if not address.is_ascii and not txn.params.smtputf8:
            await self.reply(Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8"))
            return
        try:
            rcpt_params = parse_rcpt_params(params)
        except Refusal as refusal:
            await self.reply(refusal.reply, bad=refusal.bad)
            return
        answer = await self.handler.rcpt(self.gsession, self.scope, txn, Recipient(address, rcpt_params))
        await self.answer(answer)

    async def cmd_data(self, arg: str) -> None:
        txn = self.txn
        if txn is None:
            await self.reply(R_NEED_MAIL, bad=True)
            return
        if arg:
            await self.reply(Reply(501, "5.5.4", "Syntax: DATA"), bad=True)
            return
        if not txn.recipients:
            await self.reply(R_NO_VALID_RCPT)
            return
        limits = self.scope.limits
        await self.reply(R_GO_AHEAD)
        self.txn = None
        try:
            result = await read_data(
                self._reader,
                max_size=self.handler.message_size_limit(self.scope, txn),
                max_line_length=limits.max_line_length,
                timeout=limits.data_timeout,
                watchdog=self._watchdog,
                spool_threshold=limits.spool_threshold,
                new_spool=self.handler.new_spool,
            )
        except TimeoutError:
            log.info("timeout during DATA client=%s", self.gsession.peer_ip)
            await self._try_reply(R_IDLE)
            raise _Close() from None
        message = result.raw if result.spool is None else result.spool
        if result.error is not None or message is None:
            log.info("data refused: %s", result.error)
            await self.reply(result.error or R_SYNTAX)
            return
        self.gsession.transactions += 1
        answer = await self.handler.data(self.gsession, self.scope, txn, message)
        if answer.reply.is_positive:
            self.errors = 0
        await self.answer(answer)

    async def cmd_rset(self, arg: str) -> None:
        if arg:
            await self.reply(Reply(501, "5.5.4", "Syntax: RSET"), bad=True)
            return
        self.txn = None
        await self.reply(R_OK)

    async def cmd_noop(self, arg: str) -> None:
        await self.reply(R_OK)

    async def cmd_quit(self, arg: str) -> None:
        await self.reply(R_BYE)
        raise _Close()

    async def cmd_vrfy(self, arg: str) -> None:
        if not arg:
            await self.reply(Reply(501, "5.5.4", "Syntax: VRFY address"), bad=True)
            return
        # RFC 5321 §7.3: do not disclose; promise nothing.
        await self.reply(Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery"))

    async def cmd_expn(self, arg: str) -> None:
        await self.reply(Reply(502, "5.5.1", "EXPN not available"))

    async def cmd_help(self, arg: str) -> None:
        await self.reply(Reply(214, "2.0.0", "See RFC 5321"))

    async def cmd_etrn(self, arg: str) -> None:
        # RFC 1985: a flush of held mail; gateway/smtp/etrn.py decides.
        if not is_offered(self.handler.gateway.policy):
            await self.reply(R_UNRECOGNISED, bad=True)
            return
        if self.gsession.helo is None:
            await self.reply(R_NEED_HELO, bad=True)
            return
        if self.txn is not None:
            await self.reply(Reply(503, "5.5.1", "ETRN not permitted during a mail transaction"), bad=True)
            return
        reply = await etrn(self.handler.gateway, self.gsession, arg)
        await self.reply(reply, bad=reply.code in (500, 501))

    async def cmd_starttls(self, arg: str) -> None:
        if self.tls_context is None:
            await self.reply(R_NO_TLS, bad=True)
            return
        if self.gsession.has_tls:
            await self.reply(Reply(503, "5.5.1", "TLS already active"), bad=True)
            return
        if arg:
            await self.reply(Reply(501, "5.5.4", "Syntax: STARTTLS"), bad=True)
            return
        # aiosmtpd switches the transport; connection_made then drops any plaintext
        # the client pipelined after STARTTLS and resets the session (RFC 3207 §4.2).
        # A client that never completes the handshake must not hold the session.
        try:
            async with asyncio.timeout(self.scope.limits.idle_timeout):
                await self.smtp_STARTTLS("")
        except TimeoutError:
            log.info("TLS handshake timed out client=%s", self.gsession.peer_ip)
            raise _Close() from None

    async def cmd_auth(self, arg: str) -> None:
        # RFC 4954; gateway/smtp/auth.py checks the command and collects the credentials.
        if await auth_command(self, arg):
            raise _Close()


# The command table, built once (not per connection): the verb and the method answering it.
_COMMANDS: dict[str, Callable[[GatewaySMTP, str], Awaitable[None]]] = {
    "HELO": GatewaySMTP.cmd_helo,
    "EHLO": GatewaySMTP.cmd_ehlo,
    "MAIL": GatewaySMTP.cmd_mail,
    "RCPT": GatewaySMTP.cmd_rcpt,
    "DATA": GatewaySMTP.cmd_data,
    "RSET": GatewaySMTP.cmd_rset,
    "NOOP": GatewaySMTP.cmd_noop,
    "QUIT": GatewaySMTP.cmd_quit,
    "VRFY": GatewaySMTP.cmd_vrfy,
    "EXPN": GatewaySMTP.cmd_expn,
    "HELP": GatewaySMTP.cmd_help,
    "STARTTLS": GatewaySMTP.cmd_starttls,
    "AUTH": GatewaySMTP.cmd_auth,
    "ETRN": GatewaySMTP.cmd_etrn,
}
