"""Plugin discovery, the pluggy manager, and the ordered async hook runner.

pluggy knows nothing of asyncio and calls implementations in reverse registration
order, so the core uses pluggy only to register plugins and check them against the
hookspecs. :class:`HookRunner` calls the implementations itself, in the order of the
policy's plugin chain, awaiting coroutines under each entry's time budget.
"""

from __future__ import annotations

import asyncio
import bisect
import importlib
import inspect
import logging
import time
import types
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any, Callable, Coroutine, Generator, Iterable, Mapping, Sequence

import pluggy

from gateway import hookspecs
from gateway.verdicts import Action, PermanentFailure, Reply, TemporaryFailure, Verdict

__all__ = [
    "ENTRY_POINT_GROUP",
    "HookRunner",
    "PluginSpec",
    "discover_plugins",
    "hookimpl",
]

log = logging.getLogger(__name__)

hookimpl = pluggy.HookimplMarker(hookspecs.PROJECT)
ENTRY_POINT_GROUP = "gateway.plugins"
RESERVED_SETTINGS = frozenset({"name", "id", "mode", "timeout", "on_error"})

PLUGIN_ERROR_REPLY = Reply(451, "4.3.0", "Temporary local problem, please try again later")


@dataclass(frozen=True)
class NoSettings:
    """Settings of a plugin that declares none."""


@dataclass(frozen=True)
class PluginSpec:
    """A plugin known to the gateway: its module and settings schema."""

    name: str
    module: ModuleType
    settings_cls: type

    def instantiate(self) -> object:
        """The object to register: a fresh ``Plugin()`` if the module defines one."""
        factory = getattr(self.module, "Plugin", None)
        return factory() if factory is not None else self.module


def _spec_from_module(name: str, module: ModuleType) -> PluginSpec:
    settings_cls = getattr(module, "Settings", NoSettings)
    fields = set(getattr(settings_cls, "__dataclass_fields__", {}))
    clash = fields & RESERVED_SETTINGS
    if clash:
        raise ValueError(f"plugin {name}: setting names {sorted(clash)} are reserved")
    return PluginSpec(name, module, settings_cls)


def discover_plugins(extra: Iterable[str] = ()) -> dict[str, PluginSpec]:
    """Every plugin this installation knows: the stock ones and entry points.

    :param extra: further module paths (``package.module``) to load as plugins, named
        by their last component
    """
    from plugins import DEFAULT_PLUGINS

    found: dict[str, PluginSpec] = {}
    for name in DEFAULT_PLUGINS:
        found[name] = _spec_from_module(name, importlib.import_module(f"plugins.{name}"))
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found:
            log.warning("plugin entry point %s shadows a stock plugin; ignored", ep.name)
            continue
        found[ep.name] = _spec_from_module(ep.name, ep.load())
    for path in extra:
        name = path.rsplit(".", 1)[-1]
        found[name] = _spec_from_module(name, importlib.import_module(path))
    return found


@dataclass(frozen=True, slots=True)
class _Impl:
    function: Callable[..., Any]
    argnames: tuple[str, ...]


#: Upper bounds (seconds) of the hook latency histogram buckets.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class HookStats:
    """Counters the runner keeps per (plugin, hook); read by the metrics endpoint.

    Plain integers on the hot path; the metrics endpoint turns them into Prometheus
    series only when scraped. Kept across policy reloads (the app passes it on).
    """

    calls: dict[tuple[str, str], int] = field(default_factory=dict)
    seconds: dict[tuple[str, str], float] = field(default_factory=dict)
    buckets: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    verdicts: dict[tuple[str, str, str], int] = field(default_factory=dict)
    errors: dict[tuple[str, str], int] = field(default_factory=dict)

    def observe(self, key: tuple[str, str], elapsed: float) -> None:
        self.calls[key] = self.calls.get(key, 0) + 1
        self.seconds[key] = self.seconds.get(key, 0.0) + elapsed
        counts = self.buckets.get(key)
        if counts is None:
            counts = self.buckets[key] = [0] * len(LATENCY_BUCKETS)
        i = bisect.bisect_left(LATENCY_BUCKETS, elapsed)  # the first bound >= elapsed
        if i < len(counts):
            counts[i] += 1


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], waiting: Any) -> Generator[Any, Any, Any]:
    """Go on with ``coro``, already started and now waiting on ``waiting`` (what its
    first step yielded), as ``await coro`` would have: what the task sends or throws in
    goes to ``coro``, what ``coro`` yields goes to the task."""
    while True:
        try:
            value = yield waiting
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # a cancellation, above all: coro's to handle
            try:
                waiting = coro.throw(exc)
            except StopIteration as done:
                return done.value
        else:
            try:
                waiting = coro.send(value)
            except StopIteration as done:
                return done.value


class HookRunner:
    """Calls the hook implementations of a plugin chain in policy order.

    One runner per set of registered plugin objects (rebuilt on policy reload); the
    chain to run is passed per call, because overrides give each scope its own.
    """

    def __init__(
        self, specs: Mapping[str, PluginSpec], names: Iterable[str], stats: HookStats | None = None
    ) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.objects: dict[str, object] = {}
        self._impls: dict[str, dict[str, _Impl]] = {}
        self.stats = stats if stats is not None else HookStats()
        # (hook, id(entries)) -> (entries, the entries implementing it with their impl);
        # the entries tuple is kept so that its id cannot be reused while cached.
        self._chains: dict[tuple[str, int], tuple[Sequence[Any], tuple[tuple[Any, _Impl], ...]]] = {}
        for name in dict.fromkeys(names):
            obj = specs[name].instantiate()
            self.pm.register(obj, name=name)
            self.objects[name] = obj
            self._impls[name] = {}
        self.pm.check_pending()
        for hook_name in dir(self.pm.hook):
            if not hook_name.startswith("gateway_"):
                continue
            caller = getattr(self.pm.hook, hook_name)
            for impl in caller.get_hookimpls():
                self._impls[impl.plugin_name][hook_name] = _Impl(impl.function, tuple(impl.argnames))

    def implements(self, name: str, hook: str) -> bool:
        return hook in self._impls.get(name, {})

    def _chain(self, hook: str, entries: Sequence[Any]) -> tuple[tuple[Any, _Impl], ...]:
        """The entries of ``entries`` that implement ``hook``, in order, with their
        implementation: found once per chain (a scope's tuple), not at every call."""
        key = (hook, id(entries))
        cached = self._chains.get(key)
        if cached is not None and cached[0] is entries:
            return cached[1]
        pairs = tuple(
            (entry, impl) for entry in entries if (impl := self._impls[entry.name].get(hook)) is not None
        )
        if type(entries) is tuple and len(self._chains) < 4096:  # scopes' chains live as long as us
            self._chains[key] = (entries, pairs)
        return pairs

    async def _call(self, entry: Any, impl: _Impl, kwargs: Mapping[str, Any]) -> Any:
        args = [entry.settings if a == "settings" else kwargs[a] for a in impl.argnames]
        result = impl.function(*args)
        if inspect.isawaitable(result):
            async with asyncio.timeout(entry.timeout):
                result = await result
        return result

    async def first_verdict(
        self, hook: str, entries: Sequence[Any], **kwargs: Any
    ) -> Verdict | None:
        """Run ``hook`` for each entry in order; return the first verdict.

        A plugin that raises or exceeds its time budget is logged and answered by its
        ``on_error``: ``tempfail`` (fail closed) or ``continue`` (fail open). A plugin
        in ``observe`` mode is run and logged but its verdict is not acted on.
        """
        for entry, impl in self._chain(hook, entries):
            key = (entry.id, hook)
            started = time.perf_counter()
            try:  # _call's work, without its coroutine
                result = impl.function(*[entry.settings if a == "settings" else kwargs[a] for a in impl.argnames])
                if type(result) is types.CoroutineType:
                    # Most answer without waiting (a set lookup, a cache): run the
                    # coroutine's first step here, and only one that waits gets a timer.
                    try:
                        waiting = result.send(None)
                    except StopIteration as done:
                        result = done.value
                    else:
                        async with asyncio.timeout(entry.timeout):
                            result = await _resume(result, waiting)
                elif result is not None and not isinstance(result, Verdict) and inspect.isawaitable(result):
                    async with asyncio.timeout(entry.timeout):
                        result = await result
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # boundary: a plugin must never kill the session
                self.stats.errors[key] = self.stats.errors.get(key, 0) + 1
                if isinstance(exc, TimeoutError):
                    log.error("plugin %s %s timed out after %.1fs", entry.id, hook, entry.timeout)
                    reason = f"plugin {entry.id} timed out"
                else:
                    log.exception("plugin %s %s failed: %s", entry.id, hook, exc)
                    reason = f"plugin {entry.id} failed: {type(exc).__name__}"
                if entry.on_error == "continue":
                    continue
                return Verdict(Action.TEMPFAIL, PLUGIN_ERROR_REPLY, entry.id, reason)
            finally:
                self.stats.observe(key, time.perf_counter() - started)
            if result is None:
                continue
            if not isinstance(result, Verdict):
                log.error("plugin %s %s returned %r, not a Verdict; ignored", entry.id, hook, result)
                continue
            verdict = result.named(entry.id)
            if entry.mode == "observe":
                log.info(
                    "observe plugin=%s hook=%s would=%s reply=%r reason=%s",
                    entry.id, hook, verdict.action.value, str(verdict.reply), verdict.reason,
                )
                continue
            vkey = (entry.id, hook, verdict.action.value)
            self.stats.verdicts[vkey] = self.stats.verdicts.get(vkey, 0) + 1
            return verdict
        return None

    async def first_value(self, hook: str, entries: Sequence[Any], **kwargs: Any) -> Any:
        """Run a non-filtering hook (``gateway_route``) in order; first non-``None`` wins.

        A plugin's :class:`TemporaryFailure` or :class:`PermanentFailure` is its answer
        and reaches the caller (for a route: retry or bounce the recipient). Any other
        error, or a plugin over its time budget, is logged and answered by the entry's
        ``on_error``: ``tempfail`` raises a TemporaryFailure (fail closed: the built-in
        answer could bounce mail, or send it elsewhere, that the plugin would have
        delivered), ``continue`` skips the entry and the built-in answer may apply.
        """
        for entry in entries:
            impl = self._impls[entry.name].get(hook)
            if impl is None:
                continue
            try:
                result = await self._call(entry, impl, kwargs)
            except (asyncio.CancelledError, TemporaryFailure, PermanentFailure):
                raise
            except Exception as exc:  # boundary: a plugin must never kill the scheduler
                if isinstance(exc, TimeoutError):
                    log.error("plugin %s %s timed out after %.1fs", entry.id, hook, entry.timeout)
                else:
                    log.exception("plugin %s %s failed: %s", entry.id, hook, exc)
                if entry.on_error == "continue":
                    continue
                raise TemporaryFailure(PLUGIN_ERROR_REPLY, f"plugin {entry.id} {hook} failed") from exc
            if result is not None:
                return result
        return None

    async def call_all(self, hook: str, entries: Sequence[Any], **kwargs: Any) -> None:
        """Run an "always runs" hook for every entry; errors are logged, not raised."""
        for entry, impl in self._chain(hook, entries):
            try:
                await self._call(entry, impl, kwargs)
            except asyncio.CancelledError:
                raise
            except Exception:  # boundary: logged, never propagated
                log.exception("plugin %s %s failed", entry.id, hook)

    async def startup(self, entries: Sequence[Any], **kwargs: Any) -> None:
        """Run ``gateway_startup`` for each entry; the first failure is raised."""
        for entry in entries:
            impl = self._impls[entry.name].get("gateway_startup")
            if impl is not None:
                await self._call(entry, impl, kwargs)
