"""VERP (variable envelope return paths): a sender address per recipient.

A mailing list sends as ``list-return@lists.example.com``; with the default VERP
delimiters ``-=`` the copy for ``user@example.org`` goes out as
``list-return-user=example.org@lists.example.com`` (qmail's ``-V``, Postfix's ``XVERP``
with ``XVERP=-=``), so a bounce, even one that names nobody, tells the list which
subscriber failed.

The first delimiter is the default ``[local] extension_delimiter`` (``-``), so such a
return address of a local list is the list's own ``user-extension`` address: its bounces
reach the list user (its ``.qmail-default``, else its mailbox) with no setting changed.
With ``extension_delimiter = "+"`` ask for ``+=`` (Postfix's default) instead.

The scheduler asks :func:`for_recipient` for each recipient of a message whose envelope
has ``verp`` set: delivery then uses one SMTP transaction per recipient, and the
delivery status notifications go to that recipient's own address.
"""

from __future__ import annotations

import dataclasses
import re

from gateway.model import Envelope, QueuedRecipient

__all__ = ["DEFAULT_DELIMITERS", "VERP_CHARACTERS", "check_delimiters", "for_recipient", "verp_sender"]

# "-" first: the default [local] extension_delimiter, so a local list's VERP address
# (list-user=example.org@) is its user-extension address and its bounces are delivered.
DEFAULT_DELIMITERS = "-="
VERP_CHARACTERS = "-=+"  # as Postfix's verp_delimiter_filter: safe in any local part
# The recipient's local part must stay a plain dot-atom once embedded (RFC 5321 §4.1.2).
_DOT_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]+)*$")


def check_delimiters(value: str) -> str:
    """``value`` if it is two VERP delimiter characters, else :class:`ValueError`."""
    if len(value) != 2 or any(c not in VERP_CHARACTERS for c in value):
        raise ValueError(f"VERP delimiters must be two of {VERP_CHARACTERS!r}, not {value!r}")
    return value


def verp_sender(sender: str, recipient: str, delimiters: str) -> str:
    """``sender`` with ``recipient`` folded into its local part, or ``sender`` unchanged
    when either has no plain ``local@domain`` form (the null sender, a quoted local part,
    a bare ``postmaster``).

    :param sender: the envelope sender, ``list-return@lists.example.com``
    :param recipient: the recipient, ``user@example.org``
    :param delimiters: two characters: before the recipient, and in place of its ``@``
    """
    local, at, domain = sender.rpartition("@")
    rlocal, rat, rdomain = recipient.rpartition("@")
    if not (at and rat and local and rlocal and _DOT_ATOM.match(local) and _DOT_ATOM.match(rlocal)):
        return sender
    return f"{local}{delimiters[0]}{rlocal}{delimiters[1]}{rdomain}@{domain}"


def for_recipient(envelope: Envelope, recipient: QueuedRecipient) -> Envelope:
    """The envelope as one recipient's delivery sees it: its own VERP sender.

    The copy shares the recipients list (the scheduler records states on the original).
    """
    if not envelope.verp or not envelope.sender:
        return envelope
    sender = verp_sender(envelope.sender, recipient.address, envelope.verp)
    return dataclasses.replace(envelope, sender=sender)
