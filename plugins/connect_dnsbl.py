"""DNS lists: IP block lists (DNSBL), IP allow lists (DNSWL) and domain lists (RHSBL).

Hooks: ``gateway_startup``, ``gateway_connect``, ``gateway_helo``, ``gateway_mail``,
``gateway_rcpt``, ``gateway_data``. Put it before the plugins that accept recipients
(``rcpt_relay``, ``rcpt_local_users``): its RCPT verdict must come before a plugin accepts
the recipient. A ``refuse_only`` entry of ``rcpt_relay`` may come first, so a relay
attempt is refused as such whatever the lists say.

Each entry of ``zones`` (a ``[[plugins.zones]]`` table) is one list: ``zone``, ``type``
(``ip``, ``ip-allow`` or ``domain``), ``targets`` of a domain list (``helo``, ``mail_from``,
``body``), ``codes`` (return code to an action or to ``{action, score, reply}``), ``action``
for other codes (``accept`` for allow lists, else ``reject``), ``score``, and ``reply``, a
template with ``{kind}``, ``{target}``, ``{zone}``, ``{code}``, ``{txt}``. Actions: reject,
tempfail, score (added to each transaction's results, so ``[scoring]`` counts it), accept
(allow list: the session gets :data:`ALLOW_LISTED` and no list is asked or enforced for it
any more) and ignore.

IP lists are asked in parallel at connect (RFC 5782: reversed IPv4 octets, IPv6 nibbles),
the HELO name at HELO, the MAIL FROM domain at MAIL, the hosts of URLs in the decoded text
parts at DATA (at most ``body_max_domains`` from the first ``body_scan_size`` octets, the only
part of the message read, in the thread pool, even when it is spooled to disk). The A
record says how a name is listed; for reject and tempfail the TXT record is fetched and the
reply names the list and adds that text, sanitised and cut short. Answers are kept in one LRU
cache of ``cache_size`` entries for their TTL (at most ``max_ttl``), negative ones for the SOA
minimum (RFC 2308 §5) or ``negative_ttl``. Each lookup waits at most ``lookup_timeout``.

``reject_at``: ``"rcpt"`` (default) delays the verdict like rblsmtpd and Haraka: findings
stay on the session/transaction stash and each recipient is refused, 550 5.7.1 (451 4.7.1 for
tempfail), except the local parts in ``exempt_local_parts`` (postmaster, abuse; any domain and
bare ``<postmaster>``: RFC 5321 §4.5.1, RFC 2142); a client that authenticated meanwhile is
let through. ``"connect"`` refuses at once: 554 (421) instead of the greeting, 550 at HELO
or MAIL. Body listings are judged at DATA unless every recipient is exempt.

``on_dns_error`` (SERVFAIL, timeout, a refusal code such as 127.255.255.254): ``"continue"``
(default: a list is an opinion, its outage must not stop mail; a 0-score note is recorded)
or ``"tempfail"`` (451 4.4.3, 421 at connect). A failing allow list just does not vouch.
Relay clients are never checked, authenticated sessions not after AUTH.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping

from gateway.context import Gateway
from gateway.dns import DnsTemporaryError
from gateway.hooks import hookimpl
from gateway.model import Message, Recipient, Results, Session, Stash, StashKey, Transaction
from gateway.policy import Duration, Size, setting
from gateway.verdicts import Reply, Verdict
from plugins._dnslist import (
    KIND_TEXT,
    ActionName,
    Findings,
    Kind,
    Listing,
    RecordCache,
    check_template,
    classify_code,
    clean_text,
    domain_query_name,
    extract_body_domains,
    ip_query_name,
    lookup_records,
    normalise_domain,
    render_reply,
)

__all__ = [
    "ALLOW_LISTED",
    "NAME",
    "SESSION_FINDINGS",
    "TXN_FINDINGS",
    "CodeRule",
    "Plugin",
    "Settings",
    "Zone",
    "decide",
]

NAME = "connect_dnsbl"
log = logging.getLogger(f"plugins.{NAME}")

Stage = Literal["connect", "helo", "mail", "rcpt", "data"]
DEFAULT_REPLY = "Service unavailable; {kind} [{target}] blocked using {zone}"
# Which code of a multi-code answer wins (zen answers 127.0.0.2 and 127.0.0.10 at once).
_RANK = {"accept": 4, "reject": 3, "tempfail": 2, "score": 1, "ignore": 0}

ALLOW_LISTED = StashKey[str]("connect_dnsbl.allow_listed")
"""Session stash: the allow list that vouched for the client (other plugins may skip checks)."""
SESSION_FINDINGS = StashKey[Findings]("connect_dnsbl.session")
"""Session stash: findings about the client (IP lists) and its HELO name."""
TXN_FINDINGS = StashKey[Findings]("connect_dnsbl.transaction")
"""Transaction stash: findings about the MAIL FROM domain and the body's domains."""


@dataclass(frozen=True)
class CodeRule:
    """What one return code means, when an action name alone does not say enough."""

    action: ActionName = setting("reject", "reject, tempfail, score, accept or ignore")
    score: float | None = setting(None, "score for action score; default: the zone's score")
    reply: str = setting("", "reply template; default: the zone's")

    def __post_init__(self) -> None:
        check_template(self.reply)


@dataclass(frozen=True)
class Zone:
    """One DNS list: a ``[[plugins.zones]]`` table."""

    zone: str = field(metadata={"doc": "the list's DNS zone, e.g. zen.spamhaus.org"})
    type: Literal["ip", "ip-allow", "domain"] = setting(
        "ip", "ip (DNSBL), ip-allow (DNSWL) or domain (RHSBL)"
    )
    targets: tuple[Literal["helo", "mail_from", "body"], ...] = setting(
        ("helo", "mail_from"), "domain lists: which names to look up"
    )
    codes: Mapping[str, ActionName | CodeRule] = setting(
        {}, 'return code -> action or {action, score, reply}, e.g. {"127.0.0.2" = "reject"}'
    )
    action: ActionName | None = setting(
        None, "action for other codes; default accept (ip-allow) or reject"
    )
    score: float = setting(1.0, "score of the score action")
    reply: str = setting("", f"reply template; default {DEFAULT_REPLY!r} plus '; ' and the TXT")

    def __post_init__(self) -> None:
        zone = normalise_domain(self.zone)
        if zone is None:
            raise ValueError(f"zone {self.zone!r} is not a DNS zone name")
        object.__setattr__(self, "zone", zone)
        for code in self.codes:
            if classify_code(code) != "listed":
                raise ValueError(f"zone {zone}: code {code!r} is not a 127.0.0.0/8 listing address")
        actions = [self.default_action]
        actions += [c if isinstance(c, str) else c.action for c in self.codes.values()]
        if self.type == "domain" and "accept" in actions:
            raise ValueError(f"zone {zone}: accept is for IP allow lists, not domain lists")
        if self.type == "domain" and not self.targets:
            raise ValueError(f"zone {zone}: a domain list needs targets")
        check_template(self.reply)

    @property
    def default_action(self) -> ActionName:
        if self.action is not None:
            return self.action
        return "accept" if self.type == "ip-allow" else "reject"

    def rule(self, code: str) -> tuple[ActionName, float, str]:
        """(action, score, reply template) for one return code."""
        entry = self.codes.get(code)
        if entry is None:
            return self.default_action, self.score, self.reply or DEFAULT_REPLY
        if isinstance(entry, str):
            return entry, self.score, self.reply or DEFAULT_REPLY
        score = self.score if entry.score is None else entry.score
        return entry.action, score, entry.reply or self.reply or DEFAULT_REPLY


@dataclass(frozen=True)
class Settings:
    """Settings of ``connect_dnsbl``."""

    zones: tuple[Zone, ...] = setting((), "the lists, as [[plugins.zones]] tables")
    reject_at: Literal["connect", "rcpt"] = setting(
        "rcpt", "connect: refuse at once; rcpt: refuse each recipient but postmaster/abuse"
    )
    on_dns_error: Literal["continue", "tempfail"] = setting(
        "continue", "on SERVFAIL, timeout or a list's error code: go on, or answer 451 4.4.3"
    )
    lookup_timeout: Duration = setting(2.0, "longest wait for one DNS lookup", min=0.001)
    cache_size: int = setting(10000, "answers kept in the LRU cache (0: no cache)", min=0)
    negative_ttl: Duration = setting(300.0, "cache time of a negative answer without SOA", min=0)
    max_ttl: Duration = setting(3600.0, "no answer is cached longer than this", min=0)
    exempt_local_parts: tuple[str, ...] = setting(
        ("postmaster", "abuse"), "recipients (any domain) never refused at RCPT or DATA"
    )
    body_scan_size: Size = setting(256 * 1024, "body check: how much of the message is read", min=0)
    body_max_domains: int = setting(20, "body check: most host names looked up per message", min=1)


_Job = tuple[Zone, Kind, str, str]  # zone, kind, target, query name


def _findings(stash: Stash, key: StashKey[Findings]) -> Findings:
    found = stash.get(key)
    if found is None:
        found = stash[key] = Findings()
    return found


def _replies(stage: Stage) -> tuple[Reply, Reply, Reply]:
    """(reject, tempfail, DNS failure) replies: RFC 5321 §3.1, 554/421 before the greeting."""
    if stage == "connect":
        return Reply(554, "5.7.1"), Reply(421, "4.7.1"), Reply(421, "4.4.3")
    # RFC 3463: X.7.1 delivery not authorized; X.4.3 directory (here: DNS) server failure.
    return Reply(550, "5.7.1"), Reply(451, "4.7.1"), Reply(451, "4.4.3")


def decide(items: Iterable[Listing], settings: Settings, stage: Stage) -> Verdict | None:
    """The verdict on findings: the first reject, else the first tempfail, else a DNS failure.

    Findings of zones the settings in force do not name (another scope's) are ignored.

    :param items: the findings, in zone order
    :param settings: the settings in force
    :param stage: where the verdict is given (sets the reply codes)
    :returns: a reject or tempfail verdict, or ``None``
    """
    zones = {zone.zone for zone in settings.zones}
    relevant = [item for item in items if item.zone in zones]
    reject, tempfail, dns_failure = _replies(stage)
    for item in relevant:
        if item.action == "reject":
            reason = f"{item.target} listed at {item.zone}"
            return Verdict.reject(reject.with_text(item.text), reason=reason)
    for item in relevant:
        if item.action == "tempfail":
            reason = f"{item.target} listed at {item.zone}"
            return Verdict.tempfail(tempfail.with_text(item.text), reason=reason)
    if settings.on_dns_error == "tempfail":
        for item in relevant:
            if item.action == "error":
                text = f"DNS list {item.zone} unavailable, please try again later"
                return Verdict.tempfail(dns_failure.with_text(text), reason=item.text)
    return None


def _note(results: Results, items: Iterable[Listing], settings: Settings) -> None:
    """Record findings as results: the score for ``score``, 0 (a note) for the rest."""
    zones = {zone.zone for zone in settings.zones}
    for item in items:
        if item.zone not in zones or item.action == "ignore":
            continue
        if item.action == "error":
            results.add(NAME, 0.0, f"{item.zone} failed: {item.text}")
            continue
        score = item.score if item.action == "score" else 0.0
        what = f"{KIND_TEXT[item.kind]} {clean_text(item.target, 100)}"
        results.add(NAME, score, f"{what} listed at {item.zone} ({item.code}): {item.action}")


def _body_domains_in_thread(message: Message, settings: Settings) -> list[str]:
    # Only the first body_scan_size octets are read (from disk, for a spooled message).
    return extract_body_domains(
        message.content.head(settings.body_scan_size), settings.body_scan_size, settings.body_max_domains
    )


def _is_exempt(session: Session) -> bool:
    return session.is_relay_client or session.is_authenticated or ALLOW_LISTED in session.stash


def _domain_jobs(
    settings: Settings, kind: Literal["helo", "mail_from", "body"], domains: Iterable[str]
) -> list[_Job]:
    jobs: list[_Job] = []
    for domain in domains:
        for zone in settings.zones:
            if zone.type == "domain" and kind in zone.targets:
                qname = domain_query_name(domain, zone.zone)
                if qname is not None:
                    jobs.append((zone, kind, domain, qname))
    return jobs


class Plugin:
    """Holds the answer cache, shared by every chain entry of the plugin."""

    def __init__(self) -> None:
        self.cache = RecordCache(10000)
        self._sized = False

    @hookimpl
    def gateway_startup(self, settings: Settings) -> None:
        # One cache for all entries: the largest size any of them asks for.
        size = settings.cache_size
        self.cache.size = max(self.cache.size, size) if self._sized else size
        self._sized = True

    async def _records(
        self, resolver: Any, settings: Settings, qname: str, rdtype: Literal["A", "TXT"]
    ) -> tuple[str, ...]:
        return await lookup_records(
            resolver, self.cache, qname, rdtype, timeout=settings.lookup_timeout,
            fallback_negative_ttl=settings.negative_ttl, max_ttl=settings.max_ttl,
        )

    async def _check(
        self, resolver: Any, settings: Settings, zone: Zone, kind: Kind, target: str, qname: str
    ) -> Listing | None:
        """Ask one zone about one target; a failure is a finding, never an exception."""
        try:
            codes = await self._records(resolver, settings, qname, "A")
        except DnsTemporaryError as exc:
            log.warning("lookup failed zone=%s: %s", zone.zone, exc)
            if zone.type == "ip-allow":
                return None  # an allow list that fails just does not vouch
            return Listing(zone.zone, kind, target, "", "error", 0.0, str(exc))
        best: tuple[ActionName, float, str, str] | None = None
        refused = ""
        for code in codes:
            meaning = classify_code(code)
            if meaning != "listed":
                log.warning("zone=%s answered %s for %s (%s)", zone.zone, code, qname, meaning)
                if meaning == "error" and not refused:
                    refused = code
                continue
            action, score, template = zone.rule(code)
            if best is None or (_RANK[action], score) > (_RANK[best[0]], best[1]):
                best = (action, score, template, code)
        if best is None:
            if refused and zone.type != "ip-allow":
                detail = f"{zone.zone} refused the query ({refused})"
                return Listing(zone.zone, kind, target, refused, "error", 0.0, detail)
            return None
        action, score, template, code = best
        txt = ""
        if action in ("reject", "tempfail"):
            try:
                txt = clean_text(" ".join(await self._records(resolver, settings, qname, "TXT")))
            except DnsTemporaryError:
                pass  # the reason is a courtesy: the listing stands without it
        log.info(
            "listed %s=%s zone=%s code=%s action=%s",
            kind, clean_text(target, 100), zone.zone, code, action,
        )
        text = render_reply(template, kind, target, zone.zone, code, txt)
        return Listing(zone.zone, kind, target, code, action, score, text)

    async def _ask(self, gateway: Gateway, settings: Settings, jobs: list[_Job]) -> list[Listing]:
        """Run the lookups in parallel; the findings come in job (zone) order."""
        if not jobs:
            return []
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(self._check(gateway.resolver, settings, *job)) for job in jobs
            ]
        return [found for task in tasks if (found := task.result()) is not None]

    @hookimpl
    async def gateway_connect(
        self, session: Session, gateway: Gateway, settings: Settings
    ) -> Verdict | None:
        zones = [zone for zone in settings.zones if zone.type in ("ip", "ip-allow")]
        if session.is_relay_client or not zones:
            return None
        ip = session.peer_ip
        jobs: list[_Job] = [(zone, "client", ip, ip_query_name(ip, zone.zone)) for zone in zones]
        found = await self._ask(gateway, settings, jobs)
        allowed = next((item for item in found if item.action == "accept"), None)
        if allowed is not None:
            # The allow list wins over every block list, now and at the later stages.
            session.stash[ALLOW_LISTED] = allowed.zone
            reason = f"client {ip} allow-listed by {allowed.zone} ({allowed.code})"
            session.results.add(NAME, 0.0, reason)
            log.info("allow-listed client=%s zone=%s", ip, allowed.zone)
            return None
        _findings(session.stash, SESSION_FINDINGS).set("client", found)
        return decide(found, settings, "connect") if settings.reject_at == "connect" else None

    @hookimpl
    async def gateway_helo(
        self, session: Session, helo: str, gateway: Gateway, settings: Settings
    ) -> Verdict | None:
        if _is_exempt(session):
            return None
        found = await self._ask(gateway, settings, _domain_jobs(settings, "helo", [helo]))
        _findings(session.stash, SESSION_FINDINGS).set("helo", found)
        return decide(found, settings, "helo") if settings.reject_at == "connect" else None

    @hookimpl
    async def gateway_mail(
        self, session: Session, txn: Transaction, gateway: Gateway, settings: Settings
    ) -> Verdict | None:
        if _is_exempt(session):
            return None
        sender = txn.sender
        domains = [] if sender.is_null or not sender.domain else [sender.domain_key]
        found = await self._ask(gateway, settings, _domain_jobs(settings, "mail_from", domains))
        _findings(txn.stash, TXN_FINDINGS).set("mail_from", found)
        # Scores go to the transaction: only its results count in the [scoring] step.
        _note(txn.results, _findings(session.stash, SESSION_FINDINGS).items + found, settings)
        return decide(found, settings, "mail") if settings.reject_at == "connect" else None

    @hookimpl
    def gateway_rcpt(
        self, session: Session, txn: Transaction, rcpt: Recipient, settings: Settings
    ) -> Verdict | None:
        if settings.reject_at != "rcpt" or _is_exempt(session):
            return None
        if rcpt.address.local_key in {part.lower() for part in settings.exempt_local_parts}:
            return None  # RFC 5321 §4.5.1, RFC 2142: a listed site must be able to complain
        items = _findings(session.stash, SESSION_FINDINGS).items
        return decide(items + _findings(txn.stash, TXN_FINDINGS).items, settings, "rcpt")

    @hookimpl
    async def gateway_data(
        self, session: Session, txn: Transaction, message: Message, gateway: Gateway,
        settings: Settings,
    ) -> Verdict | None:
        zones = [zone for zone in settings.zones if zone.type == "domain" and "body" in zone.targets]
        if not zones or _is_exempt(session) or settings.body_scan_size <= 0:
            return None
        domains = await gateway.run_in_thread(_body_domains_in_thread, message, settings)
        found = await self._ask(gateway, settings, _domain_jobs(settings, "body", domains))
        _findings(txn.stash, TXN_FINDINGS).set("body", found)
        _note(txn.results, found, settings)
        exempt = {part.lower() for part in settings.exempt_local_parts}
        if all(r.address.local_key in exempt for r in txn.recipients):
            return None
        return decide(found, settings, "data")
