"""Domain lists (RHSBL) on the HELO name, the MAIL FROM domain and the body's URLs."""

from __future__ import annotations

from tests.conftest import MESSAGE
from tests.integration.dnsbl.conftest import (
    REFUSED,
    SENT,
    SPECS,
    client,
    envelope_notes,
    policy,
    split,
    zone,
)

CODES = '{ "127.0.1.2" = "reject", "127.0.1.10" = { action = "score", score = 1.5 } }'


def dbl(*targets: str, **fields: object) -> str:
    return zone("dbl.test", type='"domain"', targets=repr(list(targets)).replace("'", '"'), **fields)


def body_message(body: bytes, headers: bytes = b"") -> bytes:
    return (
        b"From: <a@example.org>\r\nTo: <alice@localhost>\r\nSubject: links\r\n"
        + headers + b"\r\n" + body
    )


def test_sender_domain_codes_reject_and_score(gateway_factory, dns) -> None:
    gw = gateway_factory(policy(dns.port, dbl("mail_from", codes=CODES)), specs=SPECS)
    with client(gw.port) as c:
        assert c.mail("someone@Spam.Example")[0] == SENT
        status, text = split(c.rcpt("alice@localhost"))
        assert status == REFUSED
        assert "Sender domain [spam.example] blocked using dbl.test" in text
        assert "https://dbl.test/lookup/spam.example" in text
        assert c.rcpt("postmaster@localhost")[0] == SENT
        c.rset()
        # Another code of the same list only scores.
        assert c.sendmail("someone@grey.example", ["alice@localhost"], MESSAGE) == {}
    (qid,) = gw.queue_ids()
    notes = gw.queue.load(qid).envelope.notes
    assert [(n["plugin"], n["score"]) for n in notes] == [("connect_dnsbl", 1.5)]


def test_sender_domain_refused_at_mail_when_not_delayed(gateway_factory, dns) -> None:
    gw = gateway_factory(policy(dns.port, 'reject_at = "connect"\n' + dbl("mail_from")), specs=SPECS)
    with client(gw.port) as c:
        status, text = split(c.mail("someone@spam.example"))
        assert status == REFUSED and "dbl.test" in text
        assert c.mail("<>")[0] == SENT  # the null sender has no domain to look up


def test_helo_name_refused_at_helo(gateway_factory, dns) -> None:
    gw = gateway_factory(policy(dns.port, 'reject_at = "connect"\n' + dbl("helo")), specs=SPECS)
    with client(gw.port, helo="badhelo.example") as c:  # its EHLO was refused: again
        for reply in (c.ehlo(), c.helo()):
            status, text = split(reply)
            assert status == REFUSED
            assert "HELO name [badhelo.example] blocked using dbl.test" in text
        assert split(c.mail("a@example.org"))[0][0] == 503  # no greeting accepted


def test_helo_name_refused_at_rcpt_but_not_the_sender_when_only_helo_is_a_target(
    gateway_factory, dns
) -> None:
    gw = gateway_factory(policy(dns.port, dbl("helo")), specs=SPECS)
    with client(gw.port, helo="client.test.example") as c:
        # HELO not listed; spam.example is, but MAIL FROM is not a target of this list.
        assert c.sendmail("someone@spam.example", ["alice@localhost"], MESSAGE) == {}
    with client(gw.port, helo="badhelo.example") as c:
        c.mail("someone@example.org")
        status, text = split(c.rcpt("alice@localhost"))
        assert status == REFUSED and "HELO name [badhelo.example]" in text


def test_body_domains_refused_at_data(gateway_factory, dns) -> None:
    gw = gateway_factory(policy(dns.port, dbl("body")), specs=SPECS)
    # Quoted-printable hides the host from a naive scan: the plugin decodes text parts.
    body = b"See http://www.ok.example/ and <a href=3D\"https://user@EV=\r\nIL.example:8443/x\">this</a>\r\n"
    message = body_message(body, b"Content-Type: text/html\r\nContent-Transfer-Encoding: quoted-printable\r\n")
    with client(gw.port) as c:
        c.mail("a@example.org")
        assert c.rcpt("alice@localhost")[0] == SENT
        status, text = split(c.data(message))
        assert status == REFUSED
        assert "Message body domain [evil.example] blocked using dbl.test" in text
    with client(gw.port) as c:  # mail for postmaster only still goes through
        assert c.sendmail("a@example.org", ["postmaster@localhost"], message) == {}
    (qid,) = gw.queue_ids()
    assert any("evil.example listed at dbl.test" in note for note in envelope_notes(gw, qid))


def test_clean_body_is_queued(gateway_factory, dns) -> None:
    gw = gateway_factory(policy(dns.port, dbl("body")), specs=SPECS)
    with client(gw.port) as c:
        assert c.sendmail("a@example.org", ["alice@localhost"], body_message(b"http://fine.example/\r\n")) == {}
    assert len(gw.queue_ids()) == 1


def test_reply_template_and_default_action(gateway_factory, dns) -> None:
    reply = '"Mail from {target} refused ({code}), see {txt}"'
    gw = gateway_factory(policy(dns.port, dbl("mail_from", reply=reply)), specs=SPECS)
    with client(gw.port) as c:
        c.mail("someone@spam.example")
        status, text = split(c.rcpt("alice@localhost"))
    assert status == REFUSED
    assert text == "Mail from spam.example refused (127.0.1.2), see https://dbl.test/lookup/spam.example"
