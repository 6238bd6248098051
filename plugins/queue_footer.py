"""A footer (disclaimer, tag line) on the text of outgoing mail.

Hooks: ``gateway_startup`` (refuses a chain that lists ``queue_dkim_sign`` before this
plugin) and ``gateway_queue``. For mail of the selected ``direction`` (by default ``outbound``:
relay clients and authenticated users; ``inbound`` is everyone else; or ``all``) it adds
``text`` to the message's ``text/plain`` body and ``html`` (by default ``text``, escaped,
in a ``<div>``) to its ``text/html`` body, before ``</body>`` when there is one:

- single-part messages, ``multipart/alternative`` (both alternatives), and
  ``multipart/mixed`` / ``related`` (only the body part: attachments are never touched);
- base64 and quoted-printable parts are decoded and encoded again the same way; 7bit
  text that needs more than ASCII becomes quoted-printable; the charset is kept when it
  can hold the footer, else the part becomes UTF-8;
- signed or encrypted content, and parts in a charset or encoding Python cannot decode,
  are left alone;
- every byte of the parts it does not change is kept (see ``plugins/_mime_footer.py``).

It never adds the footer twice: a message that already has the ``marker_header`` field
is passed on unchanged, and so is a part that already contains the footer text. The
field (``X-Footer-Added: <our hostname>``) is added whenever the footer was, and the
change is noted with :func:`gateway.authres.note_change` (``"footer"``), which is what
``queue_arc_seal`` (after this plugin) seals by default.

**Order.** List it before ``queue_dkim_sign``: the signature must cover the body with
the footer, or every receiver sees a broken signature (start-up refuses the other order). A gateway that must pass on
mail signed elsewhere should leave that mail to an ``inbound``/``outbound`` choice
that excludes it. The work (parsing and re-encoding) runs in the thread pool.

**Cost of a large message.** The footer needs the decoded text parts, so for mail it
changes the body is read into memory in the thread (for a message spooled to disk, one
read of the body; the header block is already in memory) and the new body is held
until the message is queued.

Settings: ``text`` (default empty: add nothing), ``html``, ``direction`` (default
``outbound``), ``marker_header`` (default ``X-Footer-Added``).
"""

from __future__ import annotations

import html as html_lib
import logging
from dataclasses import dataclass, field
from typing import Literal

from gateway.authres import note_change
from gateway.context import Gateway
from gateway.hooks import hookimpl
from gateway.model import Message, Session, Transaction
from plugins._mime_footer import FooterText, Result, add_footer

__all__ = ["Settings", "check_order", "footer_texts", "footer_message_in_thread"]

log = logging.getLogger("plugins.queue_footer")


@dataclass(frozen=True)
class Settings:
    """Settings of ``queue_footer``."""

    text: str = field(default="", metadata={"doc": "the footer added to text/plain parts (empty: none)"})
    html: str = field(default="", metadata={"doc": "the footer for text/html parts; empty = text, escaped, in a <div>"})
    direction: Literal["outbound", "inbound", "all"] = field(
        default="outbound", metadata={"doc": "outbound (relay clients, authenticated), inbound or all"}
    )
    marker_header: str = field(
        default="X-Footer-Added", metadata={"doc": "field added with the footer; mail that has it is left alone"}
    )


def footer_texts(settings: Settings) -> FooterText:
    """The plain and HTML footers (the HTML one derived from the text when not given)."""
    text = settings.text.replace("\r\n", "\n")
    html = settings.html.replace("\r\n", "\n")
    if not html:
        html = '<div class="footer">' + html_lib.escape(text).replace("\n", "<br>\n") + "</div>"
    return FooterText(text, html)


def footer_message_in_thread(message: Message, footer: FooterText) -> Result | None:
    """Parse and re-encode off the event loop (the body may be megabytes). The header
    block is the one in memory; the body is read here, once (from disk, for a spooled
    message), never the whole message besides."""
    return add_footer(message.head, message.body, footer)


def check_order(names: list[str]) -> None:
    """Refuse a chain that signs before it adds the footer (the signature would break)."""
    footers = [i for i, name in enumerate(names) if name == "queue_footer"]
    signers = [i for i, name in enumerate(names) if name == "queue_dkim_sign"]
    if footers and signers and min(signers) < max(footers):
        raise ValueError(
            "queue_footer must come before queue_dkim_sign in [[plugins]]: "
            "a footer added after signing breaks the DKIM signature"
        )


@hookimpl
def gateway_startup(gateway: Gateway, settings: Settings) -> None:
    check_order([entry.name for entry in gateway.policy.plugins])


def _is_outbound(session: Session) -> bool:
    return session.is_relay_client or session.is_authenticated


@hookimpl
async def gateway_queue(
    session: Session, txn: Transaction, message: Message, gateway: Gateway, settings: Settings
) -> None:
    if not settings.text.strip():
        return None
    if settings.direction != "all" and (settings.direction == "outbound") != _is_outbound(session):
        return None
    if message.header_values(settings.marker_header):
        log.debug("txn=%s footer already added", txn.id)
        return None
    result = await gateway.run_in_thread(footer_message_in_thread, message, footer_texts(settings))
    if result is None:
        log.debug("txn=%s no text part to add a footer to", txn.id)
        return None
    for change in result.headers:
        message.remove_headers(change.name)
        message.prepend_header(change.name, change.value)
    message.replace_body(result.body)
    message.prepend_header(settings.marker_header, gateway.hostname)
    note_change(txn, "footer")
    log.info("txn=%s footer added to %s", txn.id, ",".join(result.parts))
    return None
