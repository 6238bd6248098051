"""Spam filtering through rspamd's HTTP protocol (``POST /checkv2`` to a normal worker).

Hooks: ``gateway_startup`` (``GET /ping``, for at most 3 s; if rspamd does not answer, a
WARNING says what that means: every message will get 451, or pass unscanned with
``on_scanner_error = "continue"``; start-up goes on), ``gateway_probe`` (the same
``/ping`` for ``gateway check --probe``) and ``gateway_data`` (checks each message).

The message goes to rspamd at ``address`` (``host:port``, or a Unix socket path) with
what the SMTP session knows as request headers: ``IP``, ``Helo``, ``From``, one ``Rcpt``
per recipient, ``Queue-Id``, ``User`` (authenticated sessions only), ``MTA-Name``,
``TLS-Version``/``TLS-Cipher`` and, if set, ``settings_id`` as ``Settings-ID``. The
client is a small HTTP/1.1 client on asyncio streams (``plugins/_http.py``), under
``connect_timeout`` and ``scan_timeout``; the message is the body, with its
``Content-Length``, written a chunk at a time as it is read (a message spooled to disk
is never loaded whole). The hook is :func:`~gateway.hooks.independent`: beside
``data_clamav`` or ``data_spamd`` in the chain, the scans run at the same time and the
outcome follows the chain's order.

rspamd answers with an action, which this plugin maps through its settings to one of
``reject`` (550 5.7.1), ``tempfail`` (451 4.7.1), ``quarantine``, ``rewrite_subject``
(the Subject rspamd proposes, or ``subject_prefix`` before the old one), ``tag`` (headers
only) or ``ignore``:

===================  ============================  =================
rspamd action        setting                       default
===================  ============================  =================
reject               ``reject_action``             ``reject``
soft reject          ``soft_reject_action``        ``tempfail``
rewrite subject      ``rewrite_subject_action``    ``rewrite_subject``
add header           ``add_header_action``         ``tag``
greylist             ``greylist_action``           ``tempfail``
no action            (always)                      ``ignore``
===================  ============================  =================

On top of that, ``reject_score`` and ``quarantine_score`` (off by default) act on
rspamd's score; the stronger outcome wins (reject, tempfail, quarantine, then the rest).
With ``add_headers`` (default true) the message gets ``X-Spam-Status: Yes|No,
score=.. required=.. action=.. tests=..`` and ``X-Spam-Score`` ("Yes" when the outcome
is anything but ``ignore`` or ``tempfail``); client-sent copies are removed. With
``milter_headers`` (default false) the headers rspamd's ``milter_headers`` module asks
for (``milter.add_headers`` / ``remove_headers`` in its answer) are applied as well.
``scoring_weight`` (default 0: off) adds ``score × scoring_weight`` to the
transaction's results for the policy's ``[scoring]`` step.

Messages over ``max_size`` are not scanned. rspamd down, too slow or answering an
error: ``on_scanner_error``, ``tempfail`` (default, ``451 4.7.1 Spam scanner
unavailable, try again later``) or ``continue`` (pass unscanned); a WARNING names the
plugin. Start-up refuses a policy where ``connect_timeout`` plus ``scan_timeout`` is
not below the chain entry's ``timeout`` (30 s by default), or ``address`` is malformed.

Settings: ``address``, ``connect_timeout``, ``scan_timeout``, ``max_size``,
``settings_id``, ``reject_action``, ``soft_reject_action``, ``rewrite_subject_action``,
``add_header_action``, ``greylist_action``, ``subject_prefix``, ``quarantine_score``,
``reject_score``, ``add_headers``, ``milter_headers``, ``scoring_weight``,
``on_scanner_error``. Put it after ``data_clamav``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from gateway.content import Content
from gateway.context import Gateway
from gateway.hooks import hookimpl, independent, wait_for_turn
from gateway.model import Message, Session, Transaction
from gateway.policy import Duration, Size, setting
from gateway.probe import Probes, startup_probe
from gateway.verdicts import Action, Reply, Verdict
from plugins._http import http_request
from plugins._rspamd_reply import RspamdReply, apply_milter_headers, parse_checkv2, rewrite_subject
from plugins._scanner import (
    REPLY_SPAM,
    OnScannerError,
    ScannerError,
    SpamResult,
    check_entries,
    format_score,
    scanner_unavailable,
    skip_if_too_big,
    spam_headers,
    threshold_verdict,
    unavailable_consequence,
)

__all__ = ["Outcome", "Settings", "decide", "request_headers", "rspamd_check", "rspamd_ping"]

NAME = "data_rspamd"
log = logging.getLogger(f"plugins.{NAME}")

REPLY_UNAVAILABLE = Reply(451, "4.7.1", "Spam scanner unavailable, try again later")
REPLY_LATER = Reply(451, "4.7.1", "Message deferred, please try again later")
DEFAULT_PORT = 11333

Outcome = Literal["reject", "tempfail", "quarantine", "rewrite_subject", "tag", "ignore"]
# Strongest first: the stronger of the action's and the thresholds' outcomes wins.
_RANK: dict[str, int] = {
    "reject": 5, "tempfail": 4, "quarantine": 3, "rewrite_subject": 2, "tag": 1, "ignore": 0,
}


@dataclass(frozen=True)
class Settings:
    """Settings of ``data_rspamd``."""

    address: str = setting("127.0.0.1:11333", "rspamd normal worker: host:port, or a Unix socket path")
    connect_timeout: Duration = setting(5.0, "longest wait to connect to rspamd", min=0.001)
    scan_timeout: Duration = setting(15.0, "longest wait for rspamd's answer once connected", min=0.001)
    max_size: Size = setting(20 * 1024**2, "larger messages are not scanned", min=1)
    settings_id: str = setting("", "rspamd settings id to apply (Settings-ID header); empty: none")
    reject_action: Outcome = setting("reject", "outcome of rspamd's 'reject'")
    soft_reject_action: Outcome = setting("tempfail", "outcome of rspamd's 'soft reject'")
    rewrite_subject_action: Outcome = setting("rewrite_subject", "outcome of rspamd's 'rewrite subject'")
    add_header_action: Outcome = setting("tag", "outcome of rspamd's 'add header'")
    greylist_action: Outcome = setting("tempfail", "outcome of rspamd's 'greylist'")
    subject_prefix: str = setting("[SPAM]", "put before the Subject when rspamd proposes none")
    quarantine_score: float | None = setting(None, "quarantine at or above this score; default: off")
    reject_score: float | None = setting(None, "reject (550 5.7.1) at or above this score; default: off")
    add_headers: bool = setting(True, "add X-Spam-Status and X-Spam-Score headers")
    milter_headers: bool = setting(False, "also apply rspamd's milter.add_headers/remove_headers")
    scoring_weight: float = setting(0.0, "add score x weight to the transaction's results; 0: off")
    on_scanner_error: OnScannerError = setting(
        "tempfail", "rspamd down or failing: tempfail (451 4.7.1) or continue (pass unscanned)"
    )


def request_headers(session: Session, txn: Transaction, hostname: str, settings: Settings) -> list[tuple[str, str]]:
    """The ``/checkv2`` request headers for this session and transaction (rspamd protocol)."""
    headers = [("IP", session.peer_ip)]
    if session.helo:
        headers.append(("Helo", session.helo))
    headers.append(("From", str(txn.sender) if not txn.sender.is_null else "<>"))
    headers += [("Rcpt", str(r.address)) for r in txn.recipients]
    if txn.queue_id:
        headers.append(("Queue-Id", txn.queue_id))
    if session.auth_login is not None:
        headers.append(("User", session.auth_login))
    headers.append(("MTA-Name", hostname))
    if session.tls_version:
        headers += [("TLS-Version", session.tls_version), ("TLS-Cipher", session.tls_cipher or "")]
    if settings.settings_id:
        headers.append(("Settings-ID", settings.settings_id))
    return headers


async def rspamd_check(data: bytes | Content, headers: list[tuple[str, str]], settings: Settings) -> RspamdReply:
    """Ask rspamd about ``data``.

    :param data: the message (``message.content``), sent as it is read
    :param headers: the request headers (see :func:`request_headers`)
    :param settings: where rspamd is and how long to wait
    :raises ScannerError: rspamd is unreachable, too slow, or answered an error
    """
    response = await http_request(
        settings.address, DEFAULT_PORT, "POST", "/checkv2", headers, data,
        connect_timeout=settings.connect_timeout, timeout=settings.scan_timeout,
    )
    if response.status != 200:
        raise ScannerError(f"rspamd answered HTTP {response.status} {response.reason[:80]}")
    return parse_checkv2(response.body)


def decide(reply: RspamdReply, settings: Settings) -> tuple[Outcome, str]:
    """The outcome for rspamd's answer, through the action map and the score thresholds.

    :returns: the outcome and the reason for the log
    """
    by_action: dict[str, Outcome] = {
        "reject": settings.reject_action,
        "soft reject": settings.soft_reject_action,
        "rewrite subject": settings.rewrite_subject_action,
        "add header": settings.add_header_action,
        "greylist": settings.greylist_action,
        "no action": "ignore",
    }
    outcome = by_action.get(reply.action)
    if outcome is None:
        log.warning("%s: unknown rspamd action %r, taken as no action", NAME, reply.action[:40])
        outcome = "ignore"
    reason = f"rspamd action '{reply.action}' score {format_score(reply.score)}"
    threshold = threshold_verdict(reply.score, settings.quarantine_score, settings.reject_score, "rspamd")
    if threshold is not None:
        by_score: Outcome = "reject" if threshold.action is Action.REJECT else "quarantine"
        if _RANK[by_score] > _RANK[outcome]:
            outcome, reason = by_score, threshold.reason
    return outcome, reason


async def rspamd_ping(settings: Settings) -> str:
    """Check that rspamd answers ``GET /ping`` with ``pong``.

    :returns: its answer, ``"pong"``
    :raises ScannerError: it does not
    """
    response = await http_request(
        settings.address, DEFAULT_PORT, "GET", "/ping", [], b"",
        connect_timeout=settings.connect_timeout, timeout=settings.scan_timeout,
    )
    if response.status != 200 or not response.body.startswith(b"pong"):
        raise ScannerError(f"rspamd answered {response.status} {response.body[:40]!r} to /ping")
    return "pong"


@hookimpl
async def gateway_startup(gateway: Gateway, settings: Settings) -> None:
    check_entries(gateway, NAME, Settings, DEFAULT_PORT)  # a policy that cannot work stops start-up
    consequence = unavailable_consequence(settings.on_scanner_error, REPLY_UNAVAILABLE)
    await startup_probe(log, NAME, "rspamd", settings.address, lambda: rspamd_ping(settings), consequence)


@hookimpl
async def gateway_probe(settings: Settings, probes: Probes) -> None:
    await probes.add(NAME, "rspamd", settings.address, lambda: rspamd_ping(settings))


@hookimpl
@independent
async def gateway_data(
    session: Session, txn: Transaction, message: Message, gateway: Gateway, settings: Settings
) -> Verdict | None:
    if skip_if_too_big(log, NAME, message, settings.max_size):
        return None
    headers = request_headers(session, txn, gateway.hostname, settings)
    try:
        reply = await rspamd_check(message.content, headers, settings)
    except ScannerError as exc:
        await wait_for_turn()
        return scanner_unavailable(log, NAME, exc, settings.on_scanner_error, REPLY_UNAVAILABLE)
    await wait_for_turn()  # changes and decisions in chain order (gateway.hooks.independent)
    outcome, reason = decide(reply, settings)
    log.info("%s: action=%r score=%s outcome=%s symbols=%s", NAME, reply.action, format_score(reply.score),
             outcome, ",".join(reply.symbols[:20]))
    if settings.scoring_weight:
        txn.results.add(NAME, reply.score * settings.scoring_weight, reason)
    if outcome == "reject":
        return Verdict.reject(REPLY_SPAM, reason=reason)
    if outcome == "tempfail":
        return Verdict.tempfail(REPLY_LATER, reason=reason)
    if settings.milter_headers:
        apply_milter_headers(message, reply.milter)
    if settings.add_headers:
        is_spam = outcome != "ignore"
        result = SpamResult(reply.score, reply.required, reply.symbols, is_spam)
        spam_headers(message, result, extra=f"action={reply.action.replace(' ', '_')}")
    if outcome == "rewrite_subject":
        rewrite_subject(message, reply.subject, settings.subject_prefix)
    if outcome == "quarantine":
        return Verdict.quarantine(reason)
    return None
