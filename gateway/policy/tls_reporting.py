"""The ``[tls_reporting]`` section: SMTP TLS reports (RFC 8460) about our remote deliveries.

Off by default: a report goes to whoever a recipient domain names in its ``_smtp._tls``
TXT record, on the Internet, and tells them our sending addresses and how much mail we
sent them; a site turns it on once it has a reporting address (and, ideally, a DKIM key
for it in ``queue_dkim_sign``). See docs/remote-delivery.md#tls-reporting-rfc-8460.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.policy.schema import setting
from gateway.policy.units import Duration
from gateway.state.registry import check_url

__all__ = ["TlsReportingSettings"]


@dataclass(frozen=True)
class TlsReportingSettings:
    """TLS reporting (RFC 8460) of remote delivery: ``[tls_reporting]``."""

    enabled: bool = setting(
        False, "count each MX delivery's TLS outcome per policy domain and send the daily reports (master)"
    )
    state: str = setting("sqlite", 'store of the counts, shared by workers (and nodes): "sqlite" or "redis://..."')
    period: Duration = setting(86400.0, "reporting period (aligned to UTC midnight when it divides a day)", min=1)
    report_from: str = setting("", "From and envelope sender of report mail; empty: tlsrpt-noreply@<hostname>")
    org_name: str = setting("", "organization-name of the reports and Submitter of their subject; empty: the hostname")
    contact_info: str = setting("", "contact-info of the reports; empty: report_from")
    https_ca_file: Path | None = setting(None, "CA bundle for https: report destinations; default: the system's")
    https_timeout: Duration = setting(30.0, "limit for one report POST to an https: destination", min=0.001)

    def __post_init__(self) -> None:
        check_url(self.state)
