"""ARC (RFC 8617) through real SMTP: two gateways chained over SMTP and a DNS server
on loopback serving the keys.

Gateway A (a forwarder: ``[relay] domains`` holds B's domain) verifies, adds a footer
and seals as ``d=out.example s=rsa1`` (the zone's DKIM key). Gateway B verifies the
chain; with ``out.example`` among its ``trusted_arc_sealers`` the message passes DMARC
although A's footer broke the author's DKIM signature, without it ``p=reject`` refuses
it and A bounces it to its sender. Crafted chains (tampered, malformed, gapped,
oversized) sent straight to B give ``arc=fail`` with a reason and are still accepted.
"""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import dkim
from prometheus_client.parser import text_string_to_metric_families

from plugins._dkim_sync import load_key_in_thread
from tests.conftest import wait_for
from tests.integration.dkim.conftest import (
    AUTHSERV_ID, auth_results, header_values, make_message, policy, send, sender_sign,
)

SENDER = "bounce@a.test.example"  # A's own user: no SPF for B, and A's DSNs land in A's Maildir
AUTHOR = "ceo@reject.example"  # p=reject; DKIM key sel1 in the test zone
RCPT = "alice@local.example"  # B's user
A_ID = "mx-a.test.example"
ARC_SPECS = None  # the stock plugins, as discovered (data_arc_verify, queue_arc_seal included)
METRICS = "\n[metrics]\nenabled = true\nport = 0\n"


def auth_counts(gw) -> dict[tuple[str, str], float]:
    """``gateway_auth_results`` scraped from ``gw``'s /metrics endpoint."""
    port = gw.app.metrics_server.server_address[1]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        families = {f.name: f.samples for f in text_string_to_metric_families(response.read().decode())}
    return {(s.labels["method"], s.labels["result"]): s.value for s in families["gateway_auth_results"]}


def forwarder_policy(world, b_port: int, *, seal: str = "", local: str = "") -> str:
    """Gateway A: verifies, adds a footer to inbound mail, seals, relays to B."""
    return f"""
[server]
hostname = "{A_ID}"
[[listeners]]
name = "smtp"
address = "127.0.0.1"
tls = "none"
[local]
domains = ["a.test.example"]
users = ["postmaster", "bounce", "joe"]
{local}
[relay]
domains = ["local.example"]
[delivery]
poll_interval = "200ms"
[dns]
nameservers = ["127.0.0.1:{world.port}"]
timeout = "2s"
[[routes]]
domain = "local.example"
host = "127.0.0.1"
port = {b_port}
tls = "none"
[[plugins]]
name = "rcpt_relay"
[[plugins]]
name = "rcpt_local_users"
[[plugins]]
name = "mail_spf"
add_header = false
[[plugins]]
name = "data_dkim_verify"
[[plugins]]
name = "data_arc_verify"
[[plugins]]
name = "data_dmarc"
[[plugins]]
name = "queue_authentication_results"
[[plugins]]
name = "queue_footer"
direction = "inbound"
text = "-- \\nForwarded by A."
[[plugins]]
name = "queue_arc_seal"
domain = "out.example"
selector = "rsa1"
key_file = "{world.out_rsa}"
{seal}
[[plugins]]
name = "queue_received_header"
"""


def receiver_policy(world, *, trusted: bool, extra: str = "") -> str:
    """Gateway B: the DKIM/DMARC test chain with data_arc_verify before data_dmarc."""
    dmarc = 'trusted_arc_sealers = ["out.example"]' if trusted else ""
    text = policy(world, dmarc=dmarc + "\n" + extra)
    marker = '[[plugins]]\nname = "data_dmarc"'
    return text.replace(marker, '[[plugins]]\nname = "data_arc_verify"\n' + marker)


def signed_message(world, subject: str) -> bytes:
    return sender_sign(make_message(AUTHOR, subject, to=RCPT), "reject.example", "sel1", world.inbound_rsa)


def inbox(gw, user: str) -> list[bytes]:
    new = Path(gw.policy.local.mail_root) / user / "Maildir" / "new"
    return [p.read_bytes() for p in sorted(new.glob("*"))] if new.exists() else []


def chain(gateway_factory, world, *, trusted: bool):
    b = gateway_factory(receiver_policy(world, trusted=trusted) + METRICS, specs=ARC_SPECS)
    a = gateway_factory(forwarder_policy(world, b.port), specs=ARC_SPECS)
    return a, b


def test_trusted_sealer_passes_dmarc_although_the_footer_broke_dkim(gateway_factory, dkim_world) -> None:
    a, b = chain(gateway_factory, dkim_world, trusted=True)
    assert send(a.port, SENDER, signed_message(dkim_world, "trusted"), rcpt=RCPT)[0] == 250
    assert wait_for(lambda: len(b.queue_ids()) == 1, timeout=20)
    raw = b.queue.read_message(b.queue_ids()[0])
    assert b"Forwarded by A." in raw
    # A sealed what it saw: the author's signature intact, DMARC passing.
    (aar,) = header_values(raw, "ARC-Authentication-Results")
    assert aar.startswith(f"i=1; {A_ID}") and "dkim=pass header.d=reject.example" in aar and "dmarc=pass" in aar
    (seal,) = header_values(raw, "ARC-Seal")
    assert "cv=none" in seal and "d=out.example" in seal
    results = auth_results(raw)
    assert "dkim=fail" in results
    assert "arc=pass (i=1 d=out.example s=rsa1)" in results
    assert re.search(r'dmarc=pass reason="ARC override: trusted sealer out.example \(i=1\) saw dmarc=pass '
                     r'header.from=reject.example" header.from=reject.example policy.dmarc=reject', results), results
    # An independent check of A's seal on what B queued (B's own fields are above it).
    cv, _, why = dkim.arc_verify(raw, dnsfunc=dkim_world.dnsfunc)
    assert cv == dkim.CV_Pass, why
    assert not dkim.verify(raw, dnsfunc=dkim_world.dnsfunc)  # the footer broke the author's signature
    assert auth_counts(b) == {("arc", "pass"): 1, ("dmarc", "arc_override"): 1}


def test_without_trust_the_dmarc_policy_applies(gateway_factory, dkim_world) -> None:
    a, b = chain(gateway_factory, dkim_world, trusted=False)
    assert send(a.port, SENDER, signed_message(dkim_world, "untrusted"), rcpt=RCPT)[0] == 250
    # B refuses it (p=reject, 550 5.7.1); A bounces it to its sender, a local user of A.
    assert wait_for(lambda: inbox(a, "bounce"), timeout=20)
    (dsn,) = inbox(a, "bounce")
    assert b"5.7.1" in dsn and b"DMARC" in dsn
    assert b.queue_ids() == [] and b.queue_ids("quarantine") == []
    assert auth_counts(b) == {("arc", "pass"): 1}


def test_mail_the_forwarder_does_not_change_is_not_sealed(gateway_factory, dkim_world) -> None:
    b = gateway_factory(receiver_policy(dkim_world, trusted=True), specs=ARC_SPECS)
    text = forwarder_policy(dkim_world, b.port).replace('text = "-- \\nForwarded by A."', 'text = ""')
    a = gateway_factory(text, specs=ARC_SPECS)
    assert send(a.port, SENDER, signed_message(dkim_world, "unchanged"), rcpt=RCPT)[0] == 250
    assert wait_for(lambda: len(b.queue_ids()) == 1, timeout=20)
    raw = b.queue.read_message(b.queue_ids()[0])
    assert header_values(raw, "ARC-Seal") == []
    results = auth_results(raw)
    assert "arc=none" in results and "dkim=pass" in results and "dmarc=pass header.from" in results


def test_forwards_to_another_domain_are_sealed_as_they_leave(gateway_factory, dkim_world, tmp_path) -> None:
    """An alias and a .qmail '&address' line at A forward to B: A seals each copy at delivery."""
    aliases = tmp_path / "aliases"
    aliases.write_text("fwd: alice@local.example\n")
    b = gateway_factory(receiver_policy(dkim_world, trusted=False), specs=ARC_SPECS)
    text = forwarder_policy(dkim_world, b.port, local=f'aliases = "{aliases}"')
    a = gateway_factory(text.replace('text = "-- \\nForwarded by A."', 'text = ""'), specs=ARC_SPECS)
    home = Path(a.policy.local.mail_root) / "joe"
    home.mkdir(parents=True)
    (home / ".qmail").write_text("&alice@local.example\n")
    for rcpt in ("fwd@a.test.example", "joe@a.test.example"):
        message = signed_message(dkim_world, f"forward via {rcpt}")
        assert send(a.port, "bounce@elsewhere.example", message, rcpt=rcpt)[0] == 250
    assert wait_for(lambda: len(b.queue_ids()) == 2, timeout=20)
    for qid in b.queue_ids():
        raw = b.queue.read_message(qid)
        (seal,) = header_values(raw, "ARC-Seal")
        assert "i=1;" in seal and "cv=none" in seal and "d=out.example" in seal
        (aar,) = header_values(raw, "ARC-Authentication-Results")
        assert aar.startswith(f"i=1; {A_ID}") and "dkim=pass header.d=reject.example" in aar
        assert "arc=pass (i=1 d=out.example s=rsa1)" in auth_results(raw)
        cv, _, why = dkim.arc_verify(raw, dnsfunc=dkim_world.dnsfunc)
        assert cv == dkim.CV_Pass, why


def test_always_seals_outbound_mail_too(gateway_factory, dkim_world) -> None:
    """when = "always": our own users' mail, which no check looked at, is sealed with arc=none."""
    seal = f'[[plugins]]\nname = "queue_arc_seal"\ndomain = "out.example"\nselector = "rsa1"\nkey_file = "{dkim_world.out_rsa}"\nwhen = "always"\n'
    marker = '[[plugins]]\nname = "queue_received_header"'
    gw = gateway_factory(policy(dkim_world, relay_client=True).replace(marker, seal + marker), specs=ARC_SPECS)
    assert send(gw.port, "alice@out.example", make_message("alice@out.example", "outbound"), rcpt="bob@remote.example")[0] == 250
    (qid,) = gw.queue_ids()
    raw = gw.queue.read_message(qid)
    assert header_values(raw, "ARC-Authentication-Results") == [f"i=1; {AUTHSERV_ID}; arc=none"]
    assert dkim.arc_verify(raw, dnsfunc=dkim_world.dnsfunc)[0] == dkim.CV_Pass
    assert dkim.verify(raw, dnsfunc=dkim_world.dnsfunc)  # queue_dkim_sign's signature, beside the seal


# -- crafted chains sent straight to B ---------------------------------------------------


def arc_set(world, message: bytes, srv_id: str = "fwd.test.example", status: str = "none") -> bytes:
    """``message`` with one more ARC set by out.example, as a forwarder would add it."""
    ar = f"Authentication-Results: {srv_id}; dkim=pass header.d=reject.example; arc={status}\r\n".encode()
    key = load_key_in_thread(world.out_rsa, "rsa-sha256")
    made = dkim.arc_sign(ar + message, b"rsa1", b"out.example", key, srv_id.encode(),
                         include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    assert len(made) == 3, "dkimpy added no ARC set"
    return b"".join(made) + message


def receive(gw, message: bytes) -> str:
    """Send ``message`` to ``gw``, which must accept it; the ``arc=`` clause it recorded."""
    before = set(gw.queue_ids())
    assert send(gw.port, "bounce@elsewhere.example", message)[0] == 250
    (new,) = set(gw.queue_ids()) - before
    (clause,) = [c.strip() for c in auth_results(gw.queue.read_message(new)).split(";") if c.strip().startswith("arc=")]
    return clause


def failed(reason: str) -> str:
    return f'reason="{reason}"'


def test_crafted_chains(gateway_factory, dkim_world) -> None:
    gw = gateway_factory(receiver_policy(dkim_world, trusted=True) + METRICS, specs=ARC_SPECS)
    base = make_message("ceo@none.example", "crafted", to=RCPT)  # p=none: refusals never hide a verdict
    good = arc_set(dkim_world, base)
    assert receive(gw, good) == "arc=pass (i=1 d=out.example s=rsa1)"
    two = arc_set(dkim_world, good, status="pass")
    assert receive(gw, two) == "arc=pass (i=2 d=out.example s=rsa1)"

    # A broken seal: the body changed after sealing, or a seal's signature altered.
    assert receive(gw, good + b"appended\r\n").endswith(failed("ARC-Message-Signature i=1 did not verify"))
    # The newest ARC-Seal comes first; its signed t= moved by a second.
    tampered = re.sub(rb" t=(\d+);", lambda m: b" t=%d;" % (int(m.group(1)) + 1), two, count=1)
    assert tampered != two
    assert receive(gw, tampered).endswith(failed("ARC-Seal[2] did not validate"))

    # Bad input: each fails with its reason, and the message is still accepted.
    no_instance = re.sub(rb"ARC-Seal: i=1;", b"ARC-Seal: ", good, count=1)
    assert receive(gw, no_instance).endswith(failed("malformed ARC-Seal: no valid i= instance"))
    garbage = b"ARC-Seal: i=1; this is ; not=a=tag list\r\n" + base
    assert receive(gw, garbage).endswith(failed("malformed ARC-Seal: not a tag=value list"))
    gap = re.sub(rb"i=2;", b"i=3;", two)
    assert receive(gw, gap).endswith(failed("ARC instance gap: no set i=2 below i=3"))
    duplicate = good.split(b"\r\n", 1)[0] + b"\r\n" + good
    assert receive(gw, duplicate).endswith(failed("two ARC-Seal fields with i=1"))
    incomplete = re.sub(rb"ARC-Authentication-Results: i=1;[^\r]*\r\n(?:[ \t][^\r]*\r\n)*", b"", good)
    assert receive(gw, incomplete).endswith(failed("incomplete ARC set i=1: no ARC-Authentication-Results"))
    cv_fail = re.sub(rb"cv=pass", b"cv=fail", two, count=1)
    assert receive(gw, cv_fail).endswith(failed("ARC-Seal i=2 says the chain had failed (cv=fail)"))
    huge = b"".join(
        f"ARC-Seal: i={i}; cv={'none' if i == 1 else 'pass'}; a=rsa-sha256; d=out.example; s=rsa1; b=AAAA\r\n"
        f"ARC-Message-Signature: i={i}; a=rsa-sha256; d=out.example; s=rsa1; h=from; bh=AAAA; b=AAAA\r\n"
        f"ARC-Authentication-Results: i={i}; fwd{i}.test.example; none\r\n".encode()
        for i in range(51, 0, -1)
    ) + base
    assert receive(gw, huge).endswith(failed("153 ARC header fields: more than 50 ARC sets (RFC 8617 section 4.2.1)"))
    instance_51 = re.sub(rb"i=1;", b"i=51;", good)
    assert receive(gw, instance_51).endswith(failed("ARC-Seal i=51: instances run from 1 to 50 (RFC 8617 section 4.2.1)"))
    assert receive(gw, base) == "arc=none"

    assert auth_counts(gw) == {("arc", "pass"): 2, ("arc", "fail"): 10, ("arc", "none"): 1}


def test_a_chain_that_seals_before_the_footer_is_refused(gateway_factory, dkim_world) -> None:
    import pytest

    text = forwarder_policy(dkim_world, 2525)
    footer = '[[plugins]]\nname = "queue_footer"\ndirection = "inbound"\ntext = "-- \\nForwarded by A."\n'
    assert footer in text
    text = text.replace(footer, "").replace('[[plugins]]\nname = "queue_received_header"', footer + '[[plugins]]\nname = "queue_received_header"')
    with pytest.raises(ValueError, match="queue_footer must come before queue_arc_seal"):
        gateway_factory(text, specs=ARC_SPECS)
