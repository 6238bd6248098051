"""gateway.delivery.expansion: recipients that cannot expand cost no pool thread."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from gateway.delivery.expansion import expand_pending
from gateway.delivery.types import LocalRoute
from gateway.model import Envelope, QueuedRecipient
from gateway.policy.model import LocalSettings, Policy


def _expand(tmp_path: Path, **local: Any) -> list[str]:
    """Expand one local recipient; the names of the functions handed to the pool."""
    settings = replace(LocalSettings(), domains=("local.example",), users=("alice",), mail_root=tmp_path, **local)
    handed: list[str] = []

    async def run_in_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
        handed.append(fn.__name__)
        return await asyncio.to_thread(fn, *args, **kwargs)

    gateway = SimpleNamespace(policy=Policy(source="test", local=settings), run_in_thread=run_in_thread)
    rcpt = QueuedRecipient("alice@local.example")
    envelope = Envelope(sender="a@example.org", recipients=[rcpt])
    route = LocalRoute("alice", "", "local.example")
    out, failed, changed = asyncio.run(expand_pending(gateway, envelope, [(rcpt, route)]))  # type: ignore[arg-type]
    assert (out, failed, changed) == ([(rcpt, route)], {}, False)
    return handed


def test_without_aliases_or_forward_files_nothing_goes_to_a_thread(tmp_path: Path) -> None:
    assert _expand(tmp_path) == []


def test_with_forward_files_the_lookup_goes_to_a_thread(tmp_path: Path) -> None:
    (tmp_path / "alice").mkdir()
    assert _expand(tmp_path, dot_forward=True) == ["expand_recipient"]
