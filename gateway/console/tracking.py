"""The message tracking page (admins): search the index by sender, recipient, Message-ID,
queue id, client and time; a message's page tells its story as the log does, from the
connection to its removal (gateway/tracking). The index is read in the thread pool."""

from __future__ import annotations

import calendar
import re
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway.console.listing import PAGE, age
from gateway.tracking import console_index

if TYPE_CHECKING:
    from gateway.console.server import Console
    from gateway.console.sessions import Session

__all__ = ["RANGES", "add_routes", "parse_time"]

KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9/@.-]{0,199}")
"""A message's key: its queue id, or ``<session>/<n>`` (a session id may carry ``@node``)."""
RANGES = {"1h": 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400, "all": None}
"""The time ranges the form offers (before ``since``/``until``, which win)."""
_QUEUED_AS = re.compile(r"queued as ([A-Za-z0-9]+)")
_FIELDS = ("sender", "recipient", "message_id", "qid", "client")


def parse_time(text: str) -> float | None:
    """``2026-12-05T13:30`` (or with seconds, or a space) as UTC; ``None`` if empty or bad."""
    text = text.strip().replace(" ", "T")
    for layout in ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d"):
        try:
            return float(calendar.timegm(time.strptime(text, layout)))
        except ValueError:
            continue
    return None


def utc(epoch: float | None, *, precise: bool = False) -> str:
    if epoch is None:
        return ""
    text = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch))
    return f"{text}.{int(epoch * 1000) % 1000:03d}" if precise else text


def _story(message: dict[str, Any]) -> list[dict[str, Any]]:
    steps = []
    for event in message["story"]:
        step = dict(event)
        step["when"] = utc(event["time"], precise=True)
        step["delay"] = "" if event["delay"] is None else f"{event['delay']:.3f}s"
        step["score"] = "" if event["score"] is None else f"{event['score']:g}"
        link = _QUEUED_AS.search(event["detail"] or "")
        step["link"] = link.group(1) if link and event["kind"] in ("dsn", "copy") else ""
        steps.append(step)
    return steps


def add_routes(console: Console, app: web.Application) -> None:
    """``/tracking`` (search) and ``/tracking/{key}`` (one message's story)."""
    admin = console.requires("admin")
    index = console_index(console.policy)

    def is_on() -> bool:
        return getattr(console.gateway_app, "index", None) is not None or index.exists()

    @admin
    async def search(request: web.Request, session: Session) -> web.StreamResponse:
        query = request.query
        form = {name: query.get(name, "")[:200] for name in (*_FIELDS, "since", "until")}
        chosen = query.get("range", "24h")
        chosen = chosen if chosen in RANGES else "24h"
        now = time.time()
        since, until = parse_time(form["since"]), parse_time(form["until"])
        if since is None and RANGES[chosen] is not None:
            since = now - RANGES[chosen]  # type: ignore[operator]
        rows: list[dict[str, Any]] = []
        total = 0
        try:
            page = max(1, int(query.get("page", "1")))
        except ValueError:
            page = 1
        if is_on():
            rows, total = await console.in_thread(
                lambda: index.search(**{f: form[f] for f in _FIELDS}, since=since, until=until,
                                     limit=PAGE, offset=(page - 1) * PAGE))
        for row in rows:
            row["when"] = utc(row["time"])
            row["age"] = age(row["time"], now)
        pages = max(1, -(-total // PAGE))
        return console.render(
            "tracking.html", session, rows=rows, total=total, form=form, range=chosen, ranges=RANGES,
            page=page, pages=pages, is_on=is_on(), shown_since=utc(since), shown_until=utc(until),
        )

    @admin
    async def show(request: web.Request, session: Session) -> web.StreamResponse:
        key = request.match_info["key"]
        if not KEY_RE.fullmatch(key) or not is_on():
            raise web.HTTPNotFound(text="no such message in the index\n")
        message = await console.in_thread(index.message, key)
        if message is None:
            raise web.HTTPNotFound(text="no such message in the index\n")
        message["when"] = utc(message["time"], precise=True)
        return console.render("tracking_message.html", session, m=message, story=_story(message))

    app.router.add_get("/tracking", search)
    app.router.add_get(r"/tracking/{key:[A-Za-z0-9][A-Za-z0-9/@.-]{0,199}}", show)
