"""The ordered async hook runner: policy order, first verdict, failures, observe mode,
independent plugins at the same time."""

import asyncio
import types
from dataclasses import dataclass

import pytest

from gateway.hooks import PLUGIN_ERROR_REPLY, HookRunner, NoSettings, PluginSpec, hookimpl, independent, wait_for_turn
from gateway.policy.model import PluginEntry
from gateway.verdicts import Action, Reply, TemporaryFailure, Verdict

REJECT = Verdict.reject(Reply(550, "5.7.1", "no"))


def module(name: str, **hooks):
    mod = types.ModuleType(name)
    for hook, fn in hooks.items():
        setattr(mod, hook, hookimpl(fn))
    return PluginSpec(name, mod, NoSettings)


def entry(name: str, **kw) -> PluginEntry:
    return PluginEntry(name=name, settings=kw.pop("settings", NoSettings()), **kw)


def run(runner: HookRunner, entries, hook="gateway_mail"):
    return asyncio.run(runner.first_verdict(hook, entries, session=None, txn=None, sender=None, gateway=None))


def test_policy_order_not_registration_order() -> None:
    calls = []

    def a(sender):
        calls.append("a")

    async def b(sender):
        calls.append("b")
        return REJECT

    def c(sender):
        calls.append("c")

    specs = {"a": module("a", gateway_mail=a), "b": module("b", gateway_mail=b), "c": module("c", gateway_mail=c)}
    runner = HookRunner(specs, ["a", "b", "c"])
    verdict = run(runner, [entry("c"), entry("a"), entry("b")])
    assert calls == ["c", "a", "b"]
    assert verdict.action is Action.REJECT and verdict.plugin == "b"


def test_first_verdict_stops_chain() -> None:
    calls = []

    async def first(sender):
        calls.append("first")
        return Verdict.accept()

    def second(sender):
        calls.append("second")
        return REJECT

    runner = HookRunner({"x": module("x", gateway_mail=first), "y": module("y", gateway_mail=second)}, ["x", "y"])
    assert run(runner, [entry("x"), entry("y")]).action is Action.ACCEPT
    assert calls == ["first"]


def test_raising_plugin_fails_closed_with_its_name() -> None:
    def boom(sender):
        raise RuntimeError("scanner exploded")

    runner = HookRunner({"boom": module("boom", gateway_mail=boom)}, ["boom"])
    verdict = run(runner, [entry("boom")])
    assert verdict.action is Action.TEMPFAIL
    assert verdict.reply == PLUGIN_ERROR_REPLY and verdict.reply.code == 451
    assert verdict.plugin == "boom"
    assert runner.stats.errors[("boom", "gateway_mail")] == 1


def test_slow_plugin_times_out_and_fail_open_continues() -> None:
    async def slow(sender):
        await asyncio.sleep(10)

    def after(sender):
        return REJECT

    specs = {"slow": module("slow", gateway_mail=slow), "after": module("after", gateway_mail=after)}
    runner = HookRunner(specs, ["slow", "after"])
    closed = run(runner, [entry("slow", timeout=0.05), entry("after")])
    assert closed.action is Action.TEMPFAIL and closed.plugin == "slow"
    opened = run(runner, [entry("slow", timeout=0.05, on_error="continue"), entry("after")])
    assert opened.action is Action.REJECT and opened.plugin == "after"


def test_observe_mode_runs_but_does_not_decide() -> None:
    calls = []

    def watcher(sender):
        calls.append("watched")
        return REJECT

    runner = HookRunner({"w": module("w", gateway_mail=watcher)}, ["w"])
    assert run(runner, [entry("w", mode="observe")]) is None
    assert calls == ["watched"]


def test_settings_are_passed_per_entry() -> None:
    @dataclass(frozen=True)
    class Settings:
        code: int = 550

    seen = []

    def hook(settings):
        seen.append(settings.code)

    runner = HookRunner({"s": module("s", gateway_mail=hook)}, ["s"])
    run(runner, [entry("s", settings=Settings(551), id="one"), entry("s", settings=Settings(552), id="two")])
    assert seen == [551, 552]


def test_non_verdict_return_is_ignored() -> None:
    runner = HookRunner({"bad": module("bad", gateway_mail=lambda sender: "550 no")}, ["bad"])
    assert run(runner, [entry("bad")]) is None


def test_call_all_runs_every_entry_despite_errors() -> None:
    calls = []

    def one(session):
        calls.append(1)
        raise ValueError("x")

    def two(session):
        calls.append(2)

    runner = HookRunner({"one": module("one", gateway_disconnect=one), "two": module("two", gateway_disconnect=two)}, ["one", "two"])
    asyncio.run(runner.call_all("gateway_disconnect", [entry("one"), entry("two")], session=None, gateway=None))
    assert calls == [1, 2]


def test_unknown_hook_name_is_refused_at_registration() -> None:
    def gateway_mial(sender):  # misspelt on purpose
        return None

    mod = types.ModuleType("typo")
    mod.gateway_mial = hookimpl(gateway_mial)
    with pytest.raises(Exception):
        HookRunner({"typo": PluginSpec("typo", mod, NoSettings)}, ["typo"])


def test_argument_not_in_spec_is_refused() -> None:
    def gateway_mail(sender, mystery):
        return None

    with pytest.raises(Exception):
        HookRunner({"m": module("m", gateway_mail=gateway_mail)}, ["m"])


def _route(runner: HookRunner, entries):
    return asyncio.run(runner.first_value("gateway_route", entries, envelope=None, recipient=None, gateway=None))


def test_route_plugin_failure_defers_instead_of_the_built_in_route() -> None:
    # The built-in answer could bounce (or send elsewhere) mail the plugin would deliver.
    async def broken(recipient):
        raise RuntimeError("bug")

    async def defers(recipient):
        raise TemporaryFailure(Reply(451, "4.4.3", "directory down"))

    def routes(recipient):
        return "a route"

    specs = {n: module(n, gateway_route=f) for n, f in (("broken", broken), ("defers", defers), ("routes", routes))}
    runner = HookRunner(specs, ["broken", "defers", "routes"])
    with pytest.raises(TemporaryFailure) as raised:
        _route(runner, [entry("broken"), entry("routes")])
    assert raised.value.reply == PLUGIN_ERROR_REPLY
    assert _route(runner, [entry("broken", on_error="continue"), entry("routes")]) == "a route"
    with pytest.raises(TemporaryFailure) as raised:
        _route(runner, [entry("defers", on_error="continue"), entry("routes")])  # its answer, not an error
    assert raised.value.reply.status == "4.4.3"


def test_a_coroutine_that_answers_without_waiting_gets_no_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    timers = []
    real_timeout = asyncio.timeout

    def counting_timeout(delay):
        timers.append(delay)
        return real_timeout(delay)

    monkeypatch.setattr(asyncio, "timeout", counting_timeout)

    async def quick(sender):
        return REJECT

    async def waits(sender):
        await asyncio.sleep(0.01)
        return Verdict.accept()

    specs = {"quick": module("quick", gateway_mail=quick), "waits": module("waits", gateway_mail=waits)}
    runner = HookRunner(specs, ["quick", "waits"])
    assert run(runner, (entry("quick"),)).plugin == "quick"
    assert timers == []
    verdict = run(runner, (entry("waits", timeout=7.0),))
    assert (verdict.action, verdict.plugin, timers) == (Action.ACCEPT, "waits", [7.0])


def test_a_coroutine_that_waits_sees_a_cancellation_of_the_session() -> None:
    seen = []

    async def waits(sender):
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    async def session(runner):
        task = asyncio.create_task(runner.first_verdict("gateway_mail", (entry("waits"),), session=None, txn=None,
                                                        sender=None, gateway=None))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(session(HookRunner({"waits": module("waits", gateway_mail=waits)}, ["waits"])))
    assert seen == ["cancelled"]


def test_a_coroutine_that_raises_after_waiting_fails_closed() -> None:
    async def fails(sender):
        await asyncio.sleep(0)
        raise RuntimeError("lost the scanner")

    verdict = run(HookRunner({"fails": module("fails", gateway_mail=fails)}, ["fails"]), (entry("fails"),))
    assert verdict.action is Action.TEMPFAIL and verdict.plugin == "fails"


# Independent plugins (gateway.hooks.independent): scanners waiting on their daemons together.


def scanner(name: str, events: list, delay: float, answer=None, *, fail: bool = False):
    """An independent plugin: 'waits on its daemon' for ``delay``, then, in its turn,
    records that it applied its findings and answers ``answer``."""

    async def gateway_mail(sender):
        events.append(("start", name))
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            events.append(("cancelled", name))
            raise
        events.append(("scanned", name))
        if fail:
            raise RuntimeError(f"{name} broke")
        await wait_for_turn()
        events.append(("applied", name))
        return answer

    return module(name, gateway_mail=independent(gateway_mail))


def runner_of(*specs: PluginSpec) -> HookRunner:
    return HookRunner({s.name: s for s in specs}, [s.name for s in specs])


def test_independent_plugins_run_at_the_same_time_and_apply_in_chain_order() -> None:
    events: list = []
    runner = runner_of(scanner("a", events, 0.06), scanner("b", events, 0.02), scanner("c", events, 0.0))
    assert run(runner, (entry("a"), entry("b"), entry("c"))) is None
    starts = [e for e in events[:3]]
    assert sorted(starts) == [("start", "a"), ("start", "b"), ("start", "c")]  # all began before any scan ended
    assert [n for what, n in events if what == "scanned"] == ["c", "b", "a"]  # the quickest answered first
    assert [n for what, n in events if what == "applied"] == ["a", "b", "c"]  # changes in chain order


def test_a_dependent_plugin_is_a_barrier() -> None:
    events: list = []

    async def reads_stash(sender):  # not independent: sees what a and b did, before d starts
        events.append(("start", "c"))
        events.append(("applied", "c"))

    specs = [scanner("a", events, 0.02), scanner("b", events, 0.0), module("c", gateway_mail=reads_stash),
             scanner("d", events, 0.0), scanner("e", events, 0.01)]
    run(runner_of(*specs), tuple(entry(s.name) for s in specs))
    c = events.index(("start", "c"))
    assert {("applied", "a"), ("applied", "b")} <= set(events[:c])
    assert ("start", "d") not in events[:c] and ("start", "e") not in events[:c]
    assert [n for what, n in events if what == "applied"] == ["a", "b", "c", "d", "e"]


def test_the_first_verdict_in_chain_order_wins_and_cancels_the_later_ones() -> None:
    events: list = []
    specs = [
        scanner("a", events, 0.0),
        scanner("b", events, 0.05, REJECT),
        scanner("c", events, 0.0, Verdict.tempfail(Reply(451, "4.7.1", "later"))),  # answers first
        scanner("d", events, 10.0),
    ]
    verdict = run(runner_of(*specs), tuple(entry(s.name) for s in specs))
    assert (verdict.action, verdict.plugin) == (Action.REJECT, "b")
    assert ("cancelled", "d") in events
    assert ("applied", "c") not in events  # its turn never came
    assert [n for what, n in events if what == "applied"] == ["a", "b"]


def test_observe_mode_and_on_error_apply_per_entry_in_a_group() -> None:
    events: list = []
    specs = [scanner("watch", events, 0.01, REJECT), scanner("broken", events, 0.0, fail=True),
             scanner("last", events, 0.0, Verdict.accept())]
    runner = runner_of(*specs)
    closed = run(runner, (entry("watch", mode="observe"), entry("broken"), entry("last")))
    assert (closed.action, closed.plugin, closed.reply) == (Action.TEMPFAIL, "broken", PLUGIN_ERROR_REPLY)
    opened = run(runner, (entry("watch", mode="observe"), entry("broken", on_error="continue"), entry("last")))
    assert (opened.action, opened.plugin) == (Action.ACCEPT, "last")
    assert runner.stats.errors[("broken", "gateway_mail")] == 2


def test_a_failure_after_the_deciding_plugin_is_never_looked_at() -> None:
    events: list = []
    runner = runner_of(scanner("a", events, 0.03, REJECT), scanner("b", events, 0.0, fail=True))
    verdict = run(runner, (entry("a"), entry("b")))
    assert (verdict.action, verdict.plugin) == (Action.REJECT, "a")
    assert ("b", "gateway_mail") not in runner.stats.errors


def test_each_entry_keeps_its_own_timeout_and_waiting_for_a_turn_is_not_counted() -> None:
    events: list = []
    runner = runner_of(scanner("slow", events, 10.0), scanner("quick", events, 0.0, REJECT))
    # slow overruns its 0.3 s; quick answered at once but waits 0.3 s for its turn, longer
    # than its own 0.1 s budget: that wait is not quick's time.
    verdict = run(runner, (entry("slow", timeout=0.3, on_error="continue"), entry("quick", timeout=0.1)))
    assert (verdict.action, verdict.plugin) == (Action.REJECT, "quick")
    closed = run(runner, (entry("slow", timeout=0.05), entry("quick", timeout=0.1)))
    assert (closed.action, closed.plugin) == (Action.TEMPFAIL, "slow")


def test_a_cancelled_session_cancels_every_independent_plugin() -> None:
    events: list = []
    runner = runner_of(scanner("a", events, 10.0), scanner("b", events, 10.0))

    async def session():
        task = asyncio.create_task(runner.first_verdict("gateway_mail", (entry("a"), entry("b")), session=None,
                                                        txn=None, sender=None, gateway=None))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(session())
    assert {("cancelled", "a"), ("cancelled", "b")} <= set(events)


def test_wait_for_turn_outside_a_group_returns_at_once() -> None:
    events: list = []
    runner = runner_of(scanner("alone", events, 0.0, REJECT))
    assert run(runner, (entry("alone"),)).plugin == "alone"
    asyncio.run(wait_for_turn())


def test_only_a_coroutine_can_be_independent() -> None:
    with pytest.raises(TypeError, match="async def"):
        independent(lambda sender: None)
