"""State shared across gateway nodes: counters and flags with expiry.

:class:`StateStore` is the interface (``incr``, ``get``, ``set``, ``delete``, ``close``);
:class:`~gateway.state.sqlite.SqliteStore` is the embedded default and
:class:`~gateway.state.redis.RedisStore` the server backend for several nodes. Plugins
do not build stores themselves: they hold a :class:`PluginStores`, open the store their
``state`` setting names in ``gateway_startup`` and close it in ``gateway_shutdown``, so
all plugins of a gateway that name one URL share one store. See ``docs/state.md``.
"""

from gateway.state.registry import PluginStores, acquire, canonical_url, check_url, release
from gateway.state.store import REPLY_STATE_UNAVAILABLE, StateStore, StateUnavailable

__all__ = [
    "REPLY_STATE_UNAVAILABLE",
    "PluginStores",
    "StateStore",
    "StateUnavailable",
    "acquire",
    "canonical_url",
    "check_url",
    "release",
]
