"""The queue page: list with filters (sender, recipient, state); hold, release, retry,
delete, which are :func:`gateway.commands.queue.change` as ``gateway queue`` does them."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway.commands import queue as commands
from gateway.console.listing import age, head_of, matches, page_of
from gateway.console.server import QID_RE, redirect
from gateway.queue.damage import CorruptQueueFile

if TYPE_CHECKING:
    from gateway.console.server import Console
    from gateway.console.sessions import Session

__all__ = ["add_routes"]

log = logging.getLogger(__name__)

STATES = ("any", "held", "deferred", "pending")
"""held: by an operator or a route; deferred: tried and waiting; pending: not tried yet."""


def state_of(row: dict[str, Any]) -> str:
    if row["held"]:
        return "held"
    return "deferred" if row["attempts"] else "pending"


def rows(store: Any, policy: Any, sender: str, recipient: str, state: str) -> list[dict[str, Any]]:
    """The queued messages matching the filters, oldest first (thread pool)."""
    import time

    found = []
    for qid in store.ids("msg"):
        try:
            row = commands.describe(store, qid, "msg", policy)
            if not matches(sender, row["sender"]):
                continue
            if not matches(recipient, *(r["address"] for r in row["recipients"])):
                continue
            row["state"] = state_of(row)
            if state != "any" and row["state"] != state:
                continue
            row.update(head_of(store, qid, "msg"))
        except (FileNotFoundError, CorruptQueueFile):
            continue  # delivered meanwhile, or damaged (the gateway sets it aside)
        row["age"] = age(time.time() - row["age_seconds"])
        found.append(row)
    return found


def add_routes(console: Console, app: web.Application) -> None:
    """``/queue`` and ``/queue/{qid}/{hold|release|retry|delete}`` POSTs."""
    admin = console.requires("admin")

    @admin
    async def listing(request: web.Request, session: Session) -> web.StreamResponse:
        sender = request.query.get("sender", "")[:200]
        recipient = request.query.get("recipient", "")[:200]
        state = request.query.get("state", "any")
        state = state if state in STATES else "any"
        found = await console.in_thread(rows, console.store, console.policy, sender, recipient, state)
        shown, page, pages = page_of(request.query, found)
        done, done_id = request.query.get("done", ""), request.query.get("id", "")
        notice = f"{done_id}: {done}" if done in commands.CHANGES and QID_RE.fullmatch(done_id) else ""
        return console.render(
            "queue.html", session, rows=shown, total=len(found),
            sender=sender, recipient=recipient, state=state, states=STATES, page=page, pages=pages,
            notice=notice, actions=commands.CHANGES,
        )

    @admin
    async def act(request: web.Request, session: Session) -> web.StreamResponse:
        qid, action = request.match_info["qid"], request.match_info["action"]
        if not QID_RE.fullmatch(qid):
            raise web.HTTPNotFound(text="no such message\n")
        try:
            await console.in_thread(commands.change, console.store, qid, action)
        except (FileNotFoundError, ValueError):
            raise web.HTTPNotFound(text="no such message in the queue\n") from None
        except CorruptQueueFile:
            raise web.HTTPConflict(text="that message is damaged; the gateway sets it aside\n") from None
        if action in ("release", "retry"):
            console.wake(qid)
        log.info("console: queue %s qid=%s login=%s", action, qid, session.login)
        return redirect(f"/queue?done={action}&id={qid}")

    app.router.add_get("/queue", listing)
    app.router.add_post(r"/queue/{qid}/{action:hold|release|retry|delete}", act)
