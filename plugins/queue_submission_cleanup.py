"""Clean up mail submitted by our own users, as a submission server must (RFC 6409 §8).

Hook: ``gateway_queue``. Only for the sessions it is meant for: authenticated ones
(``authenticated``, default true) and, with ``relay_clients``, the relay client networks
(``[relay] clients``). Any other mail passes through unchanged, byte for byte.

For those sessions, before the message is queued:

- ``add_date``: a message without ``Date:`` gets one, now, in RFC 5322 form;
- ``add_message_id``: a message without ``Message-ID:`` gets
  ``<queue id.random@domain>``, the domain being ``message_id_domain`` (default:
  ``[server] hostname``);
- ``remove_bcc``: ``Bcc:`` and ``Resent-Bcc:`` headers are removed (RFC 5322 §3.6.3: the
  blind copies must not be disclosed to the other recipients);
- ``remove_received`` (default false): the ``Received:`` headers already in the message
  are removed; they were written on the user's side (a local relay or the client
  itself) and tell recipients about the user's internal network;
- ``hide_client`` (default false): our own ``Received:`` header (``queue_received_header``)
  leaves out the client's HELO name and address, like a locally submitted message's.

Put it before ``queue_dkim_sign`` (so the signature covers the added ``Date:`` and
``Message-ID:``) and before ``queue_received_header``. Adds no results.
"""

from __future__ import annotations

import email.utils
import logging
import secrets
from dataclasses import dataclass

from gateway.context import Gateway
from gateway.hooks import hookimpl
from gateway.model import Message, Session, Transaction
from gateway.policy import setting
from plugins.queue_received_header import HIDE_CLIENT

__all__ = ["Settings", "applies", "clean_up"]

log = logging.getLogger("plugins.queue_submission_cleanup")


@dataclass(frozen=True)
class Settings:
    """Settings of ``queue_submission_cleanup``."""

    authenticated: bool = setting(True, "clean up mail of authenticated sessions")
    relay_clients: bool = setting(False, "clean up mail of relay client networks ([relay] clients)")
    add_date: bool = setting(True, "add a missing Date: header")
    add_message_id: bool = setting(True, "add a missing Message-ID: header")
    message_id_domain: str = setting("", "domain of added Message-IDs; empty = [server] hostname")
    remove_bcc: bool = setting(True, "remove Bcc: and Resent-Bcc: headers")
    remove_received: bool = setting(False, "remove the Received: headers the client's side wrote")
    hide_client: bool = setting(False, "our Received: header leaves out the client's HELO and address")


def applies(session: Session, settings: Settings) -> bool:
    """Whether this session's mail is submitted mail to clean up."""
    return (settings.authenticated and session.is_authenticated) or (
        settings.relay_clients and session.is_relay_client
    )


def clean_up(message: Message, queue_id: str, hostname: str, settings: Settings) -> list[str]:
    """Apply the clean-up to ``message``; return what was done, for the log line."""
    done = []
    if settings.remove_bcc:
        removed = message.remove_headers("Bcc") + message.remove_headers("Resent-Bcc")
        if removed:
            done.append(f"removed {removed} Bcc")
    if settings.remove_received:
        removed = message.remove_headers("Received")
        if removed:
            done.append(f"removed {removed} Received")
    # Prepended in reverse, so they read Date, Message-ID after our trace headers.
    if settings.add_message_id and not message.header_values("Message-ID"):
        domain = settings.message_id_domain or hostname
        message.prepend_header("Message-ID", f"<{queue_id}.{secrets.token_hex(6)}@{domain}>")
        done.append("added Message-ID")
    if settings.add_date and not message.header_values("Date"):
        message.prepend_header("Date", email.utils.format_datetime(email.utils.localtime()))
        done.append("added Date")
    return done


@hookimpl
def gateway_queue(
    session: Session, txn: Transaction, message: Message, gateway: Gateway, settings: Settings
) -> None:
    if not applies(session, settings):
        return
    if settings.hide_client:
        txn.stash[HIDE_CLIENT] = True
    done = clean_up(message, txn.queue_id or "", gateway.hostname, settings)
    if done:
        log.info("submission clean-up: %s", ", ".join(done))
