"""The message as the data and queue hooks see it: :class:`Message`.

A message arrives either whole in memory (``bytes``) or, past the DATA spool threshold,
in a file on the queue's disk (a :class:`~gateway.content.Content` naming its octets).
Either way the header block is parsed once, on first use, and kept in memory; a spooled
message's body stays on disk and is read in chunks (:attr:`Message.content`,
:meth:`Message.body_content`). The old accessors (:attr:`Message.raw`,
:attr:`Message.body`, :meth:`Message.as_bytes`) still work for every message, but on a
spooled one each call reads the whole message into memory: plugins that only need to
look through the message should stream it instead.
"""

from __future__ import annotations

import re
from typing import Any

from gateway.content import Content

__all__ = ["Message"]

_HEADER_NAME = re.compile(rb"^[!-9;-~]+$")
#: How much of a spooled message is read to find the end of its header block, at first,
#: and at most (a header block longer than that ends at the last whole line read).
_HEAD_FIRST = 64 * 1024
_HEAD_MAX = 1024 * 1024


class Message:
    """The message as data and queue hooks see it.

    Backed by the octets as received (CRLF line ends, dot-unstuffed), in memory or in a
    spool file. Headers are parsed once, on first use. Plugins never rewrite the octets:
    they queue header additions and removals (or a new body), and the queue writes the
    final form once, at commit.
    """

    __slots__ = ("_raw", "_content", "_src", "_header_end", "_headers", "_prepend", "_removed", "_body")

    def __init__(self, raw: bytes | Content) -> None:
        self._content: Content | None = None
        if isinstance(raw, Content):
            if raw.is_in_memory:
                raw = raw.read()
            else:
                self._content = raw
        self._raw: bytes | None = None if self._content is not None else bytes(raw)  # type: ignore[arg-type]
        # What the header parser reads: the whole message, or the head of a spooled one.
        self._src: bytes | None = self._raw
        self._header_end: int | None = None
        self._headers: list[tuple[str, bytes, int, int]] | None = None
        self._prepend: list[bytes] = []
        self._removed: set[int] = set()
        self._body: bytes | None = None

    @property
    def size(self) -> int:
        """Size of the message as received, in octets."""
        if self._raw is not None:
            return len(self._raw)
        assert self._content is not None
        return self._content.size

    @property
    def is_spooled(self) -> bool:
        """True when the message is in a file rather than in memory."""
        return self._content is not None

    @property
    def content(self) -> Content:
        """The message exactly as received (no added headers), to stream
        (:meth:`~gateway.content.Content.stream`) or copy without loading it whole."""
        if self._content is not None:
            return self._content
        assert self._raw is not None
        return Content.of_bytes(self._raw)

    @property
    def raw(self) -> bytes:
        """The message exactly as received (no added headers). On a spooled message this
        reads the whole file into memory on every call: prefer :attr:`content`."""
        if self._raw is not None:
            return self._raw
        assert self._content is not None
        return self._content.read()

    @property
    def head(self) -> bytes:
        """The header block as received, with the blank line after it if there is one
        (always in memory)."""
        return self._source()[: self.body_offset]

    @property
    def is_modified(self) -> bool:
        """True once a header was prepended or removed, or the body replaced."""
        return bool(self._prepend or self._removed) or self._body is not None

    @property
    def body(self) -> bytes:
        """The body as it will be queued: :meth:`replace_body`'s, else the received one.
        On a spooled message this reads the body into memory: prefer :meth:`body_content`."""
        if self._body is not None:
            return self._body
        if self._raw is not None:
            return self._raw[self.body_offset :]
        return self.body_content().read()

    def body_content(self) -> Content:
        """The body as it will be queued, without reading it."""
        if self._body is not None:
            return Content.of_bytes(self._body)
        if self._raw is not None:
            return Content.of_bytes(memoryview(self._raw)[self.body_offset :])
        assert self._content is not None
        return self._content.slice(self.body_offset)

    def replace_body(self, body: bytes) -> None:
        """Queue ``body`` (CRLF line ends) in place of the received body.

        For queue plugins that must change the content (a footer): the header block
        stays as received (apart from :meth:`prepend_header` / :meth:`remove_headers`),
        so every byte a plugin did not mean to change is kept.
        """
        self._body = bytes(body)

    def _source(self) -> bytes:
        """What the header parser reads: the whole message in memory, or enough of the
        start of a spooled one to hold its header block."""
        if self._src is not None:
            return self._src
        assert self._content is not None
        want = _HEAD_FIRST
        while True:
            src = self._content.head(want)
            if src.find(b"\r\n\r\n") >= 0 or src.startswith(b"\r\n") or len(src) < want or want >= _HEAD_MAX:
                break
            want *= 2
        self._src = src
        return src

    def _parse(self) -> list[tuple[str, bytes, int, int]]:
        if self._headers is not None:
            return self._headers
        raw = self._source()
        if raw.startswith(b"\r\n"):
            end = 0
        else:
            end = raw.find(b"\r\n\r\n")
            if end >= 0:
                end += 2
            elif self._raw is not None or len(raw) == self.size:
                end = len(raw)
            else:  # a header block longer than _HEAD_MAX: it ends at the last whole line read
                end = raw.rfind(b"\r\n") + 2
        self._header_end = end
        headers: list[tuple[str, bytes, int, int]] = []
        pos = 0
        while pos < end:
            nl = raw.find(b"\r\n", pos, end)
            line_end = end if nl < 0 else nl + 2
            line = raw[pos:line_end]
            if line[:1] in (b" ", b"\t") and headers:
                name, _, start, _ = headers[-1]
                headers[-1] = (name, raw[start:line_end], start, line_end)
            else:
                name_b, colon, _ = line.partition(b":")
                if colon and _HEADER_NAME.match(name_b):
                    headers.append((name_b.decode("ascii").lower(), line, pos, line_end))
                else:
                    # Not a header: the header block ends here (no blank line).
                    self._header_end = pos
                    break
            pos = line_end
        self._headers = headers
        return headers

    def header_values(self, name: str) -> list[str]:
        """Unfolded values of every header called ``name`` (case-insensitive)."""
        name = name.lower()
        out = []
        for i, (hname, line, _, _) in enumerate(self._parse()):
            if hname == name and i not in self._removed:
                value = line.partition(b":")[2]
                text = value.decode("utf-8", "surrogateescape")
                out.append(re.sub(r"\r\n[ \t]", " ", text).strip())
        return out

    def header_names(self) -> list[str]:
        return [h[0] for i, h in enumerate(self._parse()) if i not in self._removed]

    def prepend_header(self, name: str, value: str) -> None:
        """Add ``Name: value`` above the existing headers.

        The value may be folded with ``\\n`` + whitespace; any other CR or LF is
        refused, so client-supplied text can never inject a header.
        """
        if not _HEADER_NAME.match(name.encode("ascii", "replace")):
            raise ValueError(f"invalid header name {name!r}")
        lines = value.split("\n")
        for extra in lines[1:]:
            if not extra[:1] in (" ", "\t"):
                raise ValueError("header continuation lines must start with whitespace")
        if any("\r" in line for line in lines):
            raise ValueError("CR in header value")
        text = f"{name}: " + "\r\n".join(lines) + "\r\n"
        self._prepend.append(text.encode("utf-8"))

    def remove_headers(self, name: str, predicate: Any = None) -> int:
        """Remove received headers called ``name`` (those ``predicate(value)`` is true for).

        :returns: how many were removed
        """
        name = name.lower()
        count = 0
        for i, (hname, line, _, _) in enumerate(self._parse()):
            if hname != name or i in self._removed:
                continue
            value = line.partition(b":")[2].decode("utf-8", "surrogateescape").strip()
            if predicate is None or predicate(value):
                self._removed.add(i)
                count += 1
        return count

    @property
    def body_offset(self) -> int:
        """Offset of the body in :attr:`raw` (after the blank line, if any)."""
        self._parse()
        assert self._header_end is not None
        end = self._header_end
        if self._source()[end : end + 2] == b"\r\n":
            return end + 2
        return end

    def _head_pieces(self, stop: int) -> list[bytes | memoryview]:
        """The received octets up to ``stop``, less the removed headers."""
        view = memoryview(self._source())
        out: list[bytes | memoryview] = []
        pos = 0
        for i, (_, _, start, end) in enumerate(self._parse()):
            if i in self._removed:
                out.append(view[pos:start])
                pos = end
        out.append(view[pos:stop])
        return out

    def _final_head_pieces(self) -> list[bytes | memoryview]:
        out: list[bytes | memoryview] = list(reversed(self._prepend))
        offset = self.body_offset
        out.extend(self._head_pieces(offset))
        if self._body is not None and offset == self._header_end:
            out.append(b"\r\n")  # the received message had no blank line
        return out

    def final_head(self) -> bytes:
        """The header block as it will be queued: the prepended headers, the received
        ones less those removed, and the blank line (added if the body was replaced on a
        message that had none)."""
        return b"".join(self._final_head_pieces())

    def final_content(self) -> Content:
        """The final message (added headers first), without reading a spooled body."""
        if self._content is None:
            return Content(self.chunks())
        return Content.join(self.final_head(), self.body_content())

    def chunks(self) -> list[bytes | memoryview]:
        """The final message (added headers first) as a list of buffers for writing.
        On a spooled message the body is read into memory: prefer :meth:`final_content`."""
        if self._raw is None:
            return [self.final_head(), self.body_content().read()]
        if not self._removed and self._body is None:
            return [*reversed(self._prepend), memoryview(self._raw)]
        out = self._final_head_pieces()
        out.append(self._body if self._body is not None else memoryview(self._raw)[self.body_offset :])
        return out

    def as_bytes(self) -> bytes:
        """The final message as one bytes object (copies: prefer :meth:`chunks`, or
        :meth:`final_content` on a spooled message)."""
        return b"".join(bytes(c) for c in self.chunks())
