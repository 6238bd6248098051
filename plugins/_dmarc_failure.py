"""DMARC failure reports (RFC 7489 §7.3, ``ruf=``), redacted, for ``data_dmarc``.

Off unless ``failure_reports = true``. A failure report describes one message, so it
carries personal data: ours never carries the body, and every address in the copied
header fields has its local part replaced by ``redacted`` (RFC 6590), so the report says
which domains and hosts were involved, not who wrote to whom.

- :func:`wants_report`: the record's ``fo=`` options decide (§6.3): ``0`` (the default)
  when no mechanism gave an aligned pass (DMARC failed), ``1`` when any did not, ``d``
  when a DKIM signature failed to verify, ``s`` when SPF failed.
- :func:`failure_mail`: the report, an RFC 6591 authentication failure report:
  ``multipart/report; report-type=feedback-report`` with a text part, a
  ``message/feedback-report`` part (``Feedback-Type: auth-failure``, ``Auth-Failure:
  dmarc``, ``Reported-Domain``, ``Source-IP``, ``Identity-Alignment``, ``Delivery-Result``
  ...) and the redacted header section as ``text/rfc822-headers``.
"""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass

__all__ = ["Failure", "failure_mail", "redact", "wants_report"]

#: the most of the original header section a report copies
MAX_HEADER = 32 * 1024
_ADDRESS = re.compile(rb"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\-\"]+@(?=[A-Za-z0-9\[])")


@dataclass(frozen=True, slots=True)
class Failure:
    """One failing message, as its failure report describes it.

    :param domain: the author domain (``Reported-Domain``)
    :param source_ip: the connecting client
    :param envelope_domain: the MAIL FROM domain ("" for the null sender)
    :param dkim: the aligned DKIM verdict (pass or fail)
    :param spf: the aligned SPF verdict (pass or fail)
    :param authentication: the ``dmarc=...; spf=...; dkim=...`` results, for the report
    :param delivery: ``delivered``, ``spam`` (quarantined) or ``reject``
    :param header: the redacted header section of the message
    :param arrival: when the message arrived (seconds since the epoch)
    """

    domain: str
    source_ip: str
    envelope_domain: str
    dkim: str
    spf: str
    authentication: str
    delivery: str
    header: bytes
    arrival: float


def wants_report(fo: str, dkim: str, spf: str, dkim_failed: bool, spf_failed: bool) -> bool:
    """Whether the record's ``fo=`` asks for a report on this message (RFC 7489 §6.3).

    :param fo: the record's ``fo`` value (``0:d``, ``1`` ...)
    :param dkim: the aligned DKIM verdict
    :param spf: the aligned SPF verdict
    :param dkim_failed: a DKIM signature failed to verify, aligned or not
    :param spf_failed: SPF gave ``fail``, aligned or not
    """
    options = {o.strip().lower() for o in fo.split(":") if o.strip()} or {"0"}
    return (
        ("0" in options and dkim != "pass" and spf != "pass")
        or ("1" in options and (dkim != "pass" or spf != "pass"))
        or ("d" in options and dkim_failed)
        or ("s" in options and spf_failed)
    )


def redact(header: bytes) -> bytes:
    """The header section with every address's local part replaced by ``redacted``."""
    return _ADDRESS.sub(b"redacted@", header[:MAX_HEADER])


def failure_mail(
    failure: Failure, *, sender: str, recipients: list[str], org_name: str, hostname: str, now: float
) -> bytes:
    """The failure report message (CRLF line ends)."""
    from email.mime.base import MIMEBase
    from email.mime.multipart import MIMEMultipart
    from email.mime.text import MIMEText

    alignment = [m for m, v in (("dkim", failure.dkim), ("spf", failure.spf)) if v == "pass"] or ["none"]
    fields = [
        "Feedback-Type: auth-failure",
        "User-Agent: smtp-gateway",
        "Version: 1",
        "Original-Mail-From: " + (f"<redacted@{failure.envelope_domain}>" if failure.envelope_domain else "<>"),
        f"Arrival-Date: {email.utils.formatdate(failure.arrival, usegmt=True)}",
        f"Reporting-MTA: dns; {hostname}",
        f"Source-IP: {failure.source_ip}",
        f"Authentication-Results: {hostname}; {failure.authentication}",
        "Auth-Failure: dmarc",
        f"Reported-Domain: {failure.domain}",
        f"Identity-Alignment: {', '.join(alignment)}",
        f"Delivery-Result: {failure.delivery}",
    ]
    report = MIMEMultipart("report", report_type="feedback-report")
    report["From"] = sender
    report["To"] = ", ".join(recipients)
    report["Subject"] = f"DMARC failure report for {failure.domain} from {failure.source_ip}"
    report["Date"] = email.utils.formatdate(now, usegmt=True)
    report["Message-ID"] = email.utils.make_msgid("dmarc-failure", domain=hostname)
    report.attach(MIMEText(
        f"A message claiming to be from {failure.domain} failed DMARC at {org_name}.\n"
        "Its header follows, every address's local part redacted; the body is not included.\n"
    ))
    feedback = MIMEBase("message", "feedback-report")
    feedback.set_payload("\r\n".join(fields) + "\r\n")
    report.attach(feedback)
    headers = MIMEBase("text", "rfc822-headers")
    headers.set_payload(failure.header.decode("ascii", "replace"))
    report.attach(headers)
    data = report.as_bytes()
    return re.sub(rb"\r?\n", b"\r\n", data)
