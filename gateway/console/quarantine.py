"""The quarantine pages: list (newest first), search, text preview, release, delete.

Release and delete are :func:`gateway.commands.quarantine.release` and ``delete``, as
``gateway quarantine release|delete`` does them; a released message is handed to this
process's scheduler at once.

An admin sees every message. An end user (``user`` scope) sees only messages with a
recipient that is theirs (:func:`gateway.console.users.is_theirs`), and of their
recipients only their own; any other message is "no such message" (404) to them, to
open, release or delete alike. A user's release releases the whole message, as an
admin's does: every recipient gets it.
"""

from __future__ import annotations

import datetime
import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway.commands import quarantine as commands
from gateway.console.listing import age, head_of, matches, page_of
from gateway.console.preview import preview
from gateway.console.server import QID_RE, redirect
from gateway.console.users import USER, theirs
from gateway.queue.damage import CorruptQueueFile

from gateway.console.sessions import Session

if TYPE_CHECKING:
    from gateway.console.server import Console

__all__ = ["add_routes"]

log = logging.getLogger(__name__)

AREA = "quarantine"
FIELDS = ("any", "sender", "recipient", "subject")


Mine = Callable[[list[str]], list[str]]
"""The recipients a session may see of a message's recipients."""


def _everyone(recipients: list[str]) -> list[str]:
    return recipients


def mine_of(local: Any, session: Session) -> Mine:
    """What ``session`` may see of a message's recipients: all (admin) or its own."""
    if session.is_admin:
        return _everyone
    return functools.partial(theirs, local, session.addresses)


def describe(store: Any, qid: str, mine: Mine) -> dict[str, Any]:
    """A quarantined message's facts, its recipients cut to ``mine``.

    :raises FileNotFoundError: not in the quarantine, or none of its recipients are ``mine``
    """
    row = commands.describe(store, qid)
    row["recipients"] = mine(row["recipients"])
    if not row["recipients"]:
        raise FileNotFoundError(qid)
    return row


def rows(store: Any, needle: str, field: str, mine: Mine = _everyone) -> list[dict[str, Any]]:
    """The quarantined messages matching the search, newest first (thread pool)."""
    found = []
    for qid in reversed(store.ids(AREA)):
        try:
            row = describe(store, qid, mine)
            row.update(head_of(store, qid, AREA))
        except (FileNotFoundError, CorruptQueueFile):
            continue  # released or deleted meanwhile, or damaged
        sender, recipients, subject = row["sender"], " ".join(row["recipients"]), row["Subject"]
        fields = {"sender": (sender,), "recipient": (recipients,), "subject": (subject,),
                  "any": (sender, recipients, subject, row["reason"])}[field]
        if matches(needle, *fields):
            row["age"] = age(datetime.datetime.fromisoformat(row["arrived"]).timestamp())
            found.append(row)
    return found


def message(store: Any, qid: str, mine: Mine = _everyone) -> tuple[dict[str, Any], Any]:
    """A quarantined message's facts and its text preview (thread pool)."""
    row = describe(store, qid, mine)
    return row, preview(store.read_message(qid, AREA))


def act_on(store: Any, qid: str, action: str, mine: Mine = _everyone) -> None:
    """Release or delete a message ``mine`` lets the session see (thread pool).

    :raises FileNotFoundError: no such message, or not the session's
    :raises FileExistsError: the queue holds that queue id already (release)
    """
    describe(store, qid, mine)
    if action == "release":
        commands.release(store, qid)
    else:
        commands.delete(store, qid)


def _qid(request: web.Request) -> str:
    qid = request.match_info["qid"]
    if not QID_RE.fullmatch(qid):
        raise web.HTTPNotFound(text="no such message\n")
    return qid


def add_routes(console: Console, app: web.Application) -> None:
    """``/quarantine``, ``/quarantine/{qid}`` and its ``release`` and ``delete`` POSTs."""
    allowed = console.requires("admin", USER)

    @allowed
    async def listing(request: web.Request, session: Session) -> web.StreamResponse:
        needle = request.query.get("q", "")[:200]
        field = request.query.get("field", "any")
        field = field if field in FIELDS else "any"
        found = await console.in_thread(rows, console.store, needle, field, mine_of(console.policy.local, session))
        shown, page, pages = page_of(request.query, found)
        done, done_id = request.query.get("done", ""), request.query.get("id", "")
        notice = f"{done_id}: {done}" if done in ("released", "deleted") and QID_RE.fullmatch(done_id) else ""
        return console.render(
            "quarantine.html", session, rows=shown, total=len(found),
            q=needle, field=field, fields=FIELDS, page=page, pages=pages, notice=notice,
        )

    @allowed
    async def show(request: web.Request, session: Session) -> web.StreamResponse:
        qid = _qid(request)
        try:
            row, shown = await console.in_thread(message, console.store, qid, mine_of(console.policy.local, session))
        except (FileNotFoundError, ValueError, CorruptQueueFile):
            raise web.HTTPNotFound(text="no such message in the quarantine\n") from None
        return console.render("message.html", session, row=row, preview=shown)

    @allowed
    async def act(request: web.Request, session: Session) -> web.StreamResponse:
        qid, action = _qid(request), request.match_info["action"]
        try:
            await console.in_thread(act_on, console.store, qid, action, mine_of(console.policy.local, session))
            if action == "release":
                console.wake(qid)
        except (FileNotFoundError, ValueError):
            raise web.HTTPNotFound(text="no such message in the quarantine\n") from None
        except FileExistsError:
            raise web.HTTPConflict(text="that queue id is in the queue already\n") from None
        done = "released" if action == "release" else "deleted"
        log.info("console: %s from the quarantine qid=%s login=%s", done, qid, session.login)
        return redirect(f"/quarantine?done={done}&id={qid}")

    app.router.add_get("/quarantine", listing)
    app.router.add_get("/quarantine/{qid}", show)
    app.router.add_post(r"/quarantine/{qid}/{action:release|delete}", act)
