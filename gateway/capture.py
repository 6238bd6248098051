"""Capture: a bounded, rotating record of SMTP sessions, for ``gateway replay``.

With ``[capture] enabled = true`` each session is recorded as it runs and written as one
JSON line when it ends (format: docs/replay.md): the client's address, the listener,
HELO, TLS and AUTH facts (the mechanism and login, never the credentials: an ``AUTH``
command keeps only its mechanism), every command with its replies, the DNS answers the
plugins saw (through :data:`gateway.dns.DNS_TAP`), the verdicts (from the handler's
decision points) and each message that reached the end of DATA, accepted or refused
(its header section only with ``headers_only``).

The taps are called from the SMTP front end (:class:`SessionTap`, started by
:func:`start` in the session's task) and from the handler (:func:`note_verdict`,
:func:`note_data`). They only append to in-memory lists; encoding and writing happen
in one thread per capture directory (:class:`CaptureWriter`), in batches. Capture is
best effort: when the disk is full or the writer falls behind, records are dropped and
the log says so once, never the session.

Files: ``var_dir/capture/capture-<UTC time>-<pid>-<n>.jsonl``, mode 0600 in a 0700
directory; a new file past ``file_size`` or an hour, the oldest removed past
``max_size`` in total or ``max_age``.
"""

from __future__ import annotations

import atexit
import base64
import contextvars
import json
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

from gateway.dns import DNS_TAP
from gateway.model import Message, Session, Transaction
from gateway.verdicts import Reply, Verdict

__all__ = ["CAPTURE_VERSION", "CaptureWriter", "SessionTap", "flush", "note_data", "note_verdict", "start"]

log = logging.getLogger(__name__)

CAPTURE_VERSION = 1
# A file is closed after this long even when small, so max_age can remove old traffic.
_FILE_SECONDS = 3600.0
# Records waiting for the writer thread; past this the new ones are dropped.
_MAX_PENDING_BYTES = 64 * 1024 * 1024
_BATCH = 256
# Commands kept per session (the last entry is replaced past it).
_MAX_LOG = 2000
# Client-supplied text kept per command.
_MAX_ARG = 1024

_CURRENT: contextvars.ContextVar[SessionTap | None] = contextvars.ContextVar("gateway_capture", default=None)


def _reply_text(reply: Reply) -> str:
    return " ".join(reply.lines())


def _verdict(stage: str, verdict: Verdict) -> dict[str, Any]:
    return {
        "stage": stage, "action": verdict.action.value, "plugin": verdict.plugin,
        "reason": verdict.reason[:_MAX_ARG], "reply": _reply_text(verdict.reply),
    }


def header_section(raw: bytes) -> bytes:
    """The header section of ``raw`` with the blank line that ends it (all of it if none)."""
    end = raw.find(b"\r\n\r\n")
    return raw if end < 0 else raw[: end + 4]


class _NoTap:
    """What the front end holds when nothing is captured: every call does nothing."""

    def command(self, verb: str, arg: str) -> None:
        pass

    def reply(self, reply: Reply) -> None:
        pass

    def finish(self, session: Session) -> None:
        pass


NO_TAP = _NoTap()


class SessionTap:
    """Collects one session's record; :meth:`finish` hands it to the writer.

    Also used by ``gateway replay`` (with ``writer=None``) to collect what a new policy
    does with a recorded session, so both sides are described alike.
    """

    def __init__(self, session: Session, writer: CaptureWriter | None, *, headers_only: bool = False) -> None:
        self.writer = writer
        self.headers_only = headers_only
        self.log: list[list[Any]] = []
        self.dns: list[list[Any]] = []
        self.verdicts: list[dict[str, Any]] = []
        self.txns: list[dict[str, Any]] = []
        self.record: dict[str, Any] = {
            "v": CAPTURE_VERSION, "session": session.id, "start": round(session.started, 3),
            "listener": session.listener, "client": session.peer_ip, "port": session.peer_port,
            "local": [session.local_ip, session.local_port],
        }

    # -- front end -----------------------------------------------------------

    def command(self, verb: str, arg: str) -> None:
        """One command line, parsed into verb and argument; AUTH keeps its mechanism only."""
        if verb == "AUTH":
            arg = arg.partition(" ")[0]
        line = f"{verb} {arg[:_MAX_ARG]}" if arg else verb
        if len(self.log) >= _MAX_LOG:  # a client looping on NOOP: keep the start and count
            self.record["log_dropped"] = self.record.get("log_dropped", 0) + 1
            self.log[-1] = [line, []]
        else:
            self.log.append([line, []])
        if verb == "MAIL":
            self.txns.append({"mail": arg[:_MAX_ARG], "mail_reply": "", "reply": "", "rcpts": [], "verdicts": [], "data": None})
        elif verb == "RCPT" and self.txns:
            self.txns[-1]["rcpts"].append({"rcpt": arg[:_MAX_ARG], "reply": "", "verdicts": []})

    def reply(self, reply: Reply) -> None:
        """A reply sent to the client; it belongs to the last command."""
        text = _reply_text(reply)
        if not self.log:
            self.log.append(["", []])  # the greeting, or a refusal before it
        line, replies = self.log[-1]
        replies.append(text)
        verb = line.partition(" ")[0]
        if self.txns and verb == "MAIL":
            self.txns[-1]["mail_reply"] = text
        elif self.txns and verb == "DATA":
            self.txns[-1]["reply"] = text  # the 354, then the final reply
        elif self.txns and verb == "RCPT" and self.txns[-1]["rcpts"]:
            self.txns[-1]["rcpts"][-1]["reply"] = text

    def finish(self, session: Session) -> None:
        """The session ended: complete the record and queue it for writing."""
        _CURRENT.set(None)
        DNS_TAP.set(None)
        if self.writer is None:
            return
        self.writer.submit(self.result(session))

    def result(self, session: Session) -> dict[str, Any]:
        """The record as it stands, with the session's final facts."""
        record = self.record
        record.update(
            end=round(time.time(), 3), helo=session.helo, esmtp=session.is_esmtp,
            relay_client=session.is_relay_client,
            tls={"version": session.tls_version, "cipher": session.tls_cipher} if session.has_tls else None,
            auth={"login": session.auth_login} if session.auth_login else None,
            log=self.log, dns=self.dns, verdicts=self.verdicts, txns=self.txns,
        )
        return record

    # -- handler and resolver ------------------------------------------------

    def verdict(self, stage: str, verdict: Verdict) -> None:
        entry = _verdict(stage, verdict)
        if stage in ("connect", "helo") or not self.txns:
            self.verdicts.append(entry)
        elif stage == "rcpt" and self.txns[-1]["rcpts"]:
            self.txns[-1]["rcpts"][-1]["verdicts"].append(entry)
        else:
            self.txns[-1]["verdicts"].append(entry)

    def data(self, session: Session, txn: Transaction, message: Message) -> None:
        if not self.txns:
            return
        # A spooled message is read back whole only when whole messages are kept.
        raw = message.head if self.headers_only else message.raw
        results = [
            {"plugin": r.plugin, "score": r.score, "reason": r.reason[:_MAX_ARG]}
            for holder in (session.results, txn.results) for r in holder
        ]
        self.txns[-1]["data"] = {
            "size": message.size, "headers_only": self.headers_only,
            "message": header_section(raw) if self.headers_only else raw,
            "score": txn.results.total + session.results.total, "results": results,
            "queue_id": txn.queue_id,
        }

    def dns_answer(self, name: str, kind: str, outcome: str, wire: bytes | None) -> None:
        if len(self.dns) < 1000:  # a session's lookups are bounded; a hostile one's too
            self.dns.append([name, kind, outcome, wire])


def start(handler: Any, session: Session) -> SessionTap | _NoTap:
    """Begin capturing ``session`` if the policy says so (called in the session's task)."""
    settings = handler.policy.capture
    if not settings.enabled:
        return NO_TAP
    tap = SessionTap(session, writer_for(Path(handler.policy.server.var_dir) / "capture", settings),
                     headers_only=settings.headers_only)
    begin(tap)
    return tap


def begin(tap: SessionTap) -> None:
    """Make ``tap`` the current task's capture, DNS answers included."""
    _CURRENT.set(tap)
    DNS_TAP.set(tap.dns_answer)


def note_verdict(stage: str, verdict: Verdict) -> None:
    """A decision the handler logged: a refusal at ``stage``, or a quarantine."""
    tap = _CURRENT.get()
    if tap is not None:
        tap.verdict(stage, verdict)


def note_data(session: Session, txn: Transaction, message: Message) -> None:
    """The message of the current transaction and its score, after the chain ran."""
    tap = _CURRENT.get()
    if tap is not None:
        tap.data(session, txn, message)


def _encode(value: Any) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    raise TypeError(f"cannot encode {type(value).__name__}")


class CaptureWriter:
    """Writes records of one capture directory from its own thread, in batches."""

    def __init__(self, directory: Path, settings: Any) -> None:
        self.directory = directory
        self.settings = settings
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._pending = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._fd: int | None = None
        self._path: Path | None = None
        self._opened = 0.0
        self._written = 0
        self._files = 0
        self._is_failing = False
        self.dropped = 0

    def submit(self, record: dict[str, Any]) -> None:
        """Queue ``record`` for writing (never blocks); dropped when too much waits."""
        size = 4096 + sum(len((t.get("data") or {}).get("message") or b"") for t in record.get("txns", ()))
        with self._lock:
            if self._pending + size > _MAX_PENDING_BYTES:
                self._drop("the writer is behind")
                return
            self._pending += size
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="gateway-capture", daemon=True)
                self._thread.start()
        self._queue.put((record, size))

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything submitted so far is written (or dropped)."""
        if self._thread is None:
            return True
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def _drop(self, why: str) -> None:
        self.dropped += 1
        if not self._is_failing:
            self._is_failing = True
            log.warning("capture is best effort: %s; session records are dropped until it recovers", why)

    def _run(self) -> None:
        while True:
            items = [self._queue.get()]
            while len(items) < _BATCH:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            lines, events, size = [], [], 0
            for item in items:
                if isinstance(item, threading.Event):
                    events.append(item)
                    continue
                record, cost = item
                size += cost
                try:
                    lines.append(json.dumps(record, default=_encode, separators=(",", ":")).encode() + b"\n")
                except (TypeError, ValueError) as exc:  # a bug: say so, keep the others
                    log.error("capture: a record could not be encoded: %s", exc)
            if lines:
                self._write(b"".join(lines), len(lines))
            with self._lock:
                self._pending -= size
            for event in events:
                event.set()

    def _write(self, data: bytes, count: int) -> None:
        try:
            fd = self._file()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            self._written += len(data)
        except OSError as exc:
            self.dropped += count
            self._close()  # a line may be cut short: the next record starts a new file
            self._drop(f"writing to {self.directory} failed ({exc.strerror or exc})")
            return
        if self._is_failing:
            self._is_failing = False
            log.warning("capture: writing to %s works again (%d records dropped)", self.directory, self.dropped)

    def _file(self) -> int:
        now = time.time()
        limit = int(self.settings.file_size)
        if self._fd is not None and (self._written >= limit or now - self._opened >= _FILE_SECONDS):
            self._close()
        if self._fd is None:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._expire(now)
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
            self._files += 1
            path = self.directory / f"capture-{stamp}-{os.getpid()}-{self._files:06d}.jsonl"
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            os.fchmod(self._fd, 0o600)
            self._path, self._opened, self._written = path, now, os.fstat(self._fd).st_size
        return self._fd

    def _close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def _expire(self, now: float) -> None:
        """Remove capture files past ``max_age``, then the oldest past ``max_size``."""
        files = []
        for path in self.directory.glob("capture-*.jsonl"):
            try:
                st = path.stat()
            except OSError:
                continue
            files.append((st.st_mtime, st.st_size, path))
        files.sort()
        total = sum(size for _, size, _ in files)
        for mtime, size, path in files:
            if now - mtime < float(self.settings.max_age) and total <= int(self.settings.max_size):
                break
            try:
                path.unlink()
                total -= size
                log.info("capture: removed %s", path.name)
            except OSError as exc:
                log.warning("capture: could not remove %s: %s", path, exc)


_writers: dict[Path, CaptureWriter] = {}
_writers_lock = threading.Lock()


def writer_for(directory: Path, settings: Any) -> CaptureWriter:
    """The writer of ``directory``, shared by all sessions and policy generations."""
    writer = _writers.get(directory)
    if writer is None:
        with _writers_lock:
            writer = _writers.setdefault(directory, CaptureWriter(directory, settings))
    writer.settings = settings  # a reload may change the limits
    return writer


def flush(timeout: float = 5.0) -> bool:
    """Write out every record submitted so far (at exit, and for tests)."""
    return all(writer.flush(timeout) for writer in list(_writers.values()))


atexit.register(flush)
