"""ARC verification (RFC 8617): does the chain of intermediaries' seals hold?

Hook: ``gateway_data``. Reads the message's ARC sets as received (``message.raw``, in the
thread pool) and
checks, in this order (RFC 8617 §5.2):

1. structure: at most 50 sets (§4.2.1), every instance from 1 to the highest present
   exactly once with its ARC-Seal, ARC-Message-Signature and ARC-Authentication-Results,
   ``cv=none`` at ``i=1`` and ``cv=pass`` above it (a ``cv=fail`` ends the chain);
2. keys: every sealer's and signer's ``<s>._domainkey.<d>`` TXT record, fetched in
   parallel through the gateway's resolver (the policy's ``[dns]`` section);
3. signatures: the newest ARC-Message-Signature and every ARC-Seal, checked by dkimpy
   in the gateway's thread pool against the records fetched.

Records ``arc=pass``, ``arc=fail`` (with a ``reason=`` naming the fault) or ``arc=none``
(no ARC header field) with :func:`gateway.authres.add_result`; the comment names the
newest sealer and its instance (``arc=pass (i=2 d=lists.example.org s=arc1)``). A key
lookup that fails temporarily fails the chain too (ARC defines no temperror; the chain
only ever adds trust). Stashes an :class:`ArcVerdict` under :data:`ARC_RESULT`, with
every set's sealer and the results its ARC-Authentication-Results reports:
``data_dmarc`` (after this plugin) reads it for ``trusted_arc_sealers``. Counts each
verdict in ``gateway_auth_results_total{method="arc"}``. Decides nothing.

**Cost of a large message.** A message without ARC fields costs nothing (its headers are
in memory). With a chain, dkimpy needs the whole message in memory: reading the chain and
verifying it each load it in the thread pool, never on the event loop (from the file, for
a message spooled to disk), and let it go during the key lookups in between.

Settings: ``min_key_bits`` (default 1024, RFC 8301), ``check_outbound`` (default false:
mail from relay clients and authenticated users is not verified).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from gateway.authres import AuthResult, add_result, count
from gateway.context import Gateway
from gateway.dns import DnsTemporaryError
from gateway.hooks import hookimpl
from gateway.model import Message, Session, StashKey, Transaction
from plugins._arc_sync import ArcChain, ArcSet, read_chain_in_thread, verify_chain_in_thread
from plugins._mailauth import fetch_txt

__all__ = ["ARC_RESULT", "ArcVerdict", "Settings"]

log = logging.getLogger("plugins.data_arc_verify")


@dataclass(frozen=True)
class Settings:
    """Settings of ``data_arc_verify``."""

    min_key_bits: int = field(
        default=1024, metadata={"doc": "RSA keys shorter than this fail the chain (RFC 8301)", "min": 512}
    )
    check_outbound: bool = field(
        default=False, metadata={"doc": "also verify mail from relay clients and authenticated users"}
    )


@dataclass(frozen=True, slots=True)
class ArcVerdict:
    """The ARC outcome of one message.

    :param result: pass, fail or none
    :param reason: why it failed, for the header and the logs
    :param sets: the chain's sets, ``i=1`` first (empty when it failed on its structure)
    """

    result: str
    reason: str = ""
    sets: tuple[ArcSet, ...] = ()

    @property
    def sealer(self) -> str:
        """The newest set's sealing domain ("" without sets)."""
        return self.sets[-1].sealer if self.sets else ""


ARC_RESULT = StashKey[ArcVerdict]("data_arc_verify.result")

_ARC_FIELDS = frozenset({"arc-seal", "arc-message-signature", "arc-authentication-results"})


async def _fetch_records(gateway: Gateway, names: frozenset[str]) -> dict[str, bytes | None] | str:
    """Every key record at once; a temporary failure answers the reason instead."""
    timeout = float(gateway.policy.dns.timeout) + 1.0
    ordered = sorted({name.lower() for name in names})
    answers = await asyncio.gather(
        *(fetch_txt(gateway.resolver, name, timeout) for name in ordered), return_exceptions=True
    )
    out: dict[str, bytes | None] = {}
    for name, answer in zip(ordered, answers):
        if isinstance(answer, DnsTemporaryError):
            return f"key lookup failed: {name[:100]}"
        if isinstance(answer, BaseException):
            raise answer
        # RFC 6376 §3.6.2.2: with several records take the first that holds a key.
        out[name] = next((r for r in answer if b"p=" in r), answer[0] if answer else None)
    return out


def _read_chain_in_thread(message: Message) -> ArcChain:
    # message.raw reads a spooled message from disk: here, never on the event loop.
    return read_chain_in_thread(message.raw)


def _verify_chain_in_thread(message: Message, records: dict[str, bytes | None], min_key_bits: int) -> tuple[str, str]:
    return verify_chain_in_thread(message.raw, records, min_key_bits)


def _record(txn: Transaction, gateway: Gateway, verdict: ArcVerdict) -> None:
    comment = ""
    if verdict.sets:
        newest = verdict.sets[-1]
        comment = f"i={newest.instance} d={newest.sealer[:64]} s={newest.selector[:64]}"
    add_result(txn, AuthResult("arc", verdict.result, verdict.reason, comment=comment))
    txn.stash[ARC_RESULT] = verdict
    count(gateway.counters, "arc", verdict.result)


@hookimpl
async def gateway_data(
    session: Session, txn: Transaction, message: Message, gateway: Gateway, settings: Settings
) -> None:
    if not settings.check_outbound and (session.is_relay_client or session.is_authenticated):
        return None
    if not _ARC_FIELDS.intersection(message.header_names()):
        chain = ArcChain()  # the common case: no thread hop for a message without ARC fields
    else:
        chain = await gateway.run_in_thread(_read_chain_in_thread, message)
    if chain.error:
        verdict = ArcVerdict("fail", chain.error)
    elif not chain.sets:
        verdict = ArcVerdict("none")
    else:
        records = await _fetch_records(gateway, chain.keys)
        if isinstance(records, str):
            verdict = ArcVerdict("fail", records, chain.sets)
        else:
            result, reason = await gateway.run_in_thread(
                _verify_chain_in_thread, message, records, settings.min_key_bits
            )
            verdict = ArcVerdict(result, reason, chain.sets)
    _record(txn, gateway, verdict)
    if verdict.result == "none":
        log.debug("txn=%s arc=none", txn.id)
    else:
        log.info(
            "txn=%s arc=%s sets=%d sealer=%s%s", txn.id, verdict.result, len(verdict.sets),
            verdict.sealer[:64] or "-", f": {verdict.reason}" if verdict.reason else "",
        )
    return None
