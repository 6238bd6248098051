"""data_rspamd in real SMTP sessions against a real rspamd."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

from gateway.verdicts import Action
from plugins import data_rspamd
from tests.integration.scanners._mail import big_attachment_then, clean, gtube, queued, send, session_and_txn, spooled, start
from tests.integration.scanners.conftest import GTUBE, Rspamd
from tests.processes import free_port

UNAVAILABLE = "4.7.1 Spam scanner unavailable"


def test_gtube_is_rejected_by_rspamds_action(gateway_factory, rspamd_daemon: Rspamd) -> None:
    gw = start(gateway_factory, data_rspamd, address=rspamd_daemon.address)
    code, text = send(gw, gtube())
    assert code == 550 and text.startswith("5.7.1")
    assert gw.queue_ids() == []


def test_reject_mapped_to_quarantine_holds_the_message(gateway_factory, rspamd_daemon: Rspamd) -> None:
    gw = start(gateway_factory, data_rspamd, address=rspamd_daemon.address, reject_action="quarantine")
    assert send(gw, gtube())[0] == 250
    assert gw.queue_ids() == []
    (qid,) = gw.queue_ids("quarantine")
    reason = gw.queue.load(qid, "quarantine").envelope.quarantine_reason
    assert reason is not None and reason.startswith("data_rspamd: rspamd action 'reject'")
    assert queued(gw, "quarantine")["X-Spam-Status"].startswith("Yes,")


def test_reject_mapped_to_tag_only_marks_the_message(gateway_factory, rspamd_daemon: Rspamd) -> None:
    gw = start(gateway_factory, data_rspamd, address=rspamd_daemon.address, reject_action="tag")
    forged = b"X-Spam-Status: No\r\n"
    assert send(gw, gtube(forged))[0] == 250
    msg = queued(gw)
    (status,) = msg.get_all("X-Spam-Status")
    assert status.startswith("Yes, score=15.0 required=15.0 action=reject")
    assert "GTUBE" in status
    assert msg["X-Spam-Score"] == "15.0"


def test_clean_mail_passes_with_status_no(gateway_factory, rspamd_daemon: Rspamd) -> None:
    gw = start(gateway_factory, data_rspamd, address=rspamd_daemon.address)
    assert send(gw, clean())[0] == 250
    status = queued(gw)["X-Spam-Status"]
    assert status.startswith("No, ") and "action=no_action" in status
    # rspamd compared the envelope we passed (From, Rcpt headers) with the message.
    assert "FROM_EQ_ENVFROM" in status


def test_add_header_action_tags(gateway_factory, rspamd_daemon: Rspamd) -> None:
    gw = start(gateway_factory, data_rspamd, address=rspamd_daemon.address, settings_id="always_add_header")
    assert send(gw, clean())[0] == 250
    msg = queued(gw)
    assert msg["X-Spam-Status"].startswith("Yes, ") and "action=add_header" in msg["X-Spam-Status"]
    assert msg["Subject"] == "Lunch on Thursday"


def test_rewrite_subject_action_rewrites_the_subject(gateway_factory, rspamd_daemon: Rspamd) -> None:
    gw = start(gateway_factory, data_rspamd, address=rspamd_daemon.address, settings_id="always_rewrite_subject")
    assert send(gw, clean())[0] == 250
    msg = queued(gw)
    assert msg.get_all("Subject") == ["*** SPAM *** Lunch on Thursday"]


def test_add_header_mapped_to_reject(gateway_factory, rspamd_daemon: Rspamd) -> None:
    gw = start(gateway_factory, data_rspamd, address=rspamd_daemon.address,
               settings_id="always_add_header", add_header_action="reject")
    code, text = send(gw, clean())
    assert code == 550 and text.startswith("5.7.1")


def test_score_threshold_quarantines(gateway_factory, rspamd_daemon: Rspamd) -> None:
    gw = start(gateway_factory, data_rspamd, address=rspamd_daemon.address, quarantine_score=-100.0)
    assert send(gw, clean())[0] == 250
    (qid,) = gw.queue_ids("quarantine")
    reason = gw.queue.load(qid, "quarantine").envelope.quarantine_reason
    assert reason is not None and ">= -100" in reason


def test_milter_headers_are_applied(gateway_factory, rspamd_daemon: Rspamd) -> None:
    gw = start(gateway_factory, data_rspamd, address=rspamd_daemon.address, milter_headers=True)
    assert send(gw, clean())[0] == 250
    (qid,) = gw.queue_ids()
    msg = queued(gw)
    assert msg["X-Rspamd-Queue-Id"] == qid  # our queue id went to rspamd as Queue-Id
    assert msg["X-Spamd-Result"].startswith("default: False")


def test_score_feeds_the_policys_scoring(gateway_factory, rspamd_daemon: Rspamd) -> None:
    gw = start(gateway_factory, data_rspamd, address=rspamd_daemon.address, reject_action="tag",
               scoring_weight=1.0, extra="\n[scoring]\nreject = 10.0\n")
    code, text = send(gw, gtube())
    assert code == 550 and text.startswith("5.7.1")


def test_rspamd_down_defers(gateway_factory) -> None:
    gw = start(gateway_factory, data_rspamd, address=f"127.0.0.1:{free_port()}")
    code, text = send(gw, gtube())
    assert code == 451 and text.startswith(UNAVAILABLE)
    assert gw.queue_ids() == []


def test_rspamd_down_with_continue_passes_unscanned(gateway_factory) -> None:
    gw = start(gateway_factory, data_rspamd, address=f"127.0.0.1:{free_port()}", on_scanner_error="continue")
    assert send(gw, clean())[0] == 250
    assert "X-Spam-Status" not in queued(gw)


def test_message_over_max_size_is_not_scanned(gateway_factory, rspamd_daemon: Rspamd) -> None:
    data = gtube()
    gw = start(gateway_factory, data_rspamd, address=rspamd_daemon.address, max_size=len(data) - 1)
    assert send(gw, data)[0] == 250
    assert "X-Spam-Status" not in queued(gw)


def test_a_spooled_message_is_streamed_to_rspamd_from_its_file(rspamd_daemon: Rspamd, tmp_path: Path) -> None:
    # 3 MB, GTUBE in a text part after a large attachment: rspamd read the whole body
    # (its Content-Length), written as it was read from the file, and the message was
    # never loaded whole (the spooled message fails on raw/body/as_bytes).
    data = big_attachment_then(GTUBE, 3_000_000)
    session, txn = session_and_txn()
    settings = data_rspamd.Settings(address=rspamd_daemon.address, max_size=len(data))
    with spooled(data, tmp_path) as message:
        verdict = asyncio.run(data_rspamd.gateway_data(session, txn, message, SimpleNamespace(hostname="mx.test.example"),
                                                       settings))
    assert verdict is not None and verdict.action is Action.REJECT and verdict.reply.code == 550
    assert "rspamd action 'reject'" in verdict.reason
