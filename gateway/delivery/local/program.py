"""Program delivery: run ``/bin/sh -c command`` with the message on standard input.

The program runs without blocking the event loop (asyncio subprocess), with a clean
environment, in its own session and process group (so a time-out kills everything it
started), and, when the gateway is root and a uid is given, as that uid/gid with no
other groups. Its exit code decides the outcome as in qmail-local:

========================  ===========================================
0                         delivered
99                        delivered, and ignore further .qmail lines
100, 64, 65, 70, 76, 77,  permanent failure (bounce)
78, 112
111 and anything else     temporary failure (retry)
========================  ===========================================

The first line of what the program printed (stdout and stderr, at most 4 KiB kept)
becomes the reply text, so a program can explain a refusal.

The message is fed to the program's standard input a chunk at a time, read from disk
when it is there, each chunk written once the pipe has taken the last (flow control),
so a large message never sits whole in memory; a program that stops reading (exits, or
closes its input) simply gets no more.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

from gateway.content import CHUNK, Content
from gateway.delivery.types import Outcome
from gateway.verdicts import Reply

__all__ = ["OUTPUT_LIMIT", "PATH", "ProgramResult", "classify_exit", "run_program"]

PATH = "/usr/local/bin:/usr/bin:/bin"
OUTPUT_LIMIT = 4096
# sysexits.h codes that mean "will never work" (qmail-local treats them as permanent):
# EX_USAGE, EX_DATAERR, EX_SOFTWARE, EX_PROTOCOL, EX_NOPERM, EX_CONFIG, and 100/112.
_PERMANENT_CODES = frozenset({100, 64, 65, 70, 76, 77, 78, 112})
_STOP_CODE = 99
# After the shell exits, how long to wait for its output pipe to close before killing
# what is left of its process group (a background child may hold the pipe forever).
_EOF_GRACE = 1.0
# After SIGKILL the exit is reported at once; this only bounds a stuck kernel.
_REAP_WAIT = 5.0
_MAX_TEXT = 200
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


@dataclass(frozen=True, slots=True)
class ProgramResult:
    """What one program delivery did.

    :ivar status: ``delivered``, ``deferred`` (retry) or ``failed`` (bounce)
    :ivar reply: the reply, its text from the program's first output line when it printed one
    :ivar stop: exit 99: delivered, and the remaining ``.qmail`` lines are skipped
    :ivar exit_code: the exit status, or ``None`` when killed (time-out, signal) or not started
    """

    status: Literal["delivered", "deferred", "failed"]
    reply: Reply
    stop: bool = False
    exit_code: int | None = None

    def outcome(self) -> Outcome:
        """This result as a delivery :class:`~gateway.delivery.types.Outcome`."""
        return Outcome(self.status, self.reply)


def _first_line(output: bytes) -> str:
    """The first non-empty output line, printable ASCII only, bounded."""
    for raw in output.splitlines():
        text = _UNPRINTABLE.sub("?", raw.decode("utf-8", "replace")).strip()
        if text:
            return text[:_MAX_TEXT]
    return ""


def classify_exit(code: int, output: bytes = b"") -> ProgramResult:
    """Map an exit status to a result, qmail-local style.

    :param code: the exit status (negative: killed by that signal, as asyncio reports it)
    :param output: what the program printed; its first line is the reply text
    """
    text = _first_line(output)
    if code == 0 or code == _STOP_CODE:
        reply = Reply(250, "2.0.0", text or "delivered to program")
        return ProgramResult("delivered", reply, code == _STOP_CODE, code)
    if code in _PERMANENT_CODES:
        return ProgramResult(
            "failed", Reply(554, "5.3.0", text or f"program failed permanently (exit {code})"),
            exit_code=code,
        )
    if code < 0:
        name = _signal_name(-code)
        return ProgramResult("deferred", Reply(451, "4.3.0", text or f"program killed by {name}"))
    return ProgramResult(
        "deferred", Reply(451, "4.3.0", text or f"program failed temporarily (exit {code})"),
        exit_code=code,
    )


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class _ProgramProtocol(asyncio.SubprocessProtocol):
    """Collects bounded output and signals exit and end of output separately.

    ``Process.wait()`` would also wait for the output pipe to close, which a background
    child may hold open for ever; here the exit alone is enough.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.output = bytearray()
        self.exited: asyncio.Future[None] = loop.create_future()
        self.output_closed: asyncio.Future[None] = loop.create_future()
        #: set while the input pipe takes more (cleared while its buffer is full)
        self.writable = asyncio.Event()
        self.writable.set()
        self.input_closed = False

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        room = OUTPUT_LIMIT - len(self.output)
        if room > 0:
            self.output.extend(data[:room])
        # Past the limit the data is dropped but still read, so the program never
        # blocks on a full pipe.

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        # fd 0 closing early (the program did not read all its input) is no error of
        # ours: the exit code decides.
        if fd == 0:
            self.input_closed = True
            self.writable.set()  # a feeder waiting for room stops waiting
        if fd == 1 and not self.output_closed.done():
            self.output_closed.set_result(None)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)
        self.writable.set()  # nobody will read more


async def _feed(stdin: asyncio.WriteTransport, protocol: _ProgramProtocol, message: Content) -> None:
    """Write ``message`` to the program's input a chunk at a time, each once the pipe
    has room, until it is all written or the program stops taking it; then close."""
    try:
        if message.is_in_memory:  # bounded already: one write, as it always was
            stdin.write(message.read())
            return
        async for chunk in message.stream(CHUNK):
            await protocol.writable.wait()
            if protocol.input_closed or protocol.exited.done() or stdin.is_closing():
                return
            stdin.write(chunk)
    finally:
        stdin.close()  # flushes what is buffered, then closes: the program sees EOF


async def run_program(
    command: str,
    message: bytes | Content,
    *,
    env: Mapping[str, str],
    cwd: Path,
    uid: int | None,
    gid: int | None,
    timeout: float,
) -> ProgramResult:
    """Run ``command`` through ``/bin/sh -c`` with ``message`` on standard input.

    :param command: the shell command (a ``.qmail`` ``|`` line without the bar)
    :param message: what the program reads on standard input (a message on disk is
        read and fed in chunks)
    :param env: variables added to the clean environment (only ``PATH`` is preset)
    :param cwd: the working directory (the user's home)
    :param uid: run as this uid when the gateway is root (ignored otherwise); callers
        decide who that is, and never pass ``None`` or 0 when root unless they mean it
    :param gid: and this gid, as the only group (defaults to ``uid``'s number)
    :param timeout: seconds before the whole process group is killed (temporary failure)
    :returns: the classified result; never raises for the program's own failures
    """
    environment = {"PATH": PATH}
    environment.update({k: v.replace("\0", "") for k, v in env.items() if "\0" not in k})
    drop: dict[str, Any] = {}
    if uid is not None and os.geteuid() == 0:
        group = uid if gid is None else gid
        # extra_groups=[group]: without it the child keeps root's supplementary groups.
        drop = {"user": uid, "group": group, "extra_groups": [group]}
    loop = asyncio.get_running_loop()
    try:
        transport, protocol = await loop.subprocess_exec(
            lambda: _ProgramProtocol(loop),
            "/bin/sh", "-c", command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=environment,
            start_new_session=True,  # own session and process group: killpg reaches all
            close_fds=True,
            **drop,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        # Cannot chdir, cannot exec /bin/sh, cannot switch user: try again later.
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return ProgramResult("deferred", Reply(451, "4.3.0", f"cannot run program: {reason}"))
    pid = transport.get_pid()
    try:
        stdin = transport.get_pipe_transport(0)
        assert isinstance(stdin, asyncio.WriteTransport)
        content = message if isinstance(message, Content) else Content.of_bytes(message)
        async with asyncio.timeout(timeout):
            # A program that neither reads nor exits is bounded by the same time-out.
            await _feed(stdin, protocol, content)
            # shield: a time-out must cancel our wait, not the future itself.
            await asyncio.shield(protocol.exited)
            try:
                # Normally the output closes with the exit. A background child may keep
                # it open: wait a little, then end what is left of the process group.
                await asyncio.wait_for(asyncio.shield(protocol.output_closed), _EOF_GRACE)
            except TimeoutError:
                _kill_group(pid)
    except TimeoutError:
        return ProgramResult(
            "deferred", Reply(451, "4.3.0", f"program timed out after {timeout:g}s")
        )
    finally:
        if not protocol.exited.done():
            # Timed out or cancelled (shutdown): leave nothing running behind us, and
            # reap the shell so no zombie or late exit report outlives this call.
            _kill_group(pid)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(protocol.exited), _REAP_WAIT)
        transport.close()
    code = transport.get_returncode()
    assert code is not None
    return classify_exit(code, bytes(protocol.output))


def _kill_group(pid: int) -> None:
    """SIGKILL the program's process group (its pid, thanks to the new session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
