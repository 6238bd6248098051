"""Reading queue files for the console's pages (run in the thread pool only), and
cutting a list into pages."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from gateway.console.preview import header_summary
from gateway.content import Content

__all__ = ["PAGE", "age", "head_of", "matches", "page_of"]

T = TypeVar("T")

PAGE = 50
"""Rows on one list page."""

HEAD_BYTES = 32 * 1024
"""How much of a message is read for its Subject on a list page."""


def head_of(store: Any, qid: str, area: str) -> dict[str, str]:
    """Subject, From and Date of a queued message, from its first octets only."""
    item = store.load(qid, area)
    fd = os.open(item.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = Content.of_file(fd, item.extents).head(HEAD_BYTES)
    finally:
        os.close(fd)
    end = data.find(b"\r\n\r\n")
    try:
        return header_summary(data if end < 0 else data[: end + 4])
    except Exception:  # a header section the parser chokes on: no summary
        return {"Subject": "", "From": "", "Date": ""}


def age(epoch: float, now: float | None = None) -> str:
    """How long ago, shortly: ``45s``, ``12m``, ``3h``, ``2d``."""
    seconds = max(0, int((time.time() if now is None else now) - epoch))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def matches(needle: str, *haystack: str) -> bool:
    """Case-insensitive substring search over some fields; an empty needle matches."""
    needle = needle.strip().lower()
    return not needle or any(needle in (h or "").lower() for h in haystack)


def page_of(query: Mapping[str, str], found: Sequence[T]) -> tuple[Sequence[T], int, int]:
    """The rows of the page ``query`` asks for (``page=N``, 1 if absent or bad, the last
    if past the end), that page's number and the number of pages."""
    try:
        page = max(1, int(query.get("page", "1")))
    except ValueError:
        page = 1
    pages = max(1, -(-len(found) // PAGE))
    page = min(page, pages)
    return found[(page - 1) * PAGE: page * PAGE], page, pages
