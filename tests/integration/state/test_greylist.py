"""Greylisting through real SMTP sessions: SQLite on one node, Redis across two."""

from __future__ import annotations

import time

from tests.integration.state._policy import attempt, policy, specs

GREYLISTED = (451, b"4.7.1 Greylisted, please try again later")
DELAY = 1.0  # the test policies' delay; the tests sleep just past it


def greylist(state: str = "sqlite", extra: str = "") -> str:
    return f'name = "rcpt_greylist"\nstate = "{state}"\ndelay = "{DELAY}s"\n{extra}'


def test_first_attempt_is_greylisted_retry_after_the_delay_is_accepted(gateway_factory) -> None:
    gw = gateway_factory(policy(greylist()), specs=specs())
    assert attempt(gw.port) == GREYLISTED
    assert attempt(gw.port) == GREYLISTED  # too early
    assert gw.queue_ids() == []
    time.sleep(DELAY + 0.2)
    assert attempt(gw.port)[0] == 250
    assert len(gw.queue_ids()) == 1
    assert attempt(gw.port)[0] == 250  # remembered as passed
    # Another sender to the same recipient is a new triplet.
    assert attempt(gw.port, sender="b@example.org") == GREYLISTED


def test_greylisting_still_leaves_the_decision_to_the_recipient_plugins(gateway_factory) -> None:
    gw = gateway_factory(policy(greylist()), specs=specs())
    assert attempt(gw.port, rcpt="nobody@local.example") == GREYLISTED
    time.sleep(DELAY + 0.2)
    code, _ = attempt(gw.port, rcpt="nobody@local.example")
    assert code == 550  # passed greylisting, refused by rcpt_local_users


def test_allow_listed_network_passes_at_once(gateway_factory) -> None:
    gw = gateway_factory(policy(greylist(extra='allow_networks = ["127.0.0.0/8"]')), specs=specs())
    assert attempt(gw.port)[0] == 250
    assert len(gw.queue_ids()) == 1


def test_allow_listed_sender_domain_passes_at_once(gateway_factory) -> None:
    gw = gateway_factory(policy(greylist(extra='allow_sender_domains = [".example.org"]')), specs=specs())
    assert attempt(gw.port, sender="news@lists.example.org")[0] == 250
    assert attempt(gw.port, sender="x@example.net") == GREYLISTED


def test_two_gateways_sharing_redis_share_the_greylist(gateway_factory, redis_url: str) -> None:
    node_a = gateway_factory(policy(greylist(redis_url)), specs=specs())
    node_b = gateway_factory(policy(greylist(redis_url)), specs=specs())
    assert attempt(node_a.port) == GREYLISTED
    assert attempt(node_b.port) == GREYLISTED  # B knows the triplet: still too early
    time.sleep(DELAY + 0.2)
    assert attempt(node_b.port)[0] == 250  # the retry reaches the other node and passes
    assert len(node_b.queue_ids()) == 1 and node_a.queue_ids() == []
    assert attempt(node_a.port)[0] == 250  # and the pass is shared too
