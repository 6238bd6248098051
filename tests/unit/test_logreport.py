"""The log summary: what each kind of log line counts for."""

from __future__ import annotations

import io
import logging

import pytest

from gateway import logs
from gateway.logreport import DelayHistogram, LogReport, Tally, format_duration

QID = "6611879129A20000C500000"
BOUNCE = "661187913B797000C500000"


def line(clock: str, logger: str, text: str, queue: str = "-", session: str = "-") -> str:
    return f"2026-11-25 {clock} gateway[42] INFO {logger} session={session} queue={queue} {text}\n"


STORY = [
    line("11:00:00,000", "gateway.smtp.handler", "connect client=192.0.2.1 port=4000 listener=smtp relay_client=False", session="S1"),
    line("11:00:00,100", "gateway.smtp.handler",
         "rcpt reject by=rcpt_relay reply='554 5.7.1 Relay access denied' reason=relay to remote.example denied rcpt=<x@remote.example>",
         session="S1"),
    line("11:00:00,200", "gateway.smtp.handler", "rcpt to=<who@localhost> refused by=default-deny", session="S1"),
    line("11:00:00,300", "gateway.smtp.handler",
         "mail reject by=mail_test reply=\"550 5.7.1 it's you\" reason=listed sender=<spam@example.net>", session="S1"),
    line("11:00:00,400", "gateway.smtp.handler",
         "data tempfail by=scoring reply='451 4.7.1 Message deferred, please try again later' reason=score 9.0 >= 8 ",
         session="S1"),
    line("11:00:01,000", "gateway.smtp.handler",
         "queued from=<a@example.org> to=<alice@localhost>,<bob@other.example> size=1000 area=msg score=0.0",
         queue=QID, session="S1"),
    line("11:00:01,500", "gateway.delivery.scheduler",
         "delivery to=<alice@localhost> status=delivered relay=local reply='250 2.0.0 delivered to ./Maildir/'", queue=QID),
    line("11:00:02,000", "gateway.delivery.scheduler",
         "delivery to=<bob@other.example> status=deferred relay=mx.other.example reply='451 4.4.1 try later'", queue=QID),
    line("11:01:01,000", "gateway.delivery.scheduler",
         "delivery to=<bob@other.example> status=failed relay=mx.other.example reply='550 5.1.1 no such user'", queue=QID),
    line("11:01:01,010", "gateway.delivery.scheduler",
         f"queued qid={BOUNCE} from=<> to=<a@example.org> (generated)", queue=QID),
    line("11:01:01,020", "gateway.delivery.scheduler", "done: removed from the queue", queue=QID),
    line("11:01:03,020", "gateway.delivery.scheduler",
         "delivery to=<a@example.org> status=delivered relay=mx.example.org reply='250 ok'", queue=BOUNCE),
    line("11:01:03,030", "gateway.delivery.scheduler", "done: removed from the queue", queue=BOUNCE),
    "Traceback (most recent call last):\n",
]


def test_a_story_counts_once_each_and_ends() -> None:
    report = LogReport()
    report.feed_all(STORY)
    s = report.summary()
    assert s["lines"] == len(STORY) and s["unparsed"] == 1
    assert s["connections"] == 1
    assert s["messages"] == {"received": 1, "bytes": 1000, "quarantined": 0, "generated": 1, "in_queue_at_end": 0}
    assert s["recipients"] == {"delivered": 2, "bounced": 1, "expired": 0, "deferred": 1}
    # Delivered after 0.5 s (alice) and the bounce 2.01 s after it was generated.
    assert s["delay"]["count"] == 2
    assert s["delay"]["p50"] == pytest.approx(0.5, rel=0.01)
    assert s["delay"]["max"] == pytest.approx(2.01)
    assert report.in_flight == {}
    domains = {row["domain"]: row for row in s["recipient_domains"]}
    assert domains["other.example"] == {"domain": "other.example", "delivered": 0, "bounced": 1, "deferred": 1}
    assert s["senders"] == [{"sender": "a@example.org", "messages": 1, "bytes": 1000}]


def test_a_message_delivered_at_once_is_received_delivered_and_not_left_queued() -> None:
    report = LogReport()
    report.feed_all([
        line("12:00:00,000", "gateway.smtp.handler",
             "queued from=<a@example.org> to=<alice@localhost> rcpts=1 size=700 area=direct score=0.0",
             queue=QID, session="S2"),
        line("12:00:00,000", "gateway.delivery.scheduler",
             "delivery to=<alice@localhost> status=delivered relay=local reply='250 2.0.0 delivered to ./Maildir/'",
             queue=QID, session="S2"),
        line("12:00:00,001", "gateway.delivery.scheduler", "done: delivered at once, never queued",
             queue=QID, session="S2"),
    ])
    s = report.summary()
    assert s["messages"] == {"received": 1, "bytes": 700, "quarantined": 0, "generated": 0, "in_queue_at_end": 0}
    assert s["recipients"]["delivered"] == 1 and s["delay"]["count"] == 1
    assert report.in_flight == {}


def test_rejections_name_plugin_reason_and_reply() -> None:
    report = LogReport()
    report.feed_all(STORY)
    rejects = report.summary()["rejects"]
    assert rejects["total"] == 4
    reasons = {(r["plugin"], r["reason"], r["reply"]) for r in rejects["reasons"]}
    assert ("rcpt_relay", "relay to remote.example denied", "554 5.7.1 Relay access denied") in reasons
    assert ("mail_test", "listed", "550 5.7.1 it's you") in reasons
    assert ("scoring", "score 9.0 >= 8", "451 4.7.1 Message deferred, please try again later") in reasons
    assert ("default-deny", "no plugin accepted the recipient", "550 5.7.1 Recipient not accepted") in reasons
    stages = {(r["stage"], r["action"], r["plugin"]) for r in rejects["by_plugin"]}
    assert ("data", "tempfail", "scoring") in stages


def test_observe_expired_quarantine_and_core_limits() -> None:
    report = LogReport()
    report.feed_all([
        line("10:00:00,000", "gateway.hooks",
             "observe plugin=helo_checks hook=gateway_helo would=reject reply='550 5.7.1 no' reason=claims_us"),
        line("10:00:00,000", "gateway.smtp.handler", "quarantine by=data_av reason=EICAR"),
        line("10:00:00,000", "gateway.smtp.handler",
             "queued from=<> to=<alice@localhost> size=10 area=quarantine score=0.0", queue=QID),
        line("10:00:00,000", "gateway.smtp.protocol", "data refused: 552 5.3.4 Message size exceeds fixed maximum message size"),
        line("10:00:00,000", "gateway.smtp.protocol", "connection refused client=192.0.2.9: too many connections"),
        line("10:00:00,000", "gateway.delivery.scheduler", "expired to=<bob@gone.example>", queue=BOUNCE),
    ])
    s = report.summary()
    assert s["observe"] == [{"plugin": "helo_checks", "stage": "helo", "would": "reject", "count": 1}]
    assert s["quarantine"] == [{"plugin": "data_av", "count": 1}]
    assert s["messages"]["quarantined"] == 1 and s["messages"]["in_queue_at_end"] == 0
    assert s["recipients"]["expired"] == 1 and s["recipients"]["bounced"] == 1
    plugins = {(r["stage"], r["plugin"]) for r in s["rejects"]["by_plugin"]}
    assert plugins == {("data", "core"), ("connect", "core")}
    assert s["senders"][0]["sender"] == ""  # the null sender


def test_lines_written_by_the_gateways_own_formatter_are_understood() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure("info", stream=stream)
        token = logs.QUEUE_ID.set(QID)
        logging.getLogger("gateway.smtp.handler").info(
            "queued from=<%s> to=%s size=%d area=%s score=%.1f", "a@example.org", "<b@example.org>", 42, "msg", 0.0
        )
        logs.QUEUE_ID.reset(token)
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
    report = LogReport()
    report.feed_all(io.StringIO(stream.getvalue()))
    assert report.summary()["messages"]["received"] == 1
    assert list(report.in_flight) == [QID]


def test_bounded_counters_keep_the_frequent_keys() -> None:
    tally = Tally(1, capacity=10)
    for i in range(1000):
        tally.add("frequent")
        tally.add(f"rare{i}")
    assert len(tally.counts) <= 20
    assert tally.top(1) == [("frequent", [1000])]
    assert not tally.is_exact


def test_histogram_percentiles_are_within_one_percent() -> None:
    h = DelayHistogram()
    for ms in range(1, 1001):
        h.add(ms / 1000)
    assert h.percentile(50) == pytest.approx(0.5, rel=0.011)
    assert h.percentile(90) == pytest.approx(0.9, rel=0.011)
    assert h.percentile(100) == pytest.approx(1.0)
    assert DelayHistogram().percentile(50) is None


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.0421, "0.042s"), (12.34, "12.3s"), (312, "5m12s"), (3 * 3600 + 300, "3h05m"), (2 * 86400 + 4 * 3600, "2d04h")]
)
def test_durations_read_well(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
