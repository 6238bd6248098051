"""Log set-up and the ids that let one message's story be followed end to end.

Every record carries ``session=`` and ``queue=`` taken from context variables, set by
the SMTP session task and the delivery tasks, so a plain ``grep QUEUEID`` shows the
message's whole life.

A message costs a dozen lines at ``info``, so the running gateway formats them with
:class:`LineFormatter` (the same line as ``logging.Formatter(FORMAT)``, without its
per-record ``strftime`` and format-string parsing) and asks the logging module for no
caller, thread or process-name lookups, which no line shows.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time

__all__ = ["FORMAT", "LineFormatter", "QUEUE_ID", "SESSION_ID", "configure", "short"]

SESSION_ID: contextvars.ContextVar[str] = contextvars.ContextVar("session_id", default="-")
QUEUE_ID: contextvars.ContextVar[str] = contextvars.ContextVar("queue_id", default="-")

FORMAT = "%(asctime)s gateway[%(process)d] %(levelname)s %(name)s session=%(session)s queue=%(queue)s %(message)s"


class _IdsFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.session = SESSION_ID.get()
        record.queue = QUEUE_ID.get()
        return True


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
        line = "%s gateway[%d] %s %s session=%s queue=%s %s" % (
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


def configure(level: str = "info", stream: object = None) -> None:
    """Send log lines with ids to ``stream`` (standard error by default)."""
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.setFormatter(LineFormatter())
    handler.addFilter(_IdsFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # No line shows the caller's file and line, the thread or the process name: the
    # logging module's documented switches spare each record looking them up.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logMultiprocessing = False
    # aiosmtpd logs every command line at INFO; our own lines tell the story.
    logging.getLogger("mail.log").setLevel(logging.WARNING)


def short(text: object, limit: int = 120) -> str:
    """Client-supplied text made safe and short for a log line."""
    s = str(text)
    s = s.encode("ascii", "backslashreplace").decode("ascii")
    s = "".join(c if 32 <= ord(c) < 127 else "?" for c in s)
    return s if len(s) <= limit else s[: limit - 3] + "..."
