"""The plugin contract stays documented: hookspecs, docs/plugins.md and the stock plugins.

``gateway/hookspecs.py`` is the contract and ``docs/plugins.md`` its reference for plugin
authors; these tests fail, naming the hook, argument or plugin, as soon as one drifts from
the other, or a stock plugin from the rules in STYLE.md ("Plugins").
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import pytest

from gateway import hookspecs
from gateway.policy import RESERVED_PLUGIN_KEYS
from plugins import DEFAULT_PLUGINS

DOC = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"
SPEC_MARK = f"{hookspecs.PROJECT}_spec"  # the attributes pluggy's markers set
IMPL_MARK = f"{hookspecs.PROJECT}_impl"
_PARAM = re.compile(r"^\s*:param (\w+):", re.M)
_HEADING = re.compile(r"^(#{1,3}) (.*?)\s*$", re.M)


def _specs() -> dict[str, Callable[..., Any]]:
    """Every ``gateway_*`` function of the hookspecs module, in source (call) order."""
    found = [
        fn
        for name, fn in vars(hookspecs).items()
        if name.startswith("gateway_") and inspect.isfunction(fn)
    ]
    found.sort(key=lambda fn: fn.__code__.co_firstlineno)
    return {fn.__name__: fn for fn in found}


SPECS = _specs()


def _arguments(fn: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _doc_sections() -> dict[str, str]:
    """``### gateway_xxx`` heading -> its text up to the next heading, in document order."""
    text = DOC.read_text(encoding="utf-8")
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)  # headings only outside code
    headings = list(_HEADING.finditer(text))
    sections: dict[str, str] = {}
    for i, match in enumerate(headings):
        title = match.group(2).strip("`")
        if match.group(1) == "###" and title.startswith("gateway_"):
            end = headings[i + 1].start() if i + 1 < len(headings) else len(text)
            assert title not in sections, f"docs/plugins.md: two '### {title}' sections"
            sections[title] = text[match.end() : end]
    return sections


def test_hookspecs_module_defines_hooks() -> None:
    assert len(SPECS) >= 10, f"found only {sorted(SPECS)} in gateway/hookspecs.py"


# The contract: gateway/hookspecs.py ---------------------------------------------------


@pytest.mark.parametrize("name", SPECS)
def test_hookspec_is_marked_and_typed(name: str) -> None:
    fn = SPECS[name]
    assert hasattr(fn, SPEC_MARK), f"{name} in gateway/hookspecs.py lacks @hookspec"
    signature = inspect.signature(fn)
    untyped = [p for p, param in signature.parameters.items() if param.annotation is param.empty]
    assert not untyped, f"{name}: arguments without a type: {untyped}"
    assert signature.return_annotation is not signature.empty, f"{name}: no return type"


@pytest.mark.parametrize("name", SPECS)
def test_hookspec_docstring_documents_every_argument(name: str) -> None:
    fn = SPECS[name]
    doc = inspect.getdoc(fn)
    assert doc, f"{name} in gateway/hookspecs.py has no docstring"
    lines = doc.splitlines()
    assert lines[0].strip(), f"{name}: the docstring must open with a summary line"
    assert len(lines) == 1 or not lines[1].strip(), (
        f"{name}: the summary must be one line, followed by a blank line"
    )
    documented = _PARAM.findall(doc)
    arguments = _arguments(fn)
    missing = [a for a in arguments if a not in documented]
    assert not missing, f"{name}: no ':param NAME:' for {missing}"
    stale = [p for p in documented if p not in arguments]
    assert not stale, f"{name}: ':param:' for arguments the hook does not have: {stale}"
    assert len(documented) == len(set(documented)), f"{name}: an argument documented twice"
    assert ":returns:" in doc, f"{name}: the docstring does not say what a return means"


# The reference: docs/plugins.md ------------------------------------------------------


def test_plugin_guide_exists() -> None:
    assert DOC.is_file(), f"{DOC} is missing: it is the hook reference for plugin authors"


@pytest.mark.parametrize("name", SPECS)
def test_every_hook_has_a_section_naming_its_arguments(name: str) -> None:
    section = _doc_sections().get(name)
    if section is None:
        pytest.fail(f"docs/plugins.md has no '### {name}' section; add one")
    unnamed = [a for a in _arguments(SPECS[name]) if f"`{a}`" not in section]
    assert not unnamed, (
        f"docs/plugins.md '### {name}' does not describe the arguments {unnamed}"
        " (as `name`)"
    )


def test_every_hook_section_names_an_existing_hook() -> None:
    unknown = [title for title in _doc_sections() if title not in SPECS]
    assert not unknown, (
        f"docs/plugins.md documents hooks that gateway/hookspecs.py does not define: {unknown}"
    )


def test_hook_sections_follow_the_hookspecs_order() -> None:
    documented = [title for title in _doc_sections() if title in SPECS]
    expected = [name for name in SPECS if name in documented]
    assert documented == expected, (
        "docs/plugins.md lists the hooks in another order than gateway/hookspecs.py:"
        f"\n  doc:       {documented}\n  hookspecs: {expected}"
    )


# The stock plugins ----------------------------------------------------------------------


def _plugin(name: str) -> ModuleType:
    return importlib.import_module(f"plugins.{name}")


def _hookimpls(module: ModuleType) -> dict[str, Callable[..., Any]]:
    """The hook implementations pluggy would register: on ``Plugin`` if defined, else module."""
    owner: Any = getattr(module, "Plugin", module)
    return {
        name: value
        for name, value in vars(owner).items()
        if callable(value) and hasattr(value, IMPL_MARK)
    }


@pytest.mark.parametrize("name", DEFAULT_PLUGINS)
def test_stock_plugin_has_a_module_docstring(name: str) -> None:
    module = _plugin(name)
    doc = inspect.getdoc(module)
    assert doc, f"plugins/{name}.py has no module docstring"
    settings = getattr(module, "Settings", None)
    names = [*_hookimpls(module)]
    if settings is not None and dataclasses.is_dataclass(settings):
        names += [f.name for f in dataclasses.fields(settings)]
    unnamed = [n for n in names if f"``{n}``" not in doc]
    assert not unnamed, (
        f"plugins/{name}.py: the module docstring does not name the hooks and settings {unnamed}"
        " (as ``name``)"
    )


@pytest.mark.parametrize("name", DEFAULT_PLUGINS)
def test_stock_plugin_settings_are_a_documented_frozen_dataclass(name: str) -> None:
    module = _plugin(name)
    settings = getattr(module, "Settings", None)
    assert settings is not None, f"plugins/{name}.py has no Settings dataclass"
    assert isinstance(settings, type) and dataclasses.is_dataclass(settings), (
        f"plugins/{name}.py: Settings is not a dataclass"
    )
    assert settings.__module__ == module.__name__, (
        f"plugins/{name}.py: Settings must be defined in the plugin's own module"
    )
    assert settings.__dataclass_params__.frozen, (
        f"plugins/{name}.py: Settings must be @dataclass(frozen=True)"
    )
    fields = dataclasses.fields(settings)
    undocumented = [f.name for f in fields if not str(f.metadata.get("doc", "")).strip()]
    assert not undocumented, (
        f"plugins/{name}.py: Settings fields without metadata['doc'] (use setting(...)):"
        f" {undocumented}"
    )
    reserved = sorted({f.name for f in fields} & set(RESERVED_PLUGIN_KEYS))
    assert not reserved, f"plugins/{name}.py: Settings fields use reserved keys {reserved}"


@pytest.mark.parametrize("name", DEFAULT_PLUGINS)
def test_stock_plugin_implements_only_hookspecs(name: str) -> None:
    module = _plugin(name)
    impls = _hookimpls(module)
    assert impls, f"plugins/{name}.py implements no hook"
    unknown = [hook for hook in impls if hook not in SPECS]
    assert not unknown, f"plugins/{name}.py: @hookimpl for hooks that do not exist: {unknown}"
    for hook, fn in impls.items():
        arguments = [a for a in inspect.signature(fn).parameters if a != "self"]
        extra = [a for a in arguments if a not in _arguments(SPECS[hook])]
        assert not extra, f"plugins/{name}.py: {hook} takes arguments the hook lacks: {extra}"
    owner: Any = getattr(module, "Plugin", module)
    unmarked = [
        attr
        for attr, value in vars(owner).items()
        if attr.startswith("gateway_") and callable(value) and attr not in impls
    ]
    assert not unmarked, f"plugins/{name}.py: hook functions without @hookimpl: {unmarked}"
