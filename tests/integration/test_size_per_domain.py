"""A recipient-domain override of ``limits.max_message_size``, over real SMTP (RFC 1870).

The base limit is 10 KB; mail to ``local.example`` may be 100 KB (the partner-domain
override of policies/edge-relay.toml, scaled down). EHLO advertises the larger; a
declared SIZE is refused per recipient at RCPT (552 5.3.4); DATA's limit is the
smallest of the accepted recipients'.
"""

from __future__ import annotations

import pytest

from gateway.testing import RunningGateway
from tests.conftest import BASE_POLICY, RawClient, smtp

BASE = 10 * 1024
PARTNER = 100 * 1024
POLICY = BASE_POLICY + """
[limits]
max_message_size = "10KB"

[[overrides]]
match = { recipient_domain = "local.example" }
limits = { max_message_size = "100KB" }
"""
TOO_BIG = 552, "5.3.4"
BIG = b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 400  # about 28 KB: between the limits


@pytest.fixture
def gw(gateway_factory) -> RunningGateway:
    return gateway_factory(POLICY)


def _send(gw: RunningGateway, rcpts: list[str], mail_options: tuple[str, ...] = ()) -> tuple[list[int], int, str]:
    """MAIL, each RCPT, DATA with BIG: the RCPT codes and the final reply."""
    with smtp(gw.port) as client:
        client.ehlo()
        assert client.mail("sender@example.org", list(mail_options))[0] == 250
        codes = [client.rcpt(r)[0] for r in rcpts]
        if 250 not in codes:
            return codes, 0, ""
        code, text = client.data(BIG)
        return codes, code, text.decode()


def test_ehlo_advertises_the_largest_limit_a_recipient_may_have(gw: RunningGateway) -> None:
    c = RawClient(gw.port)
    assert c.reply()[0] == 220
    code, lines = c.cmd("EHLO client.test.example")
    assert code == 250 and f"SIZE {PARTNER}" in lines


def test_message_over_the_base_limit_is_accepted_for_the_partner_domain(gw: RunningGateway) -> None:
    codes, code, text = _send(gw, ["alice@local.example"])
    assert codes == [250] and code == 250, text
    assert len(gw.queue_ids()) == 1


def test_the_same_message_is_refused_for_another_domain(gw: RunningGateway) -> None:
    codes, code, text = _send(gw, ["alice@localhost"])
    assert codes == [250]
    assert (code, text[:5]) == TOO_BIG
    assert gw.queue_ids() == []


def test_declared_size_is_refused_per_recipient_at_rcpt(gw: RunningGateway) -> None:
    # RFC 1870 §6.2: the recipient whose limit is too small is refused; the message
    # then goes to the others, under the smallest limit of those accepted.
    with smtp(gw.port) as client:
        client.ehlo()
        assert client.mail("sender@example.org", [f"SIZE={len(BIG)}"])[0] == 250
        code, text = client.rcpt("alice@localhost")
        assert (code, text.decode()[:5]) == TOO_BIG
        assert client.rcpt("bob@local.example")[0] == 250
        assert client.data(BIG)[0] == 250
    (qid,) = gw.queue_ids()
    assert [r.address for r in gw.queue.load(qid).envelope.recipients] == ["bob@local.example"]


def test_declared_size_over_every_limit_is_refused_at_mail(gw: RunningGateway) -> None:
    with smtp(gw.port) as client:
        client.ehlo()
        code, text = client.mail("sender@example.org", [f"SIZE={PARTNER + 1}"])
        assert (code, text.decode()[:5]) == TOO_BIG
        assert client.mail("sender@example.org", [f"SIZE={PARTNER}"])[0] == 250


def test_data_limit_is_the_smallest_of_the_accepted_recipients(gw: RunningGateway) -> None:
    # Without a declared SIZE both are accepted; one message cannot exceed either limit.
    codes, code, text = _send(gw, ["alice@local.example", "bob@localhost"])
    assert codes == [250, 250]
    assert (code, text[:5]) == TOO_BIG
    assert gw.queue_ids() == []
