"""gateway.logs: the running gateway's lines are exactly FORMAT's, made cheaply."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import sys
import threading
import time
from typing import Any, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import logs
from gateway.logs import FORMAT, QUEUE_ID, SESSION_ID, LineFormatter


def _record(msg: str, *args: Any, exc: bool = False, stack: str | None = None, created: float | None = None,
            level: int = logging.INFO) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    record = logging.LogRecord("gateway.delivery.scheduler", level, __file__, 1, msg, args, exc_info,
                               sinfo=stack)
    if created is not None:
        record.created, record.msecs = created, (created - int(created)) * 1000
    record.session, record.queue = "S1-2a", "661E102AFFD1D0042770000"
    return record


@pytest.mark.parametrize("kwargs", [
    {}, {"exc": True}, {"stack": "Stack (most recent call last):\n  here"},
    {"exc": True, "stack": "Stack:\n  there"}, {"level": logging.WARNING},
], ids=["plain", "exception", "stack", "both", "warning"])
@pytest.mark.parametrize("msg", ["delivery to=<%s> status=%s", "ends in a newline %s %s\n"])
def test_lines_are_what_logging_formatter_makes_of_format(msg: str, kwargs: dict[str, Any]) -> None:
    for created in (1764932897.123456, 1764932897.999, 1764932898.0005):
        expected = logging.Formatter(FORMAT).format(_record(msg, "a@b", "sent", created=created, **kwargs))
        assert LineFormatter().format(_record(msg, "a@b", "sent", created=created, **kwargs)) == expected


def test_the_time_text_is_made_once_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = time.strftime

    def strftime(fmt: str, *args: Any) -> str:
        calls.append(fmt)
        return real(fmt, *args)

    monkeypatch.setattr(time, "strftime", strftime)
    formatter = LineFormatter()
    lines = [formatter.format(_record("line %d", i, created=1764932897.0 + i / 1000)) for i in range(500)]
    assert len(calls) == 1
    assert all(line.startswith(time.strftime("%Y-%m-%d %H:%M:%S,", time.localtime(1764932897))) for line in lines)


@pytest.fixture
def restored() -> Iterator[None]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging._srcfile, logging.logThreads,  # type: ignore[attr-defined]
             logging.logMultiprocessing)
    factory = logging.getLogRecordFactory()
    try:
        yield
    finally:
        logging.setLogRecordFactory(factory)
        root.handlers[:], root.level = saved[0], saved[1]
        logging._srcfile, logging.logThreads, logging.logMultiprocessing = saved[2:]  # type: ignore[attr-defined]


def test_configure_writes_ids_and_skips_lookups_no_line_shows(restored: None) -> None:
    stream = io.StringIO()
    logs.configure("info", stream=stream)
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    logging.getLogger().addHandler(Keep())
    s, q = SESSION_ID.set("S9-1"), QUEUE_ID.set("QID1")
    try:
        logging.getLogger("gateway.test").info("hello %s", "there")
    finally:
        SESSION_ID.reset(s)
        QUEUE_ID.reset(q)
    line = stream.getvalue()
    assert line.endswith(" INFO gateway.test session=S9-1 queue=QID1 hello there\n")
    assert f" gateway[{seen[0].process}] " in line
    # No caller (file, line, function), thread or process name was looked up.
    assert (seen[0].lineno, seen[0].threadName, seen[0].processName) == (0, None, None)


def test_configured_records_carry_what_the_standard_record_does(restored: None) -> None:
    logs.configure("info", stream=io.StringIO())
    args = ("gateway.smtp.handler", logging.INFO, "(unknown file)", 0, "rcpt to=<%s> accepted by=%s",
            ("a@b", "rcpt_relay"), None)
    s, q = SESSION_ID.set("S1-1"), QUEUE_ID.set("Q1")
    try:
        ours = logging.getLogRecordFactory()(*args)
    finally:
        SESSION_ID.reset(s)
        QUEUE_ID.reset(q)
    theirs = logging.LogRecord(*args)
    skip = {"created", "msecs", "relativeCreated"}
    assert {k: v for k, v in vars(ours).items() if k not in skip | {"session", "queue", "taskName"}} == {
        k: v for k, v in vars(theirs).items() if k not in skip | {"taskName"}}
    assert (ours.session, ours.queue, ours.getMessage()) == ("S1-1", "Q1", "rcpt to=<a@b> accepted by=rcpt_relay")
    assert abs(ours.created - theirs.created) < 1 and 0 <= ours.msecs < 1000
    # A mapping as the only argument, as LogRecord takes it; a real path's names.
    record = logging.getLogRecordFactory()("x", logging.WARNING, "/a/b/mod.py", 3, "%(k)s", ({"k": 1},), None)
    assert (record.getMessage(), record.filename, record.module, record.levelname) == ("1", "mod.py", "mod", "WARNING")


def test_a_forked_child_logs_its_own_process_id(restored: None) -> None:
    logs.configure("info", stream=io.StringIO())
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if its records carry its own id
        record = logging.getLogRecordFactory()("x", logging.INFO, "(unknown file)", 0, "m", (), None)
        os._exit(0 if record.process == os.getpid() else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _short_as_before(text: object, limit: int = 120) -> str:
    s = str(text)
    s = s.encode("ascii", "backslashreplace").decode("ascii")
    s = "".join(c if 32 <= ord(c) < 127 else "?" for c in s)
    return s if len(s) <= limit else s[: limit - 3] + "..."


@given(st.one_of(st.text(), st.text(alphabet=st.characters(max_codepoint=0x7F)), st.integers()),
       st.integers(min_value=3, max_value=200))
def test_short_makes_what_it_always_made(text: object, limit: int) -> None:
    # Printable ASCII takes a short cut; everything else the whole way.
    assert logs.short(text, limit) == _short_as_before(text, limit)


class _Writes(io.StringIO):
    """A stream that keeps each write apart."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def test_the_loops_lines_go_out_in_one_write_at_the_end_of_its_turn(restored: None) -> None:
    stream = _Writes()
    logs.configure("info", stream=stream)
    log = logging.getLogger("gateway.test")
    seen_during_turn: list[str] = []

    async def turn() -> None:
        logs.write_from_loop(asyncio.get_running_loop())
        try:
            for n in range(5):
                log.info("line %d", n)
            seen_during_turn.append(stream.getvalue())
            await asyncio.sleep(0)  # the turn ends: the callback writes them
            await asyncio.sleep(0)
            assert stream.getvalue().count("\n") == 5
            log.info("after")
        finally:
            logs.write_from_loop(None)  # writes what is pending

    asyncio.run(turn())
    assert seen_during_turn == [""]
    assert len(stream.writes) == 2  # five lines in one write, then the last one
    assert [line.rsplit(" ", 1)[-1] for line in stream.getvalue().splitlines()] == [
        "0", "1", "2", "3", "4", "after",
    ]


def test_a_thread_line_follows_what_the_loop_has_pending_and_goes_out_at_once(restored: None) -> None:
    stream = _Writes()
    logs.configure("info", stream=stream)
    log = logging.getLogger("gateway.test")

    async def main() -> None:
        logs.write_from_loop(asyncio.get_running_loop())
        try:
            log.info("from the loop")
            thread = threading.Thread(target=log.info, args=("from a thread",))
            thread.start()
            thread.join()  # within the loop's turn: its line is still pending
            # The thread wrote at once (the loop has not finished its turn), the loop's
            # pending line first.
            assert [line.rsplit(" ", 3)[-3:] for line in stream.getvalue().splitlines()] == [
                ["from", "the", "loop"], ["from", "a", "thread"],
            ]
        finally:
            logs.write_from_loop(None)

    asyncio.run(main())


def test_flush_writes_the_pending_lines_when_the_loop_never_gets_to_them(restored: None) -> None:
    stream = io.StringIO()
    logs.configure("info", stream=stream)
    loop = asyncio.new_event_loop()
    try:
        async def log_and_stop() -> None:
            logs.write_from_loop(asyncio.get_running_loop())
            logging.getLogger("gateway.test").warning("last words")
            loop.stop()  # as a process ending: the turn's callback never runs

        loop.create_task(log_and_stop())
        loop.run_forever()
        assert stream.getvalue() == ""
        logs.flush()  # what gateway run does before os._exit
        assert stream.getvalue().endswith(" WARNING gateway.test session=- queue=- last words\n")
    finally:
        logs.write_from_loop(None)
        loop.close()
