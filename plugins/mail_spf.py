"""SPF (RFC 7208): may the client's address send mail for the MAIL FROM domain?

Hooks: ``gateway_startup`` (builds a blocking resolver from the policy's ``[dns]``
section), ``gateway_mail`` (runs the check and acts on it) and ``gateway_queue`` (adds
the ``Received-SPF:`` header).

At MAIL FROM the plugin checks the sender's domain (the "mailfrom" identity, RFC 7208
§2.4); for the null sender ``<>`` it checks the HELO name instead (§2.3, as
``postmaster@<helo>``), unless ``check_helo_for_null_sender`` is false. Relay clients
and authenticated sessions are not checked. pyspf does the evaluation, with its limits
of §4.6.4 (10 DNS-querying terms, 2 void lookups), in the gateway's thread pool; its
lookups go to the gateway's resolver (its blocking view, see ``plugins/_spf_dns.py``:
under ``[capture]`` they are recorded, and ``gateway replay`` answers them from the
record) and the whole check ends after ``max_time`` with temperror.

Each result leads to the action its setting names: ``fail_action`` (default
``reject``: 550 5.7.23, RFC 7372, with the domain's ``exp=`` explanation when
``show_explanation``), ``softfail_action`` (``score``), ``neutral_action`` and
``none_action`` (``ignore``), ``temperror_action`` (``tempfail``: 451 4.7.24) and
``permerror_action`` (``score``; ``reject`` gives 550 5.7.24). ``score`` adds the
result's score to the transaction's results: ``fail_score``, ``softfail_score``,
``neutral_score``, ``none_score``, ``temperror_score``, ``permerror_score``.

What it leaves for others: ``txn.stash[SPF_RESULT]`` (:class:`SpfResult`), an
``AuthResult("spf", ...)`` with ``smtp.mailfrom`` or ``smtp.helo`` for the
Authentication-Results and DMARC plugins, and, with ``add_header``, a ``Received-SPF:``
header (RFC 7208 §9.1). That header should sit above our own ``Received:`` (§9.1), so
list this plugin after ``queue_received_header``: each queue hook's header goes above
the earlier ones.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import time
from dataclasses import dataclass, replace
from typing import Literal

import spf

from gateway.address import Address
from gateway.authres import AuthResult, add_result
from gateway.context import Gateway
from gateway.dns import BlockingResolver
from gateway.hooks import hookimpl
from gateway.model import Message, Session, StashKey, Transaction
from gateway.policy import Duration, setting
from gateway.policy.model import DnsSettings
from gateway.verdicts import Reply, Verdict
from plugins._spf_dns import SpfQuery, make_sync_resolver

__all__ = ["SPF_RESULT", "Plugin", "Settings", "SpfResult", "apply", "check_spf", "received_spf"]

log = logging.getLogger("plugins.mail_spf")

Action = Literal["reject", "tempfail", "score", "ignore"]
RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
# The thread cannot be cancelled, but its lookups stop at max_time; this is the margin.
_GRACE = 1.0
_TEXT_LIMIT = 200


@dataclass(frozen=True)
class Settings:
    """Settings of ``mail_spf``."""

    fail_action: Action = setting("reject", "on fail: reject (550 5.7.23), tempfail, score or ignore")
    softfail_action: Action = setting("score", "on softfail: reject, tempfail, score or ignore")
    neutral_action: Action = setting("ignore", "on neutral: reject, tempfail, score or ignore")
    none_action: Action = setting("ignore", "on none (no SPF record): reject, tempfail, score or ignore")
    temperror_action: Action = setting("tempfail", "on temperror: tempfail (451 4.7.24), reject, score or ignore")
    permerror_action: Action = setting("score", "on permerror: score, reject (550 5.7.24), tempfail or ignore")
    fail_score: float = setting(5.0, "score added for fail when fail_action is score")
    softfail_score: float = setting(2.0, "score added for softfail when softfail_action is score")
    neutral_score: float = setting(0.0, "score added for neutral when neutral_action is score")
    none_score: float = setting(0.0, "score added for none when none_action is score")
    temperror_score: float = setting(0.0, "score added for temperror when temperror_action is score")
    permerror_score: float = setting(1.0, "score added for permerror when permerror_action is score")
    check_helo_for_null_sender: bool = setting(True, "check the HELO name when MAIL FROM is <> (RFC 7208 2.3)")
    max_time: Duration = setting(10.0, "time limit of one whole check, all lookups (RFC 7208 4.6.4)", min=0.1)
    add_header: bool = setting(True, "add a Received-SPF header (RFC 7208 9.1) at the queue stage")
    show_explanation: bool = setting(True, "quote the domain's exp= explanation in a fail reply")


@dataclass(frozen=True, slots=True)
class SpfResult:
    """The outcome of one check, for the header, Authentication-Results and DMARC.

    :param result: ``pass``, ``fail``, ``softfail``, ``neutral``, ``none``,
        ``temperror`` or ``permerror`` (RFC 7208 §2.6)
    :param identity: ``mailfrom`` or ``helo`` (RFC 7208 §2.3, §2.4)
    :param domain: the domain checked (the sender's, or the HELO name)
    :param sender: the MAIL FROM address, ``""`` for the null sender
    :param client_ip: the SMTP client's address
    :param helo: the HELO/EHLO name the client gave
    :param receiver: our host name, as the header's ``receiver``
    :param explanation: the domain's ``exp=`` text for a fail, sanitised; ``None`` if none
    :param problem: why a permerror or temperror happened
    :param mechanism: the directive of the record that matched, if one did
    """

    result: str
    identity: Literal["mailfrom", "helo"]
    domain: str
    sender: str
    client_ip: str
    helo: str
    receiver: str = "unknown"
    explanation: str | None = None
    problem: str = ""
    mechanism: str = ""


SPF_RESULT = StashKey[SpfResult]("mail_spf.result")

# RFC 7372 §3.2: X.7.23 "SPF validation failed", X.7.24 "SPF validation error".
_STATUS = {
    ("reject", "fail"): (550, "5.7.23"),
    ("reject", "permerror"): (550, "5.7.24"),
    ("reject", "temperror"): (550, "5.7.24"),
    ("tempfail", "fail"): (451, "4.7.23"),
    ("tempfail", "permerror"): (451, "4.7.24"),
    ("tempfail", "temperror"): (451, "4.7.24"),
}
_UNSAFE_TEXT = re.compile(r"[\x00-\x1f\x7f]+")
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_DOT_ATOM = re.compile(rf"^[{_ATEXT}]+(\.[{_ATEXT}]+)*$")


def _clean(text: str, limit: int = _TEXT_LIMIT) -> str:
    """Text from the client or a DNS record, made safe for one reply or header line."""
    return _UNSAFE_TEXT.sub(" ", text).strip()[:limit]


def _is_spf_domain(domain: str) -> bool:
    """RFC 7208 §4.3: only a well-formed multi-label name is checked; else "none"."""
    name = domain[:-1] if domain.endswith(".") else domain
    if not name or len(name) > 253 or "." not in name or name.startswith("["):
        return False
    return all(0 < len(label) < 64 for label in name.split("."))


def _identity(sender: str, helo: str) -> tuple[Literal["mailfrom", "helo"], str, str]:
    """(identity, local part, domain) to check for this sender and HELO name."""
    if not sender:
        return "helo", "postmaster", helo
    # The domain follows the last "@": a quoted local part may hold one.
    local, _, domain = sender.rpartition("@")
    return "mailfrom", local or "postmaster", domain  # RFC 7208 §4.3: empty local part


def check_spf(
    resolver: BlockingResolver,
    client_ip: str,
    sender: str,
    helo: str,
    *,
    receiver: str = "unknown",
    max_time: float = 10.0,
) -> SpfResult:
    """Run ``check_host()`` (RFC 7208 §4) for one client: blocking, run it in a thread.

    :param resolver: the blocking resolver pyspf's lookups go to
    :param client_ip: the SMTP client's address
    :param sender: the MAIL FROM address, ``""`` for ``<>`` (then the HELO name is checked)
    :param helo: the HELO/EHLO argument
    :param receiver: our host name, for the ``%{r}`` macro and the header
    :param max_time: time limit of the whole check; past it, temperror
    :returns: the result; library failures come back as temperror, never raised
    """
    identity, local, domain = _identity(sender, helo)
    base = SpfResult("none", identity, domain, sender, client_ip, helo, receiver)
    if not _is_spf_domain(domain):
        return base
    try:
        address = ipaddress.ip_address(client_ip.partition("%")[0])
    except ValueError:
        return replace(base, result="none", problem="no client IP address")
    try:
        query = SpfQuery(resolver, time.monotonic() + max_time, i=str(address), s=sender, h=helo, receiver=receiver)
        # pyspf splits at the first "@"; set the parts it would get wrong (quoted locals).
        query.l, query.o, query.d = local, domain, domain
        # An empty default makes any explanation pyspf returns the domain's own exp= text.
        query.set_default_explanation("")
        outcome, _code, text = query.check()
    except Exception:  # boundary: a third-party library must not decide by crashing
        log.exception("pyspf failed checking %s for %s", domain[:100], client_ip)
        return replace(base, result="temperror", problem="internal error in the SPF library")
    if outcome not in RESULTS:
        log.warning("pyspf returned %r for %s; treated as temperror", outcome, domain[:100])
        return replace(base, result="temperror", problem=f"unexpected SPF result {outcome!r}")
    mechanism = _clean(str(query.mechanism or ""))
    if outcome in ("permerror", "temperror"):
        # pyspf prefixes "SPF Permanent Error: " / "SPF Temporary Error: ".
        return replace(base, result=outcome, problem=_clean(text.partition(": ")[2] or text), mechanism=mechanism)
    explanation = _clean(text) if outcome == "fail" and text else None
    return replace(base, result=outcome, explanation=explanation or None, mechanism=mechanism)


def _reply(result: SpfResult, action: Action, settings: Settings) -> Reply:
    code, status = _STATUS.get((action, result.result), (550, "5.7.1") if action == "reject" else (451, "4.7.1"))
    domain = _clean(result.domain, 100) or "(unknown)"
    texts = {
        "fail": f"SPF fail: {domain} does not authorize {result.client_ip} to send its mail",
        "softfail": f"SPF softfail: {domain} discourages mail from {result.client_ip}",
        "neutral": f"SPF neutral: {domain} neither permits nor denies {result.client_ip}",
        "none": f"SPF none: {domain} publishes no SPF policy",
        "permerror": f"SPF permanent error for {domain}: {result.problem}",
        "temperror": f"SPF temporary error for {domain}, try again later",
    }
    text = texts.get(result.result, f"SPF {result.result} for {domain}")
    if result.result == "fail" and result.explanation and settings.show_explanation:
        # RFC 7208 §6.2: the explanation is for the sender; it is sanitised and cut.
        text += f": {result.explanation}"
    return Reply(code, status, text)


def apply(txn: Transaction, result: SpfResult, settings: Settings) -> Verdict | None:
    """Record ``result`` on the transaction and take the action its setting names.

    :param txn: the transaction: gets the stash entry, the auth result and any score
    :param result: the check's outcome
    :param settings: the actions and scores per result
    :returns: a reject or tempfail verdict, or ``None``
    """
    txn.stash[SPF_RESULT] = result
    ptype = ("smtp.mailfrom", result.sender) if result.identity == "mailfrom" else ("smtp.helo", result.helo)
    add_result(txn, AuthResult("spf", result.result, reason=result.problem, properties=(ptype,)))
    action: Action = getattr(settings, f"{result.result}_action", "ignore")
    reason = f"SPF {result.result} for {result.identity} {result.domain[:100]} from {result.client_ip}"
    if action == "score":
        txn.results.add("mail_spf", getattr(settings, f"{result.result}_score"), reason)
    elif action == "reject":
        return Verdict.reject(_reply(result, action, settings), reason=reason)
    elif action == "tempfail":
        return Verdict.tempfail(_reply(result, action, settings), reason=reason)
    return None


_COMMENTS = {
    "pass": "domain of {who} designates {ip} as permitted sender",
    "fail": "domain of {who} does not designate {ip} as permitted sender",
    "softfail": "domain of transitioning {who} does not designate {ip} as permitted sender",
    "neutral": "{ip} is neither permitted nor denied by domain of {who}",
    "none": "domain of {who} does not designate permitted sender hosts",
    "permerror": "permanent error in processing domain of {who}: {problem}",
    "temperror": "temporary error in processing during lookup of {who}: {problem}",
}


def _quote(value: str) -> str:
    """A dot-atom, or a quoted-string (RFC 5322 §3.2.4) that cannot break the header."""
    value = _UNSAFE_TEXT.sub("?", value)[:256]
    if _DOT_ATOM.match(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def received_spf(result: SpfResult) -> str:
    """The ``Received-SPF`` header value (RFC 7208 §9.1), folded with ``\\n\\t``."""
    who = result.sender if result.identity == "mailfrom" else result.helo
    comment = _COMMENTS[result.result].format(who=who, ip=result.client_ip, problem=result.problem)
    # ctext excludes "(", ")" and "\" (RFC 5322 §3.2.2): drop them rather than escape.
    comment = _clean(f"{result.receiver}: {comment}", 400).translate({40: None, 41: None, 92: None})
    pairs = [
        ("receiver", result.receiver),
        ("client-ip", result.client_ip),
        ("envelope-from", result.sender),
        ("helo", result.helo),
        ("identity", result.identity),
    ]
    if result.mechanism:
        pairs.append(("mechanism", result.mechanism))
    if result.problem:
        pairs.append(("problem", result.problem))
    return f"{result.result} ({comment})" + "".join(f"\n\t{key}={_quote(value)};" for key, value in pairs)


class Plugin:
    """Asks the blocking view of the gateway's resolver; keeps one of its own per
    ``[dns]`` configuration only for a gateway that has none."""

    def __init__(self) -> None:
        self._resolvers: dict[DnsSettings, BlockingResolver] = {}

    def _resolver(self, gateway: Gateway) -> BlockingResolver:
        if gateway.resolver is not None:
            # The gateway's own: recorded under capture, answered from the record in replay.
            resolver: BlockingResolver = gateway.resolver.blocking()
            return resolver
        settings = gateway.policy.dns
        if settings not in self._resolvers:
            self._resolvers[settings] = make_sync_resolver(settings)
        return self._resolvers[settings]

    @hookimpl
    async def gateway_startup(self, gateway: Gateway) -> None:
        # Reading /etc/resolv.conf is file I/O: keep it off the event loop.
        await gateway.run_in_thread(self._resolver, gateway)

    @hookimpl
    async def gateway_mail(
        self, session: Session, txn: Transaction, sender: Address, gateway: Gateway, settings: Settings
    ) -> Verdict | None:
        if session.is_relay_client or session.is_authenticated:
            return None  # our own users: SPF judges other domains' mail to us
        if sender.is_null and not settings.check_helo_for_null_sender:
            return None
        sender_text, helo = str(sender), session.helo or ""
        try:
            async with asyncio.timeout(settings.max_time + _GRACE):
                result = await gateway.run_in_thread(
                    check_spf,
                    self._resolver(gateway),
                    session.peer_ip,
                    sender_text,
                    helo,
                    receiver=gateway.hostname,
                    max_time=settings.max_time,
                )
        except TimeoutError:
            identity, _, domain = _identity(sender_text, helo)
            result = SpfResult(
                "temperror", identity, domain, sender_text, session.peer_ip, helo, gateway.hostname,
                problem="SPF check timed out",
            )
        log.debug("session=%s txn=%s spf=%s domain=%s", session.id, txn.id, result.result, result.domain[:100])
        return apply(txn, result, settings)

    @hookimpl
    def gateway_queue(self, txn: Transaction, message: Message, settings: Settings) -> None:
        result = txn.stash.get(SPF_RESULT)
        if result is not None and settings.add_header:
            message.prepend_header("Received-SPF", received_spf(result))
