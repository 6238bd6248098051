"""VERP addresses and the XVERP MAIL parameter."""

from __future__ import annotations

import pytest

from gateway.delivery.router import route_for
from gateway.delivery.types import LocalRoute
from gateway.delivery.verp import DEFAULT_DELIMITERS, check_delimiters, for_recipient, verp_sender
from gateway.model import Envelope, QueuedRecipient
from gateway.policy.model import LocalSettings, Policy
from gateway.smtp.params import Refusal, mail_params
from plugins.mail_verp import sender_matches


def test_verp_sender_folds_the_recipient_into_the_local_part() -> None:
    assert verp_sender("list-return@lists.example.com", "user@example.org", "+=") == (
        "list-return+user=example.org@lists.example.com"
    )
    assert verp_sender("list-return@lists.example.com", "user@example.org", "-=") == (
        "list-return-user=example.org@lists.example.com"
    )


def test_addresses_without_a_plain_form_keep_the_sender() -> None:
    assert verp_sender("", "user@example.org", "+=") == ""
    assert verp_sender("list@lists.example.com", '"john doe"@example.org', "+=") == "list@lists.example.com"
    assert verp_sender("list@lists.example.com", "postmaster", "+=") == "list@lists.example.com"


def test_for_recipient_only_changes_verp_envelopes() -> None:
    rcpt = QueuedRecipient("a@b.example")
    plain = Envelope(sender="list@l.example", recipients=[rcpt])
    assert for_recipient(plain, rcpt) is plain
    verp = Envelope(sender="list@l.example", recipients=[rcpt], verp="+=")
    assert for_recipient(verp, rcpt).sender == "list+a=b.example@l.example"
    assert Envelope.from_dict(verp.to_dict()).verp == "+="


def test_xverp_parameter_only_when_allowed() -> None:
    assert mail_params({"XVERP": None}, esmtp=True, max_size=10, allow_verp=True).verp == "-="
    assert mail_params({"XVERP": "+="}, esmtp=True, max_size=10, allow_verp=True).verp == "+="
    with pytest.raises(Refusal) as refused:
        mail_params({"XVERP": None}, esmtp=True, max_size=10)
    assert refused.value.reply.code == 555
    with pytest.raises(Refusal) as refused:
        mail_params({"XVERP": "@@"}, esmtp=True, max_size=10, allow_verp=True)
    assert refused.value.reply.code == 501
    with pytest.raises(ValueError):
        check_delimiters("+")


def test_policy_senders_match_address_or_domain() -> None:
    assert sender_matches("News@Lists.Example", ("@lists.example",))
    assert sender_matches("news@lists.example", ("NEWS@lists.example",))
    assert not sender_matches("news@other.example", ("@lists.example",))
    assert not sender_matches("", ("@lists.example",))


def test_default_verp_address_of_a_local_list_routes_to_the_list_user() -> None:
    # With every default, the return path a local list's copy carries is the list's
    # user-extension address, so the bounce to it reaches the list (not a double bounce).
    policy = Policy(source="t", local=LocalSettings(domains=("lists.example",), users=("postmaster", "list")))
    for subscriber in ("user@example.org", "mary-ann@my-isp.example", "x+tag@example.org"):
        returned = verp_sender("list@lists.example", subscriber, DEFAULT_DELIMITERS)
        route = route_for(returned, policy)
        assert isinstance(route, LocalRoute) and route.user == "list", (returned, route)
        assert route.extension == subscriber.replace("@", "=")
