"""Plugin discovery, the pluggy manager, and the ordered async hook runner.

pluggy knows nothing of asyncio and calls implementations in reverse registration
order, so the core uses pluggy only to register plugins and check them against the
hookspecs. :class:`HookRunner` calls the implementations itself, in the order of the
policy's plugin chain, awaiting coroutines under each entry's time budget.

Implementations marked :func:`independent` (the content scanners' ``gateway_data``)
that follow one another in a chain run at the same time, each in a task of its own;
their verdicts are still taken in chain order, and each makes its changes only when
its turn comes (:func:`wait_for_turn`), so the outcome is the one the chain would give
one plugin at a time.
"""

from __future__ import annotations

import asyncio
import bisect
import contextvars
import importlib
import inspect
import logging
import time
import types
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any, Callable, Coroutine, Generator, Iterable, Mapping, Sequence, TypeVar

import pluggy

from gateway import hookspecs
from gateway.verdicts import Action, PermanentFailure, Reply, TemporaryFailure, Verdict

__all__ = [
    "ENTRY_POINT_GROUP",
    "HookRunner",
    "PluginSpec",
    "discover_plugins",
    "hookimpl",
    "independent",
    "wait_for_turn",
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


_F = TypeVar("_F", bound=Callable[..., Any])
_INDEPENDENT = "gateway_independent"


def independent(function: _F) -> _F:
    """Declare a coroutine hook implementation independent of its neighbours in the chain.

    Consecutive independent implementations of a filtering hook run at the same time
    (``data_clamav``, ``data_spamd`` and ``data_rspamd`` each wait on their daemon
    together), while the outcome stays the chain's: verdicts are taken in policy order,
    the first one stops the chain and cancels the later ones still running, and
    ``mode``, ``timeout`` and ``on_error`` apply per entry as before. A plugin that is
    not independent is a barrier: it starts once every plugin before it has finished,
    and the ones after it start once it has.

    An independent implementation may read the message as received and the session and
    transaction while it waits (not what plugins before it in the chain store or change:
    they may not have run yet), and makes its own changes (headers, results, stash,
    logging a decision) only after ``await wait_for_turn()``::

        @hookimpl
        @independent
        async def gateway_data(message: Message, settings: Settings) -> Verdict | None:
            answer = await scan(message.content, settings)   # at the same time as the others
            await wait_for_turn()                            # the plugins before it are done
            message.prepend_header("X-Scanned", answer.text)
            return None

    :raises TypeError: ``function`` is not a coroutine function (a plain function has
        nothing to wait on, so nothing to overlap)
    """
    if not inspect.iscoroutinefunction(function):
        raise TypeError(f"{function.__qualname__}: only an async def hook can be independent")
    setattr(function, _INDEPENDENT, True)
    return function


class _Turn:
    """An independent entry's place in its group: open once every entry before it in
    the chain has finished without stopping it."""

    __slots__ = ("opened", "timer", "waited")

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.timer: asyncio.Timeout | None = None
        self.waited = 0.0


_TURN: contextvars.ContextVar[_Turn | None] = contextvars.ContextVar("gateway_hook_turn", default=None)


async def wait_for_turn() -> None:
    """Wait until every plugin before this one in the chain has finished.

    For an :func:`independent` hook, before it changes the message, the transaction or
    the session: changes are then made in chain order, as if the plugins had run one
    at a time. The wait does not count against the entry's ``timeout``. Returns at once
    when the hook is not running beside others (a chain with one scanner, ``gateway
    explain``, a unit test calling the hook). If a plugin before it stops the chain, the
    hook is cancelled here (:class:`asyncio.CancelledError`).
    """
    turn = _TURN.get()
    if turn is None or turn.opened.is_set():
        return
    loop = asyncio.get_running_loop()
    timer = turn.timer
    deadline = timer.when() if timer is not None else None
    if timer is not None:
        timer.reschedule(None)  # waiting for the others is not this plugin's time
    started = loop.time()
    try:
        await turn.opened.wait()
    finally:
        waited = loop.time() - started
        turn.waited += waited
        if timer is not None and deadline is not None and not timer.expired():
            timer.reschedule(deadline + waited)


@dataclass(frozen=True, slots=True)
class _Impl:
    function: Callable[..., Any]
    argnames: tuple[str, ...]
    is_independent: bool = False

    def args(self, entry: Any, kwargs: Mapping[str, Any]) -> list[Any]:
        return [entry.settings if a == "settings" else kwargs[a] for a in self.argnames]


#: One step of a chain for :meth:`HookRunner.first_verdict`: an entry with its
#: implementation, and the group of independent entries it starts (None: runs alone).
_Step = tuple[Any, _Impl, "tuple[tuple[Any, _Impl], ...] | None"]


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
        # (hook, id(entries)) -> (entries, the entries implementing it with their impl, the
        # same as steps); the entries tuple is kept so its id cannot be reused while cached.
        self._chains: dict[
            tuple[str, int], tuple[Sequence[Any], tuple[tuple[Any, _Impl], ...], tuple[_Step, ...]]
        ] = {}
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
                self._impls[impl.plugin_name][hook_name] = _Impl(
                    impl.function, tuple(impl.argnames), bool(getattr(impl.function, _INDEPENDENT, False))
                )

    def implements(self, name: str, hook: str) -> bool:
        return hook in self._impls.get(name, {})

    def _chain(self, hook: str, entries: Sequence[Any]) -> tuple[tuple[Any, _Impl], ...]:
        """The entries of ``entries`` that implement ``hook``, in order, with their
        implementation: found once per chain (a scope's tuple), not at every call."""
        return self._cached(hook, entries)[1]

    def _steps(self, hook: str, entries: Sequence[Any]) -> tuple[_Step, ...]:
        """:meth:`_chain`, with each run of two or more independent entries made one step."""
        return self._cached(hook, entries)[2]

    def _cached(
        self, hook: str, entries: Sequence[Any]
    ) -> tuple[Sequence[Any], tuple[tuple[Any, _Impl], ...], tuple[_Step, ...]]:
        key = (hook, id(entries))
        cached = self._chains.get(key)
        if cached is not None and cached[0] is entries:
            return cached
        pairs = tuple(
            (entry, impl) for entry in entries if (impl := self._impls[entry.name].get(hook)) is not None
        )
        steps: list[_Step] = []
        i = 0
        while i < len(pairs):
            j = i + 1
            while pairs[i][1].is_independent and j < len(pairs) and pairs[j][1].is_independent:
                j += 1
            steps.append((pairs[i][0], pairs[i][1], pairs[i:j] if j - i > 1 else None))
            i = j
        made = (entries, pairs, tuple(steps))
        if type(entries) is tuple and len(self._chains) < 4096:  # scopes' chains live as long as us
            self._chains[key] = made
        return made

    async def _call(self, entry: Any, impl: _Impl, kwargs: Mapping[str, Any]) -> Any:
        result = impl.function(*impl.args(entry, kwargs))
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
        Consecutive :func:`independent` entries run at the same time (see
        :meth:`_first_of_group`), with the same outcome.
        """
        for entry, impl, group in self._steps(hook, entries):
            if group is not None:
                verdict = await self._first_of_group(hook, group, kwargs)
                if verdict is not None:
                    return verdict
                continue
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
                failed = self._failed(entry, hook, exc)
                if failed is None:
                    continue
                return failed
            finally:
                self.stats.observe(key, time.perf_counter() - started)
            if result is None:
                continue
            verdict = self._verdict(entry, hook, result)
            if verdict is not None:
                return verdict
        return None

    def _failed(self, entry: Any, hook: str, exc: Exception) -> Verdict | None:
        """The answer to a plugin that raised or timed out: its ``on_error``'s."""
        key = (entry.id, hook)
        self.stats.errors[key] = self.stats.errors.get(key, 0) + 1
        if isinstance(exc, TimeoutError):
            log.error("plugin %s %s timed out after %.1fs", entry.id, hook, entry.timeout)
            reason = f"plugin {entry.id} timed out"
        else:
            log.error("plugin %s %s failed: %s", entry.id, hook, exc, exc_info=exc)
            reason = f"plugin {entry.id} failed: {type(exc).__name__}"
        if entry.on_error == "continue":
            return None
        return Verdict(Action.TEMPFAIL, PLUGIN_ERROR_REPLY, entry.id, reason)

    def _verdict(self, entry: Any, hook: str, result: Any) -> Verdict | None:
        """The verdict that stops the chain, if ``result`` (not None) is one to act on."""
        if not isinstance(result, Verdict):
            log.error("plugin %s %s returned %r, not a Verdict; ignored", entry.id, hook, result)
            return None
        verdict = result.named(entry.id)
        if entry.mode == "observe":
            log.info(
                "observe plugin=%s hook=%s would=%s reply=%r reason=%s",
                entry.id, hook, verdict.action.value, str(verdict.reply), verdict.reason,
            )
            return None
        vkey = (entry.id, hook, verdict.action.value)
        self.stats.verdicts[vkey] = self.stats.verdicts.get(vkey, 0) + 1
        return verdict

    async def _first_of_group(
        self, hook: str, group: Sequence[tuple[Any, _Impl]], kwargs: Mapping[str, Any]
    ) -> Verdict | None:
        """Run independent entries at the same time; judge them in chain order.

        Every entry starts at once, in a task of its own. The first entry's turn is
        open from the start; each next one's opens when the one before has finished
        without a verdict that stops the chain (its :func:`wait_for_turn` returns then).
        The first such verdict is the answer, and the entries after it are cancelled.
        Failures and verdicts of entries that come after it are never looked at, as
        when the chain runs one plugin at a time.
        """
        turns = [_Turn() for _ in group]
        verdict: Verdict | None = None
        async with asyncio.TaskGroup() as tasks:
            running = [
                tasks.create_task(self._take_turn(entry, impl, kwargs, turn), name=f"hook {hook} {entry.id}")
                for (entry, impl), turn in zip(group, turns)
            ]
            for i, ((entry, _), task, turn) in enumerate(zip(group, running, turns)):
                turn.opened.set()
                result, error, elapsed = await task
                self.stats.observe((entry.id, hook), elapsed)
                if error is not None:
                    verdict = self._failed(entry, hook, error)
                elif result is not None:
                    verdict = self._verdict(entry, hook, result)
                if verdict is not None:
                    for later in running[i + 1 :]:
                        later.cancel()
                    break
        return verdict

    @staticmethod
    async def _take_turn(
        entry: Any, impl: _Impl, kwargs: Mapping[str, Any], turn: _Turn
    ) -> tuple[Any, Exception | None, float]:
        """One independent entry's call, in its own task: (result, error, seconds spent,
        less the wait for its turn)."""
        _TURN.set(turn)  # this task's context only
        started = time.perf_counter()
        try:
            result = impl.function(*impl.args(entry, kwargs))
            if result is not None and not isinstance(result, Verdict) and inspect.isawaitable(result):
                async with asyncio.timeout(entry.timeout) as timer:
                    turn.timer = timer
                    result = await result
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # judged by the runner, in chain order
            return None, exc, time.perf_counter() - started - turn.waited
        return result, None, time.perf_counter() - started - turn.waited

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
