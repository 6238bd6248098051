"""Property-based tests (hypothesis) of what parses the wire and the disk."""

from __future__ import annotations

import asyncio
import json
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.address import Address, AddressError, parse_params, parse_path
from gateway.model import Envelope, QueuedRecipient, RecipientState
from gateway.smtp.data import read_data
from gateway.smtp.params import Refusal, mail_params, rcpt_params

ATEXT = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"
label = st.text(alphabet=string.ascii_lowercase + string.digits, min_size=1, max_size=20)
domains = st.lists(label, min_size=1, max_size=4).map(".".join)
atoms = st.text(alphabet=ATEXT, min_size=1, max_size=10)
locals_ = st.lists(atoms, min_size=1, max_size=3).map(".".join).filter(lambda s: len(s) <= 64)


@given(st.text(max_size=300))
def test_parse_path_never_crashes(text: str) -> None:
    try:
        address, rest = parse_path(text, allow_null=True, allow_postmaster=True, utf8=True)
    except AddressError:
        return
    assert isinstance(address, Address)
    # What parsed carries no control characters and no angle brackets outside quotes.
    assert not any(ord(c) < 32 or ord(c) == 127 for c in str(address))


@given(locals_, domains)
def test_valid_mailboxes_round_trip(local: str, domain: str) -> None:
    address, rest = parse_path(f"<{local}@{domain}> SIZE=10", allow_null=False, allow_postmaster=False, utf8=False)
    assert (address.local, address.domain) == (local, domain)
    assert rest == "SIZE=10"
    assert Address.parse(str(address)) == address


@given(st.text(max_size=200))
def test_parameters_never_crash(text: str) -> None:
    try:
        params = parse_params(text)
    except AddressError:
        return
    try:
        mail_params(params, esmtp=True, max_size=10_000)
    except Refusal as refusal:
        assert 500 <= refusal.reply.code < 600
    try:
        rcpt_params(params)
    except Refusal as refusal:
        assert 500 <= refusal.reply.code < 600


recipients = st.builds(
    QueuedRecipient,
    address=st.text(min_size=1, max_size=40),
    orcpt=st.none() | st.text(max_size=40),
    notify=st.sampled_from([(), ("NEVER",), ("SUCCESS", "FAILURE"), ("DELAY",)]),
    state=st.sampled_from(list(RecipientState)),
    attempts=st.integers(min_value=0, max_value=1000),
    last_reply=st.text(max_size=80),
    remote=st.text(max_size=30),
    notified=st.booleans(),
    warned=st.booleans(),
    dsn_relayed=st.booleans(),
)
envelopes = st.builds(
    Envelope,
    sender=st.text(max_size=60),
    recipients=st.lists(recipients, min_size=1, max_size=5),
    arrived=st.floats(min_value=0, max_value=4e9, allow_nan=False),
    client_ip=st.text(max_size=40),
    helo=st.text(max_size=60),
    auth_login=st.none() | st.text(max_size=20),
    body=st.sampled_from(["7BIT", "8BITMIME"]),
    smtputf8=st.booleans(),
    ret=st.none() | st.sampled_from(["FULL", "HDRS"]),
    envid=st.none() | st.text(max_size=30),
    quarantine_reason=st.none() | st.text(max_size=30),
)


@given(envelopes)
def test_envelope_record_round_trips_through_json(envelope: Envelope) -> None:
    data = json.dumps(envelope.to_dict(), separators=(",", ":")).encode("utf-8")
    assert Envelope.from_dict(json.loads(data)) == envelope


chunks = st.lists(st.binary(max_size=300), max_size=12)


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=200)
@given(chunks)
def test_data_reader_consumes_to_the_terminator_and_never_crashes(parts: list[bytes]) -> None:
    async def go() -> tuple[object, bytes]:
        reader = asyncio.StreamReader(limit=2**20)
        for part in parts:
            reader.feed_data(part)
        reader.feed_data(b"\r\n.\r\nNEXT\r\n")
        reader.feed_eof()
        result = await read_data(reader, max_size=2000, max_line_length=1000, timeout=5)
        return result, await reader.read()

    result, rest = asyncio.run(go())
    stream = b"\r\n" + b"".join(parts) + b"\r\n.\r\nNEXT\r\n"
    end = stream.find(b"\r\n.\r\n")
    # The message ends at the first CRLF.CRLF and not a byte earlier or later.
    assert rest == stream[end + 5 :]
    if result.raw is not None:  # type: ignore[attr-defined]
        body = result.raw  # type: ignore[attr-defined]
        assert b"\n" not in body.replace(b"\r\n", b"") and b"\r" not in body.replace(b"\r\n", b"")
