"""Refuse messages whose Subject contains a blocked word (an example plugin).

Hook: ``gateway_data``. Settings: ``blocked`` (words, case-insensitive; default none),
``score`` (0: refuse with 550 5.7.1; above 0: add that score instead and let the
policy's [scoring] decide).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway import Reply, Verdict, hookimpl


@dataclass(frozen=True)
class Settings:
    """Settings of ``data_subject_filter``."""

    blocked: tuple[str, ...] = field(default=(), metadata={"doc": "words refused in the Subject"})
    score: float = field(default=0.0, metadata={"doc": "0: refuse; otherwise add this score"})


@hookimpl
def gateway_data(txn, message, settings: Settings):  # type: ignore[no-untyped-def]
    subject = " ".join(message.header_values("Subject")).lower()
    hit = next((word for word in settings.blocked if word.lower() in subject), None)
    if hit is None:
        return None
    if settings.score:
        txn.results.add("data_subject_filter", settings.score, f"subject contains {hit!r}")
        return None
    return Verdict.reject(Reply(550, "5.7.1", "Message refused by content policy"), reason=f"subject contains {hit!r}")
