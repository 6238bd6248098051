"""Mail from a sender every recipient allows skips the spam score (per-user allow lists).

Hook: ``gateway_data``. ``rcpt_user_lists`` notes, for each recipient, whether the
envelope sender is on that recipient's allow list (users edit it in the web console),
and splits transactions so that all recipients of one message answer alike. When
every recipient allows the sender, this plugin accepts the message at the data stage:
the data plugins after it in the chain and the policy's ``[scoring]`` step (the summed
score: spam scanners' ``scoring_weight``, HELO and DNS list findings) are skipped, so
the message is neither quarantined nor refused for its score and is queued for
delivery. Queue-stage plugins run as always.

What comes before it still decides: put it last among the data plugins, after
``data_clamav``, ``data_dkim_verify`` and ``data_dmarc``, so a virus or a DMARC
``reject`` is acted on whatever the lists say, and let the spam scanners score
through ``scoring_weight`` (their own ``quarantine_score`` and ``reject_score`` are
verdicts before this one). Without ``rcpt_user_lists`` in the chain it does nothing.

The envelope sender can be forged: an allow list helps most together with SPF, DKIM and
DMARC checks that refuse forgeries. No settings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gateway.hooks import hookimpl
from gateway.logs import short
from gateway.model import Transaction
from gateway.verdicts import Verdict
from plugins.rcpt_user_lists import ALLOWING

__all__ = ["Settings"]

log = logging.getLogger("plugins.data_user_lists")


@dataclass(frozen=True)
class Settings:
    """``data_user_lists`` has no settings."""


@hookimpl
async def gateway_data(txn: Transaction) -> Verdict | None:
    allowing = txn.stash.get(ALLOWING)
    if not allowing or not txn.recipients:
        return None
    if all(allowing.get(str(r.address).lower(), False) for r in txn.recipients):
        sender = short(f"{txn.sender.local}@{txn.sender.domain}", 80)
        log.info("txn=%s <%s> allowed by every recipient: no spam score", txn.id, sender)
        return Verdict.accept(reason=f"<{sender}> on every recipient's allow list")
    return None
