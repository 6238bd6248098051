"""The footer editor: MIME-correct, and every byte it does not mean to change is kept."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

from gateway.model import Message
from plugins._mime_footer import FooterText, add_footer
from plugins.queue_footer import Settings, footer_texts

FOOTER = FooterText("-- \nSent from Example Corp", "<p>Sent from Example Corp</p>")
FOOTER_TM = FooterText("Example Corp\u2122", "<p>Example Corp&trade;</p>")
ATTACHMENT = bytes(range(256)) * 8


def multipart(plain_charset: str = "iso-8859-1") -> bytes:
    msg = EmailMessage()
    msg["From"] = "alice@out.example"
    msg["To"] = "bob@remote.example"
    msg["Subject"] = "report"
    msg["Date"] = "Tue, 25 Nov 2026 10:00:00 +0000"
    msg["Message-ID"] = "<report@out.example>"
    msg.set_content("Gr\u00fc\u00dfe aus M\u00fcnchen\nZweite Zeile\n", charset=plain_charset, cte="quoted-printable")
    msg.add_alternative("<html><body><p>Gr\u00fc\u00dfe</p></body></html>\n", subtype="html", cte="base64")
    msg.add_attachment(ATTACHMENT, maintype="application", subtype="octet-stream", filename="data.bin")
    msg.preamble = "This is a multi-part message in MIME format."
    msg.epilogue = "epilogue text"
    return msg.as_bytes(policy=email.policy.SMTP)


def apply(raw: bytes, footer: FooterText = FOOTER) -> bytes | None:
    message = Message(raw)
    result = add_footer(raw[: message.body_offset], message.body, footer)
    if result is None:
        return None
    for change in result.headers:
        message.remove_headers(change.name)
        message.prepend_header(change.name, change.value)
    message.replace_body(result.body)
    return message.as_bytes()


def parts(raw: bytes) -> dict[str, email.message.EmailMessage]:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    return {p.get_content_type(): p for p in parsed.walk() if not p.is_multipart()}


def attachment_part_bytes(raw: bytes) -> bytes:
    start = raw.index(b"Content-Type: application/octet-stream")
    return raw[start : raw.index(b"\r\n--", start)]


def test_multipart_alternative_with_attachment_gets_the_footer_in_both_texts() -> None:
    raw = multipart()
    out = apply(raw)
    assert out is not None
    found = parts(out)
    plain, html = found["text/plain"], found["text/html"]
    assert plain["Content-Transfer-Encoding"] == "quoted-printable"
    assert html["Content-Transfer-Encoding"] == "base64"
    assert plain.get_content_charset() == "iso-8859-1"  # the footer fits: charset kept
    assert plain.get_content().replace("\r\n", "\n") == (
        "Gr\u00fc\u00dfe aus M\u00fcnchen\nZweite Zeile\n\n-- \nSent from Example Corp\n"
    )
    assert "<p>Sent from Example Corp</p>\n</body>" in html.get_content()
    assert found["application/octet-stream"].get_content() == ATTACHMENT
    # Bytes outside the changed parts are the same: headers, attachment, preamble, epilogue.
    assert out.split(b"\r\n\r\n", 1)[0] == raw.split(b"\r\n\r\n", 1)[0]
    assert attachment_part_bytes(out) == attachment_part_bytes(raw)
    assert out.endswith(raw[raw.rindex(b"\r\n--") :])
    assert b"This is a multi-part message in MIME format." in out


def test_a_footer_the_charset_cannot_hold_turns_the_part_into_utf8() -> None:
    out = apply(multipart("iso-8859-1"), FOOTER_TM)
    assert out is not None
    plain = parts(out)["text/plain"]
    assert plain.get_content_charset() == "utf-8"
    assert plain["Content-Transfer-Encoding"] == "quoted-printable"
    assert plain.get_content().rstrip().endswith("Example Corp\u2122")
    assert "Gr\u00fc\u00dfe aus M\u00fcnchen" in plain.get_content()


def test_single_part_7bit_ascii_becomes_quoted_printable_utf8_when_needed() -> None:
    raw = (
        b"From: alice@out.example\r\nSubject: hi\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=us-ascii; format=flowed\r\n\r\nHello.\r\n"
    )
    out = apply(raw, FOOTER_TM)
    assert out is not None
    parsed = email.message_from_bytes(out, policy=email.policy.default)
    assert parsed.get_content_charset() == "utf-8"
    assert parsed.get_param("format") == "flowed"
    assert parsed["Content-Transfer-Encoding"] == "quoted-printable"
    assert parsed.get_content().replace("\r\n", "\n") == "Hello.\n\nExample Corp\u2122\n"
    assert len(parsed.get_all("Content-Type")) == 1


def test_a_plain_ascii_footer_on_a_plain_message_changes_no_header() -> None:
    raw = b"From: alice@out.example\r\nSubject: hi\r\n\r\nHello.\r\n"
    out = apply(raw)
    assert out == b"From: alice@out.example\r\nSubject: hi\r\n\r\nHello.\r\n\r\n-- \r\nSent from Example Corp\r\n"


def test_the_footer_is_never_added_twice() -> None:
    once = apply(multipart())
    assert once is not None
    assert apply(once) is None
    single = apply(b"Subject: x\r\n\r\nbody\r\n")
    assert single is not None and apply(single) is None


def test_signed_encrypted_and_attachment_only_mail_is_left_alone() -> None:
    signed = (
        b'Content-Type: multipart/signed; protocol="application/pgp-signature"; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nsigned text\r\n--b\r\n"
        b"Content-Type: application/pgp-signature\r\n\r\nSIG\r\n--b--\r\n"
    )
    assert apply(signed) is None
    attached = (
        b"Content-Type: text/plain; name=x.txt\r\nContent-Disposition: attachment; filename=x.txt\r\n\r\nfile\r\n"
    )
    assert apply(attached) is None
    unknown_charset = b"Content-Type: text/plain; charset=x-no-such-charset\r\n\r\ntext\r\n"
    assert apply(unknown_charset) is None


def test_mixed_text_body_gets_it_text_attachment_does_not() -> None:
    raw = (
        b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="xx"\r\n\r\n'
        b"--xx\r\nContent-Type: text/plain\r\n\r\nthe body\r\n"
        b"--xx\r\nContent-Type: text/plain\r\nContent-Disposition: attachment; filename=a.txt\r\n\r\nattached text\r\n"
        b"--xx--\r\n"
    )
    out = apply(raw)
    assert out is not None
    assert out.count(b"Sent from Example Corp") == 1
    assert b"the body\r\n\r\n-- \r\nSent from Example Corp\r\n--xx\r\n" in out
    assert out.endswith(b"attached text\r\n--xx--\r\n")


def test_html_footer_defaults_to_the_escaped_text() -> None:
    footer = footer_texts(Settings(text="A & B <legal>\nline two"))
    assert footer.html == '<div class="footer">A &amp; B &lt;legal&gt;<br>\nline two</div>'


def test_a_line_that_only_starts_like_the_boundary_is_text() -> None:
    raw = (
        b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="xx"\r\n\r\n'
        b"preamble\r\n--xx\r\nContent-Type: text/plain\r\n\r\nline one\r\n--xxnot a delimiter\r\nlast\r\n"
        b"--xx \r\nContent-Type: application/octet-stream\r\n\r\nAAAA\r\n--xx--\r\n"
    )
    out = apply(raw)
    assert out is not None
    assert b"--xxnot a delimiter\r\nlast\r\n\r\n-- \r\nSent from Example Corp\r\n--xx \r\n" in out
    assert out.startswith(raw[: raw.index(b"line one")])
