"""Where each key of a policy file is written, for error messages that name a line.

TOML parsers do not report where a key was, so :class:`SourceMap` scans the source text
itself: it tracks ``[table]`` and ``[[array]]`` headers (counting array entries for the
index), ``key = value`` lines (bare, quoted and dotted keys), inline tables and array
elements, and :meth:`SourceMap.locate` falls back to the enclosing table. The scan
expects valid TOML (syntax errors are the parser's to report) and is best effort: should
it fail, what was mapped before the failure still locates.
"""

from __future__ import annotations

import bisect
import contextlib
import re
import tomllib

__all__ = ["SourceMap"]


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class SourceMap:
    """Dotted key -> first line where the key (or its table) is written, from valid TOML."""

    _BARE = re.compile(r"[A-Za-z0-9_-]+")

    def __init__(self, text: str) -> None:
        self._text = text
        self._pos = 0
        self._lines: dict[str, int] = {}
        self._arrays: dict[str, int] = {}
        self._newlines = [i for i, c in enumerate(text) if c == "\n"]
        # Best effort: should the scan fail, the partial map still locates what came before.
        with contextlib.suppress(IndexError, ValueError):
            self._scan()

    def locate(self, path: str) -> int | None:
        """The line of ``path``, else of its nearest enclosing key or table, else ``None``."""
        while path:
            line = self._lines.get(path)
            if line is not None:
                return line
            cut = max(path.rfind("."), path.rfind("["))
            path = path[: max(cut, 0)]
        return None

    def _record(self, path: str, pos: int) -> None:
        self._lines.setdefault(path, bisect.bisect_right(self._newlines, pos - 1) + 1)

    def _peek(self, count: int = 1) -> str:
        return self._text[self._pos : self._pos + count]

    def _skip_space(self, newlines: bool) -> None:
        while self._pos < len(self._text):
            c = self._text[self._pos]
            if c == "#":
                end = self._text.find("\n", self._pos)
                self._pos = len(self._text) if end < 0 else end
                if not newlines:
                    return
            elif c in " \t\r" or (newlines and c == "\n"):
                self._pos += 1
            else:
                return

    def _scan(self) -> None:
        table = ""
        while True:
            self._skip_space(newlines=True)
            if self._pos >= len(self._text):
                return
            start = self._pos
            if self._peek(2) == "[[":
                self._pos += 2
                *parents, last = self._key()
                base = _join(self._resolve(parents), last)
                self._arrays[base] = self._arrays.get(base, 0) + 1
                table = f"{base}[{self._arrays[base] - 1}]"
                self._record(base, start)
                self._record(table, start)
                self._pos = self._text.index("]]", self._pos) + 2
            elif self._peek() == "[":
                self._pos += 1
                table = self._resolve(self._key())
                self._record(table, start)
                self._pos = self._text.index("]", self._pos) + 1
            else:
                self._key_value(table)

    def _resolve(self, segments: list[str]) -> str:
        """Join header segments, indexing into arrays of tables as TOML does (last entry)."""
        path = ""
        for segment in segments:
            path = _join(path, segment)
            if path in self._arrays:
                path = f"{path}[{self._arrays[path] - 1}]"
        return path

    def _key(self) -> list[str]:
        segments = []
        while True:
            self._skip_space(newlines=False)
            c = self._peek()
            if c in "\"'":
                start = self._pos
                self._string()
                segments.append(tomllib.loads(f"k = {self._text[start : self._pos]}")["k"])
            else:
                match = self._BARE.match(self._text, self._pos)
                if match is None:
                    raise ValueError("expected a key")
                segments.append(match.group())
                self._pos = match.end()
            self._skip_space(newlines=False)
            if self._peek() != ".":
                return segments
            self._pos += 1

    def _key_value(self, table: str) -> None:
        start = self._pos
        path = table
        for segment in self._key():
            path = _join(path, segment)
            self._record(path, start)
        self._skip_space(newlines=False)
        if self._peek() != "=":
            raise ValueError("expected '='")
        self._pos += 1
        self._skip_space(newlines=False)
        self._value(path)

    def _value(self, path: str) -> None:
        c = self._peek()
        if c in "\"'":
            self._string()
        elif c == "[":
            self._pos += 1
            index = 0
            while True:
                self._skip_space(newlines=True)
                if self._peek() == "]":
                    self._pos += 1
                    return
                self._record(f"{path}[{index}]", self._pos)
                self._value(f"{path}[{index}]")
                index += 1
                self._skip_space(newlines=True)
                if self._peek() == ",":
                    self._pos += 1
        elif c == "{":
            self._pos += 1
            while True:
                self._skip_space(newlines=False)
                if self._peek() == "}":
                    self._pos += 1
                    return
                if self._peek() == ",":
                    self._pos += 1
                    continue
                self._key_value(path)
        else:
            end = self._pos
            while end < len(self._text) and self._text[end] not in ",]}\n#":
                end += 1
            if end == self._pos:
                raise ValueError("expected a value")
            self._pos = end

    def _string(self) -> None:
        quote = self._peek()
        if self._peek(3) == quote * 3:
            self._pos += 3
            escapes = quote == '"'
            while self._peek(3) != quote * 3:
                self._pos += 2 if escapes and self._peek() == "\\" else 1
                if self._pos >= len(self._text):
                    raise ValueError("unterminated string")
            self._pos += 3
            while (
                self._peek() == quote and self._peek(3) != quote * 3
            ):  # up to two quotes before the closer
                self._pos += 1
            return
        self._pos += 1
        while self._peek() != quote:
            self._pos += 2 if quote == '"' and self._peek() == "\\" else 1
            if self._pos >= len(self._text):
                raise ValueError("unterminated string")
        self._pos += 1
