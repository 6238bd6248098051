"""DMARC aggregate reports: the counts in the store, the XML (valid against RFC 7489
Appendix C's schema), report URIs and the report mail."""

from __future__ import annotations

import asyncio
import email
import email.policy
import gzip
from pathlib import Path

import pytest
import xmlschema

from gateway.state.sqlite import SqliteStore
from plugins._dmarc_report import (
    DomainReport,
    Evaluation,
    Published,
    aggregate_xml,
    period_begin,
    read_period,
    record_evaluation,
)
from plugins._dmarc_report_mail import ReportUri, parse_uri, report_filename, report_mail

SCHEMA = Path(__file__).parent.parent / "fixtures" / "dmarc" / "rua.xsd"
DAY = 86400.0
NOW = 1_796_000_000.0  # some afternoon, UTC

PUB = Published("example.org", "reject", "quarantine", 100, "r", "s", "0", ("mailto:d@example.org",))
PASS = Evaluation(
    "192.0.2.1", "example.org", "example.org", "none", "pass", "pass", (),
    (("example.org", "sel1", "pass"),), (("example.org", "mfrom", "pass"),),
)
FAIL = Evaluation(
    "2001:db8::25", "example.org", "", "none", "fail", "fail", (("sampled_out", ""),),
    (("evil.example", "s", "fail"), ("example.org", "", "permerror")), (),
)


@pytest.fixture(scope="module")
def schema() -> xmlschema.XMLSchema:
    return xmlschema.XMLSchema(str(SCHEMA))


def counts(xml: bytes) -> dict[str, int]:
    doc = xmlschema.XMLSchema(str(SCHEMA)).to_dict(xml.decode())
    return {r["row"]["source_ip"]: r["row"]["count"] for r in doc["record"]}


def test_periods_start_at_utc_midnight() -> None:
    assert period_begin(NOW, DAY) % 86400 == 0 and period_begin(NOW, DAY) <= NOW < period_begin(NOW, DAY) + DAY
    assert period_begin(NOW, 3600) == NOW // 3600 * 3600


def test_report_is_valid_against_the_rfc_schema(schema: xmlschema.XMLSchema) -> None:
    report = DomainReport(PUB, ((PASS, 5), (FAIL, 2)))
    xml = aggregate_xml(report, org_name="Example Receiver", email="dmarc@receiver.example",
                        report_id="r1", begin=100, end=199)
    schema.validate(xml.decode())
    doc = schema.to_dict(xml.decode())
    assert doc["policy_published"]["sp"] == "quarantine" and doc["policy_published"]["aspf"] == "s"
    assert doc["report_metadata"]["date_range"] == {"begin": 100, "end": 199}
    # IPv6 is written out in full: the schema's pattern takes no other form.
    assert counts(xml) == {"192.0.2.1": 5, "2001:0db8:0000:0000:0000:0000:0000:0025": 2}
    failing = doc["record"][1]
    assert failing["row"]["policy_evaluated"]["reason"] == [{"type": "sampled_out"}]
    # No SPF result recorded: the schema wants one, "none" for the envelope domain.
    assert failing["auth_results"]["spf"] == [{"domain": None, "scope": "mfrom", "result": "none"}]


def test_schema_refuses_what_it_should(schema: xmlschema.XMLSchema) -> None:
    # The fixture is a real check: a report without policy_published is invalid.
    xml = aggregate_xml(DomainReport(PUB, ((PASS, 1),)), org_name="o", email="e", report_id="r", begin=0, end=1)
    broken = xml.replace(b"<disposition>none</disposition>", b"<disposition>bounce</disposition>")
    with pytest.raises(xmlschema.XMLSchemaValidationError):
        schema.validate(broken.decode())


def test_store_counts_rows_by_period_and_domain(tmp_path: Path) -> None:
    other = Published("other.example", "none", "none", 100, "r", "r", "0", ("mailto:x@other.example",))

    async def body() -> tuple[list[DomainReport], list[DomainReport]]:
        store = SqliteStore(tmp_path / "s.db")
        try:
            for _ in range(3):
                await record_evaluation(store, NOW, DAY, PUB, PASS)
            await record_evaluation(store, NOW + 1, DAY, PUB, FAIL)
            await record_evaluation(store, NOW, DAY, other, PASS)
            await record_evaluation(store, NOW + DAY, DAY, PUB, PASS)  # the next day
            begin = period_begin(NOW, DAY)
            return await read_period(store, begin), await read_period(store, begin + int(DAY), ["example.org"])
        finally:
            await store.close()

    today, tomorrow = asyncio.run(body())
    assert [r.published.domain for r in today] == ["example.org", "other.example"]
    assert today[0].rows == ((PASS, 3), (FAIL, 1)) and today[0].messages == 4
    assert today[1].rows == ((PASS, 1),)
    assert [(r.published, r.rows) for r in tomorrow] == [(PUB, ((PASS, 1),))]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mailto:dmarc@example.org", ReportUri("dmarc@example.org", "example.org")),
        ("mailto:dmarc@Example.ORG!10m", ReportUri("dmarc@example.org", "example.org", 10 << 20)),
        (" mailto:d%40x@example.org!512 ", ReportUri("d@x@example.org", "example.org", 512)),
        ("mailto:d@example.org!2k", ReportUri("d@example.org", "example.org", 2048)),
        ("mailto:d@example.org?subject=x", ReportUri("d@example.org", "example.org")),
        ("https://example.org/report", None),
        ("mailto:d@example.org!10x", None),
        ("mailto:nobody", None),
        ("mailto:a@example.org,b@example.org", None),
    ],
)
def test_parse_uri(text: str, expected: ReportUri | None) -> None:
    assert parse_uri(text) == expected


def test_report_mail_is_as_rfc_7489_7_2_1_1_says() -> None:
    xml = b"<?xml version='1.0'?><feedback/>"
    raw = report_mail(
        xml, receiver="mx.receiver.example", org_name="Receiver", domain="example.org", report_id="r-1",
        begin=100, end=199, sender="dmarc@receiver.example", recipients=["a@example.org", "b@example.org"],
        hostname="mx.receiver.example", now=NOW,
    )
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert message["Subject"] == "Report Domain: example.org Submitter: Receiver Report-ID: <r-1>"
    assert message["To"] == "a@example.org, b@example.org" and message["From"] == "dmarc@receiver.example"
    attachments = list(message.iter_attachments())
    assert len(attachments) == 1
    part = attachments[0]
    assert part.get_content_type() == "application/gzip"
    assert part.get_filename() == report_filename("mx.receiver.example", "example.org", 100, 199)
    assert part.get_filename() == "mx.receiver.example!example.org!100!199.xml.gz"
    assert gzip.decompress(part.get_content()) == xml


@pytest.mark.parametrize(
    ("fo", "dkim", "spf", "dkim_failed", "spf_failed", "expected"),
    [
        ("0", "fail", "fail", False, False, True),  # DMARC failed
        ("0", "pass", "fail", False, True, False),  # one aligned pass: DMARC passed
        ("1", "pass", "fail", False, False, True),  # any mechanism without an aligned pass
        ("1", "pass", "pass", False, False, False),
        ("d", "pass", "pass", True, False, True),  # a signature failed, aligned or not
        ("d", "fail", "fail", False, True, False),
        ("s", "pass", "pass", False, True, True),
        ("0:s", "pass", "pass", False, True, True),
        ("", "fail", "fail", False, False, True),  # no fo: 0
    ],
)
def test_fo_decides_which_failures_are_reported(
    fo: str, dkim: str, spf: str, dkim_failed: bool, spf_failed: bool, expected: bool
) -> None:
    from plugins._dmarc_failure import wants_report

    assert wants_report(fo, dkim, spf, dkim_failed, spf_failed) is expected


def test_redact_keeps_domains_not_local_parts() -> None:
    from plugins._dmarc_failure import redact

    header = (
        b'From: "Ceo" <ceo.x+tag@example.org>\r\nTo: a@b.example, "Bob" <bob@c.example>\r\n'
        b"Message-ID: <1234@mail.example.org>\r\nSubject: about a@b.example\r\n\r\n"
    )
    assert redact(header) == (
        b'From: "Ceo" <redacted@example.org>\r\nTo: redacted@b.example, "Bob" <redacted@c.example>\r\n'
        b"Message-ID: <redacted@mail.example.org>\r\nSubject: about redacted@b.example\r\n\r\n"
    )


@pytest.mark.parametrize("is_worker", [False, True])
def test_only_the_master_runs_the_report_timer(tmp_path: Path, is_worker: bool) -> None:
    # With [server] workers, every process loads the plugin; the node's reports are sent
    # by the master alone (the store's claim would stop a second copy, at the cost of a
    # state round trip per worker and period).
    from concurrent.futures import ThreadPoolExecutor

    from gateway.context import Gateway
    from gateway.testing import prepare_policy
    from plugins.data_dmarc import Plugin, Settings

    policy = prepare_policy('[server]\nhostname = "mx.test.example"\n', tmp_path)
    settings = Settings(aggregate_reports=True)

    async def started() -> list[str]:
        with ThreadPoolExecutor(2) as pool:
            gateway = Gateway(policy=policy, runner=None, queue=None, executor=pool,  # type: ignore[arg-type]
                              hostname="mx.test.example", is_worker=is_worker)
            plugin = Plugin()
            await plugin.gateway_startup(gateway=gateway, settings=settings)
            try:
                return sorted(t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("dmarc"))
            finally:
                await plugin.gateway_shutdown(settings=settings)

    assert asyncio.run(started()) == ([] if is_worker else ["dmarc-reports"])
