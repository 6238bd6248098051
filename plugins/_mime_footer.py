"""Add a footer to the text parts of a MIME message, changing no other byte.

Pure functions for ``queue_footer``. The message is walked on its bytes (offsets, not a
re-serialised tree), so parts that get no footer (attachments, the other boundaries,
preambles, epilogues) are kept exactly as received; only the changed parts' headers
(``Content-Type`` charset, ``Content-Transfer-Encoding``, when they must change) and
bodies are written anew. The standard library's :mod:`email` package parses the header
fields and decodes nothing it cannot re-encode.

Which parts get the footer: a ``text/plain`` or ``text/html`` body that is not an
attachment; in ``multipart/alternative`` every such alternative (also inside a nested
multipart, e.g. ``multipart/related``); in any other multipart (``mixed``, ``related``)
only the first part, which is the body: attachments come after it. Signed or encrypted
content (``multipart/signed``, ``multipart/encrypted``, ``application/pkcs7-mime``) is
never touched, nor is a part whose charset or encoding cannot be decoded.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import email.message
import email.quoprimime
import email.utils
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32

__all__ = ["FooterText", "HeaderChange", "Result", "add_footer", "describe"]

_MAX_DEPTH = 20  # nested multiparts followed; deeper content is left alone
_MAX_LINE = 998  # RFC 5322 §2.1.1
_CLOSED = frozenset({"multipart/signed", "multipart/encrypted"})


@dataclass(frozen=True, slots=True)
class FooterText:
    """What to add: plain text, and its HTML form."""

    text: str
    html: str


@dataclass(frozen=True, slots=True)
class HeaderChange:
    """A new value for a field of the top-level header (only for a single-part message)."""

    name: str
    value: str


@dataclass(slots=True)
class Result:
    """The new body, the top-level header fields to replace, and what was changed."""

    body: bytes
    headers: list[HeaderChange] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Headers:
    ctype: str
    boundary: str | None
    charset: str | None
    cte: str
    is_attachment: bool
    raw: email.message.Message


def describe(header_block: bytes) -> _Headers:
    """The MIME facts of a header block (a part's, or the message's)."""
    msg = BytesHeaderParser(policy=compat32).parsebytes(header_block)
    return _facts(msg)


def _facts(msg: email.message.Message) -> _Headers:
    ctype = msg.get_content_type()
    boundary = msg.get_boundary() if ctype.startswith("multipart/") else None
    charset = msg.get_content_charset()
    cte = str(msg.get("content-transfer-encoding", "7bit")).strip().lower() or "7bit"
    disposition = msg.get_content_disposition()
    return _Headers(ctype, boundary, charset, cte, disposition == "attachment", msg)


def _split_part(buf: bytes, start: int, end: int) -> tuple[int, int]:
    """(end of the header block, start of the body) of the part ``buf[start:end]``."""
    if buf.startswith(b"\r\n", start):
        return start, start + 2
    blank = buf.find(b"\r\n\r\n", start, end)
    if blank < 0:
        return end, end
    return blank + 2, blank + 4


def _children(buf: bytes, start: int, end: int, boundary: str, limit: int = 0) -> list[tuple[int, int]]:
    """The (start, end) of each body part of the multipart body ``buf[start:end]``.

    A delimiter line is ``--boundary`` (``--boundary--`` closes) at the start of a line,
    then optional white space (RFC 2046 §5.1.1); the CRLF before it belongs to the
    delimiter. Found with ``bytes.find``, no copy: a 25 MB attachment after the body is
    not scanned at all when ``limit`` parts are enough.
    """
    marker = b"--" + boundary.encode("ascii", "replace")
    out: list[tuple[int, int]] = []
    part_start: int | None = None
    pos = start
    while True:
        i = buf.find(marker, pos, end)
        if i < 0:
            break
        pos = i + 1
        if i != start and buf[i - 2 : i] != b"\r\n":
            continue  # not at the start of a line
        after = i + len(marker)
        is_close = buf.startswith(b"--", after)
        k = after + 2 if is_close else after
        while k < end and buf[k] in (0x20, 0x09):
            k += 1
        if k < end and not buf.startswith(b"\r\n", k):
            continue  # "--boundary" followed by more text: not a delimiter
        if part_start is not None:
            out.append((part_start, i - 2 if i != start else i))
            if limit and len(out) >= limit:
                return out
        if is_close:
            return out
        part_start = pos = min(k + 2, end)
    if part_start is not None and part_start < end:
        out.append((part_start, end))  # no closing delimiter: up to the end
    return out


def _is_open_multipart(head: _Headers) -> bool:
    return (
        head.ctype.startswith("multipart/") and head.ctype not in _CLOSED and bool(head.boundary)
        and head.cte in ("7bit", "8bit", "binary")
    )


def _targets(buf: bytes, start: int, end: int, head: _Headers, depth: int) -> list[tuple[int, int, _Headers]]:
    """The text parts of the multipart body ``buf[start:end]`` to change: (part start
    including its header block, part end, its headers)."""
    if depth > _MAX_DEPTH or not _is_open_multipart(head):
        return []
    assert head.boundary is not None
    # In anything but an alternative only the first part is the body; attachments follow.
    children = _children(buf, start, end, head.boundary, 0 if head.ctype == "multipart/alternative" else 1)
    out: list[tuple[int, int, _Headers]] = []
    for child_start, child_end in children:
        header_end, body_start = _split_part(buf, child_start, child_end)
        child = describe(buf[child_start:header_end])
        if child.ctype in ("text/plain", "text/html"):
            if not child.is_attachment:
                out.append((child_start, child_end, child))
        else:
            out += _targets(buf, body_start, child_end, child, depth + 1)
    return out


def _decode(body: bytes, head: _Headers) -> str | None:
    """The part's text with LF line ends, or None when it cannot be decoded faithfully."""
    try:
        if head.cte == "base64":
            data = binascii.a2b_base64(body)
        elif head.cte == "quoted-printable":
            data = binascii.a2b_qp(body)
        elif head.cte in ("7bit", "8bit", "binary"):
            data = body
        else:
            return None
        charset = head.charset or "us-ascii"
        codecs.lookup(charset)
        text = data.decode(charset)
    except (binascii.Error, LookupError, UnicodeDecodeError, ValueError):
        return None
    return text.replace("\r\n", "\n")


def _with_footer(text: str, footer: FooterText, is_html: bool) -> str | None:
    """The text with the footer added; None when it already carries it."""
    if is_html:
        if footer.html.strip() in text:
            return None
        cut = text.lower().rfind("</body>")
        if cut >= 0:
            return text[:cut] + footer.html + "\n" + text[cut:]
        return text + ("" if text.endswith("\n") or not text else "\n") + footer.html + "\n"
    if footer.text.strip() in text:
        return None
    return text + ("" if text.endswith("\n") or not text else "\n") + "\n" + footer.text + "\n"


def _encode(text: str, head: _Headers) -> tuple[bytes, str, str]:
    """(body bytes with CRLF, charset, transfer encoding) for the changed text."""
    charset = head.charset or "us-ascii"
    try:
        data = text.encode(charset)
    except UnicodeEncodeError:
        charset = "utf-8"  # the footer needs more than the part's charset has
        data = text.encode(charset)
    cte = head.cte
    if cte in ("7bit", "binary") or cte == "8bit":
        is_long = any(len(line) > _MAX_LINE - 2 for line in data.split(b"\n"))
        if is_long or (cte == "7bit" and not data.isascii()):
            cte = "quoted-printable"
    if cte == "base64":
        body = base64.encodebytes(data).replace(b"\n", b"\r\n")
    elif cte == "quoted-printable":
        body = email.quoprimime.body_encode(data.decode("latin-1"), 76, "\r\n").encode("ascii")
        if not body.endswith(b"\r\n"):
            body += b"\r\n"
    else:
        body = data.replace(b"\n", b"\r\n")
    return body, charset, cte


def _content_type(head: _Headers, charset: str) -> str:
    """The Content-Type value with a new charset, other parameters kept."""
    params = [(k, v) for k, v in head.raw.get_params(failobj=[], header="content-type")[1:] if k.lower() != "charset"]
    items = [head.ctype, f'charset="{charset}"']
    items += [f'{k}="{email.utils.quote(str(v))}"' if v else k for k, v in params]
    return "; ".join(items)


def _replace_fields(block: bytes, changes: dict[str, str]) -> bytes:
    """The header block with the named fields' values replaced (or the fields appended)."""
    lines = block.split(b"\r\n")
    out: list[bytes] = []
    done: set[str] = set()
    skipping = False
    for line in lines:
        if line[:1] in (b" ", b"\t") and out:
            if not skipping:
                out.append(line)
            continue
        name = line.split(b":", 1)[0].strip().decode("ascii", "replace").lower()
        skipping = name in changes and ":" in line.decode("ascii", "replace")
        if skipping:
            if name not in done:
                out.append(f"{_canonical(name)}: {changes[name]}".encode("ascii"))
                done.add(name)
            continue
        out.append(line)
    # The block ends with CRLF, so the last element is empty: insert before it.
    extra = [f"{_canonical(n)}: {v}".encode("ascii") for n, v in changes.items() if n not in done]
    if out and out[-1] == b"":
        out[-1:-1] = extra
    else:
        out += extra
    return b"\r\n".join(out)


def _canonical(name: str) -> str:
    return {"content-type": "Content-Type", "content-transfer-encoding": "Content-Transfer-Encoding"}[name]


def _changed(head: _Headers, charset: str, cte: str) -> dict[str, str]:
    changes: dict[str, str] = {}
    if charset != (head.charset or "us-ascii") or ("content-type" not in head.raw and charset != "us-ascii"):
        changes["content-type"] = _content_type(head, charset)
    if cte != head.cte:
        changes["content-transfer-encoding"] = cte
    return changes


def add_footer(top_headers: bytes, body: bytes, footer: FooterText) -> Result | None:
    """The message body with the footer in its text parts, or None when nothing changed.

    :param top_headers: the message's header block (CRLF line ends)
    :param body: the message's body (CRLF line ends)
    :param footer: the texts to add
    :returns: the new body; ``headers`` holds the top-level fields to replace when the
        message is a single text part whose charset or encoding had to change
    """
    top = describe(top_headers)
    if top.ctype in ("text/plain", "text/html"):
        if top.is_attachment:
            return None
        text = _decode(body, top)
        if text is None:
            return None
        new = _with_footer(text, footer, top.ctype == "text/html")
        if new is None:
            return None
        data, charset, cte = _encode(new, top)
        changes = _changed(top, charset, cte)
        headers = [HeaderChange(_canonical(n), v) for n, v in changes.items()]
        if changes and "mime-version" not in top.raw:
            headers.append(HeaderChange("MIME-Version", "1.0"))
        return Result(data, headers, [top.ctype])
    targets = _targets(body, 0, len(body), top, 0)
    if not targets:
        return None
    pieces: list[bytes] = []
    parts: list[str] = []
    pos = 0
    for start, end, head in targets:
        header_end, body_start = _split_part(body, start, end)
        text = _decode(body[body_start:end], head)
        new = None if text is None else _with_footer(text, footer, head.ctype == "text/html")
        if new is None:
            continue
        data, charset, cte = _encode(new, head)
        block = _replace_fields(body[start:header_end], _changed(head, charset, cte))
        # The CRLF before the next delimiter belongs to the delimiter: end the part as
        # the original ended, with or without a line end of its own.
        if data.endswith(b"\r\n") and not body[body_start:end].endswith(b"\r\n"):
            data = data[:-2]
        pieces += [body[pos:start], block, b"\r\n", data]
        pos = end
        parts.append(head.ctype)
    if not parts:
        return None
    pieces.append(body[pos:])
    return Result(b"".join(pieces), [], parts)
