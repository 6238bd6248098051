"""The shared-state interface: small, atomic, expiring key/value operations.

Greylisting, rate limits and connection counts need state that every gateway node sees:
a counter bumped on node A must be visible on node B. :class:`StateStore` is the whole
contract those plugins rely on; :mod:`gateway.state.sqlite` (embedded, one host) and
:mod:`gateway.state.redis` (a server shared by several nodes) implement it.

Semantics every backend keeps:

- Keys and values are short ``str``; callers hash or bound client-supplied parts.
- ``ttl`` is in seconds. An expired key is absent for every operation, even before the
  backend has physically removed it.
- :meth:`StateStore.incr` sets the expiry only when it *creates* the key (absent or
  expired); later increments keep it. So a counter keyed by a fixed time window dies
  one ``ttl`` after the window's first event at the latest, and a connection counter
  left high by a crashed node heals itself within ``ttl`` (see ``docs/state.md``).
- A *counter map* (:meth:`StateStore.incr_field`, :meth:`StateStore.fields`) is a key
  holding named counters (a Redis hash): DMARC aggregate reports count evaluations by
  their description and read a period's counts back in one call. Its expiry, like a
  counter's, is set when the key is created and applies to the whole map.
- Any backend failure (server down, timeout, unreadable file) raises
  :class:`StateUnavailable`, never a library's own exception, so a plugin decides
  fail-open or fail-closed in one ``except`` clause.
"""

from __future__ import annotations

import abc

from gateway.verdicts import Reply, TemporaryFailure

__all__ = ["REPLY_STATE_UNAVAILABLE", "StateStore", "StateUnavailable"]

REPLY_STATE_UNAVAILABLE = Reply(451, "4.3.0", "Temporary local problem, please try again later")


class StateUnavailable(TemporaryFailure):
    """The state store could not answer (down, timed out, broken); always temporary.

    A :class:`~gateway.verdicts.TemporaryFailure`, so a plugin that lets it escape still
    yields a 4xx through the hook runner rather than a 5xx.
    """

    def __init__(self, detail: str) -> None:
        super().__init__(REPLY_STATE_UNAVAILABLE, detail)


class StateStore(abc.ABC):
    """Async key/value store with expiry, shared by the plugins of one gateway.

    Implementations never block the event loop and bound every call in time.
    """

    #: Canonical location (``sqlite:///path`` or the Redis URL without credentials), for logs.
    url: str = ""

    async def open(self) -> None:  # noqa: B027 - optional hook, default does nothing
        """Prepare the backend (create the file, check the server); may raise.

        :raises StateUnavailable: the backend cannot be reached now
        """

    async def ping(self) -> str:
        """Check that the backend answers now (start-up and ``gateway check --probe``).

        :returns: what it answered, for the log (``"PONG"``); ``""`` for a file
        :raises StateUnavailable: it does not answer
        """
        return ""

    @abc.abstractmethod
    async def incr(self, key: str, amount: int = 1, ttl: float = 60.0) -> int:
        """Add ``amount`` (may be negative) to the integer at ``key``, atomically.

        :param key: the counter's key; an absent or expired key counts from 0
        :param amount: what to add
        :param ttl: seconds until the key expires, set only when this call creates it
        :returns: the value after the addition
        :raises StateUnavailable: the backend failed
        """

    @abc.abstractmethod
    async def get(self, key: str) -> str | None:
        """The value at ``key``, or ``None`` if absent or expired.

        :param key: the key
        :raises StateUnavailable: the backend failed
        """

    @abc.abstractmethod
    async def set(
        self, key: str, value: str, ttl: float | None = None, only_if_absent: bool = False
    ) -> bool:
        """Store ``value`` at ``key`` with a fresh expiry.

        :param key: the key
        :param value: the value
        :param ttl: seconds until it expires; ``None`` keeps it until deleted
        :param only_if_absent: store only if the key is absent or expired (atomic)
        :returns: whether the value was stored (always true without ``only_if_absent``)
        :raises StateUnavailable: the backend failed
        """

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Remove ``key`` if present.

        :param key: the key
        :raises StateUnavailable: the backend failed
        """

    @abc.abstractmethod
    async def incr_field(self, key: str, name: str, amount: int = 1, ttl: float = 60.0) -> int:
        """Add ``amount`` to the counter ``name`` of the counter map at ``key``, atomically.

        :param key: the map's key; an absent or expired map starts empty
        :param name: the counter within the map (bounded by the caller)
        :param amount: what to add
        :param ttl: seconds until the whole map expires, set only when this call creates it
        :returns: the counter's value after the addition
        :raises StateUnavailable: the backend failed
        """

    @abc.abstractmethod
    async def fields(self, key: str) -> dict[str, int]:
        """Every counter of the map at ``key`` (empty if absent or expired).

        :param key: the map's key
        :raises StateUnavailable: the backend failed
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections, files and threads; the store is unusable afterwards."""
