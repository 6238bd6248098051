"""Redis stopped mid-test: each plugin answers as its ``on_state_error`` says."""

from __future__ import annotations

from tests.conftest import RawClient, smtp
from tests.integration.state._policy import attempt, policy, specs


def test_redis_down_fail_open_and_fail_closed(gateway_factory, redis_factory) -> None:
    redis = redis_factory()  # private: this test kills it
    url = redis.url
    fail_open = gateway_factory(
        policy(
            f'name = "connect_limits"\nstate = "{url}"\nconnections_per_ip = 5\nexempt_networks = []',
            f'name = "rcpt_greylist"\nstate = "{url}"',  # on_state_error = "continue" by default
        ),
        specs=specs(),
    )
    fail_closed = gateway_factory(
        policy(
            f'name = "mail_rate_limit"\nstate = "{url}"\nmessages_per_ip = 100\non_state_error = "tempfail"',
            f'name = "rcpt_greylist"\nstate = "{url}"\non_state_error = "tempfail"',
        ),
        specs=specs(),
    )
    # While Redis runs, both greylist a new triplet: the store is in use.
    assert attempt(fail_open.port)[0] == 451
    assert attempt(fail_closed.port, rcpt="bob@local.example")[0] == 451

    redis.stop()

    # Fail open: greeted despite connect_limits, and the unknown triplet is let through.
    assert attempt(fail_open.port, rcpt="carol@local.example")[0] == 250
    assert len(fail_open.queue_ids()) == 1
    # Fail closed: MAIL is refused with a temporary local error, never a 5xx.
    with smtp(fail_closed.port) as client:
        client.ehlo()
        code, text = client.mail("a@example.org")
        assert (code, text[:5]) == (451, b"4.3.0")
    assert fail_closed.queue_ids() == []


def test_redis_down_greylist_tempfails_when_configured(gateway_factory, redis_factory) -> None:
    redis = redis_factory()
    gw = gateway_factory(
        policy(f'name = "rcpt_greylist"\nstate = "{redis.url}"\non_state_error = "tempfail"'), specs=specs()
    )
    redis.stop()
    code, text = attempt(gw.port)
    assert (code, text[:5]) == (451, b"4.3.0")
    client = RawClient(gw.port)  # the session survived the failure: the gateway still serves
    try:
        assert client.reply()[0] == 220
    finally:
        client.close()
