"""Tests for gateway.policy.schema: building frozen dataclasses from TOML tables."""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from gateway.policy.schema import PolicyError, build, convert, describe, setting
from gateway.policy.units import Duration, IPNetwork, Size


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass(frozen=True)
class Inner:
    depth: int = setting(1, "how deep", min=0, max=10)


@dataclass(frozen=True)
class Everything:
    required: str = field(metadata={"doc": "must be given"})
    text: str = setting("x", "a string")
    count: int = setting(3, "an int", min=1)
    ratio: float = setting(0.5, "a float")
    flag: bool = setting(False, "a bool")
    where: Path = setting(Path("var"), "a path")
    names: tuple[str, ...] = setting((), "strings")
    ports: tuple[int, ...] = setting((), "ints")
    items: list[str] = field(default_factory=list, metadata={"doc": "a list"})
    pair: tuple[str, int] = setting(("a", 1), "fixed tuple")
    choice: Literal["a", "b"] = setting("a", "a choice")
    color: Color = setting(Color.RED, "an enum")
    wait: Duration = setting(30.0, "a duration", max=3600)
    size: Size = setting(1024, "a size")
    net: IPNetwork | None = setting(None, "a network")
    nets: tuple[IPNetwork, ...] = setting((), "networks")
    maybe: int | None = setting(None, "optional int")
    either: int | str = setting(0, "int or string")
    inner: Inner = setting(Inner(), "a sub-table")
    headers: dict[str, str] = setting({}, "a table of strings")
    limits: Mapping[str, Duration] = setting({}, "a table of durations")


@dataclass(frozen=True)
class Checked:
    low: int = 0
    high: int = 10

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ValueError("low must not exceed high")


LINES = {"t": 1, "t.count": 4, "t.inner": 9}


def locate(path: str) -> int | None:
    while path:
        if path in LINES:
            return LINES[path]
        path = path.rpartition(".")[0]
    return None


def make(data: dict[str, object], cls: type = Everything) -> object:
    return build(
        cls,
        {"required": "r", **data} if cls is Everything else data,
        path="t",
        locate=locate,
        file="p.toml",
    )


def error(data: dict[str, object], cls: type = Everything) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        make(data, cls)
    return info.value


def test_defaults() -> None:
    value = make({})
    assert isinstance(value, Everything)
    assert value.text == "x" and value.inner == Inner() and value.headers == {}
    assert value.items == [] and value.net is None


def test_every_type_converts() -> None:
    value = make(
        {
            "text": "hello",
            "count": 7,
            "ratio": 2,
            "flag": True,
            "where": "/tmp/q",
            "names": ["a", "b"],
            "ports": [25, 587],
            "items": ["x"],
            "pair": ["b", 2],
            "choice": "b",
            "color": "blue",
            "wait": "5m",
            "size": "2KB",
            "net": "10.0.0.0/8",
            "nets": ["::1", "192.0.2.1"],
            "maybe": 4,
            "either": "four",
            "inner": {"depth": 5},
            "headers": {"X-A": "1"},
            "limits": {"a": "1s", "b": 2},
        }
    )
    assert isinstance(value, Everything)
    assert value.ratio == 2.0 and isinstance(value.ratio, float)
    assert value.where == Path("/tmp/q")
    assert value.names == ("a", "b") and value.ports == (25, 587) and value.items == ["x"]
    assert value.pair == ("b", 2)
    assert value.color is Color.BLUE
    assert value.wait == 300.0 and value.size == 2048
    assert value.net == ipaddress.ip_network("10.0.0.0/8")
    assert value.nets == (ipaddress.ip_network("::1/128"), ipaddress.ip_network("192.0.2.1/32"))
    assert value.maybe == 4 and value.either == "four"
    assert value.inner == Inner(depth=5)
    assert value.headers == {"X-A": "1"} and value.limits == {"a": 1.0, "b": 2.0}


def test_missing_required_key() -> None:
    with pytest.raises(PolicyError) as info:
        build(Everything, {}, path="t", locate=locate, file="p.toml")
    assert info.value.key == "t.required"
    assert "missing required key" in info.value.message
    assert str(info.value).startswith("p.toml:1: t.required: ")


def test_unknown_key_suggests_and_lists_valid_keys() -> None:
    exc = error({"cont": 1})
    assert exc.key == "t.cont"
    assert "did you mean 'count'" in exc.message
    assert "valid keys:" in exc.message and "ratio" in exc.message


@pytest.mark.parametrize(
    ("key", "value", "expected", "given"),
    [
        ("text", 1, "expected string", "got integer 1"),
        ("count", "many", "expected integer", "got string 'many'"),
        ("count", True, "expected integer", "got boolean True"),
        ("count", 1.5, "expected integer", "got float 1.5"),
        ("ratio", "x", "expected float", "got string"),
        ("flag", "yes", "expected boolean", "got string"),
        ("flag", 1, "expected boolean", "got integer"),
        ("where", 3, "expected path", "got integer"),
        ("where", "", "expected path", "got string"),
        ("names", "a", "expected array of string", "got string"),
        ("inner", 3, "expected table", "got integer"),
        ("headers", ["a"], "expected table of string", "got array"),
        ("either", 1.5, "expected integer or string", "got float"),
    ],
)
def test_wrong_type_names_expected_and_given(
    key: str, value: object, expected: str, given: str
) -> None:
    exc = error({key: value})
    assert exc.key == f"t.{key}"
    assert expected in exc.message and given in exc.message


def test_error_in_array_item_names_index() -> None:
    exc = error({"names": ["a", 2]})
    assert exc.key == "t.names[1]"
    exc = error({"nets": ["10.0.0.0/8", "nope"]})
    assert exc.key == "t.nets[1]" and "invalid network" in exc.message


def test_error_in_table_value_names_key() -> None:
    assert error({"headers": {"X-A": 1}}).key == "t.headers.X-A"
    assert error({"limits": {"a": "soon"}}).key == "t.limits.a"


def test_choices_and_enums() -> None:
    exc = error({"choice": "c"})
    assert "one of 'a', 'b'" in exc.message and "'c'" in exc.message
    assert "one of 'red', 'blue'" in error({"color": "green"}).message
    assert error({"pair": ["a"]}).message == "expected an array of 2 items, got 1"


def test_units_errors() -> None:
    assert "invalid duration" in error({"wait": "5 minutes"}).message
    assert "invalid size" in error({"size": "5XB"}).message


def test_bounds() -> None:
    exc = error({"count": 0})
    assert exc.key == "t.count" and exc.line == 4 and "at least 1" in exc.message
    assert "at most 3600" in error({"wait": "2h"}).message
    exc = error({"inner": {"depth": 11}})
    assert exc.key == "t.inner.depth" and exc.line == 9


def test_nested_unknown_key_path() -> None:
    exc = error({"inner": {"dpth": 1}})
    assert exc.key == "t.inner.dpth" and exc.line == 9
    assert "did you mean 'depth'" in exc.message


def test_post_init_value_error_becomes_policy_error() -> None:
    exc = error({"low": 5, "high": 1}, Checked)
    assert exc.key == "t" and exc.line == 1 and "low must not exceed high" in exc.message


def test_base_supplies_missing_keys() -> None:
    base = Checked(low=2, high=8)
    merged = build(Checked, {"high": 9}, path="t", locate=locate, file="p.toml", base=base)
    assert merged == Checked(low=2, high=9)


def test_convert_single_value() -> None:
    assert convert(tuple[int, ...], [1, 2], path="x", locate=locate, file="f") == (1, 2)
    with pytest.raises(PolicyError):
        convert(int, "x", path="x", locate=locate, file="f")


def test_error_string_without_line() -> None:
    exc = PolicyError("p.toml", None, "limits.x", "bad")
    assert str(exc) == "p.toml: limits.x: bad"
    assert str(PolicyError("p.toml", 3, "limits.x", "bad")) == "p.toml:3: limits.x: bad"


def test_describe_reports_docs_and_defaults() -> None:
    infos = {info.name: info for info in describe(Everything)}
    assert infos["required"].required and infos["required"].doc == "must be given"
    assert infos["wait"].type == "duration" and infos["wait"].default == 30.0
    assert infos["inner"].default == Inner()
    assert infos["choice"].type == "one of 'a', 'b'"


@dataclass(frozen=True)
class Rule:
    action: Literal["reject", "score"] = setting("reject", "what to do")
    score: float = setting(1.0, "how much")


@dataclass(frozen=True)
class Rules:
    codes: Mapping[str, Literal["reject", "score"] | Rule] = setting({}, "code -> action or rule")


def test_union_of_name_or_table_names_the_key_inside_the_table() -> None:
    # An entry that is "an action name or a {action, score} table": a misspelt key in
    # the table is named with its path and line, not "expected ... or table, got table".
    exc = error({"codes": {"x": {"action": "score", "scroe": 2}}}, Rules)
    assert exc.key == "t.codes.x.scroe" and exc.line == 1
    assert "unknown key 'scroe'" in exc.message and "did you mean 'score'" in exc.message
    exc = error({"codes": {"x": {"action": "rejekt"}}}, Rules)
    assert exc.key == "t.codes.x.action" and "got 'rejekt'" in exc.message
    # A value that fits no member at all still lists what would do.
    exc = error({"codes": {"x": 3}}, Rules)
    assert exc.key == "t.codes.x" and "expected one of 'reject', 'score' or table" in exc.message


def test_dns_list_codes_table_error_names_file_line_and_key() -> None:
    from gateway.app import registry
    from gateway.hooks import discover_plugins
    from gateway.policy import load_policy_text

    text = (
        '[[plugins]]\nname = "connect_dnsbl"\n[[plugins.zones]]\nzone = "zen.test.example"\n'
        '[plugins.zones.codes]\n"127.0.0.2" = "reject"\n"127.0.0.3" = { action = "score", scroe = 2.0 }\n'
    )
    with pytest.raises(PolicyError) as info:
        load_policy_text(text, source="policy.toml", registry=registry(discover_plugins()))
    assert str(info.value).startswith("policy.toml:7: plugins[0].zones[0].codes.127.0.0.3.scroe: unknown key 'scroe'")
