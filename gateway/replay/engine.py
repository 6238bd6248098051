"""Play recorded sessions through a policy's real handler and plugin chain.

A :class:`Replayer` builds one :class:`~gateway.context.Gateway` for the new policy (as
``gateway explain`` does: the real :class:`~gateway.smtp.handler.SmtpHandler` and hook
runner, a dry-run queue that takes the commit and writes nothing) and keeps it for every
session, so the plugins start once. Each recorded command is parsed again with the front
end's own parsers and handed to the handler in order; what the new policy answers is
collected by a :class:`~gateway.capture.SessionTap`, exactly as capture collects it.

- DNS: a :class:`~gateway.dns.RecordedResolver` answers from the record (``dns="record"``),
  falling back to the policy's resolver for queries the record lacks with
  ``dns="record+live"``; ``dns="live"`` asks the policy's resolver only.
- State: plugins that keep state (greylisting, rate limits, AUTH lock-out, DMARC report
  counters) get a fresh SQLite store under a temporary directory, whatever their
  ``state`` setting says, so replay never changes the running gateway's state and starts
  from nothing: greylisting sees every triplet for the first time.
- AUTH: the recorded login is taken as a fact (the credentials were never recorded), so
  the new policy's AUTH backends are not asked.
- Plugins named in ``skip`` are left out of the chain and reported as not replayed
  (scanners are live daemons: by default they are asked live).
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Mapping

from gateway import capture
from gateway.address import AddressError, parse_params, parse_path
from gateway.context import Gateway
from gateway.dns import RecordedResolver, make_resolver
from gateway.explain import _DryRunQueue
from gateway.hooks import HookRunner, PluginSpec
from gateway.model import Recipient, Transaction
from gateway.smtp.data import REPLY_TOO_BIG
from gateway.smtp.handler import SmtpHandler
from gateway.smtp.params import Refusal
from gateway.smtp.params import mail_params as parse_mail_params
from gateway.smtp.params import rcpt_params as parse_rcpt_params
from gateway.verdicts import Reply

__all__ = ["Replayer", "dns_index", "prepare_policy"]

log = logging.getLogger(__name__)

_NEED_AUTH = Reply(530, "5.7.0", "Authentication required")
_NEED_TLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
_NO_VALID_RCPT = Reply(554, "5.5.1", "No valid recipients")
_TOO_MANY_MSGS = Reply(421, "4.7.0", "Too many messages in one session, closing connection")


def dns_index(record: Mapping[str, Any]) -> dict[tuple[str, str], tuple[str, bytes | None]]:
    """The record's DNS outcomes by (name, type); a later one wins."""
    return {(name, rdtype): (outcome, wire) for name, rdtype, outcome, wire in record.get("dns") or ()}


def prepare_policy(policy: Any, state_dir: Path, skip: Iterable[str] = ()) -> tuple[Any, list[str]]:
    """``policy`` with its queue and state under ``state_dir``, stateful plugins on a fresh
    SQLite store there, capture off, and the ``skip`` plugins (names or ids) removed.

    :returns: the policy and the ids of the plugins left out
    """
    skipped = set(skip)
    entries, left_out = [], []
    for entry in policy.plugins:
        if entry.name in skipped or entry.id in skipped:
            left_out.append(entry.id)
            continue
        settings: Any = entry.settings
        if dataclasses.is_dataclass(settings) and not isinstance(settings, type) and any(f.name == "state" for f in dataclasses.fields(settings)):
            entry = dataclasses.replace(entry, settings=dataclasses.replace(settings, state="sqlite"))
        entries.append(entry)
    server = dataclasses.replace(policy.server, var_dir=state_dir, queue_dir=state_dir / "queue")
    capture_off = dataclasses.replace(policy.capture, enabled=False)
    prepared = dataclasses.replace(policy, server=server, plugins=tuple(entries), capture=capture_off)
    return prepared, left_out


class Replayer:
    """One policy's chain, started once, replaying sessions one after another.

    Use as ``async with Replayer(...) as replayer: new = await replayer.replay(record)``.
    """

    def __init__(
        self,
        policy: Any,
        specs: Mapping[str, PluginSpec],
        *,
        dns: str = "record",
        everything: Mapping[tuple[str, str], tuple[str, bytes | None]] | None = None,
        skip: Iterable[str] = (),
    ) -> None:
        if dns not in ("record", "live", "record+live"):
            raise ValueError(f"dns must be record, live or record+live, not {dns!r}")
        self._tmp = tempfile.TemporaryDirectory(prefix="gateway-replay-")
        self.policy, self.skipped = prepare_policy(policy, Path(self._tmp.name), skip)
        self.specs = specs
        self.dns = dns
        live = make_resolver(policy.dns) if dns != "record" else None
        self.resolver: Any = live if dns == "live" else RecordedResolver(everything if everything is not None else {}, live)
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="replay")
        self.runner = HookRunner(specs, [entry.name for entry in self.policy.plugins])
        self.gateway = Gateway(
            policy=self.policy, runner=self.runner, queue=_DryRunQueue(),  # type: ignore[arg-type]
            executor=self.executor, hostname=self.policy.server.hostname, resolver=self.resolver,
        )
        self.handlers = {item.name: SmtpHandler(self.gateway, item) for item in self.policy.listeners}

    async def __aenter__(self) -> Replayer:
        await self.runner.startup(self.policy.plugins, gateway=self.gateway)
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.runner.call_all("gateway_shutdown", self.policy.plugins, gateway=self.gateway)
        finally:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self._tmp.cleanup()

    @property
    def missing_dns(self) -> list[tuple[str, str]]:
        """Queries the record could not answer (answered as timeouts)."""
        return list(getattr(self.resolver, "missing", []))

    async def replay(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Play ``record`` through the chain; the new record (same shape as a capture's)."""
        handler = self.handlers.get(record["listener"]) or next(iter(self.handlers.values()))
        local = record.get("local") or ["", 0]
        session, scope = handler.open_session((record["client"], int(record.get("port") or 0)), (local[0], local[1]))
        tap = capture.SessionTap(session, None)
        capture.begin(tap)
        if isinstance(self.resolver, RecordedResolver):
            self.resolver.session = dns_index(record)
        try:
            await self._play(handler, session, scope, tap, record)
        finally:
            await handler.disconnect(session, scope)
            tap.finish(session)
            if isinstance(self.resolver, RecordedResolver):
                self.resolver.session = {}
        return tap.result(session)

    async def _play(self, handler: SmtpHandler, session: Any, scope: Any, tap: Any, record: Mapping[str, Any]) -> None:
        answer = await handler.connect(session, scope)
        if answer is not None:
            tap.reply(answer.reply)
            return
        tap.reply(Reply(220, "", f"{self.gateway.hostname} ESMTP"))
        tls = record.get("tls")
        if tls:
            session.tls_version, session.tls_cipher = tls.get("version"), tls.get("cipher")
        helo = record.get("helo")
        if not helo:
            return
        session.is_esmtp = bool(record.get("esmtp"))
        tap.command("EHLO" if session.is_esmtp else "HELO", helo)
        answer = await handler.helo(session, scope, helo)
        tap.reply(answer.reply)
        if answer.reply.code != 250:
            return
        auth = record.get("auth")
        if auth and auth.get("login"):
            session.auth_login = str(auth["login"])
        for txn in record["txns"]:
            if not await self._transaction(handler, session, scope, tap, txn):
                return

    async def _transaction(self, handler: SmtpHandler, session: Any, scope: Any, tap: Any, rec: Mapping[str, Any]) -> bool:
        """One recorded transaction; False when the session ends with it."""
        arg = rec["mail"]
        tap.command("MAIL", arg)
        listener = handler.listener
        if listener.require_tls and not session.has_tls:
            tap.reply(_NEED_TLS)
            return True
        if listener.require_auth and not session.is_authenticated:
            tap.reply(_NEED_AUTH)
            return True
        if session.transactions >= scope.limits.max_transactions:
            tap.reply(_TOO_MANY_MSGS)
            return False
        try:
            if arg[:5].upper() != "FROM:":
                raise AddressError("no FROM:")
            sender, rest = parse_path(arg[5:], allow_null=True, allow_postmaster=False, utf8=True)
            params = parse_mail_params(
                parse_params(rest), esmtp=session.is_esmtp, max_size=scope.largest_message_size,
                allow_verp=session.is_relay_client or session.is_authenticated,
            )
        except AddressError as exc:
            tap.reply(Reply(501, "5.1.7", f"Bad sender address syntax: {exc}"))
            return True
        except Refusal as refusal:
            tap.reply(refusal.reply)
            return True
        txn = Transaction(sender=sender, params=params)
        answer = await handler.mail(session, scope, txn)
        tap.reply(answer.reply)
        if answer.close:
            return False
        if not answer.reply.is_positive:
            return True
        for item in rec["rcpts"]:
            if not await self._rcpt(handler, session, scope, tap, txn, str(item["rcpt"])):
                return False
        data = rec.get("data")
        if data is None:
            return True
        tap.command("DATA", "")
        if not txn.recipients:
            tap.reply(_NO_VALID_RCPT)
            return True
        raw = data["message"]
        if isinstance(raw, str):
            raw = base64.b64decode(raw)
        if len(raw) > handler.message_size_limit(scope, txn):
            tap.reply(REPLY_TOO_BIG)
            return True
        tap.reply(Reply(354, "", "End data with <CR><LF>.<CR><LF>"))
        session.transactions += 1
        answer = await handler.data(session, scope, txn, raw)
        tap.reply(answer.reply)
        return not answer.close

    async def _rcpt(self, handler: SmtpHandler, session: Any, scope: Any, tap: Any, txn: Transaction, arg: str) -> bool:
        tap.command("RCPT", arg)
        if len(txn.recipients) >= scope.limits.max_recipients:
            tap.reply(Reply(452, "4.5.3", "Too many recipients"))
            return True
        try:
            if arg[:3].upper() != "TO:":
                raise AddressError("no TO:")
            address, rest = parse_path(arg[3:], allow_null=False, allow_postmaster=True, utf8=True)
            params = parse_rcpt_params(parse_params(rest))
        except AddressError as exc:
            tap.reply(Reply(501, "5.1.3", f"Bad recipient address syntax: {exc}"))
            return True
        except Refusal as refusal:
            tap.reply(refusal.reply)
            return True
        answer = await handler.rcpt(session, scope, txn, Recipient(address, params))
        tap.reply(answer.reply)
        return not answer.close
