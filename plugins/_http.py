"""A minimal HTTP/1.1 client on asyncio streams, for scanner daemons (rspamd).

One request per connection (``Connection: close``), a ``Content-Length`` body each
way, everything bounded: the status line and headers by the stream's line limit, the
body by ``max_body``. That is all rspamd's ``/checkv2`` needs, and it avoids a
dependency (aiohttp) for a single POST. Chunked answers are read too, because a proxy
in front of the daemon may send them. A request body given as a
:class:`~gateway.content.Content` (a message, perhaps spooled to disk) is sent as it is
read, a chunk at a time, never whole in memory.
"""

from __future__ import annotations

import asyncio
import re

from gateway.content import Content
from plugins._scanner import ScannerError, close_stream, open_stream, send_content

__all__ = ["HttpResponse", "http_request"]

_MAX_HEADERS = 100
_STATUS = re.compile(rb"^HTTP/1\.[01] (\d{3})(?: (.*))?$")
# RFC 9110 §5.5: field values are visible characters, spaces and tabs; we also refuse
# anything that could end the header line early.
_UNSAFE_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class HttpResponse:
    """Status code, headers (lower-case names) and body of one answer."""

    __slots__ = ("status", "reason", "headers", "body")

    def __init__(self, status: int, reason: str, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body


def _header_lines(headers: list[tuple[str, str]]) -> bytes:
    out = []
    for name, value in headers:
        # Values may come from the SMTP client (HELO, addresses): never let one break
        # the request (RFC 9112 §2.2, request smuggling).
        clean = _UNSAFE_VALUE.sub("", value)[:1000]
        out.append(f"{name}: {clean}\r\n".encode("utf-8", "replace"))
    return b"".join(out)


async def _read_chunked(reader: asyncio.StreamReader, max_body: int) -> bytes:
    """RFC 9112 §7.1 chunked body, trailers ignored."""
    parts: list[bytes] = []
    total = 0
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip() or b"x", 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass
            return b"".join(parts)
        total += size
        if total > max_body:
            raise ScannerError(f"answer over {max_body} octets")
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


async def http_request(
    address: str,
    default_port: int,
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    body: bytes | Content,
    *,
    connect_timeout: float,
    timeout: float,
    max_body: int = 4 * 1024 * 1024,
) -> HttpResponse:
    """Send one request and read the whole answer.

    :param address: ``host:port`` or a Unix socket path (see ``parse_address``)
    :param default_port: the port when ``address`` names none
    :param method: ``GET`` or ``POST``
    :param path: the request target (``/checkv2``)
    :param headers: extra request headers, in order (repeated names allowed)
    :param body: the request body; a :class:`Content` is sent as it is read
    :param connect_timeout: longest wait for the connection
    :param timeout: longest wait for the answer once connected
    :param max_body: the largest answer body accepted
    :raises ScannerError: no connection, no complete answer in time, or a malformed one
    """
    reader, writer = await open_stream(address, default_port, connect_timeout)
    host = "localhost" if address.startswith(("/", "unix:")) else address
    request = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
        f"Content-Length: {len(body)}\r\n"  # a Content's len is its size
    ).encode("ascii", "replace") + _header_lines(headers) + b"\r\n"
    try:
        async with asyncio.timeout(timeout):
            writer.write(request)
            if isinstance(body, Content):
                await send_content(writer, body)
            else:
                writer.write(body)
            await writer.drain()
            status_line = (await reader.readuntil(b"\r\n")).rstrip(b"\r\n")
            found = _STATUS.match(status_line)
            if found is None:
                raise ScannerError(f"not an HTTP answer: {status_line[:80]!r}")
            answer_headers: dict[str, str] = {}
            while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                if len(answer_headers) >= _MAX_HEADERS:
                    raise ScannerError(f"more than {_MAX_HEADERS} answer headers")
                name, _, value = line.decode("latin-1").partition(":")
                answer_headers[name.strip().lower()] = value.strip()
            if "chunked" in answer_headers.get("transfer-encoding", "").lower():
                data = await _read_chunked(reader, max_body)
            elif "content-length" in answer_headers:
                length = int(answer_headers["content-length"])
                if not 0 <= length <= max_body:
                    raise ScannerError(f"answer of {length} octets (limit {max_body})")
                data = await reader.readexactly(length)
            else:  # HTTP/1.0 style: the body ends with the connection
                data = await reader.read(max_body + 1)
                if len(data) > max_body:
                    raise ScannerError(f"answer over {max_body} octets")
    except TimeoutError:
        raise ScannerError(f"no answer from {address} within {timeout:g}s") from None
    except asyncio.IncompleteReadError:
        raise ScannerError(f"{address} closed the connection mid-answer") from None
    except asyncio.LimitOverrunError:
        raise ScannerError(f"{address} sent an over-long header line") from None
    except ValueError:
        raise ScannerError(f"{address} sent a malformed length") from None
    except OSError as exc:
        raise ScannerError(f"connection to {address} failed: {exc.strerror or exc}") from None
    finally:
        await close_stream(writer)
    return HttpResponse(int(found.group(1)), (found.group(2) or b"").decode("latin-1"), answer_headers, data)
