"""The console's preview: text only, never the message's HTML."""

from __future__ import annotations

from gateway.console.preview import header_summary, html_to_text, preview


def test_html_becomes_text_without_scripts_styles_or_tags() -> None:
    html = ("<html><head><title>T</title><style>p{color:red}</style></head><body>"
            "<script>alert(1)</script><p>Hello <b>you</b>,</p><img src='http://x/y'><p>bye</p></body></html>")
    assert html_to_text(html) == "Hello you,\n\nbye"


def test_the_plain_part_is_preferred_and_attachments_are_listed() -> None:
    data = (
        b"From: a@example.org\r\nTo: b@example.org\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XX\r\n\r\n"
        b"--XX\r\nContent-Type: multipart/alternative; boundary=YY\r\n\r\n"
        b"--YY\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nplain words\r\n"
        b"--YY\r\nContent-Type: text/html\r\n\r\n<p>html words</p>\r\n--YY--\r\n"
        b"--XX\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename=\"bill.pdf\"\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0=\r\n--XX--\r\n"
    )
    shown = preview(data)
    assert shown.source == "text/plain" and shown.text.strip() == "plain words"
    assert ("Subject", "café") in shown.headers
    assert shown.attachments == [("bill.pdf", "application/pdf", 5)]


def test_html_only_is_shown_as_text_and_a_bad_charset_does_not_break_it() -> None:
    data = b"Subject: x\r\nContent-Type: text/html; charset=x-unknown\r\n\r\n<p>hi <script>x()</script>there</p>\r\n"
    shown = preview(data)
    assert shown.source == "text/html, shown as text"
    assert shown.text == "hi there"
    assert preview(b"Subject: nothing\r\nContent-Type: image/png\r\n\r\nxx").source == "no text part"


def test_the_summary_reads_only_headers() -> None:
    assert header_summary(b"Subject: Hi\r\nFrom: a@example.org\r\n\r\n")["Subject"] == "Hi"
