"""ARC sealing (RFC 8617 §5.1): vouch for mail this gateway changed or passes on.

Hooks: ``gateway_startup`` (loads the key in the thread pool; a missing, unreadable or
too small key, or a chain that lists ``queue_footer`` after this plugin, stops start-up
or refuses the reload), ``gateway_queue`` (seals mail as it is queued) and
``gateway_deliver`` (seals forwards as they leave).

A footer breaks the author's DKIM signature; the next hop can still see that the
message was authentic when it reached us if we add an ARC set: an
``ARC-Authentication-Results`` (``i=N``, our authserv-id and every result the plugins
recorded: spf, dkim, arc, dmarc; ``arc=none`` when no plugin looked at a message
without a chain), an ``ARC-Message-Signature`` over the message as it
leaves (its body with the footer, and the fields of ``headers`` present) and an
``ARC-Seal`` over the chain, with ``cv=`` from ``data_arc_verify``'s verdict (``none``
for the first set). Receivers that trust our domain as a sealer can then accept the
message although the author's DMARC check fails there.

``when`` chooses the mail sealed: ``changed`` (the default) seals only messages whose
content a plugin changed (``queue_footer`` notes its footer with
:func:`gateway.authres.note_change`), ``always`` every message. A message with an ARC
chain but no ``arc=`` result (``data_arc_verify`` not in the chain, or skipped for a
relay client) is not sealed: the chain cannot be continued without knowing its status.
A chain at 50 sets is not sealed either (RFC 8617 §4.2.1). Both are logged.

**Forwards** (``seal_forwards``, default true). Mail a local recipient's alias,
``.forward`` or ``.qmail`` ``&address`` line sends on to another domain leaves through
delivery, not the queue stage; ``gateway_deliver`` seals it on each attempt to a
recipient outside ``[local] domains`` that is such a forward: an expanded alias or
``.forward`` target (its ORCPT names another address, in one of our domains) or a
``.qmail`` forward (queued by the gateway itself, not the null sender, with our
``Delivered-To`` line). The ARC-Authentication-Results then copies the
``Authentication-Results`` field of ours that the message got when it was received
(``queue_authentication_results`` must be in the chain: without it nothing is sealed),
and its ``arc=`` result gives ``cv=``. A message we sealed already when it was queued
(a footer) is not sealed a second time: our first seal covers it.

The key is a DKIM key (RSA: ARC signs with rsa-sha256): the same ``key_file`` and
``selector`` as a ``queue_dkim_sign`` entry serve, its ``<selector>._domainkey.<domain>``
record is what receivers fetch. Place the plugin after ``queue_footer`` and
``queue_dkim_sign`` (so the signature it makes covers the final body) and before
``queue_received_header``. Signing runs in the thread pool; a sealing failure is the
entry's ``on_error`` (by default 451 4.3.0).

**Cost of a large message.** dkimpy seals bytes in memory: the final message (read from
the file, for a message spooled to disk) is joined in the thread pool, never on the event
loop, and copied once more with our Authentication-Results in place: about twice its
size in memory while a message is sealed.

Settings: ``domain`` and ``selector`` (required to seal; empty: the plugin does
nothing), ``key_file``, ``authserv_id`` (default empty: the gateway's hostname, as
``queue_authentication_results``), ``when`` (default ``changed``), ``headers`` (default
``queue_dkim_sign``'s list; dkimpy refuses DKIM-Signature and Received).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import dkim

from gateway.authres import AuthResult, changes, render, results
from gateway.context import Gateway
from gateway.hooks import hookimpl
from gateway.model import Envelope, Message, QueuedRecipient, Session, Transaction
from plugins._arc_sync import seal_in_thread
from plugins._dkim_sync import load_key_in_thread
from plugins.queue_authentication_results import HEADER, authserv_id_of
from plugins.queue_dkim_sign import DEFAULT_HEADERS

__all__ = ["Plugin", "Settings", "check_order", "is_forward", "results_to_seal"]

log = logging.getLogger("plugins.queue_arc_seal")

_ARC_HEADERS = {"arc-seal", "arc-message-signature", "arc-authentication-results"}


@dataclass(frozen=True)
class Settings:
    """Settings of ``queue_arc_seal``."""

    domain: str = field(default="", metadata={"doc": "the sealing domain (d=); empty: seal nothing"})
    selector: str = field(default="", metadata={"doc": "the s= selector; the key is at <selector>._domainkey.<domain>"})
    key_file: Path | None = field(default=None, metadata={"doc": "the RSA private key file (PEM), e.g. a DKIM signing key"})
    authserv_id: str = field(default="", metadata={"doc": "our authserv-id; empty: the gateway's hostname"})
    when: Literal["changed", "always"] = field(
        default="changed", metadata={"doc": "changed: only mail a plugin changed (footer); always: all mail"}
    )
    headers: tuple[str, ...] = field(
        default=DEFAULT_HEADERS,
        metadata={"doc": "header fields the ARC-Message-Signature covers when present"},
    )
    seal_forwards: bool = field(
        default=True, metadata={"doc": "seal mail aliases, .forward and .qmail send on to other domains"}
    )


def check_order(names: list[str]) -> None:
    """Refuse a chain that seals before it adds the footer (the seal would break)."""
    footers = [i for i, name in enumerate(names) if name == "queue_footer"]
    sealers = [i for i, name in enumerate(names) if name == "queue_arc_seal"]
    if footers and sealers and min(sealers) < max(footers):
        raise ValueError(
            "queue_footer must come before queue_arc_seal in [[plugins]]: "
            "a footer added after sealing breaks the ARC-Message-Signature"
        )


def _check_settings(settings: Settings) -> None:
    names = {h.lower() for h in settings.headers}
    if "from" not in names:
        raise ValueError("queue_arc_seal: headers must include From (RFC 8617 §4.1.2, as DKIM)")
    forbidden = sorted(names & ({h.decode() for h in dkim.DKIM.SHOULD_NOT} | _ARC_HEADERS | {"authentication-results"}))
    if forbidden:
        raise ValueError(f"queue_arc_seal: headers must not include {forbidden}")
    if settings.domain and (not settings.selector or settings.key_file is None):
        raise ValueError("queue_arc_seal: domain needs a selector and a key_file")


def results_to_seal(found: list[AuthResult], has_chain: bool) -> list[AuthResult] | None:
    """The results our ARC-Authentication-Results reports, or ``None`` if we cannot seal.

    The ``arc=`` result gives the seal's ``cv=``. Without one, a message with no chain
    gets ``arc=none`` (true, and the AAR is never an empty payload, which RFC 8601's
    syntax does not allow); a message with a chain whose status we do not know cannot
    be sealed.
    """
    if any(r.method == "arc" for r in found):
        return found
    if has_chain:
        return None
    return [*found, AuthResult("arc", "none")]


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


def is_forward(envelope: Envelope, rcpt: QueuedRecipient, message: Message, local_domains: set[str]) -> bool:
    """Whether delivering ``rcpt`` forwards the message to another domain.

    :param envelope: the queued envelope
    :param rcpt: a recipient of this attempt
    :param message: the message as queued
    :param local_domains: ``[local] domains``, lower case
    """
    if _domain(rcpt.address) in local_domains:
        return False
    # An alias or .forward target: the expansion names the alias as ORCPT (RFC 3461).
    orcpt = (rcpt.orcpt or "").partition(";")[2]
    if orcpt and orcpt.lower() != rcpt.address.lower() and _domain(orcpt) in local_domains:
        return True
    # A .qmail forward: queued anew by local delivery, with its Delivered-To line on top.
    return not envelope.client_ip and bool(envelope.sender) and bool(message.header_values("Delivered-To"))


def _message_to_seal(message: Message, ours: str, found: list[AuthResult]) -> bytes:
    """The final message with our results as the only Authentication-Results of ours.

    dkimpy takes the chain status and the ARC-Authentication-Results from that field;
    it is not signed (RFC 8617 §4.1.2), so handing dkimpy this copy changes nothing
    in what the receiver checks.
    """
    data = message.as_bytes()
    copy = Message(data)
    copy.remove_headers(HEADER, lambda value: authserv_id_of(value) == ours.lower())
    copy.prepend_header(HEADER, render(ours, found))
    return copy.as_bytes()


class Plugin:
    """Holds the loaded private key, by file."""

    def __init__(self) -> None:
        self._keys: dict[Path, bytes] = {}

    async def _key(self, gateway: Gateway, path: Path) -> bytes:
        key = self._keys.get(path)
        if key is None:
            key = await gateway.run_in_thread(load_key_in_thread, path, "rsa-sha256")
            self._keys[path] = key
        return key

    async def _sealer(self, gateway: Gateway, settings: Settings) -> tuple[str, bytes, tuple[str, ...]]:
        """What both kinds of seal are made with: our authserv-id, the key, the headers."""
        assert settings.key_file is not None
        ours = settings.authserv_id or gateway.hostname or gateway.policy.server.effective_hostname()
        key = await self._key(gateway, Path(settings.key_file))
        return ours, key, tuple(h.lower() for h in settings.headers)

    @hookimpl
    async def gateway_startup(self, gateway: Gateway, settings: Settings) -> None:
        check_order([entry.name for entry in gateway.policy.plugins])
        _check_settings(settings)
        if not settings.domain:
            return
        assert settings.key_file is not None  # _check_settings
        try:
            await self._key(gateway, Path(settings.key_file))
        except (OSError, ValueError) as exc:
            raise ValueError(f"queue_arc_seal: key for {settings.domain} ({settings.key_file}): {exc}") from exc
        log.info("ARC sealing as d=%s s=%s (%s mail)", settings.domain, settings.selector, settings.when)

    @hookimpl
    async def gateway_queue(
        self, session: Session, txn: Transaction, message: Message, gateway: Gateway, settings: Settings
    ) -> None:
        if not settings.domain or settings.key_file is None:
            return None
        changed = changes(txn)
        if settings.when == "changed" and not changed:
            return None
        found = results_to_seal(results(txn), has_chain=bool(message.header_values("ARC-Seal")))
        if found is None:
            log.info("txn=%s not sealed: the incoming ARC chain was not verified (no arc= result)", txn.id)
            return None
        ours, key, headers = await self._sealer(gateway, settings)
        try:
            made = await gateway.run_in_thread(
                _seal_in_thread, message, ours, found, settings.domain, settings.selector, key, headers
            )
        except dkim.DKIMException as exc:
            # The incoming chain is at its 50 sets, or too broken for dkimpy to continue:
            # that mail goes on unsealed rather than waiting for a seal it cannot get.
            log.warning("txn=%s not sealed: %s", txn.id, str(exc)[:200])
            return None
        if not made:
            log.info("txn=%s not sealed: dkimpy found no results of %s to seal", txn.id, ours)
            return None
        for name, value in reversed(made):  # prepend the AAR first, so the ARC-Seal ends on top
            message.prepend_header(name, value)
        cv = next((r.result for r in found if r.method == "arc"), "none")
        log.info(
            "txn=%s sealed d=%s s=%s cv=%s (%s)", txn.id, settings.domain, settings.selector,
            cv, ",".join(changed) or "always",
        )
        return None

    @hookimpl
    async def gateway_deliver(
        self, envelope: Envelope, recipients: list[QueuedRecipient], message: Message, gateway: Gateway,
        settings: Settings,
    ) -> None:
        if not settings.seal_forwards or not settings.domain or settings.key_file is None:
            return None
        local_domains = {d.lower() for d in gateway.policy.local.domains}
        forwards = [r.address for r in recipients if is_forward(envelope, r, message, local_domains)]
        if not forwards:
            return None
        ours, key, headers = await self._sealer(gateway, settings)
        try:
            made = await gateway.run_in_thread(
                _seal_forward_in_thread, message, ours, settings.domain, settings.selector, key, headers
            )
        except dkim.DKIMException as exc:
            log.warning("forward to=%s not sealed: %s", ",".join(forwards)[:200], str(exc)[:200])
            return None
        if not made:
            # No Authentication-Results of ours, or our own seal from the queue stage is there.
            log.info("forward to=%s not sealed: no results of %s to seal, or sealed already", ",".join(forwards)[:200], ours)
            return None
        for name, value in reversed(made):
            message.prepend_header(name, value)
        log.info("forward to=%s sealed d=%s s=%s", ",".join(forwards)[:200], settings.domain, settings.selector)
        return None


def _seal_forward_in_thread(
    message: Message, ours: str, domain: str, selector: str, key: bytes, headers: tuple[str, ...]
) -> list[tuple[str, str]]:
    # The Authentication-Results we wrote at reception is in the message: dkimpy reads it.
    return seal_in_thread(message.as_bytes(), domain, selector, key, ours, headers)


def _seal_in_thread(
    message: Message, ours: str, found: list[AuthResult], domain: str, selector: str, key: bytes,
    headers: tuple[str, ...],
) -> list[tuple[str, str]]:
    # Joining the final bytes copies the message: do it off the event loop too.
    return seal_in_thread(_message_to_seal(message, ours, found), domain, selector, key, ours, headers)
