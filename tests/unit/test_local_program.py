"""Unit tests for gateway.delivery.local.program: exit codes, time-out, environment,
standard input, output bounds, privilege drop."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from gateway.delivery.local.program import (
    OUTPUT_LIMIT,
    PATH,
    ProgramResult,
    classify_exit,
    run_program,
)
from tests.streaming import big_message, file_content, no_whole_reads

MESSAGE = b"Subject: hi\r\n\r\nbody\r\n"
NOBODY = 65534
REQUIRES_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch user")


def _run(
    command: str,
    cwd: Path,
    *,
    message: bytes = MESSAGE,
    env: dict[str, str] | None = None,
    uid: int | None = None,
    gid: int | None = None,
    timeout: float = 10.0,
) -> ProgramResult:
    return asyncio.run(
        run_program(command, message, env=env or {}, cwd=cwd, uid=uid, gid=gid, timeout=timeout)
    )


@pytest.mark.parametrize(
    ("code", "status", "stop", "reply_code"),
    [
        (0, "delivered", False, 250),
        (99, "delivered", True, 250),
        (100, "failed", False, 554),
        (64, "failed", False, 554),
        (65, "failed", False, 554),
        (70, "failed", False, 554),
        (76, "failed", False, 554),
        (77, "failed", False, 554),
        (78, "failed", False, 554),
        (112, "failed", False, 554),
        (111, "deferred", False, 451),
        (1, "deferred", False, 451),
        (75, "deferred", False, 451),
    ],
)
def test_exit_codes(tmp_path: Path, code: int, status: str, stop: bool, reply_code: int) -> None:
    result = _run(f"exit {code}", tmp_path)
    assert (result.status, result.stop, result.reply.code, result.exit_code) == (
        status, stop, reply_code, code,
    )
    assert result.outcome().status == status


def test_first_output_line_is_the_reply_text(tmp_path: Path) -> None:
    result = _run("echo; echo 'mailbox full\x1b[0m'; echo second >&2; exit 100", tmp_path)
    assert result.status == "failed"
    assert result.reply.text == "mailbox full?[0m"
    stderr = _run("echo 'from stderr' >&2; exit 111", tmp_path)
    assert stderr.reply.text == "from stderr"


def test_reply_text_without_output() -> None:
    assert "exit 111" in classify_exit(111).reply.text
    assert "SIGKILL" in classify_exit(-9).reply.text
    assert classify_exit(-9).status == "deferred"


def test_message_on_stdin(tmp_path: Path) -> None:
    result = _run(f"cat > {tmp_path}/got", tmp_path)
    assert result.status == "delivered"
    assert (tmp_path / "got").read_bytes() == MESSAGE


def test_program_not_reading_stdin(tmp_path: Path) -> None:
    # A large message the program never reads: the broken pipe is not our failure.
    result = _run("exit 0", tmp_path, message=b"x" * (4 << 20))
    assert result.status == "delivered"


def test_clean_environment_and_cwd(tmp_path: Path) -> None:
    os.environ["GATEWAY_TEST_LEAK"] = "1"
    try:
        result = _run(
            "env > env.txt; pwd > pwd.txt", tmp_path, env={"SENDER": "a@example.org", "EXT": ""}
        )
    finally:
        del os.environ["GATEWAY_TEST_LEAK"]
    assert result.status == "delivered"
    lines = (tmp_path / "env.txt").read_text().splitlines()
    env = dict(line.split("=", 1) for line in lines if "=" in line)
    assert env["PATH"] == PATH
    assert env["SENDER"] == "a@example.org"
    assert env["EXT"] == ""
    assert "GATEWAY_TEST_LEAK" not in env
    assert (tmp_path / "pwd.txt").read_text().strip() == str(tmp_path)


def test_timeout_kills_the_process_group(tmp_path: Path) -> None:
    started = time.monotonic()
    result = _run(f"sleep 30 & echo $! > {tmp_path}/bg; sleep 30", tmp_path, timeout=0.5)
    assert time.monotonic() - started < 10
    assert result.status == "deferred"
    assert result.reply.code == 451
    assert "timed out" in result.reply.text
    background = int((tmp_path / "bg").read_text())
    # The background sleep was in the same group and is gone (or a zombie being reaped).
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(background):
        time.sleep(0.05)
    assert not _alive(background)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_background_child_holding_output_does_not_hang(tmp_path: Path) -> None:
    started = time.monotonic()
    result = _run("sleep 30 & echo done", tmp_path, timeout=20)
    assert time.monotonic() - started < 10
    assert result.status == "delivered"
    assert result.reply.text == "done"


def test_output_is_bounded(tmp_path: Path) -> None:
    result = _run("head -c 1000000 /dev/zero | tr '\\0' 'a'; exit 111", tmp_path)
    assert result.status == "deferred"
    assert len(result.reply.text) <= 200
    assert OUTPUT_LIMIT == 4096


def test_cannot_start(tmp_path: Path) -> None:
    result = _run("exit 0", tmp_path / "missing")
    assert result.status == "deferred"
    assert "cannot run program" in result.reply.text


@REQUIRES_ROOT
def test_privilege_drop_to_nobody() -> None:
    result = _run('echo "$(id -u) $(id -g) $(id -G)"', Path("/"), uid=NOBODY, gid=NOBODY)
    assert result.status == "delivered"
    assert result.reply.text == f"{NOBODY} {NOBODY} {NOBODY}"


def test_cancellation_kills_the_program(tmp_path: Path) -> None:
    async def main() -> bool:
        task = asyncio.create_task(
            run_program(
                f"echo $$ > {tmp_path}/pid; exec sleep 300", MESSAGE,
                env={}, cwd=tmp_path, uid=None, gid=None, timeout=600,
            )
        )
        while not (tmp_path / "pid").exists() or not (tmp_path / "pid").read_text().strip():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The program must be gone now, not when its sleep would have ended.
        pid = int((tmp_path / "pid").read_text())
        for _ in range(500):
            if not _alive(pid):
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(main()), "the program outlived the cancelled delivery"


# -- a large message on disk (issue #17) ----------------------------------------------------


def test_large_message_on_disk_is_fed_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The program reads exactly the message; it is never read whole into memory."""
    message = big_message()
    out = tmp_path / "stdin"
    with no_whole_reads(monkeypatch) as reads, file_content(tmp_path, message) as content:
        result = asyncio.run(
            run_program(f"cat > {out}", content, env={}, cwd=tmp_path, uid=None, gid=None, timeout=60)
        )
    assert result.status == "delivered", result
    assert reads == []
    assert out.read_bytes() == message


def test_program_that_stops_reading_a_large_message_is_not_waited_for(tmp_path: Path) -> None:
    """A program that takes a few octets and exits 0 has delivered: the rest is not
    pushed at it (nor does the feeding wait for the time-out)."""
    message = big_message()
    out = tmp_path / "head"
    with file_content(tmp_path, message) as content:
        result = asyncio.run(
            run_program(f"head -c 10 > {out}", content, env={}, cwd=tmp_path, uid=None, gid=None, timeout=60)
        )
    assert result.status == "delivered", result
    assert out.read_bytes() == message[:10]

