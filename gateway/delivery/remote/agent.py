"""The remote delivery agent: one message to the recipients of one route, over SMTP.

:class:`RemoteDeliveryAgent` is qmail-remote grown up. For an MX route it looks up the
domain's hosts (:mod:`gateway.delivery.remote.mx`); for a smarthost it resolves the relay
itself. It tries the addresses in order until one takes the transaction, applying the TLS
mode (none / opportunistic / required / verify) and AUTH for smarthosts, reuses idle
connections, bounds the connections per destination, and backs off a host that said 421.
For MX routes it first asks :class:`~gateway.delivery.remote.policy.TransportSecurity`
what the destination's TLS must look like (an MTA-STS policy for the domain, DANE per MX
host from its TLSA records), enforces that answer and hands back how it went.

It returns one :class:`~gateway.delivery.types.Outcome` per recipient and never raises
for a delivery problem: the scheduler turns deferred into a retry and failed into a bounce.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import dns.asyncresolver

from gateway.content import Content
from gateway.delivery.remote.client import SmtpConnection
from gateway.delivery.remote.dane import check_chain, presented_chain
from gateway.delivery.remote.failures import HostFailure, StaleConnection, TlsFailure
from gateway.delivery.remote.mx import Destination, parse_address_literal, resolve_destinations, resolve_host
from gateway.delivery.remote.policy import TlsOutcome, TransportPolicy, TransportSecurity
from gateway.delivery.remote.tlsa import DaneConfig
from gateway.delivery.remote.tlsrpt_send import TlsReporting
from gateway.delivery.remote.wire import Outgoing, outgoing
from gateway.delivery.types import MxRoute, Outcome, SmarthostRoute
from gateway.logs import short
from gateway.model import Envelope, QueuedRecipient
from gateway.policy.model import Policy
from gateway.verdicts import GatewayError, PermanentFailure, Reply, TemporaryFailure
from gateway.tasks import cancel_and_wait

__all__ = ["RemoteDeliveryAgent"]

log = logging.getLogger("gateway.delivery.remote")

# Address, port, TLS mode, host name (a verified certificate names it), AUTH user.
_PoolKey = tuple[str, int, str, str, str]


@dataclass(slots=True)
class _Idle:
    conn: SmtpConnection
    since: float


@dataclass(slots=True)
class _Limit:
    semaphore: asyncio.Semaphore
    users: int = 0


@dataclass(frozen=True, slots=True)
class _Auth:
    user: str
    password: str = field(repr=False)


class RemoteDeliveryAgent:
    """Deliver messages to remote SMTP servers.

    :param policy: the policy; ``policy.delivery`` gives port, HELO name, TLS mode,
        timeouts and the per-destination connection limit
    :param resolver: the gateway's DNS resolver (:func:`gateway.dns.make_resolver`)
    :param hostname: our own name: the default HELO name, and the name that marks a loop
    :param backoff: seconds to leave a host alone after it answered 421 or "too many"
    :param idle_timeout: seconds an idle connection is kept for reuse
    :param max_idle: idle connections kept per (address, port, TLS mode, AUTH user);
        by default as many as ``delivery.destination_concurrency`` (so every delivery
        that may run at once to a destination can find a connection to reuse)
    :param max_transactions: transactions on one connection before it is closed
    :param share: how many gateway processes deliver (``[server] workers``); each
        takes that part of ``destination_concurrency``, so the total stays the limit
    :param primary: this is the master, which takes the remainder of that split
    :param counters: the process's :class:`~gateway.metrics.Counters` (TLS policy failures)
    :param cache_dir: where MTA-STS policies are kept; default ``<var_dir>/mta-sts``

    DANE (``[delivery] dane``, ``[dns] dnssec``) asks ``resolver`` with the AD bit set
    when the policy trusts its DNSSEC validation.
    """

    def __init__(
        self,
        policy: Policy,
        resolver: dns.asyncresolver.Resolver,
        *,
        hostname: str,
        backoff: float = 60.0,
        idle_timeout: float = 5.0,
        max_idle: int | None = None,
        max_transactions: int = 100,
        share: int = 1,
        primary: bool = True,
        counters: Any = None,
        cache_dir: Path | None = None,
    ) -> None:
        self.policy = policy
        #: TLS reports (RFC 8460): outcomes counted here, sent by the primary's timer
        self.reporting = (
            TlsReporting(policy, resolver, hostname=hostname, primary=primary) if policy.tls_reporting.enabled else None
        )
        #: answers "what must this destination's TLS look like?" (MTA-STS, DANE)
        self.security = TransportSecurity(
            policy.delivery, resolver, cache_dir or Path(policy.server.var_dir) / "mta-sts", counters=counters,
            dane=DaneConfig.from_policy(policy, resolver), reporting=self.reporting,
        )
        #: how many gateway processes split ``destination_concurrency`` (workers)
        self.share = max(1, share)
        #: the master, which also takes what the split leaves over
        self.primary = primary
        self.resolver = resolver
        self.hostname = hostname
        self.backoff = backoff
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self.max_transactions = max_transactions
        self._pool: dict[_PoolKey, list[_Idle]] = {}
        self._limits: dict[str, _Limit] = {}
        self._backed_off: dict[tuple[str, int], tuple[float, Reply]] = {}
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._is_closed = False

    @property
    def _destination_limit(self) -> int:
        """This process's part of ``destination_concurrency``."""
        return portion(self.policy.delivery.destination_concurrency, self.share, self.primary)

    @property
    def helo_name(self) -> str:
        return self.policy.delivery.helo or self.hostname

    # -- the one public operation -----------------------------------------------------

    async def deliver(
        self,
        envelope: Envelope,
        recipients: list[QueuedRecipient],
        route: MxRoute | SmarthostRoute,
        message: bytes | Content,
        *,
        before_dot: Callable[[], None] | None = None,
    ) -> dict[str, Outcome]:
        """Try to deliver ``message`` to ``recipients`` (all on ``route``) in one transaction.

        :param envelope: sender and transaction parameters (BODY, SMTPUTF8, RET, ENVID)
        :param recipients: the recipients still to deliver for this route
        :param route: where they go: the MX hosts of a domain, or a smarthost
        :param message: the whole message, CRLF line ends, not dot-stuffed; a message on
            disk is streamed to each host from the file, never read whole into memory
        :param before_dot: called just before a host is sent the final dot
            (:meth:`SmtpConnection.send`): cancelled before that, nobody has the message
        :returns: an outcome for every recipient address
        """
        if not recipients:
            return {}
        self.start_background()
        settings = self.policy.delivery
        auth: _Auth | None = None
        try:
            if isinstance(route, SmarthostRoute):
                # MTA-STS is about a domain's MX hosts; a smarthost is our own choice.
                mode, name = route.tls, route.host
                transport = TransportPolicy(route.host)
                auth = self._credentials(route)
                destinations = await resolve_host(route.host, self.resolver, port=route.port)
            else:
                mode, name = settings.tls, route.domain
                destinations = await resolve_destinations(
                    route.domain, self.security.mx_resolver(route.domain), port=settings.smtp_port,
                    local_names={self.hostname},
                )
                transport = await self.security.policy_for(route.domain)
        except GatewayError as exc:
            status: Literal["failed", "deferred"] = (
                "failed" if isinstance(exc, PermanentFailure) else "deferred"
            )
            log.info(
                "remote to %s: %d recipient(s) %s: %s", name, len(recipients), status, short(exc.reply, 300)
            )
            return {r.address: Outcome(status, exc.reply) for r in recipients}
        # What MAIL needs to know (8-bit? ASCII headers?) is learned once, not per host.
        prepared = await outgoing(message)
        limit = self._limit(route.key)
        try:
            await limit.semaphore.acquire()
            try:
                return await self._try_hosts(
                    destinations, mode, transport, auth, envelope, recipients, prepared,
                    is_mx=isinstance(route, MxRoute), before_dot=before_dot,
                )
            finally:
                limit.semaphore.release()
        finally:
            limit.users -= 1
            if limit.users == 0:
                del self._limits[route.key]

    def start_background(self) -> None:
        """The primary's MTA-STS refresh and the TLS reports' tasks, once (a loop runs now)."""
        if self._refresher is None and self.primary and self.policy.delivery.mta_sts and not self._is_closed:
            interval = float(self.policy.delivery.mta_sts_refresh)
            self._refresher = asyncio.get_running_loop().create_task(
                self.security.refresh_forever(interval), name="mta-sts-refresh"
            )
        if self.reporting is not None:
            self.reporting.start()

    async def close(self) -> None:
        """Close every pooled connection (QUIT), stop the idle reaper and the background
        tasks, and store the TLS outcomes still counted in memory."""
        self._is_closed = True
        if self._refresher is not None:
            await cancel_and_wait(self._refresher, "MTA-STS refresh")
            self._refresher = None
        if self.reporting is not None:
            await self.reporting.close()
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        pool, self._pool = self._pool, {}
        await asyncio.gather(*(idle.conn.quit() for idles in pool.values() for idle in idles))

    # -- hosts in order ---------------------------------------------------------------

    def _credentials(self, route: SmarthostRoute) -> _Auth | None:
        if not route.auth_user:
            return None
        if route.tls == "none":
            # Never send a password in clear text: the route must allow TLS.
            reply = Reply(451, "4.7.0", f"refusing AUTH to {route.host} without TLS (route tls = none)")
            log.warning("route %s: AUTH configured with tls = none; not delivering", route.key)
            raise TemporaryFailure(reply)
        password = os.environ.get(route.auth_password_env) if route.auth_password_env else None
        if password is None:
            log.error("route %s: AUTH password variable %r is not set", route.key, route.auth_password_env)
            reply = Reply(451, "4.3.5", f"AUTH password for {route.host} is not configured")
            raise TemporaryFailure(reply)
        return _Auth(route.auth_user, password)

    async def _try_hosts(
        self,
        destinations: Sequence[Destination],
        configured: str,
        transport: TransportPolicy,
        auth: _Auth | None,
        envelope: Envelope,
        recipients: list[QueuedRecipient],
        message: Outgoing,
        *,
        is_mx: bool = True,
        before_dot: Callable[[], None] | None = None,
    ) -> dict[str, Outcome]:
        last = Reply(451, "4.4.0", "no remote host could be reached")
        last_host = ""
        loop = asyncio.get_running_loop()
        for dest in destinations:
            hold = self._backed_off.get((dest.address, dest.port))
            if hold is not None and hold[0] > loop.time():
                last, last_host = hold[1], dest.host
                log.debug("remote: skipping %s, backed off", dest)
                continue
            mode = configured
            # DANE is per MX host (its TLSA records); it takes precedence over MTA-STS.
            policy = await self.security.for_host(transport, dest) if is_mx else transport
            if policy.is_dane:
                if policy.problem:
                    self.security.record(
                        TlsOutcome(policy, dest.host, policy.problem, detail=policy.detail, address=dest.address)
                    )
                    text = f"DANE: not delivering to {dest.host}: {policy.problem} ({policy.detail})"
                    last, last_host = Reply(451, "4.7.5", text[:1000]), ""
                    continue
                mode = "dane" if policy.tlsa else "required"
            elif transport.is_sts:
                if transport.allows(dest.host):
                    mode = transport.mode
                else:
                    # RFC 8461 §4.1: an MX host the policy does not name.
                    text = f"MX host {dest.host} is not named by the MTA-STS policy of {transport.domain}"
                    self.security.record(TlsOutcome(transport, dest.host, "mx-mismatch", detail=text, address=dest.address))
                    if transport.is_enforced:
                        last, last_host = Reply(451, "4.7.5", text), ""
                        continue
            try:
                conn = await self._session(dest, mode, auth, configured, policy)
                try:
                    outcomes = await conn.send(envelope, recipients, message, before_dot=before_dot)
                except StaleConnection as exc:
                    # It died while idle; this transaction never reached the server.
                    log.debug("remote: pooled connection to %s is stale (%s), opening a new one", dest, exc)
                    await conn.close()
                    conn = await self._connect(dest, mode, auth, configured, policy)
                    outcomes = await conn.send(envelope, recipients, message, before_dot=before_dot)
            except HostFailure as exc:
                # Who said it: the host, when it answered (a 4xx greeting, an AUTH 535);
                # nobody but us when there was no answer (refused, timed out, TLS broke).
                last, last_host = exc.reply, dest.host if exc.remote_reply is not None else ""
                if isinstance(exc, TlsFailure) and mode == "sts-enforce":
                    # RFC 8461 §5: under enforce, never this host without verified TLS.
                    self.security.record(
                        TlsOutcome(transport, dest.host, exc.result, detail=exc.reply.text, address=dest.address)
                    )
                    text = f"{exc.reply.text}; the MTA-STS policy of {transport.domain} requires verified TLS"
                    last = Reply(451, "4.7.5", text[:1000])
                elif isinstance(exc, TlsFailure) and policy.is_dane:
                    # RFC 7672 §2.2: never in clear, never over TLS the TLSA records do not authenticate.
                    self.security.record(
                        TlsOutcome(policy, dest.host, exc.result, detail=exc.reply.text, address=dest.address)
                    )
                    text = f"{exc.reply.text}; the DANE TLSA records of {dest.host} require authenticated TLS"
                    last = Reply(451, "4.7.5", text[:1000])
                log.info(
                    "remote to %s: %d recipient(s) host failed: %s",
                    dest, len(recipients), short(exc.reply, 300),
                )
                continue
            except PermanentFailure as exc:
                log.info(
                    "remote to %s: %d recipient(s) failed: %s", dest, len(recipients), short(exc.reply, 300)
                )
                return {r.address: Outcome("failed", exc.reply, dest.host) for r in recipients}
            result = ""
            if policy.is_dane:
                result = "success"
                self.security.record(TlsOutcome(policy, dest.host, result, conn.tls_version, address=dest.address))
            elif transport.is_sts:
                # Under testing, an MX host the policy does not name went by delivery.tls.
                # Under enforce a connection exists only once its certificate was verified.
                result = (conn.tls_verdict or "success") if mode == transport.mode else "mx-mismatch"
                if result == "success":
                    self.security.record(TlsOutcome(transport, dest.host, result, conn.tls_version, address=dest.address))
            elif is_mx:  # RFC 8460 §4.3: sessions without a policy are reported as no-policy-found
                found = transport.problem or ("success" if conn.has_tls else "starttls-not-supported")
                self.security.report(TlsOutcome(transport, dest.host, found, conn.tls_version, address=dest.address))
            shown = policy if policy.is_dane else transport if transport.is_sts else mode
            self._log_outcomes(dest, conn, outcomes, shown, result)
            if conn.is_throttled:
                self._back_off(dest, conn.last_reply or Reply(421, "4.3.2", "closing"))
            await self._release(_key(dest, mode, auth), conn)
            return outcomes
        log.info("remote: %d recipient(s) deferred, no host took them: %s", len(recipients), short(last, 300))
        return {r.address: Outcome("deferred", last, last_host) for r in recipients}

    @staticmethod
    def _log_outcomes(
        dest: Destination, conn: SmtpConnection, outcomes: dict[str, Outcome], policy: object, result: str
    ) -> None:
        states = [o.status for o in outcomes.values()]
        counts = {s: states.count(s) for s in ("delivered", "deferred", "failed")}
        last = list(outcomes.values())[-1].reply if outcomes else ""
        # The TLS version, the policy applied (an MTA-STS mode and id, or the tls setting)
        # and what came of it.
        log.info(
            "remote to %s tls=%s policy=%s result=%s: %d recipient(s) delivered=%d deferred=%d failed=%d: %s",
            dest, conn.tls_version or "none", policy, result or "-", len(outcomes),
            counts["delivered"], counts["deferred"], counts["failed"], short(last, 300),
        )

    def _back_off(self, dest: Destination, reply: Reply) -> None:
        """Leave ``dest`` alone for :attr:`backoff` seconds; recipients meanwhile defer."""
        until = asyncio.get_running_loop().time() + self.backoff
        text = f"{dest.host} asked us to slow down ({reply.code} {reply.text})"[:500]
        self._backed_off[(dest.address, dest.port)] = (until, Reply(451, "4.4.5", text))
        log.info("backing off %s for %.0fs after %s", dest, self.backoff, short(reply, 200))

    # -- sessions, TLS, AUTH --------------------------------------------------------------

    async def _session(
        self, dest: Destination, mode: str, auth: _Auth | None, configured: str, transport: TransportPolicy
    ) -> SmtpConnection:
        """A ready connection to ``dest``: from the idle pool, or newly set up."""
        conn = await self._take_idle(_key(dest, mode, auth))
        if conn is not None:
            conn.remote_name = dest.host
            return conn
        return await self._connect(dest, mode, auth, configured, transport)

    async def _connect(
        self, dest: Destination, mode: str, auth: _Auth | None, configured: str, transport: TransportPolicy
    ) -> SmtpConnection:
        """A new connection to ``dest``, set up (EHLO, STARTTLS, AUTH) and ready.

        ``mode`` is the TLS mode for this host: ``configured`` (the policy's ``tls``),
        or the transport policy's ``sts-enforce`` / ``sts-testing``.
        """
        if mode == "sts-testing":
            # RFC 8461 §5: testing checks what enforce would, reports, and delivers anyway
            # as the configured mode allows.
            try:
                conn = await self._open(dest, mode, auth, use_tls=True)
                conn.tls_verdict = "success"
                return conn
            except TlsFailure as exc:
                self.security.record(
                        TlsOutcome(transport, dest.host, exc.result, detail=exc.reply.text, address=dest.address)
                    )
                conn = await self._connect(dest, configured, auth, configured, transport)
                conn.tls_verdict = exc.result
                return conn
        try:
            return await self._open(dest, mode, auth, use_tls=mode != "none", policy=transport)
        except TlsFailure as exc:
            if mode != "opportunistic":
                raise
            # Opportunistic TLS must not make mail undeliverable: once more, in clear.
            log.info("TLS with %s failed (%s); retrying without TLS", dest, exc.reply.text)
            return await self._open(dest, mode, auth, use_tls=False)

    async def _open(
        self, dest: Destination, mode: str, auth: _Auth | None, *, use_tls: bool, policy: TransportPolicy | None = None
    ) -> SmtpConnection:
        settings = self.policy.delivery
        conn = SmtpConnection(
            helo_name=self.helo_name,
            remote_name=dest.host,
            local_names={self.hostname},
            command_timeout=float(settings.command_timeout),
            data_timeout=float(settings.data_timeout),
        )
        ready = False
        try:
            await conn.connect(dest.address, dest.port, timeout=float(settings.connect_timeout))
            await conn.ehlo()
            if use_tls and conn.has_extension("STARTTLS"):
                server_name = dest.address if parse_address_literal(dest.host) else dest.host
                if mode == "dane" and policy is not None and policy.tlsa_base:
                    server_name = policy.tlsa_base  # RFC 7672 §8.1: SNI names the TLSA base domain
                timeout = float(settings.connect_timeout)
                # MTA-STS (RFC 8461 §4.2): the certificate must be valid for the MX host name.
                context = self._context("verify" if mode.startswith("sts-") else mode)
                # DANE (RFC 7672 §3): the handshake checks nothing; the TLSA records do.
                verify = _dane_verifier(dest, policy) if mode == "dane" and policy is not None else None
                await conn.starttls(context, server_name, timeout=timeout, verify=verify)
            elif mode in ("required", "verify", "sts-enforce", "sts-testing", "dane"):
                text = f"TLS required but {dest.host} does not offer STARTTLS"
                raise TlsFailure(Reply(451, "4.7.5", text), result="starttls-not-supported")
            if auth is not None:
                if not conn.has_tls:  # RFC 4954 §4: credentials only over a protected channel
                    raise HostFailure(Reply(451, "4.7.0", f"not sending AUTH to {dest.host} without TLS"))
                await conn.auth_plain(auth.user, auth.password)
            ready = True
            return conn
        finally:
            if not ready:
                if conn.is_throttled:
                    self._back_off(dest, conn.last_reply or Reply(421, "4.3.2", "busy"))
                await conn.quit()

    def _context(self, mode: str) -> ssl.SSLContext:
        """The client TLS context for ``mode``: verifying only for ``verify``."""
        context = self._contexts.get(mode)
        if context is None:
            if mode == "verify":
                ca_file = self.policy.delivery.tls_ca_file
                context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
                context.minimum_version = ssl.TLSVersion.TLSv1_2
            else:
                # RFC 7435 opportunistic security: encrypt, do not authenticate.
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._contexts[mode] = context
        return context

    # -- idle pool and limits -------------------------------------------------------------

    async def _take_idle(self, key: _PoolKey) -> SmtpConnection | None:
        loop = asyncio.get_running_loop()
        while True:
            # Looked up afresh after every wait: the reaper and other deliveries change
            # the pool meanwhile, and a list held across an await could hand one
            # connection to two deliveries at once.
            idles = self._pool.get(key)
            if not idles:
                return None
            idle = idles.pop()
            if not idles:
                del self._pool[key]
            if loop.time() - idle.since > self.idle_timeout or not idle.conn.is_usable:
                await idle.conn.quit()
                continue
            # RFC 5321 §4.1.1.5: RSET starts clean and proves the connection still works
            # (pipelined with the next transaction when the server allows).
            if await idle.conn.reuse():
                return idle.conn
            await idle.conn.close()

    async def _release(self, key: _PoolKey, conn: SmtpConnection) -> None:
        idles = self._pool.setdefault(key, [])
        if (
            not self._is_closed
            and conn.is_usable
            and conn.transactions < self.max_transactions
            and len(idles) < (self.max_idle or self._destination_limit)
            and self.idle_timeout > 0
        ):
            idles.append(_Idle(conn, asyncio.get_running_loop().time()))
            if self._reaper is None or self._reaper.done():
                self._reaper = asyncio.get_running_loop().create_task(self._reap())
            return
        if not idles:
            del self._pool[key]
        await conn.quit()

    async def _reap(self) -> None:
        """Close idle connections once they have waited :attr:`idle_timeout`."""
        loop = asyncio.get_running_loop()
        while self._pool:
            await asyncio.sleep(max(self.idle_timeout / 2, 0.05))
            now = loop.time()
            expired: list[SmtpConnection] = []
            for key in list(self._pool):
                keep = [i for i in self._pool[key] if now - i.since <= self.idle_timeout]
                expired.extend(i.conn for i in self._pool[key] if now - i.since > self.idle_timeout)
                if keep:
                    self._pool[key] = keep
                else:
                    del self._pool[key]
            await asyncio.gather(*(conn.quit() for conn in expired))
            self._backed_off = {k: v for k, v in self._backed_off.items() if v[0] > now}

    def _limit(self, key: str) -> _Limit:
        """The semaphore keeping deliveries to ``key`` at ``destination_concurrency``,
        counted as used: the caller waits on it and gives it back (``users`` down, the
        entry dropped when nobody uses it)."""
        limit = self._limits.get(key)
        if limit is None:
            limit = _Limit(asyncio.Semaphore(self._destination_limit))
            self._limits[key] = limit
        limit.users += 1
        return limit


def portion(limit: int, share: int, primary: bool) -> int:
    """One process's part of a concurrency ``limit`` split over ``share`` processes: an
    equal part each, the remainder to the primary (the master), and at least one, so
    the parts add up to the limit whenever it is at least ``share``."""
    part = limit // share + (limit % share if primary else 0)
    return max(1, part)


def _dane_verifier(dest: Destination, policy: TransportPolicy) -> Callable[[ssl.SSLObject], None]:
    """The check of a fresh TLS session with ``dest`` against its TLSA records."""
    # RFC 7672 §3.2.2: the MX host (and its CNAME-expanded name, §2.2.2), or the domain
    names = tuple(n for n in (dest.host, dest.canonical, policy.domain) if n)

    def verify(ssl_object: ssl.SSLObject) -> None:
        check = check_chain(presented_chain(ssl_object), policy.tlsa, names)
        if check.result != "success":
            text = f"TLS with {dest.host} failed DANE: {check.detail}"
            raise TlsFailure(Reply(451, "4.7.5", text[:1000]), result=check.result)
        log.debug("DANE with %s: %s", dest, check.detail)

    return verify


def _key(dest: Destination, mode: str, auth: _Auth | None) -> _PoolKey:
    return (dest.address, dest.port, mode, dest.host, auth.user if auth else "")

