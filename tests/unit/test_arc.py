"""ARC's pure parts: the chain's structure (plugins/_arc_sync.py), the sealer comment in
Authentication-Results, content-change notes and the trusted-sealer override of DMARC."""

from __future__ import annotations

from gateway.address import Address
from gateway.authres import AuthResult, changes, count, note_change, render
from gateway.metrics import Counters
from gateway.model import Transaction
from plugins._arc_sync import ArcSet, read_chain_in_thread
from plugins._dmarc_record import DmarcRecord
from plugins.data_arc_verify import ARC_RESULT, ArcVerdict
from plugins.data_dmarc import Settings as DmarcSettings
from plugins.data_dmarc import arc_override

BODY = b"From: a@example.org\r\nSubject: x\r\n\r\nbody\r\n"


def arc_fields(i: int, cv: str | None = None, sealer: str = "fwd.example", aar: str = "dmarc=pass header.from=example.org") -> bytes:
    cv = cv or ("none" if i == 1 else "pass")
    return (
        f"ARC-Seal: i={i}; cv={cv}; a=rsa-sha256; d={sealer}; s=s1; b=AAAA\r\n"
        f"ARC-Message-Signature: i={i}; a=rsa-sha256; d={sealer}; s=s2;\r\n h=from; bh=AAAA; b=AAAA\r\n"
        f"ARC-Authentication-Results: i={i}; mx.{sealer}; {aar}\r\n"
    ).encode()


def test_a_sound_chain_lists_its_sets_and_keys() -> None:
    chain = read_chain_in_thread(arc_fields(2, sealer="list.example") + arc_fields(1) + BODY)
    assert chain.error == ""
    assert [(s.instance, s.sealer, s.cv) for s in chain.sets] == [(1, "fwd.example", "none"), (2, "list.example", "pass")]
    assert chain.keys == {"s1._domainkey.fwd.example", "s2._domainkey.fwd.example",
                          "s1._domainkey.list.example", "s2._domainkey.list.example"}
    assert chain.sets[0].results == (AuthResult("dmarc", "pass", "", (("header.from", "example.org"),)),)


def test_structural_faults_have_reasons() -> None:
    cases = {
        arc_fields(1).replace(b"ARC-Seal: i=1;", b"ARC-Seal:"): "malformed ARC-Seal: no valid i= instance",
        arc_fields(3) + arc_fields(1): "ARC instance gap: no set i=2 below i=3",
        arc_fields(1, cv="pass"): "ARC-Seal i=1 has cv=pass, expected none",
        arc_fields(2, cv="none") + arc_fields(1): "ARC-Seal i=2 has cv=none, expected pass",
        arc_fields(2, cv="fail") + arc_fields(1): "ARC-Seal i=2 says the chain had failed (cv=fail)",
        arc_fields(1).replace(b"d=fwd.example; s=s1; ", b""): "malformed ARC-Seal i=1: no d= tag",
        arc_fields(1).replace(b" bh=AAAA;", b""): "malformed ARC-Message-Signature i=1: no bh= tag",
        arc_fields(1).replace(b"ARC-Authentication-Results: i=1;", b"ARC-Authentication-Results:"):
            "malformed ARC-Authentication-Results: no valid i= instance",
        b"".join(arc_fields(i) for i in range(51, 0, -1)):
            "153 ARC header fields: more than 50 ARC sets (RFC 8617 section 4.2.1)",
        arc_fields(0): "ARC-Seal i=0: instances run from 1 to 50 (RFC 8617 section 4.2.1)",
    }
    for fields, reason in cases.items():
        assert read_chain_in_thread(fields + BODY).error == reason, fields


def test_no_arc_fields_is_no_chain_and_the_body_is_not_read() -> None:
    assert read_chain_in_thread(BODY + arc_fields(1)).sets == ()
    assert read_chain_in_thread(BODY + arc_fields(1)).error == ""


def test_the_sealer_goes_into_a_comment() -> None:
    text = render("mx.example", [AuthResult("arc", "pass", comment="i=2 d=list.example s=(x)")])
    assert text == "mx.example;\n\tarc=pass (i=2 d=list.example s=?x?)"


def test_changes_and_counts() -> None:
    txn = Transaction(sender=Address("bounce", "example.net"))
    assert changes(txn) == []
    note_change(txn, "footer")
    assert changes(txn) == ["footer"]
    counters = Counters()
    count(counters, "arc", "pass")
    count(counters, "arc", "pass")
    count(None, "arc", "pass")
    assert counters.auth_results == {("arc", "pass"): 2}


def _txn(*sets: ArcSet, result: str = "pass") -> Transaction:
    txn = Transaction(sender=Address("bounce", "example.net"))
    txn.stash[ARC_RESULT] = ArcVerdict(result, "", sets)
    return txn


def _set(i: int, sealer: str, *found: AuthResult) -> ArcSet:
    return ArcSet(i, sealer, "s1", "none" if i == 1 else "pass", sealer, "s1", found)


DMARC_PASS = AuthResult("dmarc", "pass", "", (("header.from", "example.org"),))
DKIM_PASS = AuthResult("dkim", "pass", "", (("header.d", "mail.example.org"),))
RECORD = DmarcRecord("reject")


def test_override_needs_trust_a_passing_chain_and_an_attestation() -> None:
    trusted = DmarcSettings(trusted_arc_sealers=("fwd.example",))
    assert arc_override(_txn(_set(1, "fwd.example", DMARC_PASS)), "example.org", RECORD, trusted) == (
        "fwd.example", "ARC override: trusted sealer fwd.example (i=1) saw dmarc=pass header.from=example.org")
    # relaxed alignment of the sealer's DKIM result counts too; strict does not
    assert arc_override(_txn(_set(1, "fwd.example", DKIM_PASS)), "example.org", RECORD, trusted)[0] == "fwd.example"
    strict = DmarcRecord("reject", adkim="s")
    assert arc_override(_txn(_set(1, "fwd.example", DKIM_PASS)), "example.org", strict, trusted) == ("", "")
    # no trust, a failed chain, or an attestation for another author: no override
    assert arc_override(_txn(_set(1, "fwd.example", DMARC_PASS)), "example.org", RECORD, DmarcSettings()) == ("", "")
    assert arc_override(_txn(_set(1, "fwd.example", DMARC_PASS), result="fail"), "example.org", RECORD, trusted) == ("", "")
    assert arc_override(_txn(_set(1, "fwd.example", DMARC_PASS)), "other.example", RECORD, trusted) == ("", "")
    assert arc_override(_txn(_set(1, "fwd.example", AuthResult("dmarc", "fail"))), "example.org", RECORD, trusted) == ("", "")


def test_a_trusted_set_below_an_untrusted_sealer_does_not_count() -> None:
    trusted = DmarcSettings(trusted_arc_sealers=("fwd.example", "list.example"))
    chain = (_set(1, "fwd.example", DMARC_PASS), _set(2, "stranger.example"))
    assert arc_override(_txn(*chain), "example.org", RECORD, trusted) == ("", "")
    chain = (_set(1, "fwd.example", DMARC_PASS), _set(2, "list.example"))
    assert arc_override(_txn(*chain), "example.org", RECORD, trusted)[0] == "fwd.example"


def test_what_counts_as_a_forward_to_another_domain() -> None:
    from gateway.model import Envelope, Message, QueuedRecipient
    from plugins.queue_arc_seal import is_forward

    local = {"a.example"}
    plain = Message(b"Subject: x\r\n\r\nbody\r\n")
    delivered = Message(b"Delivered-To: joe@a.example\r\nSubject: x\r\n\r\nbody\r\n")
    received = Envelope("s@x.example", [], client_ip="192.0.2.1")
    generated = Envelope("s@x.example", [], client_ip="")
    alias_target = QueuedRecipient("bob@b.example", orcpt="rfc822;fwd@a.example")
    # an alias or .forward target in another domain
    assert is_forward(received, alias_target, plain, local)
    # ... but not one in our own domains, nor a recipient the client named itself
    assert not is_forward(received, QueuedRecipient("bob@a.example", orcpt="rfc822;fwd@a.example"), plain, local)
    assert not is_forward(received, QueuedRecipient("bob@b.example"), plain, local)
    assert not is_forward(received, QueuedRecipient("bob@b.example", orcpt="rfc822;bob@b.example"), plain, local)
    # a .qmail forward: queued by us, with our Delivered-To; never a bounce (null sender)
    assert is_forward(generated, QueuedRecipient("bob@b.example"), delivered, local)
    assert not is_forward(generated, QueuedRecipient("bob@b.example"), plain, local)
    assert not is_forward(Envelope("", [], client_ip=""), QueuedRecipient("bob@b.example"), delivered, local)
    assert not is_forward(received, QueuedRecipient("bob@b.example"), delivered, local)


def test_what_a_seal_reports() -> None:
    from plugins.queue_arc_seal import results_to_seal

    spf = AuthResult("spf", "pass", "", (("smtp.mailfrom", "a@example.org"),))
    arc = AuthResult("arc", "pass", comment="i=1 d=fwd.example s=s1")
    assert results_to_seal([spf, arc], has_chain=True) == [spf, arc]
    # no chain: arc=none, also when nothing else was checked (outbound mail sealed always)
    assert results_to_seal([], has_chain=False) == [AuthResult("arc", "none")]
    assert results_to_seal([spf], has_chain=False) == [spf, AuthResult("arc", "none")]
    # a chain nobody verified cannot be continued
    assert results_to_seal([spf], has_chain=True) is None
