"""Outbound signing through real SMTP sessions, checked by independent verifiers.

The gateway signs what relay clients and authenticated users send; the queued message
must verify with dkimpy (asking the test DNS server directly) and with OpenDKIM's
``opendkim-testmsg`` (in a private network namespace, see ``_opendkim.py``).
"""

from __future__ import annotations

from pathlib import Path

import dkim
import pytest

from gateway.passwords import hash_password
from tests.conftest import no_verify_context, smtp
from tests.integration.dkim._opendkim import opendkim_verify, unavailable
from tests.integration.dkim.conftest import header_values, make_message, policy, send, specs

REMOTE = "someone@remote.example"


def only_queued(gw) -> bytes:
    ids = gw.queue_ids()
    assert len(ids) == 1, ids
    return gw.queue.read_message(ids[0])


def signature_tags(raw: bytes) -> dict[str, str]:
    values = header_values(raw, "DKIM-Signature")
    assert len(values) == 1, values
    tags = {}
    for part in values[0].split(";"):
        name, _, value = part.strip().partition("=")
        tags[name] = value.replace(" ", "")
    return tags


def relay_send(gateway_factory, world, sign: str, author: str = "alice@out.example") -> bytes:
    gw = gateway_factory(policy(world, relay_client=True, sign=sign), specs=specs())
    assert send(gw.port, author, make_message(author, to=REMOTE), rcpt=REMOTE)[0] == 250
    return only_queued(gw)


@pytest.mark.parametrize(("sign", "selector", "algorithm"), [("rsa", "rsa1", "rsa-sha256"), ("ed25519", "ed1", "ed25519-sha256")])
def test_relay_client_mail_is_signed_and_verifies(gateway_factory, dkim_world, sign, selector, algorithm) -> None:
    raw = relay_send(gateway_factory, dkim_world, sign)
    tags = signature_tags(raw)
    assert (tags["d"], tags["s"], tags["a"], tags["c"]) == ("out.example", selector, algorithm, "relaxed/relaxed")
    signed = tags["h"].split(":")
    assert signed.count("from") == 2  # oversigned: a second From breaks it
    assert {"to", "subject", "date", "message-id", "mime-version", "content-type"} <= set(signed)
    assert "received" not in signed
    # Our Received header is added after signing and stays the topmost field.
    assert raw.startswith(b"Received: ")
    assert dkim.verify(raw, dnsfunc=dkim_world.dnsfunc)
    assert not dkim.verify(raw.replace(b"Hello, world.", b"Hello, there."), dnsfunc=dkim_world.dnsfunc)
    added_from = raw.replace(b"Subject:", b"From: mallory@evil.example\r\nSubject:", 1)
    assert not dkim.verify(added_from, dnsfunc=dkim_world.dnsfunc)


def test_opendkim_verifies_rsa_and_ed25519_signatures(gateway_factory, dkim_world) -> None:
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    rsa_signed = relay_send(gateway_factory, dkim_world, "rsa")
    ed_signed = relay_send(gateway_factory, dkim_world, "ed25519")
    tampered = rsa_signed.replace(b"Hello, world.", b"Hello, there.")
    # opendkim-testmsg: 0 is a good signature, 70 (EX_SOFTWARE) a bad one.
    assert opendkim_verify(dkim_world.zone, [rsa_signed, ed_signed, tampered]) == [0, 0, 70]


def test_authenticated_submission_is_signed(gateway_factory, dkim_world, tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text(f"alice:{hash_password('s3cret', ln=4)}\n")
    gw = gateway_factory(policy(dkim_world, users_file=users), specs=specs())
    with smtp(gw.port) as client:
        client.ehlo()
        client.starttls(context=no_verify_context())
        client.ehlo()
        client.login("alice", "s3cret")
        message = make_message("alice@news.out.example", to=REMOTE)
        assert client.sendmail("alice@news.out.example", [REMOTE], message) == {}
    raw = only_queued(gw)
    assert signature_tags(raw)["d"] == "out.example"  # the parent domain's key
    assert dkim.verify(raw, dnsfunc=dkim_world.dnsfunc)


def test_inbound_and_foreign_mail_is_not_signed(gateway_factory, dkim_world) -> None:
    inbound = gateway_factory(policy(dkim_world), specs=specs())
    assert send(inbound.port, "alice@out.example", make_message("alice@out.example"))[0] == 250
    assert header_values(only_queued(inbound), "DKIM-Signature") == []
    # A relay client writing as a domain we hold no key for goes out unsigned.
    raw = relay_send(gateway_factory, dkim_world, "rsa", author="bob@other.example")
    assert header_values(raw, "DKIM-Signature") == []


def test_missing_key_file_stops_startup(gateway_factory, dkim_world, tmp_path: Path) -> None:
    text = policy(dkim_world).replace(str(dkim_world.out_rsa), str(tmp_path / "absent.key"))
    with pytest.raises(ValueError, match="absent.key"):
        gateway_factory(text, specs=specs())


def test_dual_signing_rsa_and_ed25519(gateway_factory, dkim_world) -> None:
    ed_entry = f"""[[plugins]]
name = "queue_dkim_sign"
id = "dkim_ed25519"
[plugins.domains."out.example"]
selector = "ed1"
key_file = "{dkim_world.out_ed25519}"
algorithm = "ed25519-sha256"
[[plugins]]
name = "queue_received_header"
"""
    text = policy(dkim_world, relay_client=True).replace('[[plugins]]\nname = "queue_received_header"\n', ed_entry)
    gw = gateway_factory(text, specs=specs())
    assert send(gw.port, "alice@out.example", make_message("alice@out.example", to=REMOTE), rcpt=REMOTE)[0] == 250
    raw = only_queued(gw)
    assert len(header_values(raw, "DKIM-Signature")) == 2
    for index in (0, 1):
        checker = dkim.DKIM(raw)
        assert checker.verify(idx=index, dnsfunc=dkim_world.dnsfunc), index
