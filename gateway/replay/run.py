"""Replay a capture (or a corpus) through a policy and build the :class:`Report`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from gateway.hooks import PluginSpec
from gateway.replay.engine import Replayer, dns_index
from gateway.replay.outcome import Outcome, _address, outcomes
from gateway.replay.records import Damaged, read_records
from gateway.replay.report import Report

__all__ = ["compare", "replay_capture", "replay_records"]

# Records read before their sessions replay (see replay_records).
_READ_AHEAD = 256

_GONE = Outcome("disconnect", "session", "core", "the session ended before this transaction")


def compare(report: Report, old_record: Mapping[str, Any], new_record: Mapping[str, Any], *, has_old: bool = True) -> None:
    """Add each of ``old_record``'s transactions to ``report`` with its old and new outcome."""
    old, new = outcomes(dict(old_record)), outcomes(dict(new_record))
    where = f"{old_record.get('_where', '-')} {old_record.get('session', '')}".strip()
    txns = old_record.get("txns") or []
    if not txns:  # refused before MAIL: the session is the unit
        if old or new:
            fallback = Outcome("no message", "connect", reason="nothing recorded after the greeting")
            report.add(where, "", [], old[0] if old and has_old else None, new[0] if new else fallback)
        return
    if not new_record.get("txns") and new:  # the new policy refused at connect or HELO
        new = new * len(txns)
    for i, txn in enumerate(txns):
        recipients = [_address(str(r.get("rcpt", ""))) for r in txn.get("rcpts") or []]
        later = new[i] if i < len(new) else _GONE
        report.add(f"{where}#{i + 1}", _address(str(txn.get("mail", ""))), recipients,
                   old[i] if has_old and i < len(old) else None, later)


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


async def replay_records(
    policy: Any,
    specs: Mapping[str, PluginSpec],
    items: Iterable[dict[str, Any] | Damaged],
    *,
    dns: str = "record",
    skip: Iterable[str] = (),
    has_old: bool = True,
) -> Report:
    """Replay each record of ``items`` (Damaged entries are reported and passed over)."""
    everything: dict[tuple[str, str], tuple[str, bytes | None]] = {}
    report = Report(policy.source, dns)
    async with Replayer(policy, specs, dns=dns, everything=everything, skip=skip) as replayer:
        report.skipped_plugins = list(replayer.skipped)
        for chunk in _chunks(items, _READ_AHEAD):
            # The answers of the sessions read so far (and of the next few: sessions that
            # overlapped in time are near each other) stand in for lookups a plugin's cache
            # or its shared in-flight query saved a session.
            for item in chunk:
                if not isinstance(item, Damaged):
                    everything.update(dns_index(item))
            for item in chunk:
                if isinstance(item, Damaged):
                    report.damaged.append(str(item))
                    continue
                compare(report, item, await replayer.replay(item), has_old=has_old)
        report.missing_dns = sorted({f"{name} {rdtype}" for name, rdtype in replayer.missing_dns})
    return report


async def replay_capture(
    policy: Any, specs: Mapping[str, PluginSpec], paths: Iterable[str | Path], *, dns: str = "record",
    skip: Iterable[str] = (),
) -> Report:
    """Replay the capture files (or directories of them) at ``paths`` through ``policy``."""
    return await replay_records(policy, specs, read_records(paths), dns=dns, skip=skip)
