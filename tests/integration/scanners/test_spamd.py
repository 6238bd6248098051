"""data_spamd in real SMTP sessions against a real spamd (messages kept small: SA is slow)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

from gateway.verdicts import Action
from plugins import data_spamd
from tests.integration.scanners._mail import (
    big, cli, clean, gtube, policy_file, queued, send, session_and_txn, spooled, start,
)
from tests.integration.scanners.conftest import GTUBE, Spamd
from tests.processes import free_port

UNAVAILABLE = "4.7.1 Spam scanner unavailable"


def test_gtube_is_rejected_over_reject_score(gateway_factory, spamd_daemon: Spamd) -> None:
    gw = start(gateway_factory, data_spamd, address=spamd_daemon.address, reject_score=10.0)
    code, text = send(gw, gtube())
    assert code == 550 and text.startswith("5.7.1")
    assert gw.queue_ids() == []


def test_gtube_is_tagged_by_default_and_forged_status_is_dropped(gateway_factory, spamd_daemon: Spamd) -> None:
    gw = start(gateway_factory, data_spamd, address=spamd_daemon.address)
    forged = b"X-Spam-Status: No, score=-10.0\r\nX-Spam-Score: -10.0\r\n"
    assert send(gw, gtube(forged))[0] == 250
    msg = queued(gw)
    (status,) = msg.get_all("X-Spam-Status")
    score = status.split("score=")[1].split()[0]
    assert status.startswith("Yes, ") and float(score) > 900  # GTUBE scores about 1000
    assert "required=5.0" in status and "GTUBE" in status
    assert msg.get_all("X-Spam-Score") == [score]
    assert msg["X-Spam-Flag"] == "YES"


def test_clean_mail_passes_with_status_no(gateway_factory, spamd_daemon: Spamd) -> None:
    gw = start(gateway_factory, data_spamd, address=spamd_daemon.address, reject_score=5.0)
    assert send(gw, clean())[0] == 250
    msg = queued(gw)
    assert msg["X-Spam-Status"].startswith("No, score=")
    assert "X-Spam-Flag" not in msg


def test_tag_score_overrides_spamds_required_score(gateway_factory, spamd_daemon: Spamd) -> None:
    gw = start(gateway_factory, data_spamd, address=spamd_daemon.address, tag_score=-100.0)
    assert send(gw, clean())[0] == 250
    assert queued(gw)["X-Spam-Status"].startswith("Yes,")
    assert "required=-100.0" in queued(gw)["X-Spam-Status"]


def test_gtube_over_quarantine_score_is_held(gateway_factory, spamd_daemon: Spamd, tmp_path: Path) -> None:
    gw = start(gateway_factory, data_spamd, address=spamd_daemon.address, quarantine_score=10.0, reject_score=5000.0)
    assert send(gw, gtube())[0] == 250
    assert gw.queue_ids() == []
    (qid,) = gw.queue_ids("quarantine")
    assert queued(gw, "quarantine")["X-Spam-Status"].startswith("Yes,")
    listing = cli("quarantine", "list", "--json", "--policy", policy_file(gw, tmp_path))
    assert listing.returncode == 0, listing.stderr
    (row,) = json.loads(listing.stdout)
    assert row["id"] == qid and row["reason"].startswith("data_spamd: spamd score ")


def test_score_feeds_the_policys_scoring(gateway_factory, spamd_daemon: Spamd) -> None:
    # GTUBE's 1000+ points at weight 0.01 are 10 points, over the policy's reject at 6;
    # the plugin itself decides nothing.
    gw = start(gateway_factory, data_spamd, address=spamd_daemon.address, scoring_weight=0.01,
               extra="\n[scoring]\nreject = 6.0\n")
    code, text = send(gw, gtube())
    assert code == 550 and text.startswith("5.7.1")


def test_score_is_noted_in_the_envelope(gateway_factory, spamd_daemon: Spamd) -> None:
    gw = start(gateway_factory, data_spamd, address=spamd_daemon.address, scoring_weight=1.0)
    assert send(gw, clean())[0] == 250
    (qid,) = gw.queue_ids()
    notes = gw.queue.load(qid).envelope.notes
    assert [n["plugin"] for n in notes] == ["data_spamd"]
    assert notes[0]["reason"].startswith("spamd score ")


def test_spamd_down_defers(gateway_factory) -> None:
    gw = start(gateway_factory, data_spamd, address=f"127.0.0.1:{free_port()}")
    code, text = send(gw, gtube())
    assert code == 451 and text.startswith(UNAVAILABLE)
    assert gw.queue_ids() == []


def test_spamd_down_with_continue_passes_unscanned(gateway_factory) -> None:
    gw = start(gateway_factory, data_spamd, address=f"127.0.0.1:{free_port()}", on_scanner_error="continue")
    assert send(gw, clean())[0] == 250
    assert "X-Spam-Status" not in queued(gw)


def test_message_over_max_size_is_not_scanned(gateway_factory, spamd_daemon: Spamd) -> None:
    data = gtube()
    gw = start(gateway_factory, data_spamd, address=spamd_daemon.address, reject_score=5.0, max_size=len(data) - 1)
    assert send(gw, data)[0] == 250
    assert "X-Spam-Status" not in queued(gw)


def test_a_spooled_message_is_streamed_to_spamd_from_its_file(spamd_daemon: Spamd, tmp_path: Path) -> None:
    # 3 MB with GTUBE at the top of the body (SpamAssassin reads the first part of a
    # body), sent after the Received line as it is read from the file: spamd counted the
    # Content-length it was told, and the message was never loaded whole (the spooled
    # message fails on raw/body/as_bytes).
    data = big(GTUBE, 3_000_000, at_end=False)
    session, txn = session_and_txn()
    settings = data_spamd.Settings(address=spamd_daemon.address, max_size=len(data), reject_score=10.0,
                                   scan_timeout=60.0)
    with spooled(data, tmp_path) as message:
        verdict = asyncio.run(data_spamd.gateway_data(session, txn, message, SimpleNamespace(hostname="mx.test.example"),
                                                      settings))
        head = message.final_head()
    assert verdict is not None and verdict.action is Action.REJECT and verdict.reply.code == 550
    assert b"X-Spam-Status: Yes, " in head and b"GTUBE" in head
