"""Inbound DKIM verification through real SMTP sessions: what lands in Authentication-Results."""

from __future__ import annotations

import pytest

from tests.integration.dkim.conftest import (
    AUTHSERV_ID,
    auth_results,
    header_values,
    make_message,
    policy,
    send,
    sender_sign,
    specs,
)


@pytest.fixture
def gw(gateway_factory, dkim_world):
    return gateway_factory(policy(dkim_world), specs=specs())


def queued(gw) -> bytes:
    ids = gw.queue_ids()
    assert len(ids) == 1, ids
    return gw.queue.read_message(ids[0])


def test_valid_rsa_signature_passes(gw, dkim_world) -> None:
    message = sender_sign(make_message("a@reject.example"), "reject.example", "sel1", dkim_world.inbound_rsa)
    assert send(gw.port, "bounce@elsewhere.example", message)[0] == 250
    results = auth_results(queued(gw))
    assert "dkim=pass header.d=reject.example header.i=@reject.example header.s=sel1 header.b=" in results
    assert "dmarc=pass header.from=reject.example policy.dmarc=reject" in results


def test_rsa_and_ed25519_signatures_each_get_a_result(gw, dkim_world) -> None:
    message = make_message("a@reject.example")
    message = sender_sign(message, "reject.example", "sel1", dkim_world.inbound_rsa)
    message = sender_sign(message, "reject.example", "ed1", dkim_world.inbound_ed25519, "ed25519-sha256")
    assert send(gw.port, "bounce@elsewhere.example", message)[0] == 250
    results = auth_results(queued(gw))
    assert "dkim=pass header.d=reject.example header.i=@reject.example header.s=ed1" in results
    assert "dkim=pass header.d=reject.example header.i=@reject.example header.s=sel1" in results


def test_tampered_body_fails(gw, dkim_world) -> None:
    # Signed by reject.example, but the author domain publishes p=none: the message is kept.
    message = sender_sign(make_message("a@none.example"), "reject.example", "sel1", dkim_world.inbound_rsa)
    tampered = message.replace(b"Hello, world.", b"Hello, WORLD!")
    assert send(gw.port, "bounce@elsewhere.example", tampered)[0] == 250
    results = auth_results(queued(gw))
    assert 'dkim=fail reason="body hash did not verify" header.d=reject.example' in results
    assert "dmarc=fail" in results and "policy.dmarc=none" in results


def test_tampered_header_fails(gw, dkim_world) -> None:
    message = sender_sign(make_message("a@none.example"), "reject.example", "sel1", dkim_world.inbound_rsa)
    tampered = message.replace(b"Subject: test", b"Subject: changed")
    assert send(gw.port, "bounce@elsewhere.example", tampered)[0] == 250
    assert 'dkim=fail reason="signature did not verify"' in auth_results(queued(gw))


def test_unsigned_message_gets_dkim_none(gw) -> None:
    assert send(gw.port, "bounce@elsewhere.example", make_message("a@none.example"))[0] == 250
    results = auth_results(queued(gw))
    assert results.startswith(f"{AUTHSERV_ID}; spf=none smtp.mailfrom=bounce@elsewhere.example; dkim=none;")


def test_missing_and_revoked_keys_are_permerror(gw, dkim_world) -> None:
    message = make_message("a@none.example")
    message = sender_sign(message, "reject.example", "nokey", dkim_world.inbound_rsa)
    message = sender_sign(message, "revoked.example", "sel1", dkim_world.inbound_rsa)
    assert send(gw.port, "bounce@elsewhere.example", message)[0] == 250
    results = auth_results(queued(gw))
    assert 'dkim=permerror reason="key revoked" header.d=revoked.example' in results
    assert 'dkim=permerror reason="no key for signature" header.d=reject.example' in results


def test_key_lookup_failure_is_temperror(gw, dkim_world) -> None:
    dkim_world.dns.fail("broken._domainkey.reject.example")
    message = sender_sign(make_message("a@none.example"), "reject.example", "broken", dkim_world.inbound_rsa)
    assert send(gw.port, "bounce@elsewhere.example", message)[0] == 250
    assert 'dkim=temperror reason="key lookup failed" header.d=reject.example' in auth_results(queued(gw))


def test_forged_results_claiming_our_id_are_removed(gw) -> None:
    forged = (
        f"Authentication-Results: {AUTHSERV_ID}; dkim=pass header.d=none.example\r\n"
        f"Authentication-Results: (comment) {AUTHSERV_ID.upper()} 1;\r\n\tdmarc=pass\r\n"
        "Authentication-Results: upstream.example.net; spf=pass smtp.mailfrom=x@none.example\r\n"
    ).encode()
    assert send(gw.port, "bounce@elsewhere.example", forged + make_message("a@none.example"))[0] == 250
    raw = queued(gw)
    values = header_values(raw, "Authentication-Results")
    assert values[0].startswith(f"{AUTHSERV_ID}; spf=none")  # ours, added on top
    assert "dkim=none" in values[0]
    assert values[1:] == ["upstream.example.net; spf=pass smtp.mailfrom=x@none.example"]
    assert b"dkim=pass header.d=none.example" not in raw
