"""Validate a parsed TOML table against a frozen dataclass.

Every settings object in a policy (the gateway's own sections and each plugin's ``Settings``)
is a frozen dataclass. :func:`build` turns a TOML table into an instance, checking every key
and value against the field's type hint, and raises :class:`PolicyError` naming the file, line
and dotted key of the first problem.

Supported field types: ``str``, ``int``, ``float`` (an integer is accepted), ``bool``,
:class:`pathlib.Path`, ``Literal[...]`` choices, :class:`enum.Enum` (by value),
:data:`~gateway.policy.units.Duration`, :data:`~gateway.policy.units.Size`,
:data:`~gateway.policy.units.IPNetwork`, ``tuple[X, ...]`` and ``list[X]`` (from TOML
arrays), ``dict[str, X]`` / ``Mapping[str, X]`` (from tables), unions such as ``X | None``
(TOML has no null, so ``None`` is only ever a default), nested frozen dataclasses (sub-tables),
and ``object`` / ``Any`` (taken as is).

Fields are documented with :func:`setting`, which stores the text in the field metadata under
``"doc"`` (and optional ``"min"`` / ``"max"`` bounds for numbers) so ``gateway check`` and the
docs can print it.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import enum
import ipaddress
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

from gateway.policy import units

__all__ = ["FieldInfo", "Locate", "PolicyError", "build", "convert", "describe", "setting"]

T = TypeVar("T")
Locate: TypeAlias = Callable[[str], int | None]
"""Maps a dotted key (``"limits.max_recipients"``) to its source line, or ``None``."""


class PolicyError(Exception):
    """An invalid policy: where (file, line, dotted key) and what is wrong.

    ``str()`` gives ``"{file}:{line}: {key}: {message}"``, or ``"{file}: {key}: {message}"``
    when the line is unknown.
    """

    def __init__(self, file: str, line: int | None, key: str, message: str) -> None:
        self.file = file
        self.line = line
        self.key = key
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.key}: {self.message}"


@dataclasses.dataclass(frozen=True)
class FieldInfo:
    """One documented field of a settings dataclass, as :func:`describe` reports it."""

    name: str
    type: str
    default: object
    doc: str
    required: bool


def setting(default: T, doc: str, *, min: float | None = None, max: float | None = None) -> T:
    """Declare a dataclass field with a default, a doc line and optional numeric bounds.

    Use as ``port: int = setting(2525, "TCP port", min=1, max=65535)``. Mutable-looking
    defaults (dataclass instances) are fine: settings are frozen.

    :param default: the default value.
    :param doc: one line of documentation for ``gateway check`` and the docs.
    :param min: inclusive lower bound for a number (after unit parsing).
    :param max: inclusive upper bound for a number (after unit parsing).
    :returns: a :func:`dataclasses.field` (typed as the default for the type checker).
    """
    metadata = {"doc": doc, "min": min, "max": max}
    if isinstance(default, Mapping):
        items = dict(default)
        return dataclasses.field(default_factory=lambda: dict(items), metadata=metadata)  # type: ignore[return-value]
    if dataclasses.is_dataclass(default):
        instance = default
        return dataclasses.field(default_factory=lambda: instance, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def describe(cls: type) -> tuple[FieldInfo, ...]:
    """List the fields of a settings dataclass with their type, default and doc line."""
    hints = typing.get_type_hints(cls, include_extras=True)
    infos = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default: object = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        infos.append(
            FieldInfo(
                name=f.name,
                type=_type_name(hints[f.name]),
                default=default,
                doc=str(f.metadata.get("doc", "")),
                required=default is dataclasses.MISSING,
            )
        )
    return tuple(infos)


@dataclasses.dataclass(frozen=True)
class _Context:
    file: str
    locate: Locate

    def error(self, path: str, message: str) -> PolicyError:
        return PolicyError(self.file, self.locate(path), path, message)


def build(
    cls: type[T],
    data: Mapping[str, object],
    *,
    path: str,
    locate: Locate,
    file: str,
    base: T | None = None,
) -> T:
    """Build a frozen dataclass instance from a TOML table, validating every key.

    :param cls: the dataclass to build.
    :param data: the parsed table.
    :param path: the dotted key of the table (``"limits"``, ``"plugins[2]"``), ``""`` for the
        document root; used in error messages and to find lines.
    :param locate: maps a dotted key to its line in the source, or ``None``.
    :param file: the file name for error messages.
    :param base: when given, keys missing from ``data`` take this instance's values instead of
        the dataclass defaults (used to merge an override's partial table onto the base).
    :returns: the instance.
    :raises PolicyError: on an unknown key, a missing required key, a wrong type or a value
        the dataclass itself rejects (a ``ValueError`` from ``__post_init__``).
    """
    return _build(cls, data, path, _Context(file, locate), base)


def convert(tp: object, value: object, *, path: str, locate: Locate, file: str) -> object:
    """Convert one TOML value to the type ``tp`` (see the module docstring for the types).

    :raises PolicyError: when the value does not fit the type.
    """
    return _convert(tp, value, path, _Context(file, locate))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _build(cls: type[T], data: Mapping[str, object], path: str, ctx: _Context, base: T | None) -> T:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [key for key in data if key not in fields]
    if unknown:
        key = unknown[0]
        message = f"unknown key {key!r}"
        close = difflib.get_close_matches(key, list(fields), n=1)
        if close:
            message += f" (did you mean {close[0]!r}?)"
        valid = ", ".join(sorted(fields)) or "none"
        raise ctx.error(_join(path, key), f"{message}; valid keys: {valid}")
    hints = typing.get_type_hints(cls, include_extras=True)
    values: dict[str, object] = {}
    for name, f in fields.items():
        key_path = _join(path, name)
        if name in data:
            value = _convert(hints[name], data[name], key_path, ctx)
            _check_bounds(value, f, key_path, ctx)
            values[name] = value
        elif base is not None:
            values[name] = getattr(base, name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ctx.error(key_path, f"missing required key {name!r}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ctx.error(path or "<root>", str(exc)) from None


def _check_bounds(value: object, f: dataclasses.Field[Any], path: str, ctx: _Context) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return
    low, high = f.metadata.get("min"), f.metadata.get("max")
    if low is not None and value < low:
        raise ctx.error(path, f"must be at least {low}, got {value}")
    if high is not None and value > high:
        raise ctx.error(path, f"must be at most {high}, got {value}")


def _toml_type(value: object) -> str:
    """Name a parsed TOML value's type the way the policy author wrote it."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, Mapping):
        return "table"
    return type(value).__name__


def _type_name(tp: object) -> str:
    """Name an expected type for an error message (``"duration"``, ``"array of string"``)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    simple = {str: "string", int: "integer", float: "float", bool: "boolean", Path: "path"}
    if isinstance(tp, type) and tp in simple:
        return simple[tp]
    if origin is typing.Annotated:
        marker = next((a for a in args[1:] if isinstance(a, units.UnitKind)), None)
        return marker.kind if marker else _type_name(args[0])
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list):
        return "array of " + _type_name(args[0] if args else object)
    if origin in (dict, collections.abc.Mapping):
        return "table of " + _type_name(args[1] if len(args) == 2 else object)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return "table"
    return getattr(tp, "__name__", str(tp))


def _takes_shape(tp: object, value: object) -> bool:
    """Whether ``tp`` is read from a TOML table (or array) when ``value`` is one."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _takes_shape(typing.get_args(tp)[0], value)
    if isinstance(value, Mapping):
        return origin in (dict, collections.abc.Mapping) or (
            isinstance(tp, type) and dataclasses.is_dataclass(tp)
        )
    if isinstance(value, list):
        return origin in (tuple, list)
    return False


def _convert(tp: object, value: object, path: str, ctx: _Context) -> object:
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def wrong() -> PolicyError:
        return ctx.error(path, f"expected {_type_name(tp)}, got {_toml_type(value)} {value!r}")

    if tp is object or tp is Any:
        return value
    if origin is typing.Annotated:
        marker = next((a for a in args[1:] if isinstance(a, units.UnitKind)), None)
        if marker is None:
            return _convert(args[0], value, path, ctx)
        parse = {
            "duration": units.parse_duration,
            "size": units.parse_size,
            "network": units.parse_network,
        }
        try:
            return parse[marker.kind](value)
        except units.UnitError as exc:
            raise ctx.error(path, str(exc)) from None
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        errors = []
        for member in members:
            try:
                return _convert(member, value, path, ctx)
            except PolicyError as exc:
                errors.append((member, exc))
        # A table (or array) that only one member takes as such gets that member's own
        # error, which names the unknown key or bad value inside it ("action" or
        # {action, score, reply}: a misspelt key in the table is named, not "got table").
        shaped = [exc for member, exc in errors if _takes_shape(member, value)]
        if len(members) == 1 or len(shaped) == 1:
            raise (errors[0][1] if len(members) == 1 else shaped[0]) from None
        raise wrong()
    if origin is typing.Literal:
        # Compare type too: TOML true must not match a choice of 1.
        if any(type(value) is type(choice) and value == choice for choice in args):
            return value
        raise ctx.error(path, f"expected {_type_name(tp)}, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, list):
            raise wrong()
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ctx.error(path, f"expected an array of {len(args)} items, got {len(value)}")
            return tuple(
                _convert(a, v, f"{path}[{i}]", ctx)
                for i, (a, v) in enumerate(zip(args, value, strict=True))
            )
        item = args[0] if args else object
        items = [_convert(item, v, f"{path}[{i}]", ctx) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, collections.abc.Mapping):
        if not isinstance(value, Mapping):
            raise wrong()
        item = args[1] if len(args) == 2 else object
        return {str(k): _convert(item, v, _join(path, str(k)), ctx) for k, v in value.items()}
    if not isinstance(tp, type):
        raise TypeError(f"unsupported settings type {tp!r} at {path}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise wrong()
        return _build(tp, value, path, ctx, None)
    if issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ctx.error(path, f"expected {_type_name(tp)}, got {value!r}") from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong()
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise wrong()
    if tp is str:
        if isinstance(value, str):
            return value
        raise wrong()
    if issubclass(tp, Path):
        if isinstance(value, str) and value:
            return tp(value)
        raise wrong()
    if tp in (ipaddress.IPv4Network, ipaddress.IPv6Network):
        return _convert(units.IPNetwork, value, path, ctx)
    raise TypeError(f"unsupported settings type {tp!r} at {path}")
