"""The tracking index (gateway/tracking): log records become events, events become a
message's story and counters, several processes write one SQLite file, old rows go."""

from __future__ import annotations

import json
import logging
import multiprocessing
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from gateway.logs import QUEUE_ID, SESSION_ID
from gateway.tracking.events import FORMATS, Event, IndexHandler
from gateway.tracking.sqlite import MINUTE_KEEP, SqliteIndex, summary_state
from gateway.tracking.steps import describe
from gateway.tracking.story import Assembler, Batch, EventRow, MessageRow
from gateway.tracking.writer import IndexWriter, message_id_of

ROOT = Path(__file__).resolve().parents[2]


def test_every_line_the_index_listens_for_is_still_logged_by_the_gateway() -> None:
    # A log line reworded without the index would silently drop that step of every story.
    source = "\n".join(
        p.read_text() for p in (ROOT / "gateway").rglob("*.py") if "tracking" not in p.parts
    )
    missing = [fmt for fmt in FORMATS if f'"{fmt}"' not in source]
    assert not missing, missing


def test_the_handler_takes_known_lines_of_its_own_thread_with_their_ids() -> None:
    handler = IndexHandler(lambda: None)
    logger = logging.getLogger("gateway.smtp.handler")
    record = logger.makeRecord(logger.name, logging.INFO, "x.py", 1, "helo name=%s esmtp=%s", ("mx.example", True), None)
    other = logger.makeRecord(logger.name, logging.INFO, "x.py", 1, "something else %s", ("x",), None)
    token = SESSION_ID.set("S1-1")
    try:
        handler.handle(record)
        handler.handle(other)
        elsewhere = threading.Thread(target=handler.handle, args=(record,))
        elsewhere.start()
        elsewhere.join()
    finally:
        SESSION_ID.reset(token)
    assert [(e.kind, e.session, e.queue, e.args) for e in handler.pending] == [("helo", "S1-1", "-", ("mx.example", True))]


def _events(*items: tuple[str, str, str, tuple[object, ...]]) -> list[Event]:
    return [Event(kind, 1_800_000_000.0 + n, session, queue, args) for n, (kind, session, queue, args) in enumerate(items)]


def _rows(batch: Batch) -> list[EventRow]:
    """The batch's steps as the story shows them."""
    return [EventRow(**describe(step)) for step in batch.events]


def test_a_session_becomes_transactions_with_their_stories_and_counters() -> None:
    assembler = Assembler()
    head = b"Received: x\r\nMessage-ID:\r\n <m1@example.org>\r\nSubject: s\r\n\r\nbody\r\n"
    batch = assembler.feed(_events(
        ("connect", "S1", "-", ("192.0.2.7", 4000, "smtp", False)),
        ("tls", "S1", "-", ("TLSv1.3", "TLS_AES_256_GCM_SHA384")),
        ("helo", "S1", "-", ("client.example", True)),
        ("mail", "S1", "-", ("a@example.org", None)),
        ("rcpt_ok", "S1", "-", ("bob@example.net", "rcpt_relay")),
        ("rcpt_denied", "S1", "-", ("eve@example.net",)),
        ("data", "S1", "Q1", ("a@example.org", 1, 300)),
        ("verdict", "S1", "Q1", ("data", "reject", "data_clamav", "554 5.7.1 virus", "Eicar found", "")),
        ("mail", "S1", "-", ("a@example.org", None)),
        ("rcpt_ok", "S1", "-", ("bob@example.net", "rcpt_relay")),
        ("claim", "-", "Q2", ([{"plugin": "helo_checks", "score": 1.5, "reason": "odd"}], head)),
        ("queued", "S1", "Q2", ("a@example.org", "<bob@example.net>", 1, 300, "msg", 1.5)),
        ("disconnect", "S1", "-", ("192.0.2.7", 1)),
        ("delivery", "-", "Q2", ("bob@example.net", "deferred", "mx.example.net", "451 later")),
        ("delivery", "-", "Q2", ("bob@example.net", "delivered", "mx.example.net", "250 ok")),
        ("removed", "-", "Q2", ()),
    ))
    refused, queued = batch.messages
    assert (refused.key, refused.outcome, refused.decided_by, refused.tls) == ("Q1", "refused", "data_clamav", "TLSv1.3 TLS_AES_256_GCM_SHA384")
    assert refused.refused == ["eve@example.net"] and refused.recipients == ["bob@example.net"]
    assert (queued.key, queued.outcome, queued.score, queued.client, queued.helo) == ("Q2", "queued", 1.5, "192.0.2.7", "client.example")
    stories: dict[str, list[EventRow]] = {}
    for row in _rows(batch):
        stories.setdefault(row.key, []).append(row)
    assert [r.kind for r in stories["S1"]] == ["connect", "tls", "helo", "disconnect"]
    assert [(r.kind, r.plugin, r.status) for r in stories["Q1"]] == [
        ("mail", "", ""), ("rcpt", "rcpt_relay", "accepted"), ("rcpt", "default-deny", "reject"),
        ("verdict", "data_clamav", "data reject")]
    assert [(r.plugin, r.score, r.detail) for r in stories["Q2"] if r.kind == "result"] == [("helo_checks", 1.5, "odd")]
    deliveries = [(r.status, r.delay) for r in stories["Q2"] if r.kind == "delivery"]
    assert deliveries[0] == ("deferred", None) and deliveries[1][0] == "delivered" and deliveries[1][1] == pytest.approx(3.0)
    minute = 1_800_000_000 // 60 * 60
    assert batch.counters[("refused", "data_clamav", minute)] == 1
    assert batch.counters[("refused", "default-deny", minute)] == 1
    assert batch.counters[("virus", "refused", minute)] == 1
    assert batch.counters[("received", "msg", minute)] == 1
    assert batch.counters[("delivery", "deferred", minute)] == 1
    assert batch.maxima[("latency_max", "", minute)] == pytest.approx(3.0)
    assert message_id_of(queued.head) == "<m1@example.org>"


def test_a_connection_refused_before_mail_is_a_row_of_its_own() -> None:
    batch = Assembler().feed(_events(
        ("connect", "S2", "-", ("203.0.113.9", 4000, "smtp", False)),
        ("verdict", "S2", "-", ("connect", "reject", "connect_dnsbl", "554 5.7.1 listed", "zen", "")),
        ("disconnect", "S2", "-", ("203.0.113.9", 0)),
    ))
    assert [(m.key, m.client, m.outcome, m.decided_by) for m in batch.messages] == [("S2", "203.0.113.9", "refused", "connect_dnsbl")]


def _write_many(path: str, worker: int, batches: int) -> None:
    index = SqliteIndex(path, busy_timeout=60)
    index.create()
    for n in range(batches):
        batch = Batch()
        key = f"W{worker}-{n}"
        batch.messages.append(MessageRow(key=key, session=f"S{worker}", time=time.time(), qid=key, sender="a@example.org",
                                         outcome="queued"))
        batch.events.append((time.time(), key, f"S{worker}", "queued", key, 300, 1, "msg", 0.0))
        batch.count("received", "msg", time.time())
        index.write(batch)
    index.close()


def test_several_processes_write_one_index_without_loss_corruption_or_deadlock(tmp_path: Path) -> None:
    path = str(tmp_path / "index.sqlite")
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_write_many, args=(path, w, 150)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT count(*) FROM messages").fetchone()[0] == 600
    index = SqliteIndex(path)
    stories = [index.message(f"W{w}-{n}") for w in range(4) for n in range(150)]
    assert all(s is not None and [e["kind"] for e in s["story"]] == ["queued"] for s in stories)
    for period in (60, 3600):
        total = db.execute("SELECT sum(value) FROM counters WHERE period = ? AND name = 'received'", (period,)).fetchone()[0]
        assert total == 600


def test_rows_older_than_the_retention_are_pruned(tmp_path: Path) -> None:
    index = SqliteIndex(tmp_path / "index.sqlite")
    index.create()
    now = time.time()
    batch = Batch()
    later = Batch()  # steps of each written after its message: rows of their own
    for age, key in ((40 * 86400, "old"), (3 * 86400, "recent"), (60, "new")):
        batch.messages.append(MessageRow(key=key, session="S", time=now - age, outcome="queued"))
        batch.events.append((now - age, key, "S", "queued", key, 300, 1, "msg", 0.0))
        later.events.append((now - age + 1, key, "", "removed"))
        batch.count("received", "msg", now - age)
    index.write(batch)
    index.write(later)
    index.prune(now - 30 * 86400, now)
    db = sqlite3.connect(tmp_path / "index.sqlite")
    assert sorted(k for (k,) in db.execute("SELECT key FROM messages")) == ["new", "recent"]
    assert sorted(k for (k,) in db.execute("SELECT key FROM stories")) == ["new", "recent"]
    minutes = [t for (t,) in db.execute("SELECT t FROM counters WHERE period = 60")]
    hours = [t for (t,) in db.execute("SELECT t FROM counters WHERE period = 3600")]
    assert len(minutes) == 1 and minutes[0] >= now - MINUTE_KEEP  # only the last one's minute
    assert len(hours) == 2  # the recent and the new ones' hours


def test_search_and_a_message_story_read_back(tmp_path: Path) -> None:
    index = SqliteIndex(tmp_path / "index.sqlite")
    index.create()
    now = time.time()
    batch = Batch()
    batch.messages.append(MessageRow(key="Q9", qid="Q9", session="S9", time=now, sender="carol@example.org",
                                     recipients=["dave@example.net"], message_id="<x_1%@example>", outcome="queued"))
    batch.events += [(now, "S9", "S9", "connect", "192.0.2.9", 4000, "smtp", False),
                     (now + 1, "Q9", "S9", "delivery", "dave@example.net", "deferred", "mx", "451 later", None),
                     (now + 2, "Q9", "", "delivery", "dave@example.net", "delivered", "mx", "250 ok", 2.0)]
    index.write(batch)
    assert [r["key"] for r in index.search(sender="CAROL")[0]] == ["Q9"]
    assert [r["key"] for r in index.search(message_id="x_1%")[0]] == ["Q9"]
    assert index.search(message_id="x11")[1] == 0  # the wildcards are taken literally
    assert index.search(qid="Q")[0][0]["state"] == "delivered"
    assert index.search(recipient="dave", until=now - 1)[1] == 0
    story = index.message("Q9")
    assert story is not None and [e["kind"] for e in story["story"]] == ["connect", "delivery", "delivery"]
    assert summary_state("queued", {"a": "delivered", "b": "deferred"}) == "deferred"


def _kinds(path: Path) -> list[str]:
    """The kinds of every step the index file holds, in time order."""
    db = sqlite3.connect(path)
    steps = [step for (story,) in db.execute("SELECT story FROM messages UNION ALL SELECT story FROM stories")
             for step in json.loads(story)]
    return [step[3] for step in sorted(steps, key=lambda step: step[0])]


def test_the_writer_follows_a_gateway_loop_and_stops_cleanly(tmp_path: Path) -> None:
    writer = IndexWriter(SqliteIndex(tmp_path / "i.sqlite"), None, 86400, sample_queue=False, tick=0.05)
    writer.start()
    try:
        log = logging.getLogger("gateway.smtp.handler")
        token = SESSION_ID.set("S5-1")
        try:
            log.info("connect client=%s port=%d listener=%s relay_client=%s", "192.0.2.1", 1, "smtp", False)
            log.info("verdict is not a line %s", "x")
            log.info("disconnect client=%s transactions=%d", "192.0.2.1", 0)
        finally:
            SESSION_ID.reset(token)
        assert writer.flush()
    finally:
        writer.stop()
    assert _kinds(tmp_path / "i.sqlite") == ["connect", "disconnect"]
    assert writer.handler not in logging.getLogger().handlers
    assert QUEUE_ID.get() == "-"


def test_the_index_hears_info_lines_that_a_warning_log_level_does_not_print(tmp_path: Path) -> None:
    import io

    from gateway.logs import configure

    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogRecordFactory())
    stream = io.StringIO()
    configure("warning", stream)
    writer = IndexWriter(SqliteIndex(tmp_path / "i.sqlite"), None, 86400, sample_queue=False, tick=0.05)
    writer.start()
    try:
        token = SESSION_ID.set("S6-1")
        try:
            logging.getLogger("gateway.smtp.handler").info(
                "connect client=%s port=%d listener=%s relay_client=%s", "192.0.2.1", 1, "smtp", False)
        finally:
            SESSION_ID.reset(token)
        assert writer.flush()
    finally:
        writer.stop()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        logging.setLogRecordFactory(saved[2])
    assert _kinds(tmp_path / "i.sqlite") == ["connect"]
    assert stream.getvalue() == ""  # the operator asked for warnings only
    assert not logging.getLogger("gateway.smtp.handler").isEnabledFor(logging.INFO)  # as it was, once stopped


def test_a_delivery_by_another_process_gets_its_delay_from_the_index(tmp_path: Path) -> None:
    index = SqliteIndex(tmp_path / "i.sqlite")
    index.create()
    worker = IndexWriter(index, None, 86400, sample_queue=False)
    t = 1_800_000_000.0
    index.write(worker.assembler.feed([  # the worker queued it...
        Event("mail", t, "S1", "-", ("a@example.org", None)),
        Event("queued", t + 1, "S1", "Q1", ("a@example.org", "<b@example.net>", 1, 10, "msg", 0.0)),
    ]))
    master = IndexWriter(index, None, 86400, sample_queue=True)
    batch = master.assembler.feed([Event("delivery", t + 61, "-", "Q1", ("b@example.net", "delivered", "mx", "250 ok"))])
    master._complete(batch)  # ...the master retried and delivered it
    (row,) = _rows(batch)
    assert row.delay == pytest.approx(60.0)
    assert batch.maxima[("latency_max", "", int(t + 61) // 60 * 60)] == pytest.approx(60.0)


class _Queue:
    def __init__(self, ids: list[str]) -> None:
        self._ids = ids

    def ids(self, area: str = "msg") -> list[str]:
        return self._ids if area == "msg" else []


def test_the_master_samples_the_queue_size_and_its_oldest_message_age() -> None:
    now = 1_800_000_000.0
    # Queue ids start with their time in microseconds, in hex (gateway/queue/store.py).
    ids = [f"{int((now - age) * 1e6):013X}00000A0000" for age in (3600, 60)]
    writer = IndexWriter(SqliteIndex("unused"), _Queue(ids), 86400, sample_queue=True)
    batch = Batch()
    writer._sample(batch, now)
    minute = int(now) // 60 * 60
    assert batch.maxima[("queue_size", "", minute)] == 2
    assert batch.maxima[("queue_age", "", minute)] == pytest.approx(3600, abs=1)


def _message_events(n: int, t: float) -> list[Event]:
    """The steps of one message accepted, delivered and removed by one process."""
    sid, qid = f"S7-{n}", f"Q{n:06d}"
    return [
        Event("connect", t, sid, "-", ("192.0.2.7", 4000, "smtp", False)),
        Event("helo", t, sid, "-", ("client.example", True)),
        Event("mail", t, sid, "-", ("a@example.org", None)),
        Event("rcpt_ok", t, sid, "-", ("b@example.net", "rcpt_relay")),
        Event("queued", t, sid, qid, ("a@example.org", "<b@example.net>", 1, 300, "msg", 0.0)),
        Event("disconnect", t, sid, "-", ("192.0.2.7", 1)),
        Event("delivery", t + 0.1, "-", qid, ("b@example.net", "delivered", "mx.example.net", "250 ok")),
        Event("removed", t + 0.2, "-", qid, ()),
    ]


def test_a_batch_is_written_in_a_few_statements_not_a_statement_a_step(tmp_path: Path) -> None:
    # Each statement the writer runs is a Python step and a GIL hand-over in a process
    # whose event loop is busy: 100 messages of 8 steps each were 900 statements (an
    # executemany runs one a row).
    index = SqliteIndex(tmp_path / "i.sqlite")
    index.create()
    statements: list[str] = []
    index.writer.set_trace_callback(statements.append)
    events = [e for n in range(100) for e in _message_events(n, 1_800_000_000.0 + n / 100)]
    index.write(Assembler().feed(events))
    assert len(statements) <= 6  # BEGIN, messages, counters added and raised, COMMIT
    (found, total) = index.search(qid="Q000042")
    assert total == 1 and found[0]["state"] == "delivered"
    story = index.message("Q000042")
    assert story is not None
    assert [e["kind"] for e in story["story"]] == ["connect", "helo", "mail", "rcpt", "queued", "disconnect",
                                                   "delivery", "removed"]


def test_a_story_spread_over_batches_sessions_and_processes_reads_whole(tmp_path: Path) -> None:
    index = SqliteIndex(tmp_path / "i.sqlite")
    index.create()
    t = 1_800_000_000.0
    worker = Assembler()
    index.write(worker.feed([  # the connection and a first message, written at once
        Event("connect", t, "S1", "-", ("192.0.2.7", 4000, "smtp", False)),
        Event("mail", t + 1, "S1", "-", ("a@example.org", None)),
        Event("rcpt_ok", t + 1, "S1", "-", ("b@example.net", "rcpt_relay")),
        Event("queued", t + 2, "S1", "Q1", ("a@example.org", "<b@example.net>", 1, 300, "msg", 0.0)),
    ]))
    index.write(worker.feed([  # a second message of the session, a tick later
        Event("mail", t + 3, "S1", "-", ("c@example.org", None)),
        Event("rcpt_ok", t + 3, "S1", "-", ("b@example.net", "rcpt_relay")),
        Event("queued", t + 4, "S1", "Q2", ("c@example.org", "<b@example.net>", 1, 300, "msg", 0.0)),
    ]))
    index.write(worker.feed([Event("disconnect", t + 5, "S1", "-", ("192.0.2.7", 2))]))
    master = IndexWriter(index, None, 86400, sample_queue=True)  # another process retries and delivers
    batch = master.assembler.feed([Event("delivery", t + 6, "-", "Q2", ("b@example.net", "delivered", "mx", "250 ok"))])
    master._complete(batch)
    index.write(batch)
    story = index.message("Q2")
    assert story is not None
    assert [e["kind"] for e in story["story"]] == ["connect", "mail", "rcpt", "queued", "disconnect", "delivery"]
    assert story["story"][-1]["delay"] == pytest.approx(2.0)
    assert story["state"] == "delivered" and [o["key"] for o in story["same_session"]] == ["Q1"]
    first = index.message("Q1")
    assert first is not None and first["state"] == "queued"
    assert [e["kind"] for e in first["story"]] == ["connect", "mail", "rcpt", "queued", "disconnect"]


def test_an_index_file_of_the_first_layout_is_made_anew(tmp_path: Path) -> None:
    path = tmp_path / "i.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE messages (key TEXT PRIMARY KEY, time REAL)")
    db.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, time REAL, key TEXT, kind TEXT)")
    db.commit()
    db.close()
    index = SqliteIndex(path)
    index.create()
    index.write(Assembler().feed(_message_events(1, time.time())))
    assert index.search()[1] == 1


def test_a_message_delivered_a_moment_later_is_still_one_row_and_flush_writes_a_waiting_one(tmp_path: Path) -> None:
    index = SqliteIndex(tmp_path / "i.sqlite")
    writer = IndexWriter(index, None, 86400, sample_queue=False)
    index.create()
    first, second = _message_events(1, time.time()), _message_events(2, time.time())
    writer.handler.pending.extend(first[:6])  # queued and disconnected; delivered in the next pass
    writer._once()
    assert index.search()[1] == 0  # its row waits for the delivery...
    writer.handler.pending.extend(first[6:] + second[:6])
    writer._once()
    db = sqlite3.connect(tmp_path / "i.sqlite")
    assert db.execute("SELECT count(*) FROM stories").fetchone()[0] == 0  # ...and has it
    rows, total = index.search()
    assert total == 1 and rows[0]["state"] == "delivered"
    writer._release = True  # what flush() asks of the next pass: a deferred one is shown at once
    writer._once()
    assert index.search()[1] == 2
    writer.handler.pending.extend(second[6:])
    writer._once(final=True)
    story = index.message("Q000002")
    assert story is not None and story["state"] == "delivered"
    assert [e["kind"] for e in story["story"]][-2:] == ["delivery", "removed"]


def _create_at(path: str, start: float) -> str:
    import time as _time

    from gateway.tracking.sqlite import SqliteIndex as _Index

    _time.sleep(max(0.0, start - _time.time()))
    try:
        _Index(path).create()
        return ""
    except Exception as exc:  # reported to the test
        return repr(exc)


def test_processes_starting_together_all_open_a_new_index(tmp_path: Path) -> None:
    """Workers start at once and each creates the index; switching a new file to WAL is
    'database is locked' at once for all but one, which must not leave a process with
    nothing recorded (seen with workers = 2: one process's mail missing from tracking)."""
    import multiprocessing
    import time as _time

    context = multiprocessing.get_context("fork")
    with context.Pool(6) as pool:
        for round_ in range(5):
            path = str(tmp_path / f"index-{round_}.sqlite")
            start = _time.time() + 0.3
            errors = pool.starmap(_create_at, [(path, start)] * 6)
            assert errors == [""] * 6
