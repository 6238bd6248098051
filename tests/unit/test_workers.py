"""gateway/workers.py: what the master hands a replacement worker, how an exit reads."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys

import pytest

from gateway.workers import Handover, _how, read_handover


def test_a_handover_reads_back_as_written() -> None:
    policy = b'[server]\nhostname = "gw.example"\n\xc3\xa9\n'
    sent = Handover(4021, {"smtp": 2525, "submission": 587}, ("loaded", 7, ""), policy)
    assert read_handover(io.BytesIO(sent.encode())) == sent


@pytest.mark.parametrize("data", [b"", b"no newline at all", b"[]\n", b"{}\n"])
def test_what_is_not_a_handover_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        read_handover(io.BytesIO(data))


def test_an_exit_reads_as_a_status_or_a_signal() -> None:
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed.send_signal(signal.SIGKILL)
    _, status = os.waitpid(killed.pid, 0)
    killed.returncode = -9  # reaped here
    assert _how(status) == "was killed by signal 9 (SIGKILL)"
    assert _how(3 << 8) == "exited with status 3"
