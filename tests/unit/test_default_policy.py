"""The shipped default policy lists every key of the policy schema, with its default.

``policies/default.toml`` (the embedded ``gateway/policy/default.toml`` is a symlink to
it) promises "every key is listed with its default value": a key added to
:mod:`gateway.policy.model` without a line in that file fails here, and so does a
written value that is not the schema's default.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from collections.abc import Iterator

import pytest

from gateway.policy.loader import _OVERRIDE_KEYS, DEFAULT_POLICY_PATH, RESERVED_PLUGIN_KEYS
from gateway.policy.model import Override, PluginEntry, Policy
from gateway.policy.schema import build

# Keys whose value in the shipped file is deliberately not the schema's default.
DIFFERENT = {
    "auth.users_file": "the embedded policy names var/users; the schema's default is no file",
    "console.enabled": "make run serves the console on loopback; a policy file has it off unless it says so",
}
_HEADER = re.compile(r"^\[\[?\s*([A-Za-z0-9_.\"-]+?)\s*\]\]?")
_KEY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*=")


def schema_keys(cls: type, path: str) -> Iterator[str]:
    """Every dotted key a policy may write for ``cls`` at ``path``, sub-tables included."""
    if cls is PluginEntry:
        yield from (f"{path}.{key}" for key in RESERVED_PLUGIN_KEYS)
        return
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    if cls is Override:
        names = [name for name in names if name in _OVERRIDE_KEYS]
    for name in names:
        if cls is Policy and name == "source":
            continue
        key = f"{path}.{name}" if path else name
        tp = hints[name]
        args = typing.get_args(tp)
        if typing.get_origin(tp) is tuple and args and dataclasses.is_dataclass(args[0]):
            tp = args[0]  # [[listeners]], [[routes]], [[local.assign]], ...
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            yield from schema_keys(tp, key)
        else:
            yield key


def written_keys(text: str) -> set[str]:
    """Dotted keys the file writes, set or commented out (``# key = value``), headers and
    the keys of inline tables included."""
    keys: set[str] = set()
    table = ""
    for raw in text.splitlines():
        line = raw.lstrip("#").strip()
        header = _HEADER.match(line)
        if header:
            table = header.group(1).replace('"', "")
            parts = table.split(".")
            keys.update(".".join(parts[: i + 1]) for i in range(len(parts)))
            continue
        first = _KEY.match(line)
        if not first:
            continue
        key = f"{table}.{first.group(1)}" if table else first.group(1)
        keys.add(key)
        # { storage = ..., messages = ... }: the inline table's keys belong to ``key``
        keys.update(f"{key}.{inner}" for inner in _KEY.findall(line[first.end():]))
    return keys


def test_the_embedded_default_is_the_shipped_file() -> None:
    assert DEFAULT_POLICY_PATH.resolve().read_text() == (
        DEFAULT_POLICY_PATH.parents[2] / "policies" / "default.toml"
    ).read_text()


def test_every_schema_key_is_in_the_default_policy() -> None:
    written = written_keys(DEFAULT_POLICY_PATH.read_text())
    missing = [key for key in schema_keys(Policy, "") if key not in written]
    assert not missing, f"keys missing from policies/default.toml: {missing}"


def test_the_checker_sees_a_missing_key() -> None:
    text = DEFAULT_POLICY_PATH.read_text().replace("poll_interval =", "poll_intervals =")
    assert "delivery.poll_interval" not in written_keys(text)


SECTIONS = [name for name, tp in typing.get_type_hints(Policy).items() if dataclasses.is_dataclass(tp)]


@pytest.mark.parametrize("name", SECTIONS)
def test_the_values_written_are_the_schema_defaults(name: str) -> None:
    data = tomllib.loads(DEFAULT_POLICY_PATH.read_text())
    cls = typing.get_type_hints(Policy)[name]
    written = build(cls, data.get(name, {}), path=name, locate=lambda _: None, file="default.toml")
    default = cls()
    for field in dataclasses.fields(cls):
        if f"{name}.{field.name}" in DIFFERENT:
            continue
        assert getattr(written, field.name) == getattr(default, field.name), f"{name}.{field.name}"


def test_the_listener_written_is_the_default_listener() -> None:
    data = tomllib.loads(DEFAULT_POLICY_PATH.read_text())
    (listener,) = data["listeners"]
    cls = typing.get_type_hints(Policy)["listeners"].__args__[0]
    written = build(cls, listener, path="listeners[0]", locate=lambda _: None, file="default.toml")
    assert (written,) == Policy(source="x").listeners
