"""One attempt's deliveries: route each pending recipient, deliver each route's group
with the local or remote agent under the concurrency limits, and record the outcomes.

The :class:`~gateway.delivery.scheduler.Scheduler` decides when a message is tried and
what happens after (retry, bounce, removal); :class:`Dispatcher` does the delivering in
between. It logs under the scheduler's name: its lines are the scheduler's story
(``delivery to=... status=...``, which ``gateway report`` reads).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from gateway.address import AddressError
from gateway.content import Content
from gateway.delivery.expansion import expand_pending, target_route
from gateway.delivery.notices import owes_nothing
from gateway.delivery.records import StateRecorder
from gateway.delivery.remote.agent import portion
from gateway.delivery.router import route_for
from gateway.delivery.types import LocalRoute, MxRoute, Outcome, Route, SmarthostRoute, SpecialRoute, TargetRoute
from gateway.delivery.verp import for_recipient
from gateway.logs import short
from gateway.model import Envelope, Message, QueuedRecipient, RecipientState
from gateway.verdicts import Action, PermanentFailure, Reply, TemporaryFailure

if TYPE_CHECKING:
    from gateway.context import Gateway

__all__ = ["Dispatcher", "delivery_id"]

log = logging.getLogger("gateway.delivery.scheduler")

ForwardFunction = Callable[[str, list[str], Content], Awaitable[Any]]


def delivery_id(qid: str, envelope: Envelope, rcpt: QueuedRecipient) -> str:
    """Stable per (message, recipient): a retry after a crash finds the Maildir copy."""
    index = next(i for i, r in enumerate(envelope.recipients) if r is rcpt)
    return f"Q{qid}R{index}"


class Dispatcher:
    """Delivers one attempt's recipients for a :class:`Scheduler`.

    :param delivery: the policy's ``[delivery]`` settings (the concurrency limits)
    :param records: where recipients' states are written
    :param remove: removes a message from the queue once nothing is left to do (the
        scheduler's, which also releases the delivery lock)
    :param forward: queues a forwarded copy (``.qmail`` forwards)
    :param share: how many processes split the concurrency limits
    :param primary: whether this process is the one doing retries (the master)
    """

    def __init__(
        self, delivery: Any, records: StateRecorder, remove: Callable[[str], Awaitable[None]],
        forward: ForwardFunction, *, share: int = 1, primary: bool = True,
    ) -> None:
        self._records = records
        self._remove = remove
        self._forward = forward
        self.share = share
        self.primary = primary
        self._local = asyncio.Semaphore(portion(delivery.local_concurrency, share, primary))
        self._remote = asyncio.Semaphore(portion(delivery.remote_concurrency, share, primary))
        self._agents: dict[int, tuple[Any, Any]] = {}

    async def close(self) -> None:
        """Close the remote agents' connections."""
        for _, remote in self._agents.values():
            await remote.close()

    # -- agents ------------------------------------------------------------

    def start_background(self, gateway: Gateway) -> None:
        """Start the remote agent's background tasks (MTA-STS refresh, TLS reports) now,
        in the primary, rather than at its first remote delivery: what an earlier run
        counted is reported even if this one delivers nothing remotely."""
        if self.primary:
            self._agents_for(gateway)[1].start_background()

    def _agents_for(self, gateway: Gateway) -> tuple[Any, Any]:
        agents = self._agents.get(id(gateway))
        if agents is None:
            from gateway.delivery.local import LocalDeliveryAgent
            from gateway.delivery.remote import RemoteDeliveryAgent
            from gateway.dns import make_resolver

            policy = gateway.policy
            local = LocalDeliveryAgent(
                policy, hostname=gateway.hostname, forward=self._forward, run_in_thread=gateway.run_in_thread
            )
            remote = RemoteDeliveryAgent(
                policy, make_resolver(policy.dns), hostname=gateway.hostname, share=self.share,
                primary=self.primary, counters=gateway.counters,
            )
            agents = self._agents[id(gateway)] = (local, remote)
        return agents

    async def record(
        self, gateway: Gateway, envelope: Envelope, rcpt: QueuedRecipient, outcome: Outcome,
        *, is_remote: bool = False,
    ) -> None:
        """Apply ``outcome`` to ``rcpt``, count and log it. ``is_remote``: it was for a
        remote route, even if no remote host answered (null MX, no such domain)."""
        rcpt.last_reply = " ".join(outcome.reply.lines())
        rcpt.remote = outcome.remote
        rcpt.dsn_relayed = outcome.dsn_relayed
        if outcome.status == "delivered":
            rcpt.state = RecipientState.DELIVERED
        elif outcome.status == "failed":
            rcpt.state = RecipientState.FAILED
        else:
            rcpt.attempts += 1
        is_remote = is_remote or bool(outcome.remote)
        counters = gateway.counters
        if counters is not None:
            counters.bump(counters.deliveries, (outcome.status, "remote" if is_remote else "local"))
        # As Postfix: relay=none for a remote delivery decided before any host answered.
        relay = outcome.remote or ("none" if is_remote else "local")
        log.info(
            "delivery to=<%s> status=%s relay=%s reply=%r",
            short(rcpt.address), outcome.status, relay, short(rcpt.last_reply, 200),
        )
        await gateway.runner.call_all(
            "gateway_delivered", gateway.policy.plugins,
            envelope=envelope, recipient=rcpt, reply=outcome.reply, gateway=gateway,
        )

    async def _route(self, gateway: Gateway, envelope: Envelope, rcpt: QueuedRecipient) -> Route:
        if rcpt.target:
            return target_route(rcpt, gateway)  # an alias or .forward target: decided
        route = await gateway.runner.first_value(
            "gateway_route", gateway.policy.plugins, envelope=envelope, recipient=rcpt, gateway=gateway
        )
        return route if route is not None else route_for(rcpt.address, gateway.policy)

    async def deliver(
        self, gateway: Gateway, qid: str, envelope: Envelope, pending: list[QueuedRecipient], message: Content,
        *, first: bool = False, tried: dict[str, Outcome] | None = None,
    ) -> bool:
        """Deliver every pending recipient, each route's group in parallel.

        ``message`` is the queued message: in memory, or extents of the queue file the
        caller keeps open (and delivery-locked) until this returns. Agents stream it.
        ``first``: the message's first attempt ever, in the process that queued it (a
        Maildir delivery then need not look for a copy an earlier attempt left).
        ``tried``: that first attempt was made before the message was queued
        (:meth:`deliver_at_once`: a relay the host did not take whole, Maildirs written
        for some recipients): the outcomes it got, by address, are recorded here and
        those recipients not tried again.

        Each group's results are written to the queue as soon as that group is done:
        the shorter the time between a peer's 250 and our record of it, the smaller
        the window in which a crash makes us send again. The group whose results leave
        every recipient done with no notice owed removes the message instead of
        writing its state (the removal is the record: same crash window, one write
        less).

        :returns: True when the message was removed
        """
        # With VERP every recipient has its own envelope sender: its own transaction.
        is_verp = bool(envelope.verp and envelope.sender)
        groups: dict[tuple[Route, str], list[QueuedRecipient]] = {}
        bad = Outcome("failed", Reply(553, "5.1.3", "Bad destination mailbox address syntax"))
        routed: list[tuple[QueuedRecipient, Route]] = []
        for rcpt in pending:
            try:
                routed.append((rcpt, await self._route(gateway, envelope, rcpt)))
            except AddressError:
                await self.record(gateway, envelope, rcpt, bad)
            except (TemporaryFailure, PermanentFailure) as exc:  # a route plugin's answer
                await self.record(gateway, envelope, rcpt, Outcome.of_failure(exc))
        # Aliases and .forward: targets replace the recipient, recorded before delivery.
        expanded, failures, changed = await expand_pending(gateway, envelope, routed)
        for rcpt, _ in routed:
            if id(rcpt) in failures:
                await self.record(gateway, envelope, rcpt, failures[id(rcpt)])
        if changed or failures:
            await self._records.save(qid, envelope)
        for rcpt, maybe in expanded:
            try:
                route = maybe if maybe is not None else await self._route(gateway, envelope, rcpt)
            except AddressError:
                await self.record(gateway, envelope, rcpt, bad)
                continue
            except (TemporaryFailure, PermanentFailure) as exc:
                await self.record(gateway, envelope, rcpt, Outcome.of_failure(exc))
                continue
            groups.setdefault((route, rcpt.address if is_verp else ""), []).append(rcpt)

        removal: asyncio.Future[None] | None = None  # shared by the groups that see it done
        is_shared = len(groups) > 1
        is_removed = False

        async def run(route: Route, rcpts: list[QueuedRecipient]) -> None:
            nonlocal removal, is_removed
            sent_as = for_recipient(envelope, rcpts[0]) if is_verp else envelope
            is_local = isinstance(route, (LocalRoute, SpecialRoute, TargetRoute))
            # The concurrency slot is held until the results are on disk (state written
            # or message removed), so at most local + remote concurrency deliveries can
            # ever be done-but-unrecorded.
            async with self._local if is_local else self._remote:
                outcomes = {r.address: tried[r.address] for r in rcpts if r.address in tried} if tried else {}
                rest = [r for r in rcpts if r.address not in outcomes]
                if rest:
                    outcomes.update(await self._deliver_group(gateway, qid, sent_as, route, rest, message, first))
                is_remote = isinstance(route, (MxRoute, SmarthostRoute))
                for rcpt in rcpts:
                    outcome = outcomes.get(rcpt.address)
                    if outcome is not None:
                        await self.record(gateway, envelope, rcpt, outcome, is_remote=is_remote)
                if not outcomes:
                    return
                if removal is None and owes_nothing(envelope):
                    if not is_shared:  # the only group: no task of its own for the removal
                        await self._remove(qid)
                        is_removed = True
                        return
                    removal = asyncio.ensure_future(self._remove(qid))
                if removal is not None:
                    await removal
                    return
                try:
                    await self._records.save(qid, envelope)
                except FileNotFoundError:
                    if removal is None:
                        raise
                    await removal  # a sibling group's removal records these results too

        if is_shared:
            await asyncio.gather(*(run(route, rcpts) for (route, _), rcpts in groups.items()))
        else:  # the common case, one route: no gathering task
            for (route, _), rcpts in groups.items():
                await run(route, rcpts)
        return is_removed or removal is not None

    async def deliver_at_once(
        self, gateway: Gateway, qid: str, envelope: Envelope, message: Content, announce: Callable[[], None],
    ) -> dict[str, Outcome] | None:
        """Deliver a message not yet queued, before the reply to its client, when that is
        plain deliveries (``[delivery] at_once``, docs/queue.md), no success notice
        asked for: recipients routed to local mailboxes (no alias or ``.forward``
        expanding them, no instruction file), each into its Maildir, or recipients that
        all share one remote route, in one transaction a host takes within
        ``at_once_wait`` (:meth:`_relay_at_once`).

        Routing and the ``gateway_deliver`` hook run as in a queued attempt. Only when
        every recipient is delivered are the deliveries recorded here (logged, counted,
        ``gateway_delivered``). Otherwise the caller queues the message, and the
        outcomes returned are the first queued attempt's to record as its own
        (:meth:`deliver`'s ``tried``): a relay's, whatever the host answered; the
        Maildir deliveries made. That attempt delivers the rest as usual.

        :param announce: called once delivered, before the deliveries are recorded (the
            session's arrival line goes before them)
        :returns: an outcome per recipient address, every one delivered (the message
            is done); or the outcomes of a partial attempt, as above; None when nothing
            was delivered or tried to the end
        """
        rcpts = envelope.recipients
        try:
            routes = [await self._route(gateway, envelope, rcpt) for rcpt in rcpts]
        except (AddressError, TemporaryFailure, PermanentFailure):
            return None
        route = routes[0]
        if isinstance(route, (MxRoute, SmarthostRoute)):
            if any(other != route for other in routes[1:]):
                return None  # several destinations: the queue's attempt delivers each
            # One recipient may have its own (VERP) sender; several share the message's.
            sent_as = for_recipient(envelope, rcpts[0]) if len(rcpts) == 1 else envelope
            outcomes = await self._relay_at_once(gateway, qid, sent_as, rcpts, route, message)
            if outcomes is None or any(r.address not in outcomes for r in rcpts):
                return None
            if any(o.status != "delivered" for o in outcomes.values()):
                return outcomes  # the first queued attempt records them
        elif all(isinstance(other, LocalRoute) for other in routes):
            pairs: list[tuple[QueuedRecipient, Route]] = list(zip(rcpts, routes))
            expanded, failures, changed = await expand_pending(gateway, envelope, pairs)
            if changed or failures or expanded != pairs:
                return None
            # No local delivery slot: these are bounded by the SMTP sessions waiting for
            # their reply (and the thread pool), as queue commits are; queued deliveries
            # holding every slot must not send the rest to the queue too.
            delivered = await asyncio.gather(*(self._maildir_at_once(gateway, qid, envelope, r, message) for r in pairs))
            outcomes = {rcpt.address: outcome for (rcpt, _), outcome in zip(pairs, delivered) if outcome is not None}
            if len(outcomes) < len(pairs):
                return outcomes or None  # the first queued attempt records these and delivers the rest
        else:  # a route plugin's answer (a hold, a discard, a program)
            return None
        try:  # delivered: whatever happens now, it must not be queued (and delivered) again
            announce()
            for rcpt in rcpts:
                await self.record(
                    gateway, envelope, rcpt, outcomes[rcpt.address], is_remote=not isinstance(route, LocalRoute)
                )
        except Exception:  # boundary
            log.exception("recording a delivery at once failed")
        return outcomes

    async def _maildir_at_once(
        self, gateway: Gateway, qid: str, envelope: Envelope, pair: tuple[QueuedRecipient, Route], message: Content,
    ) -> Outcome | None:
        """One local recipient's delivery at once: its outcome when delivered, else None
        (nothing written: an instruction file, a failure; the queue's attempt decides)."""
        rcpt, route = pair
        outcomes = await self._deliver_group(
            gateway, qid, for_recipient(envelope, rcpt), route, [rcpt], message, first=True, at_once=True
        )
        outcome = outcomes.get(rcpt.address)
        return outcome if outcome is not None and outcome.status == "delivered" else None

    async def _relay_at_once(
        self, gateway: Gateway, qid: str, envelope: Envelope, rcpts: list[QueuedRecipient],
        route: MxRoute | SmarthostRoute, message: Content,
    ) -> dict[str, Outcome] | None:
        """Relay the message to ``rcpts`` while its client waits, as a queued attempt
        would (a remote slot, the destination's limit, a pooled connection).

        If the final dot has not gone to a host ``at_once_wait`` seconds after the
        start, the attempt is cancelled: the connection is dropped mid-transaction, no
        host has the message, and the caller queues it. Once the dot is on its way, the
        host's reply is waited for as long as a queued attempt would wait: cutting the
        transaction off then could leave the message delivered and queued as well.

        :returns: the outcomes by address, or None when the attempt was cancelled
        """
        wait = float(gateway.policy.delivery.at_once_wait)
        if wait <= 0:
            return None
        is_final = False

        def before_dot() -> None:
            nonlocal is_final
            is_final = True

        async def relay() -> dict[str, Outcome]:
            async with self._remote:
                return await self._deliver_group(gateway, qid, envelope, route, rcpts, message, before_dot=before_dot)

        task = asyncio.ensure_future(relay())
        try:
            await asyncio.wait((task,), timeout=wait)
            if not task.done() and not is_final:
                task.cancel()
            await asyncio.wait((task,))
        except asyncio.CancelledError:  # the gateway is stopping: the client sends again
            task.cancel()
            raise
        if task.cancelled():
            to = ",".join(f"<{short(r.address, 80)}>" for r in rcpts[:10])
            log.info("not delivered at once to=%s: no final dot within %gs; queuing it", to, wait)
            return None
        return task.result()

    async def _deliver_group(
        self, gateway: Gateway, qid: str, envelope: Envelope, route: Route,
        rcpts: list[QueuedRecipient], message: Content, first: bool = False, at_once: bool = False,
        before_dot: Callable[[], None] | None = None,
    ) -> dict[str, Outcome]:
        addresses = [r.address for r in rcpts]
        if isinstance(route, SpecialRoute):
            if route.action == "hold":
                return {}
            log.warning("discarded by route to=%s", ",".join(addresses))
            return dict.fromkeys(addresses, Outcome("delivered", Reply(250, "2.0.0", "Discarded by route")))
        msg = Message(message)
        verdict = await gateway.runner.first_verdict(
            "gateway_deliver", gateway.policy.plugins,
            envelope=envelope, recipients=rcpts, route=route, message=msg, gateway=gateway,
        )
        if verdict is not None and verdict.action in (Action.REJECT, Action.TEMPFAIL, Action.DISCONNECT):
            if verdict.action is Action.REJECT:
                return dict.fromkeys(addresses, Outcome("failed", verdict.reply))
            return dict.fromkeys(addresses, Outcome("deferred", verdict.reply))
        # Headers a plugin added go before the body still on disk: nothing is read whole.
        data = msg.final_content() if msg.is_modified else message
        local, remote = self._agents_for(gateway)
        try:
            if isinstance(route, TargetRoute):
                outcome = await local.deliver_target(
                    envelope, rcpts[0].address, route, data,
                    delivery_id=delivery_id(qid, envelope, rcpts[0]), first=first,
                )
                return {r.address: outcome for r in rcpts}
            if isinstance(route, LocalRoute):
                return {
                    r.address: await self._deliver_local(gateway, local, qid, envelope, r, route, data, first, at_once)
                    for r in rcpts
                }
            return dict(await remote.deliver(envelope, rcpts, route, data, before_dot=before_dot))
        except TemporaryFailure as exc:
            return dict.fromkeys(addresses, Outcome("deferred", exc.reply))
        except PermanentFailure as exc:
            return dict.fromkeys(addresses, Outcome("failed", exc.reply))
        except asyncio.CancelledError:
            raise
        except Exception:  # boundary: an agent bug defers, never loses
            log.exception("delivery agent failed route=%s", route)
            return dict.fromkeys(addresses, Outcome("deferred", Reply(451, "4.3.0", "Local delivery error")))

    async def _deliver_local(
        self, gateway: Gateway, agent: Any, qid: str, envelope: Envelope, rcpt: QueuedRecipient,
        route: LocalRoute, data: Content, first: bool = False, at_once: bool = False,
    ) -> Outcome:
        local = gateway.policy.local
        # A user directory's route (route.account) vouches for a user [local] does not list.
        if route.account is None and route.user not in local.users and route.user != "postmaster":
            return Outcome("failed", Reply(550, "5.1.1", "Sorry, no mailbox here by that name"))
        outcome: Outcome = await agent.deliver(
            envelope, rcpt.address, route, data, delivery_id=delivery_id(qid, envelope, rcpt), first=first,
            at_once=at_once,
        )
        return outcome
