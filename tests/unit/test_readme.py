"""The README's plugin reference is generated from the code and must stay identical."""

from __future__ import annotations

from pathlib import Path

from gateway.commands.plugins import PLUGIN_REFERENCE_BEGIN, PLUGIN_REFERENCE_END, reference

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_plugin_reference_matches_the_code() -> None:
    text = README.read_text()
    start = text.index(PLUGIN_REFERENCE_BEGIN)
    end = text.index(PLUGIN_REFERENCE_END) + len(PLUGIN_REFERENCE_END)
    assert text[start:end] == reference(), (
        "README plugin reference is stale: regenerate it with `gateway plugins --markdown`"
    )


def test_readme_names_the_two_commands() -> None:
    text = README.read_text()
    assert "make run" in text and "make test" in text
