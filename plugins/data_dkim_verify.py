"""DKIM verification (RFC 6376) of every signature on an incoming message.

Hook: ``gateway_data``. Reads each ``DKIM-Signature`` field of the message as received
(``message.raw``: headers added by other plugins are not part of what the sender
signed), fetches the selector's key record (``<s>._domainkey.<d>`` TXT) through the
gateway's own resolver (the policy's ``[dns]`` section; several keys in parallel) and
verifies the signature with dkimpy in the gateway's thread pool.

Records one ``dkim`` result per signature with :func:`gateway.authres.add_result`
(``header.d``, ``header.i`` when the signature has one, ``header.s``, ``header.b``: the
first 8 characters of ``b=``, RFC 6008), and ``dkim=none`` for an unsigned message:

- ``pass``: the signature verifies; ``fail``: it (or the body hash) does not;
- ``neutral``: a signature with syntax errors, an expired one, one that does not sign
  From (RFC 6376 §5.4), or one otherwise unprocessable (RFC 8601 §2.7.1);
- ``permerror``: no key record, a revoked or malformed key, a key shorter than
  ``min_key_bits``, or a message too malformed to parse;
- ``temperror``: the key lookup failed temporarily (SERVFAIL, timeout).

The same results, with the selector and algorithm, are stashed under :data:`DKIM_RESULTS`.
The plugin decides nothing: ``data_dmarc`` (after it in the chain) acts on aligned
results, and ``queue_authentication_results`` writes the header.

**Cost of a large message.** dkimpy needs the whole message in memory: each step that
uses it (reading the signatures, then verifying them once the keys are in) loads it in
the thread pool, never on the event loop, and lets it go before the key lookups; a
message spooled to disk is read from the file at each step, so a signed message costs
its size in memory twice, briefly, and an unsigned one once.

Settings: ``max_signatures`` (default 5: later signatures are ignored, bounding the work
a hostile message can cause), ``min_key_bits`` (default 1024, RFC 8301),
``check_outbound`` (default false: mail from relay clients and authenticated users is
what we sign, not what we verify).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from gateway.authres import AuthResult, add_result
from gateway.context import Gateway
from gateway.dns import DnsTemporaryError
from gateway.hooks import hookimpl
from gateway.model import Message, Session, StashKey, Transaction
from plugins._dkim_sync import SignatureInfo, parse_signatures_in_thread, verify_in_thread
from plugins._mailauth import fetch_txt

__all__ = ["DKIM_RESULTS", "DkimResult", "Settings"]

log = logging.getLogger("plugins.data_dkim_verify")


@dataclass(frozen=True)
class Settings:
    """Settings of ``data_dkim_verify``."""

    max_signatures: int = field(
        default=5, metadata={"doc": "verify at most this many signatures per message", "min": 1}
    )
    min_key_bits: int = field(
        default=1024, metadata={"doc": "RSA keys shorter than this give permerror (RFC 8301)", "min": 512}
    )
    check_outbound: bool = field(
        default=False, metadata={"doc": "also verify mail from relay clients and authenticated users"}
    )


@dataclass(frozen=True, slots=True)
class DkimResult:
    """The outcome for one signature.

    :param result: the RFC 8601 result (pass, fail, neutral, temperror, permerror)
    :param reason: why, for the header's ``reason=`` and the logs
    :param domain: the ``d=`` domain (what DMARC aligns on)
    :param selector: the ``s=`` selector
    :param identity: the ``i=`` identity, empty when absent
    :param algorithm: the ``a=`` algorithm
    """

    result: str
    reason: str
    domain: str
    selector: str
    identity: str
    algorithm: str


DKIM_RESULTS = StashKey[tuple[DkimResult, ...]]("data_dkim_verify.results")


def _pick_key(records: list[bytes]) -> bytes:
    # RFC 6376 §3.6.2.2: with several records the verifier may choose; take the first key.
    for record in records:
        if b"p=" in record:
            return record
    return records[0]


async def _fetch_keys(gateway: Gateway, names: set[str]) -> dict[str, list[bytes] | DnsTemporaryError]:
    """Every key record at once; a temporary failure is returned, not raised."""
    timeout = float(gateway.policy.dns.timeout) + 1.0
    ordered = sorted(names)
    answers = await asyncio.gather(
        *(fetch_txt(gateway.resolver, name, timeout) for name in ordered), return_exceptions=True
    )
    out: dict[str, list[bytes] | DnsTemporaryError] = {}
    for name, answer in zip(ordered, answers):
        if isinstance(answer, DnsTemporaryError):
            out[name] = answer
        elif isinstance(answer, BaseException):
            raise answer
        else:
            out[name] = answer
    return out


def _parse_signatures_in_thread(message: Message, limit: int) -> tuple[list[SignatureInfo], int]:
    # message.raw reads a spooled message from disk: here, never on the event loop.
    return parse_signatures_in_thread(message.raw, limit)


def _verify_in_thread(message: Message, keys: dict[int, tuple[str, bytes]], min_key_bits: int) -> dict[int, tuple[str, str]]:
    return verify_in_thread(message.raw, keys, min_key_bits)


def _auth_result(info: SignatureInfo, result: str, reason: str) -> AuthResult:
    props = [("header.d", info.domain)]
    if info.identity:
        props.append(("header.i", info.identity))
    props += [("header.s", info.selector), ("header.b", info.b_prefix)]
    return AuthResult("dkim", result, reason, tuple((k, v) for k, v in props if v))


@hookimpl
async def gateway_data(
    session: Session, txn: Transaction, message: Message, gateway: Gateway, settings: Settings
) -> None:
    if not settings.check_outbound and (session.is_relay_client or session.is_authenticated):
        return None
    infos, total = await gateway.run_in_thread(_parse_signatures_in_thread, message, settings.max_signatures)
    if total > len(infos):
        log.info("txn=%s %d DKIM signatures, verifying the first %d", txn.id, total, len(infos))
    if not infos:
        add_result(txn, AuthResult("dkim", "none"))
        txn.stash[DKIM_RESULTS] = ()
        return None

    outcome: dict[int, tuple[str, str]] = {}
    usable = [info for info in infos if not info.error]
    for info in infos:
        if info.error:
            # RFC 8601 §2.7.1: an unparsable message is permerror, a bad signature neutral.
            kind = "permerror" if info.error.startswith("message format") else "neutral"
            outcome[info.index] = (kind, info.error)
    fetched = await _fetch_keys(gateway, {info.key_name for info in usable})
    keys: dict[int, tuple[str, bytes]] = {}
    for info in usable:
        answer = fetched[info.key_name]
        if isinstance(answer, DnsTemporaryError):
            outcome[info.index] = ("temperror", "key lookup failed")
        elif not answer:
            # RFC 6376 §6.1.2: no key record is a permanent failure of this signature.
            outcome[info.index] = ("permerror", "no key for signature")
        else:
            keys[info.index] = (info.algorithm, _pick_key(answer))
    if keys:
        outcome.update(await gateway.run_in_thread(_verify_in_thread, message, keys, settings.min_key_bits))

    found = []
    for info in infos:
        result, reason = outcome[info.index]
        add_result(txn, _auth_result(info, result, reason))
        found.append(DkimResult(result, reason, info.domain, info.selector, info.identity, info.algorithm))
        log.debug("txn=%s dkim=%s d=%s s=%s %s", txn.id, result, info.domain[:64], info.selector[:64], reason)
    txn.stash[DKIM_RESULTS] = tuple(found)
    return None
