"""Alias and ``.forward`` expansion inside the queue, as sendmail does it.

When the scheduler meets a pending local recipient that is an alias (or a user with a
``.forward`` file), it does not deliver to it: it asks
:func:`gateway.delivery.local.expand.expand_recipient` for the concrete targets, and
replaces the recipient by them in the message's envelope. The alias recipient is
recorded as done (``250 2.1.5``) and every target becomes a recipient of its own, with
its own state, in the same atomic state-file update. From then on each target is
delivered, retried, bounced and recorded on its own, so a crash or a temporary failure
of one target never delivers another twice.

A target recipient carries ``target`` (``\\user``, ``|command``, ``/mbox``,
``/maildir/``) and is never expanded again; an address target in another domain is an
ordinary recipient. DSNs about a target name the alias as the original recipient
(``ORCPT``), and its ``NOTIFY`` carries over.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from gateway.address import Address, AddressError
from gateway.delivery.local.aliases import ExpansionError, Leaf
from gateway.delivery.local.expand import aliases_enabled, expand_recipient
from gateway.delivery.router import split_user
from gateway.delivery.types import LocalRoute, Outcome, Route, TargetRoute
from gateway.logs import short
from gateway.model import Envelope, QueuedRecipient, RecipientState

if TYPE_CHECKING:
    from gateway.context import Gateway

__all__ = ["expand_pending", "target_route"]

log = logging.getLogger("gateway.delivery.expansion")


def target_route(rcpt: QueuedRecipient, gateway: Gateway) -> Route:
    """The route of an expanded target recipient (``rcpt.target`` is set)."""
    local = gateway.policy.local
    domain = rcpt.address.rpartition("@")[2].lower() if "@" in rcpt.address else ""
    if rcpt.target.startswith("\\"):
        user, ext = split_user(rcpt.target[1:], local.users, local.extension_delimiter)
        return LocalRoute(user, ext, domain)
    if rcpt.target.startswith("|"):
        return TargetRoute("program", rcpt.target[1:], rcpt.owner, domain)
    if rcpt.target.endswith("/"):
        return TargetRoute("maildir", rcpt.target, rcpt.owner, domain)
    return TargetRoute("mbox", rcpt.target, rcpt.owner, domain)


def _local_part(rcpt: QueuedRecipient, gateway: Gateway) -> str | None:
    """The local part to look up, or ``None`` when the recipient is not in a local domain."""
    if "@" not in rcpt.address:
        return rcpt.address.lower()  # bare <postmaster>
    try:
        parsed = Address.parse(rcpt.address)
    except AddressError:
        return None
    if parsed.domain_key not in gateway.policy.local.domains:
        return None  # a virtual domain: the local part is an extension, not a name
    return parsed.local.lower()


def _recipient(leaf: Leaf, parent: QueuedRecipient, domain: str) -> QueuedRecipient:
    orcpt = parent.orcpt or f"rfc822;{parent.address}"
    if leaf.kind == "address":
        address, target = leaf.value, ""
    elif leaf.kind == "user":
        address, target = f"{leaf.value}@{domain}" if domain else leaf.value, "\\" + leaf.value
    elif leaf.kind == "program":
        address, target = parent.address, "|" + leaf.value
    else:
        address, target = parent.address, leaf.value
    return QueuedRecipient(
        address=address, orcpt=orcpt, notify=parent.notify, target=target,
        owner=leaf.owner if leaf.kind in ("program", "mbox", "maildir") else "",
    )


def _key(rcpt: QueuedRecipient) -> tuple[str, str, str]:
    """What makes two recipients the same delivery."""
    if rcpt.target and not rcpt.target.startswith("\\"):
        # The same program or file for the same owner, whichever alias led there.
        return "", rcpt.target, rcpt.owner
    # "\\alice" and a plain alice@domain reach the same mailbox.
    return rcpt.address.lower(), "", ""


async def expand_pending(
    gateway: Gateway, envelope: Envelope, pending: list[tuple[QueuedRecipient, Route]],
) -> tuple[list[tuple[QueuedRecipient, Route | None]], dict[int, Outcome], bool]:
    """Expand the aliases among ``pending`` (recipient, route) pairs, in ``envelope``.

    :returns: the pairs to deliver now (targets in place of aliases; an address target
        in another domain has route ``None``: the caller routes it), the outcomes of
        recipients whose expansion failed (by ``id()`` of the recipient), and whether
        the envelope changed (the caller must record it before delivering)
    """
    local = gateway.policy.local
    out: list[tuple[QueuedRecipient, Route | None]] = []
    failed: dict[int, Outcome] = {}
    changed = False
    # Without an aliases file or .forward files nothing expands (expand_recipient says
    # None without reading anything): no hand-over to a pool thread per recipient.
    may_expand = aliases_enabled(local) or local.dot_forward
    for rcpt, route in pending:
        name, domain = None, ""
        if isinstance(route, LocalRoute) and not rcpt.target and may_expand:
            name, domain = _local_part(rcpt, gateway), route.domain
        if name is None:
            out.append((rcpt, route))
            continue
        try:
            leaves = await gateway.run_in_thread(expand_recipient, local, name)
        except ExpansionError as exc:
            log.warning("expansion of <%s> failed: %s", short(rcpt.address), exc.detail)
            failed[id(rcpt)] = Outcome("failed" if exc.is_permanent else "deferred", exc.reply)
            continue
        if leaves is None:
            out.append((rcpt, route))
            continue
        seen = {
            _key(r) for r in envelope.recipients
            if r is not rcpt and (r.target or r.state is not RecipientState.FAILED)
        }
        added: list[QueuedRecipient] = []
        for leaf in leaves:
            new = _recipient(leaf, rcpt, domain)
            if _key(new) in seen:
                continue
            seen.add(_key(new))
            added.append(new)
        envelope.recipients.extend(added)
        rcpt.state = RecipientState.DELIVERED
        rcpt.last_reply = f"250 2.1.5 expanded to {len(added)} recipient(s)"
        # The targets carry this recipient's NOTIFY and ORCPT: they report from now on.
        rcpt.dsn_relayed = True
        changed = True
        log.info(
            "expanded to=<%s> into %s", short(rcpt.address),
            ", ".join(short(r.target or r.address, 60) for r in added)[:400] or "(duplicates only)",
        )
        out.extend((new, target_route(new, gateway) if new.target else None) for new in added)
    return out, failed, changed
