"""DKIM signing (RFC 6376) of mail our own users send: relay clients and authenticated sessions.

Hooks: ``gateway_startup`` (loads every configured key, in the thread pool; a missing,
unreadable or too small key stops start-up or refuses the reload, naming the file) and
``gateway_queue`` (signs).

The signing domain is chosen from the RFC 5322.From domain: the entry of ``domains`` for
that domain, else for its nearest parent (a key for ``example.org`` signs mail from
``news.example.org``, which DMARC's relaxed alignment accepts). Mail whose From has no
key, or not exactly one address, is passed on unsigned. Each entry names a ``selector``,
a ``key_file`` (PEM; Ed25519 also as dkimpy's base64 seed; make one with
``gateway dkim keygen``) and an ``algorithm`` (``rsa-sha256`` or ``ed25519-sha256``,
RFC 8463)::

    [[plugins]]
    name = "queue_dkim_sign"
    [plugins.domains."example.org"]
    selector = "2026a"
    key_file = "/etc/gateway/dkim/example.org.2026a.key"

The signature covers the final message as it will be queued (``message.as_bytes()``:
headers prepended by earlier queue plugins included, but it signs only the fields named
in ``headers``, never ``Received``), with relaxed/relaxed canonicalisation, and is
prepended as the ``DKIM-Signature`` field. Fields in ``oversign`` are signed one time
more than they occur, so that a second From added in transit breaks the signature.
Signing runs in the thread pool. Place it after ``queue_authentication_results`` and
before ``queue_received_header``.

**Cost of a large message.** dkimpy signs bytes in memory: the final message is joined
(read from the file, for a message spooled to disk) in the thread pool, never on the
event loop, and held there while it is signed: its size in memory, once per message
signed.

Settings: ``domains`` (default none: sign nothing), ``headers`` (default From, To, Cc,
Subject, Date, Message-ID, MIME-Version, Content-Type, Content-Transfer-Encoding,
Reply-To, In-Reply-To, References, List-Unsubscribe, List-Unsubscribe-Post),
``oversign`` (default From), ``sign_relay_clients`` (default true),
``sign_authenticated`` (default true).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import dkim

from gateway.context import Gateway
from gateway.hooks import hookimpl
from gateway.model import Message, Session, Transaction
from plugins._dkim_sync import load_key_in_thread, sign_in_thread
from plugins._mailauth import author_domain

__all__ = ["DEFAULT_HEADERS", "DomainKey", "Plugin", "Settings"]

log = logging.getLogger("plugins.queue_dkim_sign")

DEFAULT_HEADERS: tuple[str, ...] = (
    "from", "to", "cc", "subject", "date", "message-id", "mime-version", "content-type",
    "content-transfer-encoding", "reply-to", "in-reply-to", "references",
    "list-unsubscribe", "list-unsubscribe-post",
)


@dataclass(frozen=True)
class DomainKey:
    """The key a domain signs with: an entry of ``domains``."""

    selector: str = field(metadata={"doc": "the s= selector; the public key is at <selector>._domainkey.<domain>"})
    key_file: Path = field(metadata={"doc": "the private key file (PEM)"})
    algorithm: Literal["rsa-sha256", "ed25519-sha256"] = field(
        default="rsa-sha256", metadata={"doc": "rsa-sha256 or ed25519-sha256 (RFC 8463)"}
    )


@dataclass(frozen=True)
class Settings:
    """Settings of ``queue_dkim_sign``."""

    domains: dict[str, DomainKey] = field(
        default_factory=dict, metadata={"doc": "signing domain -> selector, key_file, algorithm"}
    )
    headers: tuple[str, ...] = field(default=DEFAULT_HEADERS, metadata={"doc": "header fields to sign when present"})
    oversign: tuple[str, ...] = field(
        default=("from",), metadata={"doc": "fields signed once more than present, so none can be added"}
    )
    sign_relay_clients: bool = field(default=True, metadata={"doc": "sign mail from [relay] clients"})
    sign_authenticated: bool = field(default=True, metadata={"doc": "sign mail from authenticated sessions"})


def _check_headers(settings: Settings) -> None:
    names = {h.lower() for h in settings.headers}
    if "from" not in names:
        raise ValueError("queue_dkim_sign: headers must include From (RFC 6376 §5.4)")
    forbidden = sorted(names & {h.decode() for h in dkim.DKIM.SHOULD_NOT})
    if forbidden:
        raise ValueError(f"queue_dkim_sign: headers must not include {forbidden} (RFC 6376 §5.4.1)")


def _entry_for(domain: str, domains: dict[str, DomainKey]) -> tuple[str, DomainKey] | None:
    """The configured signing domain for ``domain``: itself or its nearest parent."""
    table = {name.lower().rstrip("."): key for name, key in domains.items()}
    labels = domain.split(".")
    for start in range(len(labels) - 1):
        candidate = ".".join(labels[start:])
        if candidate in table:
            return candidate, table[candidate]
    return None


class Plugin:
    """Holds the loaded private keys, by file and algorithm."""

    def __init__(self) -> None:
        self._keys: dict[tuple[Path, str], bytes] = {}

    async def _key(self, gateway: Gateway, entry: DomainKey) -> bytes:
        cache_key = (Path(entry.key_file), entry.algorithm)
        key = self._keys.get(cache_key)
        if key is None:
            # A key named only by a scoped override is loaded at its first use.
            key = await gateway.run_in_thread(load_key_in_thread, cache_key[0], entry.algorithm)
            self._keys[cache_key] = key
        return key

    @hookimpl
    async def gateway_startup(self, gateway: Gateway, settings: Settings) -> None:
        _check_headers(settings)
        for domain, entry in settings.domains.items():
            try:
                await self._key(gateway, entry)
            except (OSError, ValueError) as exc:
                raise ValueError(f"queue_dkim_sign: key for {domain} ({entry.key_file}): {exc}") from exc
        log.info("loaded %d DKIM key(s) for %s", len(self._keys), ", ".join(sorted(settings.domains)) or "no domain")

    @hookimpl
    async def gateway_queue(
        self, session: Session, txn: Transaction, message: Message, gateway: Gateway, settings: Settings
    ) -> None:
        wanted = (settings.sign_relay_clients and session.is_relay_client) or (
            settings.sign_authenticated and session.is_authenticated
        )
        if not wanted or not settings.domains:
            return None
        author, problem = author_domain(message)
        if author is None:
            log.info("txn=%s not signed: %s", txn.id, problem)
            return None
        found = _entry_for(author, settings.domains)
        if found is None:
            log.debug("txn=%s not signed: no key for %s", txn.id, author)
            return None
        domain, entry = found
        key = await self._key(gateway, entry)
        headers = tuple(h.lower() for h in settings.headers)
        oversign = tuple(h.lower() for h in settings.oversign)
        value = await gateway.run_in_thread(
            _sign_message_in_thread, message, domain, entry.selector, key, entry.algorithm, headers, oversign
        )
        message.prepend_header("DKIM-Signature", value)
        log.info("txn=%s signed d=%s s=%s a=%s", txn.id, domain, entry.selector, entry.algorithm)
        return None


def _sign_message_in_thread(
    message: Message, domain: str, selector: str, key: bytes, algorithm: str,
    headers: tuple[str, ...], oversign: tuple[str, ...],
) -> str:
    # Joining the final bytes copies the message: do it off the event loop too.
    return sign_in_thread(message.as_bytes(), domain, selector, key, algorithm, headers, oversign)
