"""The footer through real SMTP sessions: added before DKIM signing, so the signature
verifies (dkimpy against the test DNS server, and OpenDKIM when available), and never
added twice when the message passes through the gateway again."""

from __future__ import annotations

import email
import email.policy

import dkim
import pytest

from gateway.model import Message

from tests.integration.dkim._opendkim import opendkim_verify, unavailable
from tests.integration.dkim.conftest import header_values, policy, send, specs
from tests.unit.test_mime_footer import ATTACHMENT, attachment_part_bytes, multipart

REMOTE = "someone@remote.example"
FOOTER = '''
[[plugins]]
name = "queue_footer"
text = "-- \\nExample Corp, 1 Main Street. This message is confidential."
html = "<p class=\\"legal\\">Example Corp, 1 Main Street. This message is confidential.</p>"
'''


def footer_policy(world) -> str:
    text = policy(world, relay_client=True)
    marker = '[[plugins]]\nname = "queue_dkim_sign"'
    assert marker in text
    return text.replace(marker, FOOTER.strip() + "\n" + marker)


def queued(gw) -> list[bytes]:
    return [gw.queue.read_message(qid) for qid in gw.queue_ids()]


def texts(raw: bytes) -> dict[str, str]:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    return {p.get_content_type(): p.get_content() for p in parsed.walk() if p.get_content_maintype() == "text"}


def test_footer_then_signature_verifies_and_a_second_pass_adds_nothing(gateway_factory, dkim_world) -> None:
    gw = gateway_factory(footer_policy(dkim_world), specs=specs())
    original = multipart().replace(b"alice@out.example", b"alice@out.example", 1)
    assert send(gw.port, "alice@out.example", original, rcpt=REMOTE)[0] == 250
    (raw,) = queued(gw)
    found = texts(raw)
    assert found["text/plain"].count("This message is confidential.") == 1
    assert '<p class="legal">Example Corp, 1 Main Street.' in found["text/html"]
    assert found["text/html"].index("confidential.</p>") < found["text/html"].index("</body>")
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    (attachment,) = [p for p in parsed.walk() if p.get_filename() == "data.bin"]
    assert attachment.get_content() == ATTACHMENT
    assert attachment_part_bytes(raw) == attachment_part_bytes(original)
    assert header_values(raw, "X-Footer-Added") == ["mx.test.example"]
    assert dkim.verify(raw, dnsfunc=dkim_world.dnsfunc)

    # The same message through the gateway again (a second hop, a resend): no second footer.
    resent = Message(raw)
    resent.remove_headers("received")
    resent = resent.as_bytes()
    assert send(gw.port, "alice@out.example", resent, rcpt=REMOTE)[0] == 250
    second = [m for m in queued(gw) if m != raw]
    assert len(second) == 1
    again = texts(second[0])
    assert again["text/plain"].count("This message is confidential.") == 1
    assert again["text/html"].count("This message is confidential.") == 1
    assert dkim.verify(second[0], dnsfunc=dkim_world.dnsfunc)

    reason = unavailable()
    if reason:
        pytest.skip(f"OpenDKIM check: {reason}")
    assert opendkim_verify(dkim_world.zone, [raw]) == [0]


def test_inbound_mail_gets_no_footer(gateway_factory, dkim_world) -> None:
    text = footer_policy(dkim_world).replace('clients = ["127.0.0.1/32"]', "clients = []")
    gw = gateway_factory(text, specs=specs())
    assert send(gw.port, "someone@remote.example", multipart(), rcpt="alice@local.example")[0] == 250
    (raw,) = queued(gw)
    assert "confidential" not in texts(raw)["text/plain"]
    assert header_values(raw, "X-Footer-Added") == []


def test_a_chain_that_signs_before_the_footer_is_refused(gateway_factory, dkim_world) -> None:
    text = policy(dkim_world, relay_client=True)
    marker = '[[plugins]]\nname = "queue_received_header"'
    text = text.replace(marker, FOOTER.strip() + "\n" + marker)  # after queue_dkim_sign
    with pytest.raises(ValueError, match="queue_footer must come before queue_dkim_sign"):
        gateway_factory(text, specs=specs())
