"""Flushing held mail for one domain (serialmail, ``ETRN``): what matches, what is waiting.

A ``[[routes]]`` entry with ``hold = true`` keeps its mail in the queue: the scheduler
does not try it. ``gateway queue flush DOMAIN`` and the SMTP ``ETRN`` command (RFC 1985)
release the mail queued for that domain *now* for one delivery run: the running
gateway's scheduler is told through the queue's trigger FIFO (a line
``flush <target>``), finds the messages that have a pending recipient in the domain,
and delivers those recipients once, held or not. What fails is held again; mail that
arrives later is held again.

A flush target is ``domain`` (that domain only) or ``@domain`` (the domain and its
subdomains, RFC 1985 §5.2).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.delivery.router import domain_of
from gateway.model import QueuedRecipient, RecipientState
from gateway.queue.store import CorruptQueueFile

if TYPE_CHECKING:
    from gateway.queue import QueueStore

__all__ = ["FlushTarget", "TRIGGER_PREFIX", "matching_messages", "parse_target"]

log = logging.getLogger(__name__)

TRIGGER_PREFIX = "flush "
"""A trigger FIFO line starting with this asks the scheduler for a flush."""

_MAX_DOMAIN = 255


@dataclass(frozen=True, slots=True)
class FlushTarget:
    """What a flush covers: ``domain`` (lower case), and its subdomains when asked."""

    domain: str
    subdomains: bool = False

    def covers(self, address: str) -> bool:
        """Whether the recipient ``address`` is in this target."""
        domain = domain_of(address)
        if domain is None:
            return False
        return domain == self.domain or (self.subdomains and domain.endswith("." + self.domain))

    def __str__(self) -> str:
        return ("@" if self.subdomains else "") + self.domain


def parse_target(text: str) -> FlushTarget:
    """Parse ``domain`` or ``@domain`` (a trailing dot and case are ignored).

    :raises ValueError: for an empty or malformed domain, or a ``#queue`` name
    """
    text = text.strip()
    subdomains = text.startswith("@")
    name = (text[1:] if subdomains else text).lower().rstrip(".")
    if text.startswith("#"):
        raise ValueError("named queues are not supported")
    if not name or len(name) > _MAX_DOMAIN or name.startswith(".") or ".." in name:
        raise ValueError(f"bad domain {text[:64]!r}")
    if not all(c.isascii() and (c.isalnum() or c in "-._") for c in name):
        raise ValueError(f"bad domain {text[:64]!r}")
    return FlushTarget(name, subdomains)


def waiting(recipients: list[QueuedRecipient], target: FlushTarget) -> list[QueuedRecipient]:
    """The pending recipients of a message that ``target`` covers."""
    return [r for r in recipients if r.state is RecipientState.PENDING and target.covers(r.address)]


def matching_messages(store: QueueStore, target: FlushTarget) -> list[str]:
    """The queue ids with a pending recipient in ``target``, in arrival order.

    Synchronous (reads every envelope): run it in a thread. Messages put on hold by hand
    (``gateway queue hold``) are left out: a flush does not override the operator.
    """
    found = []
    for qid in store.ids():
        try:
            item = store.load(qid)
        except FileNotFoundError:
            continue  # delivered meanwhile
        except (CorruptQueueFile, OSError, ValueError) as exc:  # a damaged file must not stop the scan
            log.warning("flush: cannot read qid=%s: %s", qid, exc)
            continue
        if not item.held and waiting(item.envelope.recipients, target):
            found.append(qid)
    return found
