"""Transport security: what must this destination's TLS look like, and how did it go?

The remote agent asks :meth:`TransportSecurity.policy_for` once per MX delivery and gets
one :class:`TransportPolicy`: its ``mode`` is

- ``none``: nothing published (or nothing usable): the agent's ``delivery.tls`` applies;
- ``sts-testing``: an MTA-STS policy in ``testing`` mode (RFC 8461 §5): deliver as
  without it, but check what it asks and log and count what would have failed;
- ``sts-enforce``: only to MX hosts the policy names, only over STARTTLS with a
  certificate that chains to a trusted CA and names the MX host; otherwise the mail waits;
- ``dane`` / ``dane-only`` (RFC 7672): decided per MX host by :meth:`TransportSecurity.for_host`
  from the host's DNSSEC-validated TLSA records (:mod:`gateway.delivery.remote.tlsa`):
  only over STARTTLS with a certificate they authenticate (:mod:`gateway.delivery.remote.dane`),
  never in clear and never over unauthenticated TLS. A host with usable TLSA records gets
  DANE whatever MTA-STS says (RFC 8461 §2); a host without them keeps the domain's answer,
  except under ``dane-only``, where it gets none (``problem = "dane-required"``).

After each attempt the agent hands back a :class:`TlsOutcome` (:meth:`TransportSecurity.record`),
which is logged and counted in ``Counters.tls_failures``, and counted for the TLS reports
(RFC 8460, :mod:`gateway.delivery.remote.tlsrpt_send`) when they are on.

Policies come from :mod:`gateway.delivery.remote.mta_sts`: the TXT ``id`` is looked up at
most once per TXT TTL (at most :data:`RECHECK` seconds) per domain, the policy is fetched
when the ``id`` differs from the cached one, the cached one expired, or it is due for a
refresh (a day old, or half its ``max_age``), and a cached policy still within its
``max_age`` is used when the TXT lookup or the fetch fails (RFC 8461 §5.1). In the master,
:meth:`TransportSecurity.refresh` does the same in the background every ``[delivery]
mta_sts_refresh`` for each cached policy, so a changed or ageing policy is fetched before
a delivery needs it.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import dns.asyncresolver

from gateway.delivery.remote.mta_sts import (
    PolicyCache,
    PolicyFetchError,
    PolicyInvalid,
    StsPolicy,
    fetch_policy,
    https_context,
    is_domain,
    parse_policy,
    parse_record,
    policy_url,
)
from gateway.delivery.remote.dane import TlsaRecord
from gateway.delivery.remote.mx import Destination
from gateway.delivery.remote.tlsa import DaneConfig, TlsaAnswer, lookup_tlsa
from gateway.delivery.remote.tlsrpt_send import TlsReporting
from gateway.dns import DnsError, DnsNotFound, lookup
from gateway.policy.model import DeliverySettings

__all__ = ["RECHECK", "TlsOutcome", "TransportPolicy", "TransportSecurity"]

log = logging.getLogger("gateway.delivery.remote.policy")

Mode = Literal["none", "sts-testing", "sts-enforce", "dane", "dane-only"]

#: longest time an answer is kept in memory before the TXT record is asked again
RECHECK = 300.0
#: how long a failed fetch (or a policy that did not parse) is not tried again
FETCH_RETRY = 60.0
#: a cached policy is fetched again, same id or not, once it is this old (or half its
#: max_age), so a long max_age is renewed before it runs out (RFC 8461 §5.1)
REFRESH = 86400.0


@dataclass(frozen=True, slots=True)
class TransportPolicy:
    """The answer for one destination domain.

    :param domain: the recipient domain
    :param mode: ``none``, ``sts-testing`` or ``sts-enforce``
    :param mx: the MX host patterns the policy allows (``mx1.example.com``, ``*.example.com``)
    :param policy_id: the ``id`` of the TXT record the policy was fetched for
    :param expires: ``time.time()`` when the policy's ``max_age`` runs out
    :param problem: why there is no policy although one was announced (an RFC 8460 type:
        ``sts-policy-fetch-error``, ``sts-policy-invalid``, ``sts-webpki-invalid``); for
        DANE, why the host must not get the mail (``dnssec-invalid``, ``dane-required``,
        ``tlsa-invalid``)
    :param detail: in words: where the answer came from, or what went wrong
    :param tlsa: DANE: the host's usable DNSSEC-validated TLSA records; none under a DANE
        mode without a problem means TLSA records none of which is usable: TLS is then
        required but not authenticated (RFC 7672 §2.2)
    :param max_age: MTA-STS: the policy's ``max_age`` (for TLS reports' policy-string)
    :param tlsa_base: DANE: the host name the TLSA records were found at (the MX host, or
        its CNAME-expanded name: RFC 7672 §2.2.2), the name given in SNI
    """

    domain: str
    mode: Mode = "none"
    mx: tuple[str, ...] = ()
    policy_id: str = ""
    expires: float = 0.0
    problem: str = ""
    detail: str = ""
    tlsa: tuple[TlsaRecord, ...] = ()
    max_age: int = 0
    tlsa_base: str = ""

    @property
    def is_dane(self) -> bool:
        return self.mode in ("dane", "dane-only")

    @property
    def is_enforced(self) -> bool:
        return self.mode == "sts-enforce"

    @property
    def is_sts(self) -> bool:
        return self.mode in ("sts-testing", "sts-enforce")

    def allows(self, host: str) -> bool:
        """Whether mail may go to MX ``host`` under this policy (any host without one)."""
        if not self.is_sts:
            return True
        return StsPolicy("enforce", self.mx, 0).allows(host)

    def __str__(self) -> str:
        if self.is_dane:
            return f"{self.mode} tlsa={len(self.tlsa)}"
        return f"{self.mode} id={self.policy_id}" if self.is_sts else self.mode


@dataclass(frozen=True, slots=True)
class TlsOutcome:
    """How TLS went with one host under a policy (one per connection attempt or delivery).

    :param result: ``success``, or what failed: an RFC 8460 result type
        (``starttls-not-supported``, ``certificate-expired``, ``certificate-host-mismatch``,
        ``certificate-not-trusted``, ``validation-failure``) or ``mx-mismatch`` (the MX
        host is not one the policy names)
    :param address: the host's IP address (``receiving-ip`` of a TLS report)
    :param source: ours in the session, when known (``sending-mta-ip``; else the report
        takes the address the kernel would use towards ``address``)
    """

    policy: TransportPolicy
    host: str
    result: str
    tls_version: str = ""
    detail: str = ""
    when: float = field(default_factory=time.time)
    address: str = ""
    source: str = ""

    @property
    def is_failure(self) -> bool:
        return self.result != "success"


def _is_due(policy: StsPolicy) -> bool:
    """Whether a cached policy should be fetched again although its id is unchanged."""
    return time.time() - policy.fetched >= min(REFRESH, policy.max_age / 2)


def _a_labels(domain: str) -> str:
    """``domain`` in ASCII (IDNA A-labels), as DNS and the policy's host name have it."""
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain  # not a name we can look up: no policy


@dataclass(slots=True)
class _Known:
    policy: TransportPolicy
    until: float  # loop time


class TransportSecurity:
    """Answers "what must this destination's TLS look like?" for the remote agent.

    :param settings: ``[delivery]``: ``mta_sts``, ``mta_sts_https_port``, ``mta_sts_timeout``,
        ``tls_ca_file``
    :param resolver: the gateway's resolver (TXT records, and ``mta-sts.<domain>``)
    :param cache_dir: where policies are kept (``<var_dir>/mta-sts``); ``None``: memory only
    :param counters: the process's :class:`~gateway.metrics.Counters`, for ``tls_failures``
    :param dane: DANE's settings and trusted resolver; ``None``: no DANE
    :param reporting: where outcomes are counted for TLS reports (RFC 8460); ``None``: not
    """

    def __init__(
        self,
        settings: DeliverySettings,
        resolver: dns.asyncresolver.Resolver,
        cache_dir: Path | None = None,
        *,
        counters: Any = None,
        dane: DaneConfig | None = None,
        reporting: TlsReporting | None = None,
    ) -> None:
        self.settings = settings
        self.dane = dane or DaneConfig()
        self.resolver = resolver
        self.cache = PolicyCache(cache_dir)
        self.counters = counters
        self.reporting = reporting
        self._known: dict[str, _Known] = {}
        self._pending: dict[str, asyncio.Future[TransportPolicy]] = {}
        self._context: ssl.SSLContext | None = None

    async def policy_for(self, domain: str) -> TransportPolicy:
        """The policy to apply to mail for ``domain`` now (never raises)."""
        domain = _a_labels(domain.lower().rstrip("."))
        if not self.settings.mta_sts or not is_domain(domain):
            return TransportPolicy(domain, detail="MTA-STS off" if not self.settings.mta_sts else "")
        loop = asyncio.get_running_loop()
        known = self._known.get(domain)
        if known is not None and known.until > loop.time():
            return known.policy
        pending = self._pending.get(domain)
        if pending is not None:  # one lookup for every delivery to the domain at once
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not pending.cancelled() or (task is not None and task.cancelling()):
                    raise
                return await self.policy_for(domain)  # the task that looked it up was cancelled
        future: asyncio.Future[TransportPolicy] = loop.create_future()
        self._pending[domain] = future
        try:
            try:
                policy, ttl = await self.discover(domain)
            except Exception as exc:  # a boundary: a bug here must not stop delivery
                log.exception("MTA-STS of %s: lookup failed", domain)
                policy, ttl = TransportPolicy(domain, problem="sts-policy-fetch-error", detail=str(exc)[:200]), 60.0
            self._known[domain] = _Known(policy, loop.time() + ttl)
            future.set_result(policy)
            return policy
        finally:
            del self._pending[domain]
            if not future.done():
                future.cancel()

    async def discover(self, domain: str) -> tuple[TransportPolicy, float]:
        """Look the policy up afresh (TXT, cache, fetch); the answer and how long to keep it.

        ``gateway tls check`` calls this directly; deliveries use :meth:`policy_for`.
        """
        settings = self.settings
        cached = await self.cache.load(domain)
        if cached is not None and not cached.is_fresh():
            cached = None
        try:
            answer = await lookup(self.resolver, f"_mta-sts.{domain}", "TXT")
        except DnsNotFound:
            answer = None
        except DnsError as exc:
            if cached is None:
                log.info("MTA-STS of %s: TXT lookup failed (%s), no cached policy", domain, exc)
            return self._from_cache(domain, cached, f"TXT lookup: {exc}"), FETCH_RETRY
        if answer is None:
            return self._from_cache(domain, cached, "no _mta-sts TXT record"), RECHECK
        ttl = min(float(answer.rrset.ttl), RECHECK) if answer.rrset is not None else RECHECK
        texts = [b"".join(r.strings).decode("utf-8", "replace") for r in answer]
        try:
            policy_id = parse_record(texts)
        except PolicyInvalid as exc:
            return self._from_cache(domain, cached, f"_mta-sts TXT: {exc}"), ttl
        if cached is not None and cached.policy_id == policy_id and not _is_due(cached):
            return self._answer(domain, cached, "cached"), ttl
        url = policy_url(domain, settings.mta_sts_https_port)
        try:
            if self._context is None:
                self._context = await https_context(settings.tls_ca_file)
            text = await fetch_policy(
                domain, self.resolver, port=settings.mta_sts_https_port, timeout=float(settings.mta_sts_timeout),
                context=self._context,
            )
            policy = parse_policy(text, policy_id, time.time())
        except (PolicyFetchError, PolicyInvalid) as exc:
            problem = exc.result if isinstance(exc, PolicyFetchError) else "sts-policy-invalid"
            self.count("none", problem)
            if cached is not None:
                log.warning(
                    "MTA-STS of %s: %s (%s): %s; keeping the cached policy id=%s",
                    domain, problem, url, exc, cached.policy_id,
                )
                return self._answer(domain, cached, f"cached; {problem}: {exc}"), min(ttl, FETCH_RETRY)
            # RFC 8461 §3.2, §5: a policy that cannot be fetched or parsed is as if none.
            log.warning("MTA-STS of %s: %s (%s): %s; delivering as if it had no policy", domain, problem, url, exc)
            return TransportPolicy(domain, problem=problem, detail=str(exc)[:300]), min(ttl, FETCH_RETRY)
        await self.cache.store(domain, text, policy)
        log.info("MTA-STS of %s: fetched policy id=%s mode=%s max_age=%d", domain, policy_id, policy.mode, policy.max_age)
        return self._answer(domain, policy, "fetched"), ttl

    @staticmethod
    def _answer(domain: str, policy: StsPolicy, detail: str) -> TransportPolicy:
        mode: Mode = "sts-enforce" if policy.mode == "enforce" else "sts-testing" if policy.mode == "testing" else "none"
        return TransportPolicy(
            domain, mode, policy.mx, policy.policy_id, policy.expires, detail=detail, max_age=policy.max_age
        )

    def _from_cache(self, domain: str, cached: StsPolicy | None, why: str) -> TransportPolicy:
        # RFC 8461 §5.1: a cached policy stays in force until its max_age, whatever DNS says.
        if cached is not None:
            return self._answer(domain, cached, f"cached; {why}")
        return TransportPolicy(domain, detail=why)

    # -- background refresh (RFC 8461 §5.1) ------------------------------------------------

    async def refresh(self) -> int:
        """Look again at every domain with a cached, still valid policy, as a delivery
        would: its TXT ``id`` is asked, and the policy fetched when the ``id`` changed or
        it is due (half its ``max_age``, at most a day old); a failed fetch or lookup keeps
        the cached policy until its ``max_age`` runs out. Returns how many were fetched anew."""
        loop = asyncio.get_running_loop()
        domains = set(await self.cache.domains())
        domains.update(d for d, k in self._known.items() if k.policy.is_sts)
        fetched = 0
        for domain in sorted(domains):
            cached = await self.cache.load(domain)
            known = self._known.get(domain)
            if (cached is None or not cached.is_fresh()) and (known is None or not known.policy.is_sts):
                continue
            try:
                policy, ttl = await self.discover(domain)
            except Exception:  # a boundary: one domain's trouble must not stop the others
                log.exception("MTA-STS of %s: background refresh failed", domain)
                continue
            self._known[domain] = _Known(policy, loop.time() + ttl)
            fetched += policy.detail == "fetched"
        return fetched

    async def refresh_forever(self, interval: float) -> None:
        """:meth:`refresh` every ``interval`` seconds (the master's task)."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh()
            except Exception:  # boundary: the task outlives any one failure
                log.exception("MTA-STS background refresh failed")

    # -- DANE -----------------------------------------------------------------------------

    def mx_resolver(self, domain: str) -> dns.asyncresolver.Resolver:
        """The resolver for ``domain``'s MX lookup: the validating one when DANE may apply,
        so each :class:`Destination` says whether it is DNSSEC-secure."""
        if self.dane.resolver is not None and self.dane.mode_for(domain) != "off":
            return self.dane.resolver
        return self.resolver

    async def tlsa_for(self, host: str, port: int) -> TlsaAnswer | None:
        """The TLSA records of ``host`` from the trusted resolver; ``None`` without one."""
        if self.dane.resolver is None:
            return None
        return await lookup_tlsa(self.dane.resolver, host, port)

    async def tlsa_of(self, dest: Destination) -> tuple[str, TlsaAnswer]:
        """The TLSA records of an MX host (secure addresses) and the name they are at.

        RFC 7672 §2.2.2: for a host that is an alias whose expansion is DNSSEC-valid,
        the fully CNAME-expanded name first; the initial name when that has none.
        """
        if dest.canonical:
            answer = await self.tlsa_for(dest.canonical, dest.port)
            assert answer is not None
            if answer.state == "bogus" or (answer.state == "secure" and answer.records):
                return dest.canonical, answer
        answer = await self.tlsa_for(dest.host, dest.port)
        assert answer is not None
        return dest.host, answer

    async def for_host(self, transport: TransportPolicy, dest: Destination) -> TransportPolicy:
        """The policy for one MX host: DANE from its TLSA records (RFC 7672 §2.2) when it
        has usable secure ones, else ``transport`` (the domain's MTA-STS answer), or a
        refusal (``problem``) when the TLSA lookup failed or ``dane-only`` finds none."""
        domain = transport.domain
        mode = self.dane.mode_for(domain)
        if mode == "off":
            return transport
        if self.dane.resolver is None or not dest.is_secure:
            why = "the resolver's DNSSEC validation is not trusted ([dns] dnssec)" if self.dane.resolver is None else (
                f"the MX or address records of {dest.host} are not DNSSEC-validated"
            )
            if mode == "dane-only":
                return TransportPolicy(domain, "dane-only", problem="dane-required", detail=why)
            return transport
        base, answer = await self.tlsa_of(dest)
        if answer.state == "bogus":
            return TransportPolicy(domain, mode, problem="dnssec-invalid", detail=f"{answer.name}: {answer.detail}")
        if answer.state == "secure":
            usable = answer.usable
            if usable:
                return TransportPolicy(
                    domain, mode, tlsa=usable, detail=f"{answer.name}: {len(usable)} usable", tlsa_base=base
                )
            if mode == "dane-only":
                return TransportPolicy(domain, mode, problem="tlsa-invalid", detail=f"{answer.name}: no usable record")
            # RFC 7672 §2.2: TLSA records that are all unusable still mean "TLS required".
            return TransportPolicy(
                domain, mode, detail=f"{answer.name}: no usable record; TLS without authentication", tlsa_base=base
            )
        if mode == "dane-only":
            return TransportPolicy(domain, mode, problem="dane-required", detail=f"{answer.name}: {answer.detail}")
        return transport

    # -- outcomes -------------------------------------------------------------------------

    def count(self, mode: str, result: str) -> None:
        if self.counters is not None:
            self.counters.bump(self.counters.tls_failures, (mode, result))

    def report(self, outcome: TlsOutcome) -> None:
        """Count ``outcome`` for the TLS reports (RFC 8460), and nothing else."""
        if self.reporting is not None:
            self.reporting.note(outcome)

    def record(self, outcome: TlsOutcome) -> None:
        """Log and count how TLS went with a host under ``outcome.policy`` (and report it)."""
        self.report(outcome)
        if not outcome.is_failure:
            return
        policy = outcome.policy
        self.count(policy.mode, outcome.result)
        if policy.is_dane:
            log.warning(
                "DANE (%s) for %s: %s %s (%s); not delivering there",
                policy.mode, policy.domain, outcome.host, outcome.result, outcome.detail,
            )
        elif policy.is_enforced:
            log.warning(
                "MTA-STS enforce for %s: %s %s (%s); not delivering there",
                policy.domain, outcome.host, outcome.result, outcome.detail,
            )
        elif policy.mode == "sts-testing":
            log.warning(
                "MTA-STS testing for %s: %s %s (%s); delivering anyway (enforce would not)",
                policy.domain, outcome.host, outcome.result, outcome.detail,
            )
