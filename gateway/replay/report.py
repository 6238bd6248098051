"""The difference between what the old policy did and what the new one would do.

A :class:`Report` collects, per message (transaction), the old and new
:class:`~gateway.replay.outcome.Outcome`; it groups the changes by the plugin and reason
that made them, and counts totals: newly refused, newly accepted, other changes (a
refusal's kind, quarantine, the accepted recipients), score shifts, records that could
not be replayed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from gateway.replay.outcome import Outcome

__all__ = ["Change", "Report"]


@dataclass
class Change:
    """One message whose outcome (or score) differs."""

    where: str
    sender: str
    recipients: list[str]
    old: Outcome | None
    new: Outcome

    @property
    def kind(self) -> str:
        old, new = self.old, self.new
        if old is None:
            return "new"
        if old.is_accepted and new.is_refused:
            return "newly refused"
        if old.is_refused and new.is_accepted:
            return "newly accepted"
        if (old.action, old.accepted if old.is_accepted else ()) != (new.action, new.accepted if new.is_accepted else ()):
            return "changed"
        return "score"

    @property
    def cause(self) -> tuple[str, str]:
        """The plugin and reason behind the change: the refusing (or quarantining) side's."""
        new, old = self.new, self.old or self.new
        if new.is_refused or new.action == "quarantine" or (new.refused and len(new.refused) >= len(old.refused)):
            return new.plugin or "-", new.reason
        return old.plugin or "-", old.reason

    def to_dict(self) -> dict[str, Any]:
        return {
            "where": self.where, "from": self.sender, "to": self.recipients, "change": self.kind,
            "old": self.old.to_dict() if self.old else None, "new": self.new.to_dict(),
        }


@dataclass
class Report:
    """What a replay found; :meth:`add` each message, then render."""

    policy: str
    dns: str
    messages: int = 0
    changes: list[Change] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    skipped_plugins: list[str] = field(default_factory=list)
    missing_dns: list[str] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)

    def add(self, where: str, sender: str, recipients: list[str], old: Outcome | None, new: Outcome) -> None:
        self.messages += 1
        self.outcomes[new.action] += 1
        change = Change(where, sender, recipients, old, new)
        if old is None or change.kind != "score" or _shift(old, new):
            self.changes.append(change)

    def totals(self) -> dict[str, Any]:
        kinds = Counter(c.kind for c in self.changes)
        shifts = [s for c in self.changes if c.old is not None and (s := _shift(c.old, c.new))]
        return {
            "messages": self.messages,
            "unchanged": self.messages - sum(v for k, v in kinds.items() if k != "score"),
            "newly_refused": kinds["newly refused"],
            "newly_accepted": kinds["newly accepted"],
            "other_changes": kinds["changed"],
            "score_shifts": len(shifts),
            "score_shift_mean": round(sum(shifts) / len(shifts), 3) if shifts else 0.0,
            "damaged_records": len(self.damaged),
            "outcomes": dict(self.outcomes),
        }

    def groups(self) -> list[dict[str, Any]]:
        counts: Counter[tuple[str, str, str]] = Counter()
        for change in self.changes:
            if change.kind != "score":
                kind = change.new.action if change.kind == "new" else change.kind
                counts[(kind, *change.cause)] += 1
        return [
            {"change": kind, "plugin": plugin, "reason": reason, "messages": n}
            for (kind, plugin, reason), n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy, "dns": self.dns, "totals": self.totals(), "groups": self.groups(),
            "messages": [c.to_dict() for c in self.changes], "damaged": self.damaged,
            "not_replayed_plugins": self.skipped_plugins, "dns_not_in_record": self.missing_dns,
        }

    def gate(self, fail_on: str) -> bool:
        """Whether the changes fail a ``--fail-on`` gate: ``any`` outcome change,
        ``refused`` (newly refused only), ``none``."""
        totals = self.totals()
        if fail_on == "refused":
            return bool(totals["newly_refused"])
        if fail_on == "any":
            return bool(totals["newly_refused"] or totals["newly_accepted"] or totals["other_changes"])
        return False

    def unexpected(self, expect: str) -> int:
        """How many messages did not come out as ``expect`` says (``accepted``/``refused``)."""
        if expect == "accepted":
            return sum(1 for c in self.changes if not c.new.is_accepted)
        return sum(1 for c in self.changes if not c.new.is_refused)

    def render(self) -> str:
        """The report as text."""
        out = [f"replay through {self.policy} (DNS: {self.dns})", ""]
        changed = [c for c in self.changes if c.kind != "score"]
        if changed:
            out.append("Messages whose outcome changes:")
            for c in changed:
                old = c.old.describe() if c.old else "(not captured)"
                out.append(f"  {c.where} <{c.sender}> -> {', '.join(f'<{r}>' for r in c.recipients)}")
                out.append(f"      old: {old}")
                out.append(f"      new: {c.new.describe()}")
            out.append("")
        groups = self.groups()
        if groups:
            out.append("By plugin and reason:")
            for g in groups:
                out.append(f"  {g['messages']:>5}  {g['change']:<15} {g['plugin']}: {g['reason'] or '-'}")
            out.append("")
        t = self.totals()
        out.append(
            f"Totals: {t['messages']} messages, {t['unchanged']} unchanged, {t['newly_refused']} newly refused,"
            f" {t['newly_accepted']} newly accepted, {t['other_changes']} other changes,"
            f" {t['score_shifts']} score shifts (mean {t['score_shift_mean']:+g})"
        )
        if self.skipped_plugins:
            out.append(f"Not replayed (left out of the chain): {', '.join(self.skipped_plugins)}")
        if self.missing_dns:
            out.append(f"DNS queries not in the record (answered as timeouts): {len(self.missing_dns)},"
                       f" e.g. {', '.join(self.missing_dns[:5])}")
        for text in self.damaged:
            out.append(f"Damaged record, not replayed: {text}")
        return "\n".join(out) + "\n"


def _shift(old: Outcome, new: Outcome) -> float:
    if old.score is None or new.score is None:
        return 0.0
    return round(new.score - old.score, 6)
