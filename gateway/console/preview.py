"""What the console shows of a message: its headers and a text rendering, never its HTML.

A quarantined message is hostile until shown otherwise, so the preview is text only:
the first ``text/plain`` part, or else the first ``text/html`` part turned into text
(tags dropped, ``<script>`` and ``<style>`` contents dropped, nothing fetched). The
template escapes whatever comes out, and the console's Content-Security-Policy forbids
scripts and remote content besides, so even a rendering mistake here cannot run or
load anything. Parsing runs in the thread pool (a message may be megabytes).
"""

from __future__ import annotations

import email
import email.policy
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from html.parser import HTMLParser

__all__ = ["Preview", "header_summary", "preview"]

MAX_TEXT = 200_000
"""Most characters of text shown."""
MAX_PARSED = 4 * 1024 * 1024
"""Most octets of a message parsed for its preview."""
_BLOCKS = {"p", "div", "br", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table", "blockquote", "pre", "hr"}


class _TextOnly(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style", "head", "title"):
            self._skip += 1
        elif tag in _BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "head", "title"):
            self._skip = max(0, self._skip - 1)
        elif tag in _BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    """The text of an HTML document: no tags, no scripts, no styles."""
    parser = _TextOnly()
    parser.feed(html)
    parser.close()
    lines = [" ".join(line.split()) for line in "".join(parser.parts).splitlines()]
    text = "\n".join(lines)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.strip()


@dataclass
class Preview:
    """A message as the console shows it."""

    headers: list[tuple[str, str]] = field(default_factory=list)
    text: str = ""
    source: str = ""
    """Which part the text comes from (``text/plain``, ``text/html shown as text``)."""
    attachments: list[tuple[str, str, int]] = field(default_factory=list)
    """(file name, content type, size in octets) of each attachment."""
    is_truncated: bool = False


def _header(msg: EmailMessage, name: str) -> str:
    try:
        value = msg.get(name)
        return "" if value is None else str(value)[:1000]
    except Exception:  # a header the parser cannot decode: show it raw
        raw = msg.get_all(name, failobj=[""])
        return str(raw[0])[:1000] if raw else ""


def header_summary(head: bytes) -> dict[str, str]:
    """Subject, From and Date of a message's header section (for list pages)."""
    msg = BytesHeaderParser(policy=email.policy.default).parsebytes(head)
    return {name: _header(msg, name) for name in ("Subject", "From", "Date")}


def preview(data: bytes) -> Preview:
    """Headers and a text rendering of ``data`` (the message as queued)."""
    result = Preview()
    if len(data) > MAX_PARSED:
        data, result.is_truncated = data[:MAX_PARSED], True
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    result.headers = [(n, _header(msg, n)) for n in ("From", "To", "Cc", "Subject", "Date", "Message-ID") if n in msg]
    plain = html = None
    for part in msg.walk():
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        if part.get_content_disposition() == "attachment" or part.get_filename():
            payload = part.get_payload(decode=True) or b""
            result.attachments.append((str(part.get_filename() or "(no name)")[:200], ctype, len(payload)))
            continue
        if ctype == "text/plain" and plain is None:
            plain = part
        elif ctype == "text/html" and html is None:
            html = part
    chosen = plain or html
    if chosen is None:
        result.source = "no text part"
        return result
    try:
        text = chosen.get_content()
    except Exception:  # unknown charset, broken encoding: decode what is there
        payload = chosen.get_payload(decode=True)
        text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
    if chosen is plain:
        result.source = "text/plain"
    else:
        text, result.source = html_to_text(str(text)), "text/html, shown as text"
    if len(text) > MAX_TEXT:
        text, result.is_truncated = text[:MAX_TEXT], True
    result.text = str(text)
    return result
