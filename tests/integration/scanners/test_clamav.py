"""data_clamav in real SMTP sessions against a real clamd."""

from __future__ import annotations

import asyncio
import socket
import tracemalloc
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest

from plugins import data_clamav
from tests.integration.scanners._mail import (
    big,
    cli,
    clean,
    eicar_attached,
    eicar_inline,
    policy_file,
    queued,
    send,
    spooled,
    start,
)
from tests.integration.scanners.conftest import EICAR, Clamd
from tests.processes import free_port

VIRUS = "5.7.1 Virus found: "
UNAVAILABLE = "4.7.1 Virus scanner unavailable"


@pytest.fixture
def silent_scanner() -> Iterator[int]:
    """A TCP port that accepts connections and never answers: a hung scanner."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


@pytest.mark.parametrize("over", ["unix", "tcp"])
def test_eicar_attachment_is_rejected_with_the_virus_name(gateway_factory, clamd_daemon: Clamd, over: str) -> None:
    address = clamd_daemon.socket if over == "unix" else f"127.0.0.1:{clamd_daemon.port}"
    gw = start(gateway_factory, data_clamav, address=address)
    code, text = send(gw, eicar_attached())
    assert code == 554
    assert text.startswith(VIRUS) and "eicar" in text.lower()
    assert gw.queue_ids() == [] and gw.queue_ids("quarantine") == []


def test_eicar_inline_in_a_text_body_is_rejected(gateway_factory, clamd_daemon: Clamd) -> None:
    gw = start(gateway_factory, data_clamav, address=clamd_daemon.socket)
    code, text = send(gw, eicar_inline())
    assert code == 554
    assert text.startswith(VIRUS + "Eicar-Test-Signature-Body")
    assert gw.queue_ids() == []


def test_clean_mail_is_queued_with_the_scanned_header(gateway_factory, clamd_daemon: Clamd) -> None:
    gw = start(gateway_factory, data_clamav, address=clamd_daemon.socket, add_header=True)
    code, _ = send(gw, clean())
    assert code == 250
    assert queued(gw)["X-Virus-Scanned"] == "ClamAV at mx.test.example"


def test_clean_mail_gets_no_header_unless_asked(gateway_factory, clamd_daemon: Clamd) -> None:
    gw = start(gateway_factory, data_clamav, address=clamd_daemon.socket)
    assert send(gw, clean())[0] == 250
    assert "X-Virus-Scanned" not in queued(gw)


def test_scanner_down_defers_the_message(gateway_factory) -> None:
    gw = start(gateway_factory, data_clamav, address=f"127.0.0.1:{free_port()}")
    code, text = send(gw, eicar_attached())
    assert code == 451 and text.startswith(UNAVAILABLE)
    assert gw.queue_ids() == []


def test_missing_socket_defers_the_message(gateway_factory, tmp_path: Path) -> None:
    gw = start(gateway_factory, data_clamav, address=str(tmp_path / "no-clamd.sock"))
    code, text = send(gw, clean())
    assert code == 451 and text.startswith(UNAVAILABLE)


def test_hung_scanner_defers_after_the_scan_timeout(gateway_factory, silent_scanner: int) -> None:
    gw = start(gateway_factory, data_clamav, address=f"127.0.0.1:{silent_scanner}", scan_timeout="300ms")
    code, text = send(gw, clean())
    assert code == 451 and text.startswith(UNAVAILABLE)


def test_scanner_down_with_continue_lets_mail_through(gateway_factory) -> None:
    gw = start(gateway_factory, data_clamav, address=f"127.0.0.1:{free_port()}", on_scanner_error="continue")
    assert send(gw, clean())[0] == 250
    assert len(gw.queue_ids()) == 1


def test_message_over_max_size_is_not_scanned(gateway_factory, clamd_daemon: Clamd) -> None:
    data = eicar_attached()
    gw = start(gateway_factory, data_clamav, address=clamd_daemon.socket, max_size=len(data) - 1)
    assert send(gw, data)[0] == 250
    assert len(gw.queue_ids()) == 1


def test_stream_over_clamd_limit_counts_as_a_scanner_failure(gateway_factory, clamd_daemon: Clamd) -> None:
    # The fixture's clamd has StreamMaxLength 4M; a max_size above it is a misconfiguration
    # the operator must see as deferred mail, never as "clean".
    body = b"x" * 76 + b"\r\n"
    data = clean() + body * (5 * 1024 * 1024 // len(body))
    gw = start(gateway_factory, data_clamav, address=clamd_daemon.socket, max_size="10MB")
    code, text = send(gw, data)
    assert code == 451 and text.startswith(UNAVAILABLE)


def test_quarantine_action_holds_the_message_for_the_operator(
    gateway_factory, clamd_daemon: Clamd, tmp_path: Path
) -> None:
    gw = start(gateway_factory, data_clamav, address=clamd_daemon.socket, action="quarantine")
    code, _ = send(gw, eicar_attached())
    assert code == 250
    assert gw.queue_ids() == []
    (qid,) = gw.queue_ids("quarantine")
    held = gw.queue.read_message(qid, "quarantine")

    policy = policy_file(gw, tmp_path)
    listing = cli("quarantine", "list", "--policy", policy)
    assert listing.returncode == 0, listing.stderr
    assert qid in listing.stdout and "data_clamav: virus eicar" in listing.stdout.lower()

    released = cli("quarantine", "release", qid, "--policy", policy)
    assert released.returncode == 0, released.stderr
    assert gw.queue_ids("quarantine") == [] and gw.queue_ids() == [qid]
    assert gw.queue.read_message(qid) == held


def test_malformed_address_stops_start_up(gateway_factory) -> None:
    with pytest.raises(ValueError, match="bad port"):
        start(gateway_factory, data_clamav, address="127.0.0.1:99999")


def test_scan_budget_over_the_entry_timeout_stops_start_up(gateway_factory, clamd_daemon: Clamd) -> None:
    with pytest.raises(ValueError, match=r"data_clamav.*must be shorter than the entry's timeout 10s"):
        start(gateway_factory, data_clamav, address=clamd_daemon.socket, timeout="10s")


def _scan_spooled(data: bytes, clamd_daemon: Clamd, tmp_path: Path) -> tuple[object, int]:
    """data_clamav's hook on ``data`` spooled to a file; its verdict and the peak of
    memory allocated while it ran."""
    settings = data_clamav.Settings(address=clamd_daemon.socket, max_size=len(data))
    with spooled(data, tmp_path) as message:
        message.header_values("Subject")  # the head is parsed (and in memory) before the hooks
        tracemalloc.start()
        try:
            verdict = asyncio.run(data_clamav.gateway_data(message, SimpleNamespace(hostname="mx.test.example"), settings))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    return verdict, peak


def test_a_spooled_message_is_streamed_to_clamd_from_its_file(clamd_daemon: Clamd, tmp_path: Path) -> None:
    # 3.5 MB (under the fixture clamd's StreamMaxLength of 4M) with EICAR on its last
    # line: clamd saw all of it, read from the file a chunk at a time, and the message was
    # never in memory (the spooled message fails on raw/body/as_bytes; the peak is far
    # below its size).
    data = big(EICAR, 3_500_000)
    verdict, peak = _scan_spooled(data, clamd_daemon, tmp_path)
    assert verdict is not None and verdict.reply.code == 554
    assert verdict.reply.text.startswith("Virus found: Eicar-Test-Signature-Body")
    assert peak < len(data) // 4, f"{peak} octets allocated scanning a {len(data)}-octet spooled message"


def test_a_clean_spooled_message_passes(clamd_daemon: Clamd, tmp_path: Path) -> None:
    verdict, _ = _scan_spooled(big(b"nothing to see here", 3_500_000), clamd_daemon, tmp_path)
    assert verdict is None
