"""Crash test of the queue store alone: SIGKILL a committing process at random moments.

A kill cannot show a missing fsync (that needs power loss; see the ordering test in
tests/unit/test_queue_store.py), but it does show that a crash at any instant leaves
either no message or a whole one, that every acknowledged commit is there, that state
updates are all-or-nothing, and that ``open()`` recovers what the crash left behind.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.model import RecipientState
from gateway.queue import QueueStore

WRITER = Path(__file__).with_name("_queue_writer.py")
ROUNDS = 8


def _wait_for_ready(out: Path, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not out.read_bytes().startswith(b"READY\n"):
        assert proc.poll() is None, f"writer exited early with {proc.returncode}"
        assert time.monotonic() < deadline, "writer never became ready"
        time.sleep(0.01)


def _complete_lines(out: Path) -> list[list[str]]:
    data = out.read_bytes()
    return [line.split() for line in data[: data.rfind(b"\n") + 1].decode("ascii").splitlines()]


@pytest.mark.slow
def test_sigkill_leaves_no_message_or_a_whole_one(tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    root = tmp_path / "queue"
    acknowledged: dict[str, str] = {}
    state_written: set[str] = set()
    leftovers = 0
    for round_no in range(ROUNDS):
        out = tmp_path / f"writer-{round_no}.out"
        with open(out, "wb") as stdout:
            proc = subprocess.Popen(
                [sys.executable, str(WRITER), str(root), str(rng.randrange(2**32))],
                stdout=stdout,
            )
        try:
            if round_no == ROUNDS // 2:
                time.sleep(rng.uniform(0.0, 0.3))  # may land inside open()'s recovery
            else:
                _wait_for_ready(out, proc)
                time.sleep(rng.uniform(0.05, 0.5))
        finally:
            proc.kill()
            proc.wait()
        for fields in _complete_lines(out):
            if fields[0] == "OK":
                acknowledged[fields[1]] = fields[2]
            elif fields[0] == "STATE":
                state_written.add(fields[1])
        leftovers += len(os.listdir(root / "tmp")) if (root / "tmp").exists() else 0

    store = QueueStore(root)
    found = store.open()
    context = f"seed={seed} acknowledged={len(acknowledged)} tmp leftovers={leftovers}"
    print(context)
    assert acknowledged, f"no commit finished in any round ({context})"
    assert os.listdir(root / "tmp") == [], context
    assert os.listdir(root / "corrupt") == [], f"a kill left a damaged file ({context})"
    assert set(acknowledged) <= set(found), f"acknowledged messages were lost ({context})"
    for qid in found:  # every file verifies and parses, acknowledged or not
        loaded = store.load(qid)
        data = store.read_message(qid)
        assert len(data) == loaded.message_size
        if qid in acknowledged:
            assert hashlib.sha256(data).hexdigest() == acknowledged[qid], f"qid={qid} {context}"
        if qid in state_written:
            assert loaded.attempts == 1
            assert loaded.envelope.recipients[0].state is RecipientState.DELIVERED
        elif loaded.attempts == 0:  # no state file: the recipients are as committed
            assert all(r.state is RecipientState.PENDING for r in loaded.envelope.recipients)
