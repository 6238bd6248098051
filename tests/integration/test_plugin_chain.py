"""Plugins in a real session: failures, time budgets, scoring, observe mode, overrides."""

from __future__ import annotations

import asyncio
import smtplib
import sys
import types
from dataclasses import dataclass

import pytest

from gateway.hooks import hookimpl
from gateway.verdicts import Reply, Verdict
from tests.conftest import BASE_POLICY, MESSAGE, RawClient, plugin_specs, smtp


def make_plugin(name: str, **hooks) -> types.ModuleType:
    mod = types.ModuleType(name)

    @dataclass(frozen=True)
    class Settings:
        score: float = 0.0
        delay: float = 0.0

    mod.Settings = Settings
    for hook, fn in hooks.items():
        setattr(mod, hook, hookimpl(fn))
    return mod


def boom(message):
    raise RuntimeError("scanner exploded")


async def slow(message, settings):
    await asyncio.sleep(settings.delay)


def spammy(txn, settings):
    txn.results.add("data_spammy", settings.score, "looks spammy")


def deny_all(sender):
    return Verdict.reject(Reply(550, "5.7.1", "Go away"), reason="test")


def chain(*entries: str, extra: str = "") -> str:
    text = BASE_POLICY
    for entry in entries:
        text += f"\n[[plugins]]\n{entry}\n"
    return text + extra


def send(port: int) -> tuple[int, bytes]:
    with smtp(port) as client:
        client.ehlo()
        client.mail("a@example.org")
        client.rcpt("alice@localhost")
        return client.data(MESSAGE)


def test_plugin_that_raises_tempfails_and_session_survives(gateway_factory) -> None:
    specs = plugin_specs(data_boom=make_plugin("data_boom", gateway_data=boom))
    gw = gateway_factory(chain('name = "data_boom"'), specs=specs)
    with smtp(gw.port) as client:
        client.ehlo()
        client.mail("a@example.org")
        client.rcpt("alice@localhost")
        code, text = client.data(MESSAGE)
        assert code == 451 and text.startswith(b"4.3.0")
        assert client.noop()[0] == 250
    assert gw.queue_ids() == []


def test_plugin_that_raises_with_fail_open_lets_mail_through(gateway_factory) -> None:
    specs = plugin_specs(data_boom=make_plugin("data_boom", gateway_data=boom))
    gw = gateway_factory(chain('name = "data_boom"\non_error = "continue"'), specs=specs)
    assert send(gw.port)[0] == 250
    assert len(gw.queue_ids()) == 1


def test_plugin_over_its_time_budget_tempfails(gateway_factory) -> None:
    specs = plugin_specs(data_slow=make_plugin("data_slow", gateway_data=slow))
    gw = gateway_factory(chain('name = "data_slow"\ntimeout = "200ms"\ndelay = 5.0'), specs=specs)
    assert send(gw.port)[0] == 451
    assert gw.queue_ids() == []


def test_slow_plugin_does_not_stall_other_sessions(gateway_factory) -> None:
    import threading
    import time

    specs = plugin_specs(data_slow=make_plugin("data_slow", gateway_data=slow))
    gw = gateway_factory(chain('name = "data_slow"\ntimeout = "10s"\ndelay = 1.5'), specs=specs)
    slow_done = threading.Event()
    threading.Thread(target=lambda: (send(gw.port), slow_done.set()), daemon=True).start()
    time.sleep(0.2)
    started = time.monotonic()
    c = RawClient(gw.port)
    assert c.reply()[0] == 220
    assert c.cmd("EHLO other.test.example")[0] == 250
    assert c.cmd("NOOP")[0] == 250
    assert time.monotonic() - started < 1.0
    assert not slow_done.is_set()
    c.close()
    assert slow_done.wait(10)


def test_scores_add_up_to_a_reject(gateway_factory) -> None:
    specs = plugin_specs(data_spammy=make_plugin("data_spammy", gateway_data=spammy))
    policy = chain(
        'name = "data_spammy"\nid = "one"\nscore = 3.0',
        'name = "data_spammy"\nid = "two"\nscore = 4.0',
        extra="\n[scoring]\nreject = 6.0\n",
    )
    gw = gateway_factory(policy, specs=specs)
    code, text = send(gw.port)
    assert code == 550 and text.startswith(b"5.7.1")


def test_scores_below_threshold_are_kept_in_the_envelope(gateway_factory) -> None:
    specs = plugin_specs(data_spammy=make_plugin("data_spammy", gateway_data=spammy))
    gw = gateway_factory(chain('name = "data_spammy"\nscore = 2.5', extra="\n[scoring]\nreject = 6.0\n"), specs=specs)
    assert send(gw.port)[0] == 250
    notes = gw.queue.load(gw.queue_ids()[0]).envelope.notes
    assert notes == [{"plugin": "data_spammy", "score": 2.5, "reason": "looks spammy"}]


def test_quarantine_threshold_stores_apart(gateway_factory) -> None:
    specs = plugin_specs(data_spammy=make_plugin("data_spammy", gateway_data=spammy))
    gw = gateway_factory(chain('name = "data_spammy"\nscore = 5', extra="\n[scoring]\nquarantine = 4.0\nreject = 9.0\n"), specs=specs)
    assert send(gw.port)[0] == 250
    assert gw.queue_ids() == []
    (qid,) = gw.queue_ids("quarantine")
    assert "score 5.0" in gw.queue.load(qid, "quarantine").envelope.quarantine_reason


def test_observe_mode_logs_but_does_not_reject(gateway_factory) -> None:
    specs = plugin_specs(mail_deny=make_plugin("mail_deny", gateway_mail=deny_all))
    gw = gateway_factory(chain('name = "mail_deny"\nmode = "observe"'), specs=specs)
    assert send(gw.port)[0] == 250


def test_listener_override_disables_a_plugin(gateway_factory) -> None:
    specs = plugin_specs(mail_deny=make_plugin("mail_deny", gateway_mail=deny_all))
    policy = chain('name = "mail_deny"') + '\n[[overrides]]\nmatch = { network = "127.0.0.0/8" }\ndisable = ["mail_deny"]\n'
    gw = gateway_factory(policy, specs=specs)
    assert send(gw.port)[0] == 250
    denied = gateway_factory(chain('name = "mail_deny"'), specs=specs)
    with smtp(denied.port) as client:
        client.ehlo()
        assert client.mail("a@example.org") == (550, b"5.7.1 Go away")


def suspicious_client(session, settings):
    session.results.add("connect_suspicious", settings.score, "client looks odd")


def test_connect_scores_count_towards_the_message_verdict(gateway_factory) -> None:
    specs = plugin_specs(
        connect_suspicious=make_plugin("connect_suspicious", gateway_connect=suspicious_client),
        data_spammy=make_plugin("data_spammy", gateway_data=spammy),
    )
    policy = chain('name = "connect_suspicious"\nscore = 3.0', 'name = "data_spammy"\nscore = 3.0',
                   extra="\n[scoring]\nreject = 5.0\n")
    gw = gateway_factory(policy, specs=specs)
    code, text = send(gw.port)
    assert code == 550 and text.startswith(b"5.7.1")
