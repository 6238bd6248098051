"""An end user's allow and block lists of senders: ``/lists``, add and remove.

The lists live in the state store ``[console] user_lists_state`` names (shared by the
nodes that use it), where ``rcpt_user_lists`` and ``data_user_lists`` read them at
RCPT and DATA; see those plugins for what each list does. Saving writes the user's
lists under each of their addresses (:attr:`gateway.console.sessions.Session.addresses`),
read back from the first. Users only: an admin has no lists of their own.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.console.server import redirect
from gateway.console.users import USER
from gateway.state import StateStore, StateUnavailable, acquire, release
from plugins.rcpt_user_lists import MAX_ENTRIES, UserLists, load_lists, normal_entry, save_lists

if TYPE_CHECKING:
    from gateway.console.server import Console
    from gateway.console.sessions import Session

__all__ = ["add_routes"]

log = logging.getLogger(__name__)

KINDS = ("allow", "block")
_STORE = web.AppKey("user_lists_store", StateStore)


def _primary(session: Session) -> str:
    return min(session.addresses, key=lambda a: (a.split("@")[0] != session.login.split("@")[0], a))


def add_routes(console: Console, app: web.Application) -> None:
    """``/lists`` and its ``add`` and ``remove`` POSTs; the lists' store for the app's life."""
    url = console.settings.user_lists_state

    async def open_store(app: web.Application) -> None:
        app[_STORE] = await acquire(url, Path(console.policy.server.var_dir))

    async def close_store(app: web.Application) -> None:
        store = app.get(_STORE)
        if store is not None:
            await release(store)

    app.on_startup.append(open_store)
    app.on_cleanup.append(close_store)

    def store_of() -> StateStore:
        return app[_STORE]

    user = console.requires(USER)

    @user
    async def show(request: web.Request, session: Session) -> web.StreamResponse:
        error = ""
        try:
            lists = await load_lists(store_of(), _primary(session))
        except StateUnavailable as exc:
            log.warning("console: lists of %s not read: %s", session.login, exc)
            lists, error = UserLists(), "Your lists cannot be read now; try again later."
        done = request.query.get("done", "")
        notice = {"added": "Added.", "removed": "Removed."}.get(done, "")
        return console.render("lists.html", session, lists=lists, kinds=KINDS, error=error, notice=notice,
                              max_entries=MAX_ENTRIES)

    @user
    async def change(request: web.Request, session: Session) -> web.StreamResponse:
        form = await request.post()
        action, kind, text = request.match_info["action"], form.get("list"), form.get("entry")
        if kind not in KINDS or not isinstance(text, str) or len(text) > 300:
            raise web.HTTPBadRequest(text="list and entry expected\n")
        try:
            entry = normal_entry(text)
        except ValueError as exc:
            if action == "add":
                return await _refuse(request, session, str(exc))
            raise web.HTTPBadRequest(text=f"{exc}\n") from None
        try:
            lists = await load_lists(store_of(), _primary(session))
            chosen = lists.allow if kind == "allow" else lists.block
            other = lists.block if kind == "allow" else lists.allow
            if action == "add":
                if entry in other:
                    other.remove(entry)  # on one list at a time: the last word counts
                if entry not in chosen:
                    if len(chosen) >= MAX_ENTRIES:
                        return await _refuse(request, session, f"A list holds at most {MAX_ENTRIES} entries.")
                    chosen.append(entry)
            elif entry in chosen:
                chosen.remove(entry)
            await save_lists(store_of(), session.addresses, lists)
        except StateUnavailable as exc:
            log.warning("console: lists of %s not saved: %s", session.login, exc)
            raise web.HTTPServiceUnavailable(text="your lists cannot be saved now; try again later\n") from None
        log.info("console: %s list %s %s login=%s", kind, action, entry, session.login)
        return redirect(f"/lists?done={'added' if action == 'add' else 'removed'}")

    async def _refuse(request: web.Request, session: Session, error: str) -> web.StreamResponse:
        try:
            lists = await load_lists(store_of(), _primary(session))
        except StateUnavailable:
            lists = UserLists()
        return console.render("lists.html", session, status=400, lists=lists, kinds=KINDS, error=error,
                              notice="", max_entries=MAX_ENTRIES)

    app.router.add_get("/lists", show)
    app.router.add_post(r"/lists/{action:add|remove}", change)
