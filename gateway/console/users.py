"""End users of the console: mail credentials, and the addresses that are a user's own.

With ``[console] users = true`` a login that is not an admin's is checked the way SMTP
AUTH checks it: :func:`check_mail_login` runs the ``gateway_auth`` chain of the
``users_listener`` (``auth_users_file``, ``auth_dovecot``, ``auth_lockout``...) through
that listener's own :meth:`~gateway.smtp.handler.SmtpHandler.auth`, as if the client had
sent ``AUTH PLAIN`` over TLS from the browser's address. So there is one verifier, its
lockouts and logs included.

A user's addresses (:func:`addresses_of`): for a login in a local domain, or a bare
login (a local user name), ``user@d`` for every ``[local] domains`` entry ``d``, plus
every alias of the aliases file that expands to that user's mailbox alone (``alice:
alice.smith``-style personal aliases; a list that reaches several people is not
anybody's); for a login in another domain (a Dovecot user of a relayed domain), that
address only. :func:`is_theirs` also counts ``user<delimiter>extension`` in a local
domain as the user's.
"""

from __future__ import annotations

import logging
from typing import Any

from gateway.delivery.local.aliases import Leaf
from gateway.delivery.local.expand import aliases_enabled, current_aliases, resolver
from gateway.delivery.router import split_user
from gateway.model import Session
from gateway.policy.local import LocalSettings

__all__ = ["USER", "addresses_of", "check_mail_login", "is_theirs", "theirs"]

log = logging.getLogger(__name__)

USER = "user"
"""The scope of an end user's session."""


class LoginUnavailable(Exception):
    """The auth chain could not check the password now (its backend is down)."""


def _listener(policy: Any, name: str) -> Any:
    if name:
        return next((l for l in policy.listeners if l.name == name), None)
    return next((l for l in policy.listeners if l.auth), None)


async def check_mail_login(gateway_app: Any, login: str, password: str, client_ip: str) -> str | None:
    """Whether ``login``/``password`` pass the users listener's ``gateway_auth`` chain.

    :returns: the user's name as the backend knows it (Dovecot's ``user=``), or ``None``
    :raises LoginUnavailable: the chain answered a temporary failure
    """
    policy = gateway_app.policy
    listener = _listener(policy, policy.console.users_listener)
    if listener is None:
        log.warning("console: end-user login refused: no listener offers AUTH (set [console] users_listener)")
        return None
    handler = gateway_app.handler_for(listener.name)
    session = Session(peer_ip=client_ip, peer_port=0, listener=listener.name,
                      local_ip=policy.console.address, local_port=policy.console.port)
    session.tls_version = "HTTPS"  # the password came over the console's TLS
    scope = policy.scope(listener=listener.name, client_ip=client_ip)
    answer = await handler.auth(session, scope, "PLAIN", login, password)
    if answer.reply.is_positive and session.auth_login:
        return str(session.auth_login)
    if 400 <= answer.reply.code < 500:
        raise LoginUnavailable(str(answer.reply))
    return None


def addresses_of(local: LocalSettings, login: str) -> frozenset[str]:
    """The addresses that are ``login``'s own, lower case (see the module docstring).

    Reads the aliases file when it changed: call it in the thread pool.
    """
    login = login.strip().lower()
    name, at, domain = login.rpartition("@")
    if not at:
        name, domain = login, ""
    if domain and domain not in local.domains:
        return frozenset({login})
    found = {f"{name}@{d}" for d in local.domains}
    if aliases_enabled(local):
        resolve = resolver(local, current_aliases(local))
        for alias in resolve.aliases.aliases:
            try:
                leaves = resolve.expand(alias)
            except Exception:  # noqa: BLE001 - a broken alias is nobody's; delivery reports it
                continue
            if leaves == [Leaf("user", name)]:
                found.update(f"{alias}@{d}" for d in local.domains)
    return frozenset(found)


def is_theirs(local: LocalSettings, addresses: frozenset[str], recipient: str) -> bool:
    """Whether ``recipient`` is one of ``addresses``, or an extension of one in a local domain."""
    recipient = recipient.lower()
    if recipient in addresses:
        return True
    name, _, domain = recipient.rpartition("@")
    if domain not in local.domains or not local.extension_delimiter:
        return False
    user, extension = split_user(name, local.users, local.extension_delimiter)
    return bool(extension) and f"{user}@{domain}" in addresses


def theirs(local: LocalSettings, addresses: frozenset[str], recipients: list[str]) -> list[str]:
    """The recipients among ``recipients`` that are the user's."""
    return [r for r in recipients if is_theirs(local, addresses, r)]
