"""Shared state store on a Redis server, for several gateway nodes.

``state = "redis://host:6379/0"`` (also ``rediss://`` for TLS and ``unix:///path?db=0``)
makes every node that names the same server and database see the same counters and
greylist entries. The client is redis-py's ``redis.asyncio``: no call blocks the loop.

Bounded waits: every call runs under ``asyncio.timeout`` (default 1 s; the URL's
``timeout`` query parameter, in seconds, changes it) and redis-py's own socket
timeouts, with redis-py's retries switched off, so a dead server costs one timeout per
call, not several. Any failure raises :class:`~gateway.state.store.StateUnavailable`;
the next call reconnects by itself once the server is back.

Atomicity: :meth:`RedisStore.incr` (and :meth:`RedisStore.incr_field`, on a hash) is one Lua script (``INCRBY`` then ``PEXPIRE`` only if
the key has no expiry yet), so two nodes incrementing at once neither lose a count nor
leave a counter without expiry if one of them dies between the two commands.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from gateway.state.store import StateStore, StateUnavailable

__all__ = ["DEFAULT_TIMEOUT", "RedisStore", "split_timeout"]

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_TIMEOUT = 1.0

# KEYS[1] counter; ARGV[1] amount, ARGV[2] ttl in milliseconds.
# PTTL < 0: the key has no expiry (-1) - it was just created by INCRBY.
_INCR_SCRIPT = """
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < 0 then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return value
"""

# The same for one counter of a hash (a counter map): KEYS[1] the map; ARGV[1] the
# counter's name, ARGV[2] amount, ARGV[3] ttl in milliseconds.
_INCR_FIELD_SCRIPT = """
local value = redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
if redis.call('PTTL', KEYS[1]) < 0 then
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return value
"""


def split_timeout(url: str) -> tuple[str, float]:
    """Take our ``timeout`` parameter out of a Redis URL.

    :param url: ``redis://host:port/db?timeout=2``
    :returns: the URL without it, and the timeout in seconds
    :raises ValueError: the timeout is not a positive number
    """
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    timeout = DEFAULT_TIMEOUT
    rest = []
    for name, value in query:
        if name == "timeout":
            timeout = float(value)
            if not timeout > 0:
                raise ValueError(f"timeout in {url!r} must be positive")
        else:
            rest.append((name, value))
    return urlunsplit(parts._replace(query=urlencode(rest))), timeout


def _public(url: str) -> str:
    """The URL without a password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class RedisStore(StateStore):
    """A :class:`StateStore` on a Redis server.

    :param url: ``redis://``, ``rediss://`` or ``unix://`` URL, optionally with ``?timeout=``
    :raises ValueError: the URL is malformed
    :raises ImportError: redis-py is not installed
    """

    def __init__(self, url: str) -> None:
        # Imported here so the SQLite-only embedded default does not need redis-py.
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        client_url, self.timeout = split_timeout(url)
        self.url = _public(client_url)
        self._client: Any = Redis.from_url(
            client_url,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )
        self._incr_script: Any = self._client.register_script(_INCR_SCRIPT)
        self._incr_field_script: Any = self._client.register_script(_INCR_FIELD_SCRIPT)
        self._closed = False

    async def _call(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        from redis.exceptions import RedisError

        if self._closed:
            raise StateUnavailable(f"{self.url}: store is closed")
        try:
            async with asyncio.timeout(self.timeout):
                return await call()
        except TimeoutError as exc:
            raise StateUnavailable(f"{self.url}: {what}: no answer within {self.timeout:g}s") from exc
        except (RedisError, OSError) as exc:
            raise StateUnavailable(f"{self.url}: {what}: {exc}") from exc

    async def open(self) -> None:
        """Nothing to do: the client connects at its first call, and again after a
        failure. A server that is down at start-up is reported by each plugin that
        uses it (:meth:`ping` under :func:`gateway.probe.startup_probe`), with what
        that plugin's ``on_state_error`` makes of it."""

    async def ping(self) -> str:
        await self._call("PING", lambda: self._client.ping())
        return "PONG"

    async def incr(self, key: str, amount: int = 1, ttl: float = 60.0) -> int:
        value = await self._call(
            "INCRBY", lambda: self._incr_script(keys=[key], args=[amount, _ms(ttl)])
        )
        return int(value)

    async def get(self, key: str) -> str | None:
        value = await self._call("GET", lambda: self._client.get(key))
        return None if value is None else str(value)

    async def set(
        self, key: str, value: str, ttl: float | None = None, only_if_absent: bool = False
    ) -> bool:
        px = None if ttl is None else _ms(ttl)
        done = await self._call(
            "SET", lambda: self._client.set(key, value, px=px, nx=only_if_absent)
        )
        return bool(done)

    async def delete(self, key: str) -> None:
        await self._call("DEL", lambda: self._client.delete(key))

    async def incr_field(self, key: str, name: str, amount: int = 1, ttl: float = 60.0) -> int:
        value = await self._call(
            "HINCRBY", lambda: self._incr_field_script(keys=[key], args=[name, amount, _ms(ttl)])
        )
        return int(value)

    async def fields(self, key: str) -> dict[str, int]:
        found = await self._call("HGETALL", lambda: self._client.hgetall(key))
        return {str(name): int(value) for name, value in found.items()}

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.wait_for(self._client.aclose(), self.timeout)
        except Exception as exc:  # boundary: closing a dead connection must not fail shutdown
            log.warning("closing %s: %s", self.url, exc)
