"""The plugin contract: every hook the gateway calls, typed and documented.

This module is the reference documentation for plugin authors (``docs/plugins.md``
lists the same hooks; a test keeps the two in step).

Rules that hold for every filtering hook:

- Implementations may be plain functions or ``async def`` coroutines. The core's hook
  runner calls them in the order the policy lists the plugins (never pluggy's own
  order) and awaits coroutines, each under the entry's ``timeout``.
- Return ``None`` for "no opinion, ask the next plugin", or a
  :class:`~gateway.verdicts.Verdict`. The first verdict stops the chain.
- An implementation may accept any subset of the arguments a spec names.
- ``settings`` is the plugin's own ``Settings`` instance, as the policy sets it for
  this scope (listener, client network, recipient domain).
- A plugin that raises or times out gets its entry's ``on_error`` answer: ``tempfail``
  (451 4.3.0, fail closed, the default) or ``continue`` (fail open); either way the
  session goes on and the failure is logged with the plugin's name.
- An ``async def`` implementation marked :func:`gateway.hooks.independent` (as the
  content scanners' ``gateway_data`` are) runs at the same time as the independent
  implementations next to it in the chain; it makes its changes after
  ``await gateway.hooks.wait_for_turn()``, so verdicts, results and headers come out in
  chain order as if the plugins had run one at a time, and the first verdict still
  stops the chain (the later plugins still running are cancelled). An implementation
  not so marked waits for everything before it and holds back everything after it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from gateway.address import Address
    from gateway.context import Gateway
    from gateway.model import Envelope, Message, QueuedRecipient, Recipient, Session, Transaction
    from gateway.policy import Policy
    from gateway.probe import Probes
    from gateway.verdicts import Reply, Verdict

__all__ = ["hookspec", "PROJECT"]

PROJECT = "gateway"
hookspec = pluggy.HookspecMarker(PROJECT)


# ---------------------------------------------------------------------------
# Process life cycle
# ---------------------------------------------------------------------------


@hookspec
def gateway_startup(gateway: Gateway, settings: Any) -> None:
    """Open long-lived resources: scanner connections, resolvers, caches.

    Always runs, once per plugin entry, when the gateway starts and after each policy
    reload, before any session is accepted with the new policy. An exception stops
    start-up (or refuses the reload) with the plugin's name.

    :param gateway: the running gateway's services (policy, resolver, executor, queue)
    :param settings: this plugin entry's settings
    :returns: nothing; verdicts are ignored
    """


@hookspec
def gateway_shutdown(gateway: Gateway, settings: Any) -> None:
    """Close what :func:`gateway_startup` opened.

    Always runs, once per plugin entry, when the gateway stops or a reload replaces
    the plugin entry. Exceptions are logged and ignored.

    :param gateway: the running gateway's services
    :param settings: this plugin entry's settings
    :returns: nothing; verdicts are ignored
    """


@hookspec
def gateway_probe(policy: Policy, settings: Any, probes: Probes) -> None:
    """Try each daemon this plugin entry talks to, and report it in ``probes``.

    Always runs, for ``gateway check --probe``: once per plugin entry with its base
    settings, and once more for each override's settings of the entry. No gateway is
    running then; nothing is opened for long. A plugin that talks to no daemon does not
    implement it. Start-up does its own tries in :func:`gateway_startup` (see
    :func:`gateway.probe.startup_probe`). Exceptions are logged and ignored.

    :param policy: the whole validated policy being checked
    :param settings: this plugin entry's settings (or an override's for it)
    :param probes: ``await probes.add(plugin, daemon, address, check)`` tries a daemon
        once, bounded by the command's time limit, and records the outcome
    :returns: nothing; the outcomes go into ``probes``
    """


# ---------------------------------------------------------------------------
# SMTP session: connect, helo, auth
# ---------------------------------------------------------------------------


@hookspec
def gateway_connect(session: Session, gateway: Gateway, settings: Any) -> Verdict | None:
    """Judge a new connection, after TCP accept and before the greeting.

    Called once per connection. If no plugin answers, the client gets the 220
    greeting. A reject or tempfail verdict is sent instead of the greeting and the
    connection is closed (RFC 5321 §3.1: 554 / 421).

    :param session: the new session (peer address, listener); plugins may set
        ``session.is_relay_client``, add ``session.results`` and use ``session.stash``
    :param gateway: the gateway's services and the policy in force for this session
    :param settings: this plugin entry's settings
    :returns: ``None`` or a verdict; the first verdict stops the chain. ``accept``
        stops further connect checks and greets the client.
    """


@hookspec
def gateway_helo(session: Session, helo: str, gateway: Gateway, settings: Any) -> Verdict | None:
    """Judge the HELO or EHLO argument.

    Called for every HELO/EHLO that passed the core's syntax check. If no plugin
    answers, the core replies 250 and records the name in ``session.helo``.

    :param session: the session; ``session.is_esmtp`` tells EHLO from HELO
    :param helo: the name or address literal the client gave (already syntax-checked)
    :param gateway: the gateway's services and the policy in force for this session
    :param settings: this plugin entry's settings
    :returns: ``None`` or a verdict; a refusal keeps ``session.helo`` unset
    """


@hookspec
def gateway_auth(
    session: Session, mechanism: str, login: str, password: str, gateway: Gateway, settings: Any
) -> Verdict | None:
    """Check SMTP AUTH credentials (the authenticator backends).

    Called for AUTH PLAIN and LOGIN after the core decoded the credentials. Default
    deny: if no plugin answers ``accept``, the client gets 535 5.7.8.

    :param session: the session (TLS is always active here)
    :param mechanism: ``PLAIN`` or ``LOGIN``
    :param login: the authentication identity
    :param password: the password; never log it
    :param gateway: the gateway's services and the policy in force for this session
    :param settings: this plugin entry's settings
    :returns: ``accept`` (authenticated as ``login``, or as the verdict's ``login``
        when the backend names the user differently, e.g. Dovecot's canonical name),
        ``reject`` (535), ``tempfail`` (454 4.7.0, e.g. the backend is down) or
        ``disconnect`` (its 421, then the connection is closed); ``None`` asks the next
    """


@hookspec
def gateway_auth_result(
    session: Session, mechanism: str, login: str, outcome: str, gateway: Gateway, settings: Any
) -> None:
    """Note how an AUTH attempt ended: failure counters, lock-outs, logging.

    Always runs, for every plugin entry, after the :func:`gateway_auth` chain decided and
    before the client gets its reply. Added for brute-force protection: a check that
    runs before the backends in :func:`gateway_auth` cannot see their answer.

    :param session: the session; ``session.auth_login`` is set when ``outcome`` is
        ``"success"``
    :param mechanism: ``PLAIN`` or ``LOGIN``
    :param login: the authentication identity the client gave (the password is not passed)
    :param outcome: ``"success"`` (235), ``"failure"`` (535: wrong or unknown
        credentials) or ``"tempfail"`` (454: a backend down; 421: a lock-out)
    :param gateway: the gateway's services and the policy in force for this session
    :param settings: this plugin entry's settings
    :returns: nothing; verdicts are ignored
    """


# ---------------------------------------------------------------------------
# SMTP transaction: mail, rcpt, data, queue
# ---------------------------------------------------------------------------


@hookspec
def gateway_mail(
    session: Session, txn: Transaction, sender: Address, gateway: Gateway, settings: Any
) -> Verdict | None:
    """Judge the envelope sender given in MAIL FROM.

    Called after the core parsed the path and its parameters (SIZE is already checked
    against the limit). If no plugin answers, the core replies 250.

    :param session: the session
    :param txn: the new transaction (``txn.params`` holds SIZE, BODY, SMTPUTF8, RET,
        ENVID); plugins may add results and stash data
    :param sender: the reverse-path, ``Address.null()`` for ``<>``
    :param gateway: the gateway's services and the policy in force for this session
    :param settings: this plugin entry's settings
    :returns: ``None`` or a verdict; a refusal discards the transaction
    """


@hookspec
def gateway_rcpt(
    session: Session, txn: Transaction, rcpt: Recipient, gateway: Gateway, settings: Any
) -> Verdict | None:
    """Decide on one recipient: relay control, validation, greylisting.

    Default deny: unless a plugin returns ``accept``, the core refuses the recipient
    with 550 5.7.1. Runs with the settings of the recipient's domain scope.

    :param session: the session
    :param txn: the transaction; ``txn.recipients`` holds those accepted so far
    :param rcpt: the recipient being judged (address and DSN parameters)
    :param gateway: the gateway's services and the policy in force for this session
    :param settings: this plugin entry's settings
    :returns: ``accept`` (recipient added), a refusal, or ``None`` (ask the next)
    """


@hookspec
def gateway_data(
    session: Session, txn: Transaction, message: Message, gateway: Gateway, settings: Any
) -> Verdict | None:
    """Judge the whole message after the final dot: scanners, header checks.

    Called once per message with at least one accepted recipient. After the last
    plugin, the core sums the scores (``txn.results``) against the policy's scoring
    thresholds. If nothing refuses, the queue hooks run and the message is committed.
    Consecutive implementations marked :func:`gateway.hooks.independent` (``data_clamav``,
    ``data_spamd``, ``data_rspamd``) scan the message at the same time; verdicts and
    changes still follow the chain's order. A large message may be spooled to disk
    (``message.is_spooled``): read it with ``message.content.stream()`` or
    ``message.head``, not ``message.raw``, which loads all of it into memory.

    :param session: the session
    :param txn: the transaction; ``txn.queue_id`` is already assigned
    :param message: the message; read headers with ``header_values``, add headers with
        ``prepend_header``, never rewrite the bytes
    :param gateway: the gateway's services and the policy in force for this session
    :param settings: this plugin entry's settings
    :returns: ``None`` or a verdict; ``quarantine`` stores the message apart
    """


@hookspec
def gateway_queue(
    session: Session, txn: Transaction, message: Message, gateway: Gateway, settings: Any
) -> Verdict | None:
    """Last chance before the queue commit: trace headers, final annotations, signing.

    Called after the data hooks and the scoring step passed the message.

    :param session: the session
    :param txn: the transaction (``txn.queue_id`` set)
    :param message: the message; headers added here are the outermost
    :param gateway: the gateway's services and the policy in force for this session
    :param settings: this plugin entry's settings
    :returns: ``None`` or a verdict (a refusal stops the commit)
    """


@hookspec
def gateway_disconnect(session: Session, gateway: Gateway, settings: Any) -> None:
    """Note the end of a session: counters, logging.

    Always runs, for every plugin entry, when the connection closes for any reason.

    :param session: the finished session
    :param gateway: the gateway's services and the policy in force for this session
    :param settings: this plugin entry's settings
    :returns: nothing; verdicts are ignored
    """


# ---------------------------------------------------------------------------
# Delivery: route, deliver, bounce
# ---------------------------------------------------------------------------


@hookspec
def gateway_route(
    envelope: Envelope, recipient: QueuedRecipient, gateway: Gateway, settings: Any
) -> Any | None:
    """Choose where one queued recipient goes: local, remote, smarthost, hold, discard.

    Called by the scheduler for each pending recipient, at each attempt. The first
    non-``None`` route wins; if no plugin answers, the policy's built-in routing
    decides. A user directory (Dovecot's userdb, say) answers a ``LocalRoute`` carrying
    a ``LocalAccount`` (home, ids, Maildir): local delivery then takes a user that
    ``[local] users`` does not list, and delivers into that home.

    :param envelope: the queued envelope
    :param recipient: the recipient to route
    :param gateway: the gateway's services and the policy in force for this session
    :param settings: this plugin entry's settings
    :returns: a route object defined by the delivery package (``gateway.delivery.types``),
        or ``None``
    :raises TemporaryFailure: the recipient is deferred and retried (a directory that
        cannot answer now); ``PermanentFailure`` bounces it. Any other error, or a
        timeout, is answered by the entry's ``on_error``: ``tempfail`` (the default)
        defers the recipient, ``continue`` asks the next plugin, then the built-in routing
    """


@hookspec
def gateway_deliver(
    envelope: Envelope, recipients: list[QueuedRecipient], route: Any, message: Message, gateway: Gateway, settings: Any
) -> Verdict | None:
    """Before a delivery attempt: outbound signing, per-destination limits, veto.

    :param envelope: the queued envelope
    :param recipients: the recipients this attempt covers (one destination)
    :param route: where they go
    :param message: the message; headers may be prepended for this attempt
    :param gateway: the gateway's services and the policy in force for this session
    :param settings: this plugin entry's settings
    :returns: ``None`` to go on, ``tempfail`` to defer, ``reject`` to fail permanently
    """


@hookspec
def gateway_delivered(
    envelope: Envelope, recipient: QueuedRecipient, reply: Reply, gateway: Gateway, settings: Any
) -> None:
    """After a delivery attempt, once per recipient: metrics, logging.

    Always runs, for every plugin entry.

    :param envelope: the queued envelope
    :param recipient: the recipient with its new state
    :param reply: the answer of the attempt (remote server's or local delivery's)
    :param gateway: the gateway's services and the policy in force for this session
    :param settings: this plugin entry's settings
    :returns: nothing
    """


@hookspec
def gateway_bounce(
    envelope: Envelope, failed: list[QueuedRecipient], gateway: Gateway, settings: Any
) -> Verdict | None:
    """A delivery status notification is about to be sent for failed recipients.

    :param envelope: the queued envelope (the DSN goes to ``envelope.sender``)
    :param failed: the recipients that failed permanently
    :param gateway: the gateway's services and the policy in force for this session
    :param settings: this plugin entry's settings
    :returns: ``None`` to send it; ``reject`` to suppress it (logged)
    """
