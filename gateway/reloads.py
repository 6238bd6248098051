"""Which policy each gateway process runs, so that ``gateway reload`` can tell.

A reload is a SIGHUP to the first process (the master), which passes it on to its
workers (gateway/workers.py); each process then loads the policy file on its own. The
answers meet in ``<var_dir>/reload/``:

- ``request``: the number of the last reload asked for. ``gateway reload`` raises it
  (under ``lock``, so two commands do not mix their answers) before it sends SIGHUP.
- ``<pid>.json``: one per process, rewritten at start and after every reload::

      {"pid": 4021, "role": "worker", "request": 7, "result": "loaded",
       "policy": "<sha256 of the policy file>", "error": "", "workers": []}

  ``request`` is the number the process read before it loaded the file, ``result`` is
  ``started``, ``loaded`` or ``refused`` (then ``error`` says why, with file, line and
  key), and the master's file lists its ``workers`` (those running now: it is rewritten
  when one dies and when its replacement starts).

The command waits until every process has answered its number (or a later one) and
reports per process; a process that does not answer in time is named as such.

Until a process's event loop takes SIGHUP over, :func:`hold_hangups` keeps one from
killing it (the default action) and remembers it for :func:`take_early_hangup`: the
master installs it before it forks, so a worker that is still starting when the master
passes a reload on takes it once it runs. A worker the master starts later to replace
one that died is a new program: it starts with SIGHUP blocked, installs this and only
then unblocks it. It runs the policy the master runs then (handed over, not read from
the file) and first reports the master's last outcome; if the master had a reload to do
when it started, the master passes it SIGHUP once that is done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import signal
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.policy import DEFAULT_POLICY_PATH, Policy, PolicyError, load_policy_text

__all__ = [
    "ProcessStatus", "clear", "digest", "directory", "forget", "hold_hangups", "next_request", "policy_from_data",
    "read_policy", "read_policy_data", "read_request", "read_status", "request_lock", "take_early_hangup",
    "write_status",
]

#: results a process reports
STARTED, LOADED, REFUSED = "started", "loaded", "refused"


def directory(var_dir: str | os.PathLike[str]) -> Path:
    """``<var_dir>/reload``."""
    return Path(var_dir) / "reload"


def read_policy(path: str | os.PathLike[str] | None, *, registry: Mapping[str, type]) -> tuple[Policy, str]:
    """Load a policy file as :func:`gateway.policy.load_policy` does, with the SHA-256 of
    the very bytes it validated (the digest each process reports).

    :raises PolicyError: the file cannot be read or is invalid
    """
    policy, data = read_policy_data(path, registry=registry)
    return policy, digest(data)


def read_policy_data(path: str | os.PathLike[str] | None, *, registry: Mapping[str, type]) -> tuple[Policy, bytes]:
    """As :func:`read_policy`, with the bytes themselves (the master hands them to a worker
    it starts later, so that the worker runs what the master runs).

    :raises PolicyError: the file cannot be read or is invalid
    """
    file = os.fspath(path) if path is not None else str(DEFAULT_POLICY_PATH)
    try:
        data = Path(file).read_bytes()
    except OSError as exc:
        raise PolicyError(file, None, "<file>", f"cannot read policy: {exc.strerror or exc}") from None
    return policy_from_data(data, path, registry=registry), data


def policy_from_data(data: bytes, path: str | os.PathLike[str] | None, *, registry: Mapping[str, type]) -> Policy:
    """The policy in ``data``, read from ``path`` (``None``: the embedded default).

    :raises PolicyError: not UTF-8, or invalid
    """
    file = os.fspath(path) if path is not None else str(DEFAULT_POLICY_PATH)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(file, None, "<file>", f"not UTF-8: {exc.reason}") from None
    policy = load_policy_text(text, source=file, registry=registry)
    if path is None:  # as load_policy names it
        policy = dataclasses.replace(policy, source="<embedded default>")
    return policy


def digest(data: bytes) -> str:
    """The SHA-256 of a policy file's bytes, as processes report it."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ProcessStatus:
    """What one process last reported (``<var_dir>/reload/<pid>.json``)."""

    pid: int
    role: str
    request: int
    result: str
    policy: str
    error: str = ""
    workers: tuple[int, ...] = ()


def write_status(var_dir: str | os.PathLike[str], status: ProcessStatus) -> None:
    """Publish ``status`` atomically (a temporary file renamed over the old one).

    :raises OSError: the directory cannot be written
    """
    folder = directory(var_dir)
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "pid": status.pid, "role": status.role, "request": status.request, "result": status.result,
        "policy": status.policy, "error": status.error, "workers": list(status.workers),
    }
    tmp = folder / f".{status.pid}.tmp"
    tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
    tmp.replace(folder / f"{status.pid}.json")


def read_status(var_dir: str | os.PathLike[str], pid: int) -> ProcessStatus | None:
    """What process ``pid`` last reported, or ``None`` (no file yet, or not readable)."""
    try:
        record: dict[str, Any] = json.loads((directory(var_dir) / f"{pid}.json").read_text(encoding="utf-8"))
        return ProcessStatus(
            pid=int(record["pid"]), role=str(record["role"]), request=int(record["request"]),
            result=str(record["result"]), policy=str(record["policy"]), error=str(record.get("error", "")),
            workers=tuple(int(p) for p in record.get("workers", ())),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def forget(var_dir: str | os.PathLike[str], pid: int) -> None:
    """Remove the status of ``pid`` (a process that stops cleanly)."""
    with contextlib.suppress(OSError):
        (directory(var_dir) / f"{pid}.json").unlink()


def clear(var_dir: str | os.PathLike[str]) -> None:
    """Remove every process's status (the first process, at start: earlier runs')."""
    try:
        names = os.listdir(directory(var_dir))
    except OSError:
        return
    for name in names:
        if name.endswith((".json", ".tmp")):
            with contextlib.suppress(OSError):
                (directory(var_dir) / name).unlink()


def read_request(var_dir: str | os.PathLike[str]) -> int:
    """The number of the last reload asked for (0 when none was)."""
    try:
        return int((directory(var_dir) / "request").read_text(encoding="ascii").strip() or 0)
    except (OSError, ValueError):
        return 0


def next_request(var_dir: str | os.PathLike[str]) -> int:
    """Raise the request number and return it; call it under :func:`request_lock`."""
    number = read_request(var_dir) + 1
    tmp = directory(var_dir) / ".request.tmp"
    tmp.write_text(f"{number}\n", encoding="ascii")
    tmp.replace(directory(var_dir) / "request")
    return number


@contextlib.contextmanager
def request_lock(var_dir: str | os.PathLike[str], timeout: float) -> Iterator[None]:
    """Hold ``<var_dir>/reload/lock`` (one ``gateway reload`` at a time).

    :raises TimeoutError: another reload held it for ``timeout`` seconds
    """
    folder = directory(var_dir)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another reload holds {folder / 'lock'}") from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


_early_hangups = [False]


def _remember_hangup(_signum: int, _frame: Any) -> None:
    _early_hangups[0] = True


def hold_hangups() -> None:
    """Remember a SIGHUP instead of dying of it, until the event loop handles them."""
    signal.signal(signal.SIGHUP, _remember_hangup)


def take_early_hangup() -> bool:
    """Whether a SIGHUP came while :func:`hold_hangups` held them (and forget it)."""
    came, _early_hangups[0] = _early_hangups[0], False
    return came
