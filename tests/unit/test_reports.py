"""gateway/reports.py: the periods, which are owed, the once-per-report claim in a real
state store, the timer, the command's --period and the reports' DKIM signer."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.reports import (
    CLAIM_TTL,
    PeriodReporter,
    make_signer,
    period_begin,
    period_start,
    report_forever,
    timer_interval,
)
from gateway.state import StateStore, StateUnavailable
from gateway.state.sqlite import SqliteStore
from gateway.verdicts import Reply, TemporaryFailure

DAY = 86400.0
NOW = 1_700_000_000.0


def test_periods_start_at_utc_midnight_and_commands_name_them() -> None:
    today = period_begin(NOW, DAY)
    assert today % 86400 == 0 and today <= NOW < today + DAY
    assert period_start("current", DAY, NOW) == today
    assert period_start("previous", DAY, NOW) == today - 86400
    assert period_start(str(today + 5), DAY, NOW) == today
    assert period_start("yesterday", DAY, NOW) is None
    assert period_start("-5", DAY, NOW) is None


def test_the_timer_looks_often_but_not_too_often() -> None:
    assert timer_interval(DAY) == 60.0
    assert timer_interval(8.0) == 2.0
    assert timer_interval(1.0) == 0.5


class Reporter(PeriodReporter[str]):
    """Reports are their domains; ``failing`` domains defer, every send is noted."""

    prefix = "test"

    def __init__(self, store: StateStore, period: float, reports: dict[int, list[str]],
                 failing: set[str] | None = None) -> None:
        super().__init__(store, period)
        self.reports = reports
        self.failing = failing or set()
        self.sends: list[tuple[str, int]] = []

    async def _reports(self, begin: int, domains: list[str] | None) -> list[str]:
        return [d for d in self.reports.get(begin, []) if domains is None or d in domains]

    def _domain(self, report: str) -> str:
        return report

    async def _send(self, report: str, begin: int) -> str:
        self.sends.append((report, begin))
        if report in self.failing:
            raise TemporaryFailure(Reply(451, "4.3.0", "queue unavailable"))
        return f"qid-{report}" if report != "nobody.example" else ""


def run_with_store(tmp_path: Path, test: Callable[[StateStore], Awaitable[None]]) -> None:
    async def main() -> None:
        store = SqliteStore(tmp_path / "state.sqlite3")
        await store.open()
        try:
            await test(store)
        finally:
            await store.close()

    asyncio.run(main())


def test_ended_periods_are_sent_once_after_the_grace_time(tmp_path: Path) -> None:
    today = period_begin(NOW, DAY)
    yesterday, before = int(today - DAY), int(today - 2 * DAY)

    async def test(store: StateStore) -> None:
        job = Reporter(store, DAY, {today: ["a.example"], yesterday: ["b.example", "nobody.example"], before: ["c.example"]})
        # Thirty seconds into today: yesterday is still in its grace time (a tenth of
        # the period, at most a minute), the day before is owed.
        assert await job.send_due(today + 30) == 1
        assert job.sends == [("c.example", before)]
        assert await job.send_due(today + 61) == 1  # nobody.example is claimed but sent nowhere
        assert sorted(job.sends) == [("b.example", yesterday), ("c.example", before), ("nobody.example", yesterday)]
        assert await store.get(f"test:sent:{yesterday}:b.example") == "sent qid-b.example"
        assert await store.get(f"test:sent:{yesterday}:nobody.example") == "sent -"
        # Another process (or node) sharing the store finds the marks.
        other = Reporter(store, DAY, job.reports)
        assert await other.send_due(today + 61) == 0 and other.sends == []

    run_with_store(tmp_path, test)


def test_a_short_period_waits_for_counts_that_reach_the_store_late(tmp_path: Path) -> None:
    """TLS outcomes reach the store up to a second after the session: with a short period
    (3 s: a tenth is 0.3 s) the report still waits the reporter's least grace time, so a
    session counted just before the period ended is in it, not lost after it was sent."""
    from gateway.delivery.remote.tlsrpt_send import FLUSH, TlsReporter

    period = 3.0
    begin = int(period_begin(NOW, period))

    class Late(Reporter):
        min_grace = TlsReporter.min_grace

    async def test(store: StateStore) -> None:
        job = Late(store, period, {begin: ["a.example"]})
        end = begin + period
        assert await job.send_due(end + FLUSH) == 0 and job.sends == []  # a count may still come
        assert await job.send_due(end + TlsReporter.min_grace + 0.1) == 1

    assert TlsReporter.min_grace > FLUSH
    run_with_store(tmp_path, test)


def test_a_deferred_report_gives_its_claim_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    today = period_begin(NOW, DAY)
    yesterday = int(today - DAY)

    async def test(store: StateStore) -> None:
        job = Reporter(store, DAY, {yesterday: ["a.example", "b.example"]}, failing={"b.example"})
        with caplog.at_level(logging.WARNING):
            assert await job.send_due(today + 61) == 1
        assert "report domain=b.example begin=%d deferred: " % yesterday in caplog.text
        assert await store.get(f"test:sent:{yesterday}:b.example") is None
        job.failing.clear()
        assert await job.send_due(today + 62) == 1  # the period was not done: tried again
        assert await job.send_due(today + 63) == 0  # now it is: not even read
        assert job.sends.count(("b.example", yesterday)) == 2 and job.sends.count(("a.example", yesterday)) == 1

    run_with_store(tmp_path, test)


def test_a_held_claim_is_left_alone_and_one_period_can_be_sent_by_domain(tmp_path: Path) -> None:
    today = period_begin(NOW, DAY)

    async def test(store: StateStore) -> None:
        job = Reporter(store, DAY, {today: ["a.example", "b.example"]})
        await store.set(f"test:sent:{today}:a.example", "claimed 1", CLAIM_TTL, only_if_absent=True)
        assert await job.send_period(today, ["a.example"]) == (0, True)
        assert await job.send_period(today) == (1, True)
        assert job.sends == [("b.example", today)]

    run_with_store(tmp_path, test)


def test_the_timer_outlives_failures(caplog: pytest.LogCaptureFixture) -> None:
    rounds: list[int] = []

    async def send_due() -> None:
        rounds.append(len(rounds))
        if len(rounds) == 1:
            raise StateUnavailable("store down")
        if len(rounds) == 2:
            raise RuntimeError("bug")

    async def main() -> None:
        task = asyncio.create_task(report_forever(send_due, 0.01, what="test reports", log=logging.getLogger("t")))
        while len(rounds) < 3:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.WARNING):
        asyncio.run(main())
    assert "test reports: state store unavailable: store down" in caplog.text
    assert "test reports: sending failed" in caplog.text


def test_report_mail_is_signed_with_the_queue_dkim_sign_key_of_its_domain(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)
    entry = SimpleNamespace(
        name="queue_dkim_sign",
        settings=SimpleNamespace(
            domains={"gw.example": SimpleNamespace(key_file=str(key_file), algorithm="rsa-sha256", selector="s1")},
            headers=("From", "To", "Subject"), oversign=("From",),
        ),
    )
    policy = SimpleNamespace(plugins=[SimpleNamespace(name="data_dmarc", settings=None), entry])
    assert make_signer(policy, "reports@other.example") is None
    sign = make_signer(policy, "reports@mail.gw.example")  # a parent domain's key
    assert sign is not None
    message = b"From: reports@mail.gw.example\r\nTo: r@example.org\r\nSubject: report\r\n\r\nbody\r\n"

    async def signing() -> bytes:
        assert sign is not None
        return await sign(message)

    signed = asyncio.run(signing())
    assert signed.startswith(b"DKIM-Signature: ") and signed.endswith(message)
    assert b" d=gw.example;" in signed and b" s=s1;" in signed
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: record)
