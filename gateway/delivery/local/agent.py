"""The local delivery agent: qmail-local for one recipient of one message.

It finds the user's home, refuses a message that already carries this recipient's
``Delivered-To`` line (a forwarding loop), then follows the user's ``.qmail``
instruction file line by line (mailboxes, programs, forwards) or, without one, delivers
to the default mailbox (``<home>/Maildir/`` or ``<home>/mbox``).

Privileges, when the gateway runs as root:

- programs run as the user's ``uid``/``gid`` from ``[[local.assign]]``, else as
  ``policy.local.program_user``, and never as root;
- mailbox files are written by this process, but for a home owned by someone other than
  root (or an assign entry with a uid) they are confined to the home: no symlink below
  the home is followed, and new files and directories belong to that user.

A route from a user directory (``route.account``, e.g. Dovecot's userdb) gives the
home, the ids (used like an assign entry's) and perhaps the Maildir; its home is
created when missing, and an extension without a ``.qmail`` file for it goes to the
user's default delivery (the directory accepted the address at RCPT).

File I/O runs through the ``run_in_thread`` callable; the event loop never blocks.

The message is a :class:`~gateway.content.Content`: for a large one, extents of the
queue file. Mailboxes and programs get it without a whole copy in memory (a Maildir
file is filled by an in-kernel copy, an mbox and a program's input a chunk at a time),
and the loop check reads only the header block. A forward is queued anew as a whole
message, read into memory for that (a rare path).
"""

from __future__ import annotations

import logging
import os
import pwd
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

from gateway.content import Content
from gateway.delivery.local.dotqmail import NO_MAILBOX, DotQmail, Instruction, load_dotqmail
from gateway.delivery.local.homes import can_enter, ensure_account_home, ensure_home, make_parents, primary_gid
from gateway.delivery.local.maildir import Confinement, deliver_maildir
from gateway.delivery.local.mbox import deliver_mbox, from_line
from gateway.delivery.local.program import ProgramResult, run_program
from gateway.delivery.local.quota import Quota, deliver_with_quota
from gateway.delivery.types import LocalRoute, Outcome, TargetRoute
from gateway.model import Envelope, Message
from gateway.policy.model import LocalAssign, Policy
from gateway.verdicts import PermanentFailure, Reply, TemporaryFailure

__all__ = ["LOOP_REPLY", "ForwardFunction", "LocalDeliveryAgent", "program_environment"]

log = logging.getLogger("gateway.delivery.local")

LOOP_REPLY = Reply(554, "5.4.6", "message is looping: it already has my Delivered-To line")
#: What an at-once delivery answers when the recipient has instructions (it is queued).
NOT_AT_ONCE = Reply(451, "4.3.0", "the recipient's instructions are followed from the queue")
_UNKNOWN_USER = Reply(550, "5.1.1", "Sorry, no mailbox here by that name")
_INTERNAL = Reply(451, "4.3.0", "local delivery failed: internal error")
_MAX_WHERE = 200
_MAX_HOMES = 10_000  # mail-root homes remembered per agent (a policy's life)

ForwardFunction = Callable[[str, list[str], Content], Awaitable[None]]
"""``forward(sender, addresses, message)``: queue ``message`` anew for ``addresses``."""


@dataclass(frozen=True, slots=True)
class _Target:
    """Everything one delivery needs to know about its recipient."""

    user: str
    home: Path
    assign: LocalAssign | None
    local: str
    domain: str


def _header_line(name: str, value: str) -> str:
    # Addresses are parsed and cannot hold CR/LF; strip anyway, a header is at stake.
    return f"{name}: {value.replace(chr(13), '').replace(chr(10), '')}\n"


def program_environment(
    *,
    sender: str,
    recipient: str,
    user: str,
    home: Path,
    local: str,
    domain: str,
    extension: str,
    delimiter: str,
    default: str | None,
    when: float,
) -> dict[str, str]:
    """The variables qmail-local gives a program (see dot-qmail(5)).

    :param sender: envelope sender (empty for the null sender)
    :param recipient: envelope recipient, ``local@domain``
    :param user: the local user the address belongs to
    :param home: the user's home
    :param local: the recipient's local part (``LOCAL``)
    :param domain: the recipient's domain (``HOST``)
    :param extension: the address extension (``EXT``)
    :param delimiter: the extension delimiter, for ``EXT2`` .. ``EXT4``
    :param default: ``$DEFAULT`` when a ``-default`` file matched, else ``None`` (unset)
    :param when: delivery time, for ``UFLINE``
    :returns: SENDER, RECIPIENT, USER, HOME, HOST, HOST2-4, LOCAL, EXT, EXT2-4,
        [DEFAULT], DTLINE, RPLINE, UFLINE; the ``*LINE`` values end in a newline
    """
    env = {
        "SENDER": sender,
        "RECIPIENT": recipient,
        "USER": user,
        "HOME": str(home),
        "HOST": domain,
        "LOCAL": local,
        "EXT": extension,
        "DTLINE": _header_line("Delivered-To", recipient),
        "RPLINE": _header_line("Return-Path", f"<{sender}>"),
        "UFLINE": from_line(sender, when),
    }
    # EXT2 is EXT after its first delimiter, EXT3 after the second, ...
    parts = extension.split(delimiter) if extension else []
    labels = domain.split(".") if domain else []
    for n in (2, 3, 4):
        env[f"EXT{n}"] = delimiter.join(parts[n - 1 :]) if len(parts) >= n else ""
        # HOST2 is HOST before its last dot, HOST3 before the second last, ...
        env[f"HOST{n}"] = ".".join(labels[: -(n - 1)]) if len(labels) >= n else ""
    if default is not None:
        env["DEFAULT"] = default
    return env


def _is_safe_user(user: str) -> bool:
    """A user name usable as one path component under the mail root."""
    return bool(user) and user not in (".", "..") and "/" not in user and "\0" not in user


def _has_delivered_to(message: Content, recipient: str) -> bool:
    """Whether the header block has ``Delivered-To: recipient`` (only the head is read)."""
    wanted = recipient.lower()
    for value in Message(message).header_values("delivered-to"):
        if value.strip().strip("<>").lower() == wanted:
            return True
    return False


async def _outcome_of(delivery: Awaitable[Outcome], what: str, recipient: str) -> Outcome:
    """The delivery boundary: a delivery's outcome, its failures turned into outcomes;
    whatever else went wrong is retried later rather than lose mail."""
    try:
        return await delivery
    except TemporaryFailure as exc:
        return Outcome("deferred", exc.reply)
    except PermanentFailure as exc:
        return Outcome("failed", exc.reply)
    except Exception:
        log.exception("%s to %s failed unexpectedly", what, recipient)
        return Outcome("deferred", _INTERNAL)


class LocalDeliveryAgent:
    """Delivers messages to local users: Maildir, mbox, programs, forwards, ``.qmail``.

    :param policy: the policy; ``policy.local`` holds every setting used here
    :param hostname: this host's name (Maildir file names)
    :param forward: queues a forwarded copy; ``forward(sender, addresses, message)``
    :param run_in_thread: runs a blocking call off the loop, like :func:`asyncio.to_thread`
    """

    def __init__(
        self,
        policy: Policy,
        *,
        hostname: str,
        forward: ForwardFunction,
        run_in_thread: Callable[..., Awaitable[Any]],
    ) -> None:
        self._policy = policy
        self._hostname = hostname
        self._forward = forward
        self._thread = run_in_thread
        self._homes: dict[str, Path] = {}  # user -> home under mail_root

    async def deliver(
        self, envelope: Envelope, recipient: str, route: LocalRoute, message: bytes | Content,
        *, delivery_id: str | None = None, first: bool = False, at_once: bool = False,
    ) -> Outcome:
        """Deliver ``message`` to one local recipient.

        :param envelope: the queued envelope (sender, for Return-Path and forwards)
        :param recipient: the recipient address, ``local@domain``
        :param route: the local route: user, extension, domain
        :param message: the queued message, CRLF line ends (in memory, or on disk)
        :param delivery_id: stable for this (message, recipient): Maildir deliveries use
            it as the file name, so a retry after a crash cannot deliver a second copy
        :param first: this is the message's first attempt, made by the process that
            queued it: no earlier attempt can have left a Maildir copy to look for
        :param at_once: the message is not queued (yet): deliver only into the default
            mailbox (no instruction file: a program or a forward is never run before the
            reply to the client) and log nothing unless delivered; any other outcome
            sends the message to the queue, whose attempt reports it
        :returns: ``delivered`` (250), ``deferred`` (4xx: retry) or ``failed`` (5xx: bounce)
        """
        where: list[str] = []
        content = message if isinstance(message, Content) else Content.of_bytes(message)
        outcome = await _outcome_of(
            self._deliver(envelope, recipient, route, content, where, delivery_id, first, at_once),
            "local delivery", recipient,
        )
        if at_once and outcome.status != "delivered":
            return outcome
        log.info(
            "local delivery to=%s user=%s ext=%r status=%s where=%s reply=%r",
            recipient, route.user, route.extension[:64], outcome.status,
            ",".join(where)[:_MAX_WHERE] or "-", str(outcome.reply),
        )
        return outcome

    async def deliver_target(
        self, envelope: Envelope, recipient: str, route: TargetRoute, message: bytes | Content,
        *, delivery_id: str | None = None, first: bool = False,
    ) -> Outcome:
        """Deliver ``message`` to one program or mailbox file an alias or ``.forward`` named.

        A target of the aliases file runs as ``local.program_user`` (when root) from
        ``/``, and its mailbox files are written without confinement (the aliases file
        is the administrator's). A ``.forward`` target acts for its owner exactly like
        a line of the owner's ``.qmail`` file.

        :param recipient: the alias address (``Delivered-To``, ``$RECIPIENT``)
        :param route: what to deliver to, and for whom
        :returns: as :meth:`deliver` (``first`` too)
        """
        where: list[str] = []
        content = message if isinstance(message, Content) else Content.of_bytes(message)
        outcome = await _outcome_of(
            self._deliver_target(envelope, recipient, route, content, where, delivery_id, first),
            "alias target delivery", recipient,
        )
        log.info(
            "local delivery to=%s owner=%s target=%s status=%s reply=%r",
            recipient, route.owner or "(aliases)", route.kind, outcome.status, str(outcome.reply),
        )
        return outcome

    async def _deliver_target(
        self, envelope: Envelope, recipient: str, route: TargetRoute, message: Content,
        where: list[str], delivery_id: str | None, first: bool = False,
    ) -> Outcome:
        if await self._is_looping(message, recipient):
            return Outcome("failed", LOOP_REPLY)
        local, _, domain = recipient.rpartition("@")
        if route.owner:
            target = self._target(recipient, LocalRoute(route.owner, "", route.domain))
            if target.assign is None or target.assign.home == Path():
                await self._thread(ensure_home, target.home)
            confine = await self._thread(self._confinement, target)
        else:
            target = _Target(self._policy.local.program_user, Path("/"), None, local, route.domain or domain)
            confine = None
        when = time.time()
        dtline = _header_line("Delivered-To", recipient).replace("\n", "\r\n").encode()
        rpline = _header_line("Return-Path", f"<{envelope.sender}>").replace("\n", "\r\n").encode()
        delivered = Content.join(rpline, dtline, message)
        if route.kind == "program":
            env = program_environment(
                sender=envelope.sender, recipient=recipient, user=target.user, home=target.home,
                local=target.local, domain=target.domain, extension="",
                delimiter=self._policy.local.extension_delimiter, default=None, when=when,
            )
            result = await self._program(route.value, delivered, env, target)
            if result.status != "delivered":
                return result.outcome()
            where.append("program")
        else:
            path = Path(route.value)
            instruction = Instruction(route.kind, route.value, 0, path)
            await self._mailbox(
                instruction, delivered, envelope.sender, when, confine,
                self._name(envelope, delivery_id, 0), first=first,
            )
            where.append(route.value)
        return self._success(where)

    def _target(self, recipient: str, route: LocalRoute) -> _Target:
        settings = self._policy.local
        user = route.user.lower()
        if not _is_safe_user(user):
            raise PermanentFailure(_UNKNOWN_USER)
        local, _, domain = recipient.rpartition("@")
        account = route.account
        if account is not None:
            # A user directory's entry (Dovecot's userdb) stands in for an assign line.
            entry = LocalAssign(user, account.home, account.uid, account.gid)
            return _Target(user, Path(os.path.abspath(account.home)), entry, local, route.domain or domain)
        assign = next((a for a in settings.assign if a.user.lower() == user), None)
        if assign is not None and assign.home != Path():
            home = Path(os.path.abspath(assign.home))
        else:
            known = self._homes.get(user)  # the policy is this agent's for good
            if known is None:
                if len(self._homes) >= _MAX_HOMES:
                    self._homes.clear()
                known = self._homes[user] = Path(os.path.abspath(settings.mail_root / user))
            home = known
        return _Target(user, home, assign, local, route.domain or domain)

    async def _deliver(
        self,
        envelope: Envelope,
        recipient: str,
        route: LocalRoute,
        message: Content,
        where: list[str],
        delivery_id: str | None = None,
        first: bool = False,
        at_once: bool = False,
    ) -> Outcome:
        settings = self._policy.local
        target = self._target(recipient, route)
        if await self._is_looping(message, recipient):
            return Outcome("failed", LOOP_REPLY)
        when = time.time()
        dtline = _header_line("Delivered-To", recipient).replace("\n", "\r\n").encode()
        rpline = _header_line("Return-Path", f"<{envelope.sender}>").replace("\n", "\r\n").encode()
        forwarded = Content.join(dtline, message)
        delivered = Content.join(rpline, forwarded)
        limit = settings.quota.limit_for(target.user, target.domain)
        quota = Quota(limit.storage, limit.messages) if limit is not None else None
        # The home, the instruction file and, without one, the default mailbox: one
        # hand-over to a pool thread for what most deliveries are (each hand-over waits
        # for a pool thread and then for the event loop).
        dotqmail, confine, default = await self._thread(
            self._prepare, target, route, delivered, envelope.sender, when,
            self._name(envelope, delivery_id, 0), quota, first,
        )
        if default is not None:
            where.append(default)
            return self._success(where)
        assert dotqmail is not None
        if at_once:
            return Outcome("deferred", NOT_AT_ONCE)

        forwards: list[str] = []
        env = program_environment(
            sender=envelope.sender, recipient=recipient, user=target.user, home=target.home,
            local=target.local, domain=target.domain, extension=route.extension,
            delimiter=settings.extension_delimiter,
            default=dotqmail.default if dotqmail.is_default else None, when=when,
        )
        for index, instruction in enumerate(dotqmail.instructions):
            if instruction.kind == "forward":
                forwards.append(instruction.value)
            elif instruction.kind == "program":
                result = await self._program(instruction.value, delivered, env, target)
                if result.status != "delivered":
                    return result.outcome()
                where.append("program")
                if result.stop:
                    break  # exit 99: delivered, ignore the remaining lines
            else:
                await self._mailbox(
                    instruction, delivered, envelope.sender, when, confine,
                    self._name(envelope, delivery_id, index), quota, first=first,
                )
                where.append(instruction.value)
        if forwards:
            # Forwarded copies carry our Delivered-To (loop detection) but no Return-Path:
            # they get a new envelope.
            await self._forward(envelope.sender, forwards, forwarded)
            where.append("forward " + " ".join(forwards))
        return self._success(where)

    async def _is_looping(self, message: Content, recipient: str) -> bool:
        """:func:`_has_delivered_to`; the head of a message on disk is read on a thread."""
        if message.is_in_memory:
            return _has_delivered_to(message, recipient)
        return bool(await self._thread(_has_delivered_to, message, recipient))

    @staticmethod
    def _success(where: list[str]) -> Outcome:
        text = "delivered to " + (", ".join(where) or "nowhere (no delivery lines)")
        return Outcome("delivered", Reply(250, "2.0.0", text[:_MAX_WHERE]))

    def _name(self, envelope: Envelope, delivery_id: str | None, index: int) -> str | None:
        """A Maildir file name fixed for (message, recipient, instruction line), or None.

        Built from the arrival time, not the attempt's, so every retry picks the same one.
        """
        if not delivery_id:
            return None
        host = self._hostname.replace("/", "\\057").replace(":", "\\072")
        return f"{int(envelope.arrived)}.{delivery_id}L{index}.{host}"

    async def _mailbox(
        self,
        instruction: Instruction,
        message: Content,
        sender: str,
        when: float,
        confine: Confinement | None,
        name: str | None,
        quota: Quota | None = None,
        *,
        first: bool = False,
    ) -> None:
        await self._thread(self._mailbox_now, instruction, message, sender, when, confine, name, quota, first)

    def _mailbox_now(
        self,
        instruction: Instruction,
        message: Content,
        sender: str,
        when: float,
        confine: Confinement | None,
        name: str | None,
        quota: Quota | None = None,
        first: bool = False,
    ) -> None:
        """Deliver to one mailbox. Synchronous: run it in a thread. ``first``: as
        :meth:`deliver` (a Maildir copy from an earlier attempt is not looked for)."""
        assert instruction.path is not None
        if instruction.kind == "maildir" and quota is not None:
            # Maildir++ quota (docs/local-delivery.md): checked and counted in maildirsize.
            deliver_with_quota(
                instruction.path, message, quota=quota,
                bounce=self._policy.local.quota.over_quota == "bounce",
                hostname=self._hostname, confine=confine, name=name,
            )
        elif instruction.kind == "maildir":
            deliver_maildir(
                instruction.path, message, hostname=self._hostname, confine=confine, name=name, first=first
            )
        else:
            deliver_mbox(instruction.path, message, sender=sender, when=when, confine=confine)

    def _prepare(
        self, target: _Target, route: LocalRoute, delivered: Content, sender: str, when: float,
        name: str | None, quota: Quota | None, first: bool = False,
    ) -> tuple[DotQmail | None, Confinement | None, str | None]:
        """In a pool thread: make the home, find who files are written for and the
        instruction file, and without instructions deliver to the default mailbox.

        :returns: the instruction file (None without one), the confinement, and the
            default mailbox as written (``./Maildir/``) once delivered there, else None
        """
        settings = self._policy.local
        account = route.account
        if account is not None:
            ensure_account_home(target.home, account.uid, account.gid)
        elif target.assign is None or target.assign.home == Path():
            ensure_home(target.home)
        confine = self._confinement(target)
        dotqmail: DotQmail | None = None
        if settings.dot_files:
            try:
                dotqmail = load_dotqmail(target.home, route.extension, delimiter=settings.extension_delimiter)
            except PermanentFailure as exc:
                if account is None or exc.reply is not NO_MAILBOX:
                    raise
                # A directory's user-ext was accepted at RCPT (as Dovecot's own
                # recipient_delimiter does): no file for the extension, the user's own.
                dotqmail = load_dotqmail(target.home, "")
        if dotqmail is not None and dotqmail.instructions:
            return dotqmail, confine, None
        default = Instruction("maildir", "./Maildir/", 0, target.home / "Maildir")
        if account is not None and account.maildir is not None:
            default = Instruction("maildir", f"{account.maildir}/", 0, account.maildir)
            confine = make_parents(account, target.home, confine)
        elif settings.mailbox == "mbox":
            default = Instruction("mbox", "./mbox", 0, target.home / "mbox")
        self._mailbox_now(default, delivered, sender, when, confine, name, quota, first)
        return dotqmail, confine, default.value

    def _confinement(self, target: _Target) -> Confinement | None:
        """Who mailbox files are written for, when root: the assign uid or the home's owner."""
        if os.geteuid() != 0:
            return None
        try:
            info = os.stat(target.home)
        except OSError as exc:
            raise TemporaryFailure(
                Reply(451, "4.3.0", f"cannot use home directory: {exc.strerror}")
            ) from exc
        assign = target.assign
        uid = assign.uid if assign is not None and assign.uid is not None else info.st_uid
        gid = assign.gid if assign is not None and assign.gid is not None else info.st_gid
        return None if uid == 0 else Confinement(target.home, uid, gid)

    def _program_identity(self, target: _Target) -> tuple[int, int, Path] | None:
        """uid, gid and working directory for a program; ``None``: as ourselves, in home."""
        if os.geteuid() != 0:
            return None
        assign = target.assign
        if assign is not None and assign.uid is not None:
            uid = assign.uid
            gid = assign.gid if assign.gid is not None else primary_gid(uid)
        else:
            name = self._policy.local.program_user
            try:
                entry = pwd.getpwnam(name)
            except KeyError as exc:
                raise TemporaryFailure(
                    Reply(451, "4.3.0", "program delivery failed: program_user unknown"),
                    f"program_user {name!r} is not a user",
                ) from exc
            uid, gid = entry.pw_uid, entry.pw_gid
        if uid == 0:
            raise TemporaryFailure(
                Reply(451, "4.7.0", "program delivery failed: refusing to run as root")
            )
        try:
            info = os.stat(target.home)
        except OSError:
            return uid, gid, Path("/")
        # A home the program user cannot enter (a root-owned mail-root home) is useless as
        # a working directory (the chdir itself happens before the uid switch and would
        # work); run the program from / instead, HOME still names the home.
        return uid, gid, target.home if can_enter(info, uid, gid) else Path("/")

    async def _program(
        self, command: str, message: Content, env: dict[str, str], target: _Target
    ) -> ProgramResult:
        identity = await self._thread(self._program_identity, target)
        uid, gid, cwd = identity if identity is not None else (None, None, target.home)
        return await run_program(
            command, message, env=env, cwd=cwd, uid=uid, gid=gid,
            timeout=self._policy.local.program_timeout,
        )
