"""TLS reports (RFC 8460): the _smtp._tls record, the counts in a real state store, the
JSON document and the mail that carries it."""

from __future__ import annotations

import asyncio
import email
import email.policy
import gzip
import json
from pathlib import Path

import pytest

from gateway.delivery.remote.policy import TlsOutcome, TransportPolicy
from gateway.delivery.remote.tlsrpt import read_period, record_sessions, report_document, row_field
from gateway.delivery.remote.tlsrpt_mail import ReportUri, compress, parse_record, report_filename, report_mail
from gateway.delivery.remote.tlsrpt_send import describe
from gateway.state.sqlite import SqliteStore


def test_the_record_names_mailto_and_https_destinations() -> None:
    texts = ["v=TLSRPTv1; rua=mailto:tls@example.com,https://rpt.example.com/v1/tlsrpt,ftp://x.example"]
    assert parse_record(texts) == (
        ReportUri("mailto", "tls@example.com"), ReportUri("https", "https://rpt.example.com/v1/tlsrpt"),
    )
    assert parse_record(["v=spf1 -all", "v=TLSRPTv1;rua=mailto:a@b.example"]) == (ReportUri("mailto", "a@b.example"),)


@pytest.mark.parametrize(
    "texts",
    [
        [],
        ["v=TLSRPTv1; rua=mailto:a@b.example", "v=TLSRPTv1; rua=mailto:c@d.example"],  # RFC 8460 §3: not one
        ["v=TLSRPTv1"],
        ["v=TLSRPTv10; rua=mailto:a@b.example"],
    ],
)
def test_no_single_valid_record_means_no_reports(texts: list[str]) -> None:
    with pytest.raises(ValueError):
        parse_record(texts)


def test_outcomes_are_described_by_the_policy_that_applied() -> None:
    sts = TransportPolicy("example.com", "sts-enforce", ("*.mx.example.com",), "1", max_age=86400)
    policy, failure = describe(TlsOutcome(sts, "a.mx.example.com", "success"))
    assert failure is None
    assert policy.as_json() == {
        "policy-type": "sts",
        "policy-string": ["version: STSv1", "mode: enforce", "mx: *.mx.example.com", "max_age: 86400"],
        "policy-domain": "example.com",
        "mx-host": ["*.mx.example.com"],
    }
    none = TransportPolicy("plain.example")
    policy, failure = describe(TlsOutcome(none, "mx.plain.example", "starttls-not-supported", address="192.0.2.1"))
    assert policy.as_json() == {"policy-type": "no-policy-found", "policy-domain": "plain.example"}
    assert failure is not None and failure.as_json(2) == {
        "result-type": "starttls-not-supported", "receiving-mx-hostname": "mx.plain.example",
        "receiving-ip": "192.0.2.1", "failed-session-count": 2,
    }


def test_counts_from_several_writers_add_up_in_the_report(tmp_path: Path) -> None:
    sts = TransportPolicy("example.com", "sts-testing", ("mx.example.com",), "1", max_age=600)
    policy, _ = describe(TlsOutcome(sts, "mx.example.com", "success"))
    bad, failure = describe(
        TlsOutcome(sts, "mx.example.com", "certificate-expired", detail="expired", address="192.0.2.7", source="192.0.2.1")
    )

    async def main() -> dict[str, object]:
        store = SqliteStore(tmp_path / "state.sqlite3")
        await store.open()
        try:
            for _ in range(2):  # two processes flushing
                await record_sessions(store, 86400, 86400, 90000, {("example.com", row_field(policy, None)): 3})
                await record_sessions(store, 86400, 86400, 90000, {("example.com", row_field(bad, failure)): 1})
            (report,) = await read_period(store, 86400)
        finally:
            await store.close()
        return report_document(report, org_name="Org", contact="c@gw.example", report_id="r1", begin=86400, end=172800)

    document = asyncio.run(main())
    assert document["date-range"] == {"start-datetime": "1970-01-02T00:00:00Z", "end-datetime": "1970-01-03T00:00:00Z"}
    (entry,) = document["policies"]  # type: ignore[misc]
    assert entry["summary"] == {"total-successful-session-count": 6, "total-failure-session-count": 2}
    assert entry["failure-details"] == [{
        "result-type": "certificate-expired", "sending-mta-ip": "192.0.2.1", "receiving-mx-hostname": "mx.example.com",
        "receiving-ip": "192.0.2.7", "failed-session-count": 2, "failure-reason-code": "expired",
    }]


def test_the_mail_is_a_tlsrpt_report_with_the_gzip_attached() -> None:
    data = compress(b'{"a": 1}\n')
    name = report_filename("gw.example", "example.com", 0, 86400, "0")
    raw = report_mail(
        data, domain="example.com", org_name="Org", report_id="0.example.com@gw.example", filename=name,
        sender="tlsrpt@gw.example", recipients=["r@example.com"], hostname="gw.example", begin=0, end=86400, now=0,
    )
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert message["Subject"] == "Report Domain: example.com Submitter: Org Report-ID: <0.example.com@gw.example>"
    assert message["TLS-Report-Domain"] == "example.com" and message["TLS-Report-Submitter"] == "Org"
    assert message.get_content_type() == "multipart/report" and message.get_param("report-type") == "tlsrpt"
    (part,) = [p for p in message.iter_attachments()]
    assert part.get_content_type() == "application/tlsrpt+gzip"
    assert part.get_filename() == "gw.example!example.com!0!86400!0.json.gz"
    assert json.loads(gzip.decompress(part.get_content())) == {"a": 1}
