"""DMARC through real SMTP sessions: policies, alignment, subdomains, pct and DNS failures.

Mail comes from 127.0.0.1; the zone gives ``reject.example``, ``mail.relaxed.example``
and ``mail.strict.example`` an SPF record passing it, and ``elsewhere.example`` none.
"""

from __future__ import annotations

import pytest

from tests.integration.dkim.conftest import auth_results, make_message, policy, send, sender_sign, specs

UNALIGNED = "bounce@elsewhere.example"


@pytest.fixture
def gw(gateway_factory, dkim_world):
    return gateway_factory(policy(dkim_world), specs=specs())


def only_queued(gw, area: str = "msg") -> bytes:
    ids = gw.queue_ids(area)
    assert len(ids) == 1, (area, ids)
    return gw.queue.read_message(ids[0], area)


def test_reject_policy_refuses_unauthenticated_mail(gw) -> None:
    code, text = send(gw.port, UNALIGNED, make_message("ceo@reject.example"))
    assert (code, text[:5]) == (550, "5.7.1")
    assert gw.queue_ids() == [] and gw.queue_ids("quarantine") == []


def test_aligned_spf_pass_satisfies_reject_policy(gw) -> None:
    assert send(gw.port, "bounce@reject.example", make_message("ceo@reject.example"))[0] == 250
    results = auth_results(only_queued(gw))
    assert "spf=pass smtp.mailfrom=bounce@reject.example" in results
    assert "dmarc=pass header.from=reject.example policy.dmarc=reject" in results


def test_quarantine_policy_quarantines(gw) -> None:
    assert send(gw.port, UNALIGNED, make_message("ceo@quarantine.example"))[0] == 250
    assert gw.queue_ids() == []
    results = auth_results(only_queued(gw, "quarantine"))
    assert "dmarc=fail" in results and "policy.dmarc=quarantine" in results


def test_none_policy_only_annotates(gw) -> None:
    assert send(gw.port, UNALIGNED, make_message("ceo@none.example"))[0] == 250
    results = auth_results(only_queued(gw))
    assert 'dmarc=fail reason="no aligned SPF or DKIM pass" header.from=none.example policy.dmarc=none' in results


def test_domain_without_record_is_none(gw) -> None:
    assert send(gw.port, UNALIGNED, make_message("someone@nodmarc.example"))[0] == 250
    assert 'dmarc=none reason="no DMARC record" header.from=nodmarc.example' in auth_results(only_queued(gw))


def test_relaxed_alignment_accepts_a_subdomain_signature(gw, dkim_world) -> None:
    message = sender_sign(make_message("ceo@relaxed.example"), "mail.relaxed.example", "sel1", dkim_world.inbound_rsa)
    assert send(gw.port, UNALIGNED, message)[0] == 250
    results = auth_results(only_queued(gw))
    assert "dkim=pass header.d=mail.relaxed.example" in results
    assert "dmarc=pass header.from=relaxed.example" in results


def test_strict_alignment_refuses_a_subdomain_signature(gw, dkim_world) -> None:
    message = sender_sign(make_message("ceo@strict.example"), "mail.strict.example", "sel1", dkim_world.inbound_rsa)
    code, text = send(gw.port, UNALIGNED, message)
    assert (code, text[:5]) == (550, "5.7.1")


def test_spf_alignment_relaxed_and_strict(gw) -> None:
    assert send(gw.port, "bounce@mail.relaxed.example", make_message("ceo@relaxed.example"))[0] == 250
    code, text = send(gw.port, "bounce@mail.strict.example", make_message("ceo@strict.example"))
    assert (code, text[:5]) == (550, "5.7.1")
    assert "dmarc=pass header.from=relaxed.example" in auth_results(only_queued(gw))


def test_subdomain_policy_applies_to_subdomains_only(gw) -> None:
    # parent.example: p=none; sp=reject. sub.parent.example has no record of its own.
    code, text = send(gw.port, UNALIGNED, make_message("ceo@sub.parent.example"))
    assert (code, text[:5]) == (550, "5.7.1")
    assert send(gw.port, UNALIGNED, make_message("ceo@parent.example"))[0] == 250
    results = auth_results(only_queued(gw))
    assert "dmarc=fail" in results and "header.from=parent.example policy.dmarc=none" in results


def test_pct_zero_never_enacts_the_policy(gw) -> None:
    for _ in range(3):
        assert send(gw.port, UNALIGNED, make_message("ceo@pct0.example"))[0] == 250
    assert len(gw.queue_ids()) == 3 and gw.queue_ids("quarantine") == []
    results = auth_results(gw.queue.read_message(gw.queue_ids()[0]))
    assert "dmarc=fail" in results and "not applied (pct=0)" in results and "policy.dmarc=reject" in results


def test_policy_lookup_failure_tempfails(gw) -> None:
    code, text = send(gw.port, UNALIGNED, make_message("ceo@servfail.example"))
    assert (code, text[:5]) == (451, "4.4.3")
    assert gw.queue_ids() == []


def test_several_from_addresses_are_refused(gw) -> None:
    message = make_message("ceo@none.example").replace(
        b"From: Author <ceo@none.example>", b"From: ceo@none.example, other@reject.example"
    )
    code, text = send(gw.port, UNALIGNED, message)
    assert (code, text[:5]) == (550, "5.7.1")


def test_site_actions_soften_the_policy(gateway_factory, dkim_world) -> None:
    settings = 'reject_action = "quarantine"\non_dns_error = "continue"\nbad_from_action = "annotate"'
    gw = gateway_factory(policy(dkim_world, dmarc=settings), specs=specs())
    assert send(gw.port, UNALIGNED, make_message("ceo@reject.example"))[0] == 250
    assert "policy.dmarc=reject" in auth_results(only_queued(gw, "quarantine"))
    assert send(gw.port, UNALIGNED, make_message("ceo@servfail.example"))[0] == 250
    two_from = make_message("a@none.example").replace(b"From: Author <a@none.example>", b"From: a@none.example, b@x.example")
    assert send(gw.port, UNALIGNED, two_from)[0] == 250
    results = sorted(auth_results(gw.queue.read_message(qid)) for qid in gw.queue_ids())
    assert any('dmarc=temperror reason="policy lookup failed" header.from=servfail.example' in r for r in results)
    assert any('dmarc=permerror reason="several From addresses"' in r for r in results)


def test_relay_clients_are_not_checked(gateway_factory, dkim_world) -> None:
    gw = gateway_factory(policy(dkim_world, relay_client=True), specs=specs())
    assert send(gw.port, UNALIGNED, make_message("ceo@reject.example"))[0] == 250
    raw = only_queued(gw)
    assert b"dmarc=" not in raw
