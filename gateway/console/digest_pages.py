"""The digest's release links (``/digest/release``) and the console's digest timer.

See :mod:`gateway.console.digest` for what a digest holds and how its links are signed.
The pages need no session: the signed token is the authority, for one message and one
recipient. The timer runs with the console, which only the master (or single) process
serves, so a node sends each digest once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway.commands import quarantine as commands
from gateway.console.digest import (
    TokenError, base_url, build_digests, digest_key, last_run, read_token, set_last_run,
)
from gateway.console.quarantine import describe
from gateway.model import Envelope, Message, QueuedRecipient
from gateway.state import StateStore, StateUnavailable, acquire, release
from gateway.state.keys import digest as key_digest

if TYPE_CHECKING:
    from gateway.console.server import Console

__all__ = ["add_routes", "send_due"]

log = logging.getLogger(__name__)

_STORE = web.AppKey("digest_store", StateStore)
_TIMER = web.AppKey("digest_timer", asyncio.Task)


async def send_due(console: Console, force: bool = False) -> int:
    """Send the digests owed if ``digest_interval`` has passed since the last run (or
    ``force``); how many were queued."""
    settings = console.settings
    var_dir = Path(console.policy.server.var_dir)
    now = time.time()
    last = await console.in_thread(last_run, var_dir)
    if not force and now - last < float(settings.digest_interval):
        return 0
    key = await console.in_thread(digest_key, var_dir)
    url = base_url(console.policy, console.port)
    digests = await console.in_thread(build_digests, console.store, console.policy, key, last, now, url)
    for item in digests:
        qid = console.store.new_id()
        envelope = Envelope(sender=item.sender, recipients=[QueuedRecipient(address=item.recipient)], body="8BITMIME")
        await console.store.commit(qid, envelope, Message(item.message))
        console.wake(qid)
        log.info("console: digest queued qid=%s to=<%s> messages=%d", qid, item.recipient, item.count)
    await console.in_thread(set_last_run, var_dir, now)
    return len(digests)


async def _digest_forever(console: Console) -> None:
    tick = max(0.5, min(60.0, float(console.settings.digest_interval) / 2))
    while True:
        await asyncio.sleep(tick)
        try:
            await send_due(console)
        except Exception:  # a boundary: the next tick tries again
            log.exception("console: digests not sent")


def add_routes(console: Console, app: web.Application) -> None:
    """``/digest/release`` (GET: what it releases; POST: release) and the timer."""
    lifetime = float(console.settings.digest_link_lifetime)

    async def start(app: web.Application) -> None:
        app[_STORE] = await acquire(console.settings.user_lists_state, Path(console.policy.server.var_dir))
        if console.settings.digest:
            app[_TIMER] = asyncio.create_task(_digest_forever(console), name="console-digest")

    async def stop(app: web.Application) -> None:
        timer = app.get(_TIMER)
        if timer is not None:
            timer.cancel()
            try:
                await timer
            except asyncio.CancelledError:
                pass
        store = app.get(_STORE)
        if store is not None:
            await release(store)

    app.on_startup.append(start)
    app.on_cleanup.append(stop)

    def page(status: int, outcome: str, row: dict[str, Any] | None = None, token: str = "") -> web.Response:
        return console.render("digest.html", None, status=status, outcome=outcome, row=row, token=token)

    async def check(token: object) -> tuple[str, str, str, dict[str, Any] | None]:
        """(token, queue id, recipient, the message's facts or None if not quarantined)."""
        if not isinstance(token, str):
            raise web.HTTPBadRequest(text="no release token\n")
        key = await console.in_thread(digest_key, Path(console.policy.server.var_dir))
        qid, recipient = read_token(key, token)
        try:
            row = await console.in_thread(describe, console.store, qid, lambda rs: [r for r in rs if r.lower() == recipient])
        except (FileNotFoundError, ValueError):
            row = None
        return token, qid, recipient, row

    def used_key(token: str) -> str:
        return f"digest:used:{key_digest(token)}"

    async def gone(token: str) -> web.Response:
        is_used = await app[_STORE].get(used_key(token)) is not None
        return page(410, "already released" if is_used else "gone")

    async def show(request: web.Request) -> web.StreamResponse:
        try:
            token, _, _, row = await check(request.query.get("t"))
            if row is None:
                return await gone(token)
        except TokenError as exc:
            return page(403, "refused", {"error": str(exc)})
        except StateUnavailable:
            return page(503, "unavailable")
        return page(200, "confirm", row, token)

    async def do_release(request: web.Request) -> web.StreamResponse:
        form = await request.post()
        try:
            token, qid, recipient, row = await check(form.get("t"))
            if row is None:
                return await gone(token)
            if not await app[_STORE].set(used_key(token), "1", ttl=lifetime + 3600, only_if_absent=True):
                return page(410, "already released")
            try:
                await console.in_thread(commands.release, console.store, qid)
            except (FileNotFoundError, FileExistsError):
                return page(410, "gone")
        except TokenError as exc:
            return page(403, "refused", {"error": str(exc)})
        except StateUnavailable:
            return page(503, "unavailable")
        console.wake(qid)
        log.info("console: released from the quarantine by a digest link qid=%s for=<%s>", qid, recipient)
        return page(200, "released", row)

    app.router.add_get("/digest/release", show)
    app.router.add_post("/digest/release", do_release)

