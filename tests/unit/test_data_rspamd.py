"""Tests for plugins.data_rspamd, its answer reader and its small HTTP client."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
from typing import Awaitable, Callable

import pytest

from gateway.address import Address
from gateway.model import Message, Recipient, Session, Transaction
from plugins import data_rspamd
from plugins._http import http_request
from plugins._rspamd_reply import RspamdReply, apply_milter_headers, parse_checkv2, rewrite_subject
from plugins._scanner import ScannerError
from plugins.data_rspamd import Settings, decide, request_headers
from tests.unit import test_hookspecs as rules


def answer(**fields: object) -> bytes:
    data: dict[str, object] = {"action": "no action", "score": 1.5, "required_score": 15.0, "symbols": {}}
    data.update(fields)
    return json.dumps(data).encode()


def test_parse_checkv2() -> None:
    reply = parse_checkv2(answer(action="add header", score=7, symbols={"B": {}, "A": {}}, subject="x"))
    assert reply == RspamdReply("add header", 7.0, 15.0, ("A", "B"), "x", {})


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1, 2]", b'{"error": "bad request"}', answer(action=3), answer(score="high"), answer(score=True)],
)
def test_bad_answers_are_scanner_failures(body: bytes) -> None:
    with pytest.raises(ScannerError):
        parse_checkv2(body)


@pytest.mark.parametrize(
    "action, settings, outcome",
    [
        ("reject", Settings(), "reject"),
        ("soft reject", Settings(), "tempfail"),
        ("rewrite subject", Settings(), "rewrite_subject"),
        ("add header", Settings(), "tag"),
        ("greylist", Settings(), "tempfail"),
        ("no action", Settings(), "ignore"),
        ("something new", Settings(), "ignore"),
        ("reject", Settings(reject_action="quarantine"), "quarantine"),
        ("add header", Settings(add_header_action="ignore"), "ignore"),
        ("no action", Settings(quarantine_score=1.0), "quarantine"),  # the score threshold wins
        ("add header", Settings(reject_score=1.0), "reject"),
        ("reject", Settings(quarantine_score=1.0), "reject"),  # the stronger outcome stays
    ],
)
def test_decide(action: str, settings: Settings, outcome: str) -> None:
    assert decide(RspamdReply(action, 1.5, 15.0), settings)[0] == outcome


def test_request_headers_carry_the_envelope() -> None:
    session = Session(peer_ip="192.0.2.7", peer_port=4000, listener="smtp", helo="client.example",
                      auth_login="alice", tls_version="TLSv1.3", tls_cipher="TLS_AES_256_GCM_SHA384")
    txn = Transaction(sender=Address.null(), queue_id="Q1")
    txn.recipients += [Recipient(Address("a", "x.example")), Recipient(Address("b", "y.example"))]
    headers = request_headers(session, txn, "mx.example", Settings(settings_id="outbound"))
    assert headers == [
        ("IP", "192.0.2.7"), ("Helo", "client.example"), ("From", "<>"),
        ("Rcpt", "a@x.example"), ("Rcpt", "b@y.example"), ("Queue-Id", "Q1"), ("User", "alice"),
        ("MTA-Name", "mx.example"), ("TLS-Version", "TLSv1.3"), ("TLS-Cipher", "TLS_AES_256_GCM_SHA384"),
        ("Settings-ID", "outbound"),
    ]


def _final(message: Message) -> email.message.Message:
    return email.message_from_bytes(message.as_bytes(), policy=email.policy.default)


def test_rewrite_subject_uses_rspamds_proposal_or_the_prefix() -> None:
    message = Message(b"Subject: =?utf-8?q?Caf=C3=A9?=\r\n\r\nbody\r\n")
    rewrite_subject(message, None, "[SPAM]")
    assert _final(message).get_all("Subject") == ["[SPAM] Café"]
    message = Message(b"Subject: hello\r\n\r\nbody\r\n")
    rewrite_subject(message, "*** SPAM *** hello\r\nBcc: victim@example.org", "[SPAM]")
    data = message.as_bytes()
    assert b"\r\nBcc:" not in data and _final(message).get_all("Subject") == ["*** SPAM *** hello Bcc: victim@example.org"]


def test_milter_headers_are_applied_safely() -> None:
    message = Message(b"X-Spam: yes\r\nSubject: hi\r\n\r\nbody\r\n")
    milter = {
        "remove_headers": {"X-Spam": 0},
        "add_headers": {
            "X-Spamd-Result": {"value": "default: False [0.90 / 15.00];\r\n\tA(1.00)[];\r\n\tB(0.00)[]", "order": 0},
            "X-Rspamd-Queue-Id": "Q1",
            "Bad Name": "x",
            "X-List": [{"value": "one"}, {"value": "two"}],
        },
    }
    apply_milter_headers(message, milter)
    final = _final(message)
    assert "X-Spam" not in final and "Bad Name" not in message.as_bytes().decode()
    assert final["X-Rspamd-Queue-Id"] == "Q1" and sorted(final.get_all("X-List")) == ["one", "two"]
    assert final["X-Spamd-Result"].startswith("default: False [0.90 / 15.00];")


# The HTTP client against small real servers on loopback -----------------------------


def serve(answer_bytes: bytes) -> Callable[[], Awaitable[tuple[bytes, object]]]:
    async def run() -> tuple[bytes, object]:
        seen: list[bytes] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            seen.append(head + await reader.readexactly(length))
            writer.write(answer_bytes)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            try:
                result: object = await http_request(
                    f"127.0.0.1:{port}", 1, "POST", "/checkv2", [("Helo", "evil\r\nX-Injected: 1")], b"MSG",
                    connect_timeout=2, timeout=2,
                )
            except ScannerError as exc:
                result = exc
        return seen[0] if seen else b"", result

    return run


def test_http_content_length_answer_and_no_header_injection() -> None:
    request, response = asyncio.run(serve(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\npong")())
    assert request.startswith(b"POST /checkv2 HTTP/1.1\r\n") and request.endswith(b"\r\n\r\nMSG")
    assert b"Helo: evilX-Injected: 1\r\n" in request
    assert getattr(response, "status") == 200 and getattr(response, "body") == b"pong"


def test_http_chunked_answer() -> None:
    _, response = asyncio.run(serve(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\npo\r\n2\r\nng\r\n0\r\n\r\n")())
    assert getattr(response, "body") == b"pong"


@pytest.mark.parametrize(
    "raw",
    [b"SPAMD/1.1 0 EX_OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
     b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n"],
)
def test_http_bad_answers_are_scanner_failures(raw: bytes) -> None:
    _, response = asyncio.run(serve(raw)())
    assert isinstance(response, ScannerError)


def test_follows_the_stock_plugin_rules() -> None:
    rules.test_stock_plugin_has_a_module_docstring(data_rspamd.NAME)
    rules.test_stock_plugin_settings_are_a_documented_frozen_dataclass(data_rspamd.NAME)
    rules.test_stock_plugin_implements_only_hookspecs(data_rspamd.NAME)
