"""What each scoped override changes, in words, for ``gateway check``.

A listener's chain depends on the client and the recipient: network overrides apply to
some clients, recipient-domain overrides to some recipients. So ``gateway check`` prints
each listener's chain with only its listener overrides applied, then each override as a
difference from the base policy: the plugins it disables, the limits and plugin settings
it changes (``name old -> new``), values written the way a policy writes them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from dataclasses import dataclass

from gateway.policy.model import Match, Override, Policy
from gateway.policy.units import UnitKind, format_duration, format_size

__all__ = ["OverrideChanges", "describe_match", "format_value", "override_changes"]


@dataclass(frozen=True)
class OverrideChanges:
    """One override's difference from the base policy.

    :ivar disables: plugin ids it takes out of the chain (those absent from it marked)
    :ivar limits: ``"key old -> new"`` for each limit it changes
    :ivar settings: ``(plugin id, ["key old -> new", ...])`` for each plugin it changes
    """

    disables: tuple[str, ...]
    limits: tuple[str, ...]
    settings: tuple[tuple[str, tuple[str, ...]], ...]

    @property
    def is_empty(self) -> bool:
        """Whether the override changes nothing at all."""
        return not (self.disables or self.limits or self.settings)


def describe_match(match: Match) -> str:
    """``listener submission``, ``network 192.0.2.0/24``, ``recipient_domain example.org``."""
    if match.listener is not None:
        return f"listener {match.listener}"
    if match.network is not None:
        return f"network {match.network}"
    return f"recipient_domain {match.recipient_domain}"


@functools.lru_cache(maxsize=64)
def _unit_kinds(cls: type) -> dict[str, str]:
    """Field name -> ``"size"`` / ``"duration"`` / ... for the fields declared with units."""
    kinds: dict[str, str] = {}
    for name, hint in typing.get_type_hints(cls, include_extras=True).items():
        for part in (hint, *typing.get_args(hint)):
            for meta in getattr(part, "__metadata__", ()):
                if isinstance(meta, UnitKind):
                    kinds[name] = meta.kind
    return kinds


def format_value(value: object, kind: str | None = None) -> str:
    """A setting's value as a policy writes it (``"25MB"``, ``"5m"``, ``true``, ``[...]``).

    :param value: the typed value
    :param kind: the field's unit (``"size"``, ``"duration"``), if it has one
    """
    if value is None:
        return "(unset)"
    if kind == "size" and isinstance(value, int):
        return format_size(value)
    if kind == "duration" and isinstance(value, (int, float)):
        return format_duration(float(value))
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (tuple, list, frozenset)):
        return "[" + ", ".join(format_value(v, kind) for v in value) + "]"
    return str(value)


def _changed(old: object, new: object, keys: frozenset[str] | None) -> tuple[str, ...]:
    """``"key old -> new"`` for the fields of two settings objects that differ."""
    if not dataclasses.is_dataclass(old) or not dataclasses.is_dataclass(new):
        return () if old == new else (f"{format_value(old)} -> {format_value(new)}",)
    kinds = _unit_kinds(typing.cast(type, type(old)))
    out = []
    for f in dataclasses.fields(old):
        if keys is not None and f.name not in keys:
            continue
        before, after = getattr(old, f.name), getattr(new, f.name)
        if before != after:
            kind = kinds.get(f.name)
            out.append(f"{f.name} {format_value(before, kind)} -> {format_value(after, kind)}")
    return tuple(out)


def override_changes(policy: Policy, override: Override) -> OverrideChanges:
    """What ``override`` changes against the base policy (``[limits]`` and the chain).

    :param policy: the policy the override belongs to
    :param override: one of ``policy.overrides``
    """
    chain = {entry.id: entry for entry in policy.plugins}
    disables = tuple(d if d in chain else f"{d} (not in the chain)" for d in override.disable)
    limits: tuple[str, ...] = ()
    if override.limits is not None:
        limits = _changed(policy.limits, override.limits, override.limits_keys)
    settings = []
    for plugin_id, new in override.plugins.items():
        entry = chain.get(plugin_id)
        if entry is None:
            continue
        changes = _changed(entry.settings, new, override.plugin_keys.get(plugin_id))
        if changes:
            settings.append((plugin_id, changes))
    return OverrideChanges(disables, limits, tuple(settings))
