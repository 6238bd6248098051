"""Log set-up and the ids that let one message's story be followed end to end.

Every record carries ``session=`` and ``queue=`` taken from context variables, set by
the SMTP session task and the delivery tasks, so a plain ``grep QUEUEID`` shows the
message's whole life.

A message costs a dozen lines at ``info``, so the running gateway formats them with
:class:`LineFormatter` (the same line as ``logging.Formatter(FORMAT)``, without its
per-record ``strftime`` and format-string parsing) and asks the logging module for no
caller, thread or process-name lookups, which no line shows. Its records are
:class:`_Record`: the standard record's attributes, with the process id read once per
process, file and module names once per source path and the ids set as it is made (no
handler filter).
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextvars
import logging
import os
import sys
import threading
import time
from typing import Any

__all__ = [
    "FORMAT", "LineFormatter", "LoopStreamHandler", "QUEUE_ID", "SESSION_ID", "configure", "flush",
    "write_from_loop", "short",
]

SESSION_ID: contextvars.ContextVar[str] = contextvars.ContextVar("session_id", default="-")
QUEUE_ID: contextvars.ContextVar[str] = contextvars.ContextVar("queue_id", default="-")

FORMAT = "%(asctime)s gateway[%(process)d] %(levelname)s %(name)s session=%(session)s queue=%(queue)s %(message)s"


_pid = os.getpid()


def _note_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_note_pid)

# pathname -> (filename, module), as LogRecord derives them; "(unknown file)" when, as
# configured, no caller is looked up. Bounded by the source files that log.
_NAMES: dict[str, tuple[str, str]] = {}


class _Record(logging.LogRecord):
    """A :class:`logging.LogRecord` with the same attributes, made in a third of the time.

    The standard record splits its source path and asks the kernel for the process id
    for every line, and leaves the ids to a handler filter; a dozen lines a message made
    that a tenth of the event loop's time. Used only while thread and process-name
    lookups are off (:func:`configure`); otherwise the standard record is made.
    """

    def __init__(  # noqa: PLR0913 - LogRecord's signature
        self, name: str, level: int, pathname: str, lineno: int, msg: object, args: Any,
        exc_info: Any, func: str | None = None, sinfo: str | None = None, **kwargs: Any,
    ) -> None:
        ct = time.time()
        self.name = name
        self.msg = msg
        if args and len(args) == 1 and isinstance(args[0], collections.abc.Mapping) and args[0]:
            args = args[0]
        self.args = args
        self.levelname = logging.getLevelName(level)
        self.levelno = level
        self.pathname = pathname
        names = _NAMES.get(pathname)
        if names is None:
            try:
                filename = os.path.basename(pathname)
                names = (filename, os.path.splitext(filename)[0])
            except (TypeError, ValueError, AttributeError):
                names = (pathname, "Unknown module")
            if len(_NAMES) < 1000:
                _NAMES[pathname] = names
        self.filename, self.module = names
        self.exc_info = exc_info
        self.exc_text = None
        self.stack_info = sinfo
        self.lineno = lineno
        self.funcName = func  # type: ignore[assignment]  # None, as LogRecord has it
        self.created = ct
        self.msecs = int((ct - int(ct)) * 1000) + 0.0  # as LogRecord (gh-89047)
        self.relativeCreated = (ct - logging._startTime) * 1000  # type: ignore[attr-defined]
        self.thread = None
        self.threadName = None
        self.processName = None
        self.taskName = None
        self.process = _pid if logging.logProcesses else None
        self.session = SESSION_ID.get()
        self.queue = QUEUE_ID.get()


def _make_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
    if logging.logThreads or logging.logMultiprocessing:  # someone wants them after all
        record = logging.LogRecord(*args, **kwargs)
        record.session = SESSION_ID.get()
        record.queue = QUEUE_ID.get()
        return record
    return _Record(*args, **kwargs)


class LineFormatter(logging.Formatter):
    """Formats :data:`FORMAT` lines, the local time's text made once per second.

    ``logging.Formatter`` calls ``time.strftime`` and re-reads its format string for
    every record; here they cost a dictionary-free ``%`` of one fixed template.
    """

    def __init__(self) -> None:
        super().__init__(FORMAT)
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:  # a race between threads only makes it twice
            self._stamp = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = second
        return "%s,%03d" % (self._stamp, record.msecs)

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        record.asctime = self.formatTime(record)
        line = "%s gateway[%s] %s %s session=%s queue=%s %s" % (
            record.asctime, record.process, record.levelname, record.name,
            getattr(record, "session", "-"), getattr(record, "queue", "-"), record.message,
        )
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:  # as logging.Formatter.format appends them
            line = line + ("" if line[-1:] == "\n" else "\n") + record.exc_text
        if record.stack_info:
            line = line + ("" if line[-1:] == "\n" else "\n") + self.formatStack(record.stack_info)
        return line


class LoopStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A :class:`logging.StreamHandler` that writes the event loop's lines once per turn.

    A message costs a dozen lines, most of them from the event loop; written one by one,
    each is a system call that also hands the interpreter lock to a waiting thread. Once
    :meth:`use_loop` names a loop, the lines its thread logs are kept in order and
    written together by a callback at the end of the loop's current turn (before it
    waits for I/O again): one write for every line of that turn. Lines from other
    threads go out at once, after what the loop has pending, so the order holds.
    :meth:`flush` (``logging.shutdown``, :func:`flush`) writes what is pending.
    """

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = -1
        self._pending: list[str] = []

    def use_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Buffer the lines logged in ``loop``'s thread (``None``: write at once again)."""
        self.flush()
        self._loop = loop
        self._thread = threading.get_ident() if loop is not None else -1

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
            if threading.get_ident() == self._thread and self._loop is not None and not self._loop.is_closed():
                pending = self._pending
                pending.append(line)
                if len(pending) == 1:
                    self._loop.call_soon(self.flush)
                return
            with self.lock:  # type: ignore[union-attr]
                self._write_pending()
                self.stream.write(line)
                self.stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def _write_pending(self) -> None:
        if self._pending:
            text = "".join(self._pending)
            self._pending.clear()
            self.stream.write(text)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            try:
                self._write_pending()
                if self.stream and hasattr(self.stream, "flush"):
                    self.stream.flush()
            except (OSError, ValueError):  # a closed or full stream: the lines are lost, not the process
                self._pending.clear()


def _loop_handlers() -> list[LoopStreamHandler]:
    return [h for h in logging.getLogger().handlers if isinstance(h, LoopStreamHandler)]


def write_from_loop(loop: asyncio.AbstractEventLoop | None) -> None:
    """Have the log stream (:func:`configure`) gather ``loop``'s lines by turn; ``None``
    writes each line at once again. Call it from the loop's own thread."""
    for handler in _loop_handlers():
        handler.use_loop(loop)


def flush() -> None:
    """Write the lines the log stream still holds (before ``os._exit``, say)."""
    for handler in _loop_handlers():
        handler.flush()


def configure(level: str = "info", stream: object = None) -> None:
    """Send log lines with ids to ``stream`` (standard error by default)."""
    handler = LoopStreamHandler(stream or sys.stderr)
    handler.setFormatter(LineFormatter())
    # The threshold holds at the handler too: the tracking index raises the loggers whose
    # lines it needs to INFO (gateway/tracking), and those lines are not for this stream.
    handler.setLevel(level.upper())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # No line shows the caller's file and line, the thread or the process name: the
    # logging module's documented switches spare each record looking them up.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.setLogRecordFactory(_make_record)
    # aiosmtpd logs every command line at INFO; our own lines tell the story.
    logging.getLogger("mail.log").setLevel(logging.WARNING)


def short(text: object, limit: int = 120) -> str:
    """Client-supplied text made safe and short for a log line."""
    s = text if type(text) is str else str(text)
    # Printable ASCII (nearly every address and name) is already what the rest makes of it.
    if not (s.isascii() and s.isprintable()):
        s = s.encode("ascii", "backslashreplace").decode("ascii")
        s = "".join(c if 32 <= ord(c) < 127 else "?" for c in s)
    return s if len(s) <= limit else s[: limit - 3] + "..."
