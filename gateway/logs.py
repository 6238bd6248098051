"""Log set-up and the ids that let one message's story be followed end to end.

Every record carries ``session=`` and ``queue=`` taken from context variables, set by
the SMTP session task and the delivery tasks, so a plain ``grep QUEUEID`` shows the
message's whole life.
"""

from __future__ import annotations

import contextvars
import logging
import sys

__all__ = ["QUEUE_ID", "SESSION_ID", "configure", "short"]

SESSION_ID: contextvars.ContextVar[str] = contextvars.ContextVar("session_id", default="-")
QUEUE_ID: contextvars.ContextVar[str] = contextvars.ContextVar("queue_id", default="-")

FORMAT = "%(asctime)s gateway[%(process)d] %(levelname)s %(name)s session=%(session)s queue=%(queue)s %(message)s"


class _IdsFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.session = SESSION_ID.get()
        record.queue = QUEUE_ID.get()
        return True


def configure(level: str = "info", stream: object = None) -> None:
    """Send log lines with ids to ``stream`` (standard error by default)."""
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(_IdsFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiosmtpd logs every command line at INFO; our own lines tell the story.
    logging.getLogger("mail.log").setLevel(logging.WARNING)


def short(text: object, limit: int = 120) -> str:
    """Client-supplied text made safe and short for a log line."""
    s = str(text)
    s = s.encode("ascii", "backslashreplace").decode("ascii")
    s = "".join(c if 32 <= ord(c) < 127 else "?" for c in s)
    return s if len(s) <= limit else s[: limit - 3] + "..."
