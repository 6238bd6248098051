"""The blocking ARC work (RFC 8617), run only through ``gateway.run_in_thread``.

ARC verification is split like DKIM's (see ``plugins/_dkim_sync.py``):
:func:`read_chain_in_thread` reads the message's ARC sets and checks their structure
(RFC 8617 §5.2 steps 1-3: at most 50 sets, each instance complete and unique, no gap,
the ``cv=`` values consistent), the plugin fetches every sealer's and signer's key with
the gateway's asynchronous resolver, and :func:`verify_chain_in_thread` has dkimpy check
the ARC-Message-Signature and every ARC-Seal against the records it was handed (dkimpy
never touches the network). :func:`seal_in_thread` adds the next ARC set (dkimpy's
``ARC.sign``) for ``queue_arc_seal``.

Every failure of a hostile chain ends as ``fail`` with a reason, never an exception.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import authres
import dkim
from dkim.util import InvalidTagValueList, parse_tag_value

from gateway.authres import AuthResult

__all__ = [
    "ArcChain",
    "ArcSet",
    "MAX_INSTANCES",
    "read_chain_in_thread",
    "seal_in_thread",
    "verify_chain_in_thread",
]

log = logging.getLogger("plugins.arc")
# dkimpy logs every failed check at ERROR level; a bad chain is not our error.
_QUIET = logging.getLogger("plugins._arc_sync.dkimpy")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False

#: RFC 8617 §4.2.1: i= runs from 1 to 50; a longer chain is invalid.
MAX_INSTANCES = 50

_ARC_FIELDS = ("arc-seal", "arc-message-signature", "arc-authentication-results")
_SHORT = {"arc-seal": "ARC-Seal", "arc-message-signature": "ARC-Message-Signature",
          "arc-authentication-results": "ARC-Authentication-Results"}
_AAR_INSTANCE = re.compile(r"^\s*i\s*=\s*([0-9]{1,5})\s*;")
_HEADER_LIMIT = 1024 * 1024  # header sections larger than this are not looked at further


@dataclass(frozen=True, slots=True)
class ArcSet:
    """One ARC set (instance) as it was read.

    :param instance: the ``i=`` value
    :param sealer: the ARC-Seal's ``d=`` domain (lower case): who added this set
    :param selector: the ARC-Seal's ``s=``
    :param cv: the ARC-Seal's ``cv=`` (none, pass, fail)
    :param signer: the ARC-Message-Signature's ``d=`` domain
    :param signer_selector: the ARC-Message-Signature's ``s=``
    :param results: what the sealer's ARC-Authentication-Results reports
        (empty when it cannot be parsed)
    """

    instance: int
    sealer: str
    selector: str
    cv: str
    signer: str
    signer_selector: str
    results: tuple[AuthResult, ...] = ()

    @property
    def key_names(self) -> tuple[str, str]:
        """The DNS names of the seal's and the signature's keys."""
        return f"{self.selector}._domainkey.{self.sealer}", f"{self.signer_selector}._domainkey.{self.signer}"


@dataclass(frozen=True, slots=True)
class ArcChain:
    """The ARC sets of a message (oldest first), or why the chain is broken already.

    :param sets: the sets, ``i=1`` first
    :param error: a structural fault: the chain fails without any key being fetched
    """

    sets: tuple[ArcSet, ...] = ()
    error: str = ""
    keys: frozenset[str] = field(default_factory=frozenset)


def _header_fields(raw: bytes) -> list[tuple[str, str]]:
    """(lower-case name, unfolded value) of every header field, up to the blank line."""
    end = raw.find(b"\r\n\r\n")
    head = raw[: end + 2 if end >= 0 else _HEADER_LIMIT][:_HEADER_LIMIT]
    fields: list[tuple[str, str]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + " " + line.decode("utf-8", "replace").strip())
        elif b":" in line:
            raw_name, _, raw_value = line.partition(b":")
            fields.append((raw_name.decode("ascii", "replace").strip().lower(), raw_value.decode("utf-8", "replace").strip()))
    return fields


def _tags(value: str) -> dict[bytes, bytes] | None:
    try:
        tags: dict[bytes, bytes] = parse_tag_value(value.encode("utf-8", "replace"))
    except (InvalidTagValueList, ValueError):
        return None
    return tags


def _instance(text: bytes | str | None) -> int | None:
    raw = text.decode("ascii", "replace") if isinstance(text, bytes) else text
    if raw is None or not raw.strip().isdigit():
        return None
    return int(raw.strip())


def _aar_results(value: str) -> tuple[AuthResult, ...]:
    """The results an ARC-Authentication-Results value reports (empty if unparsable)."""
    payload = _AAR_INSTANCE.sub("", value, count=1)
    try:
        header = authres.AuthenticationResultsHeader.parse("Authentication-Results: " + payload)
    except Exception:  # boundary: authres on a hostile header raises several kinds
        return ()
    out = []
    for res in header.results[:32]:
        props = tuple(
            (f"{p.type}.{p.name}", str(p.value)) for p in getattr(res, "properties", [])[:16] if p.value is not None
        )
        out.append(AuthResult(str(res.method).lower(), str(res.result).lower(), str(res.reason or ""), props))
    return tuple(out)


def read_chain_in_thread(raw: bytes) -> ArcChain:
    """The message's ARC chain, checked for structure (RFC 8617 §5.2, steps 1 to 3).

    :param raw: the message as received, CRLF line ends
    :returns: the sets, or an :class:`ArcChain` whose ``error`` says why the chain fails
    """
    found = [(name, value) for name, value in _header_fields(raw) if name in _ARC_FIELDS]
    if not found:
        return ArcChain()
    if len(found) > 3 * MAX_INSTANCES:
        return ArcChain(error=f"{len(found)} ARC header fields: more than {MAX_INSTANCES} ARC sets (RFC 8617 section 4.2.1)")
    by_instance: dict[int, dict[str, str]] = {}
    for name, value in found:
        if name == "arc-authentication-results":
            match = _AAR_INSTANCE.match(value)
            instance = int(match.group(1)) if match else None
        else:
            tags = _tags(value)
            if tags is None:
                return ArcChain(error=f"malformed {_SHORT[name]}: not a tag=value list")
            instance = _instance(tags.get(b"i"))
        if instance is None:
            return ArcChain(error=f"malformed {_SHORT[name]}: no valid i= instance")
        if not 1 <= instance <= MAX_INSTANCES:
            return ArcChain(error=f"{_SHORT[name]} i={instance}: instances run from 1 to {MAX_INSTANCES} (RFC 8617 section 4.2.1)")
        fields = by_instance.setdefault(instance, {})
        if name in fields:
            return ArcChain(error=f"two {_SHORT[name]} fields with i={instance}")
        fields[name] = value
    highest = max(by_instance)
    for instance in range(1, highest + 1):
        present = by_instance.get(instance)
        if present is None:
            return ArcChain(error=f"ARC instance gap: no set i={instance} below i={highest}")
        missing = [_SHORT[name] for name in _ARC_FIELDS if name not in present]
        if missing:
            return ArcChain(error=f"incomplete ARC set i={instance}: no {', '.join(missing)}")
    sets = []
    for instance in range(1, highest + 1):
        fields = by_instance[instance]
        seal, signature = _tags(fields["arc-seal"]), _tags(fields["arc-message-signature"])
        assert seal is not None and signature is not None  # parsed above
        text = {k: v.decode("ascii", "replace").strip() for k, v in seal.items()}
        ams = {k: v.decode("ascii", "replace").strip() for k, v in signature.items()}
        for tag in (b"d", b"s", b"b", b"cv"):
            if not text.get(tag):
                return ArcChain(error=f"malformed ARC-Seal i={instance}: no {tag.decode()}= tag")
        for tag in (b"d", b"s", b"b", b"bh", b"h"):
            if not ams.get(tag):
                return ArcChain(error=f"malformed ARC-Message-Signature i={instance}: no {tag.decode()}= tag")
        cv = text[b"cv"].lower()
        # RFC 8617 §5.2 step 3: cv=none only at i=1, pass above it; a fail ends the chain.
        if cv == "fail":
            return ArcChain(error=f"ARC-Seal i={instance} says the chain had failed (cv=fail)")
        if (instance == 1) != (cv == "none") or cv not in ("none", "pass"):
            return ArcChain(error=f"ARC-Seal i={instance} has cv={cv[:16]}, expected {'none' if instance == 1 else 'pass'}")
        sets.append(ArcSet(
            instance, text[b"d"].lower(), text[b"s"], cv, ams[b"d"].lower(), ams[b"s"],
            _aar_results(fields["arc-authentication-results"]),
        ))
    keys = frozenset(name for s in sets for name in s.key_names)
    return ArcChain(tuple(sets), keys=keys)


def verify_chain_in_thread(raw: bytes, records: dict[str, bytes | None], min_key_bits: int) -> tuple[str, str]:
    """Check every signature and seal of a structurally sound chain (RFC 8617 §5.2 4-7).

    :param raw: the message as received
    :param records: key record name -> the TXT record (strings joined), ``None`` if absent
    :param min_key_bits: RSA keys shorter than this fail the chain (RFC 8301 §3.2)
    :returns: (``pass`` or ``fail``, reason)
    """

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        return records.get(name.decode("ascii", "replace").rstrip(".").lower())

    try:
        checker = dkim.ARC(raw, logger=_QUIET, minkey=min_key_bits)
        cv, details, reason = checker.verify(dnsfunc=dnsfunc)
    except Exception as exc:  # boundary: dkimpy on hostile input (IndexError, KeyError ...)
        log.debug("dkimpy could not process an ARC chain: %r", exc)
        return "fail", f"ARC chain could not be processed: {str(exc)[:120]}"
    if cv == dkim.CV_Pass:
        return "pass", ""
    text = reason if isinstance(reason, str) else repr(reason)
    if details and not details[0].get("ams-valid", True):
        text = f"ARC-Message-Signature i={details[0]['instance']} did not verify"
    return "fail", text[:200]


def seal_in_thread(
    message: bytes, domain: str, selector: str, key: bytes, authserv_id: str, headers: tuple[str, ...]
) -> list[tuple[str, str]]:
    """The next ARC set for ``message`` (RFC 8617 §5.1), or ``[]`` when it cannot be added.

    dkimpy reads the chain validation status from the ``arc=`` result in the
    ``Authentication-Results`` field of ``authserv_id`` in ``message`` and copies that
    field's results into the ARC-Authentication-Results.

    :param message: the final message with exactly one Authentication-Results of ours
    :param domain: the sealing domain (``d=``)
    :param selector: the ``s=`` selector, whose key is at ``<s>._domainkey.<d>``
    :param key: an RSA private key, PEM (ARC signs with rsa-sha256)
    :param authserv_id: our authserv-id
    :param headers: the fields the ARC-Message-Signature covers when present
    :returns: (name, value) of ARC-Seal, ARC-Message-Signature and
        ARC-Authentication-Results, top first, values folded with ``\\n``
    :raises dkim.DKIMException: dkimpy refused (the chain is at 50 sets already, say)
    """
    sealer = dkim.ARC(message, logger=_QUIET, signature_algorithm=b"rsa-sha256")
    present = {name.decode("ascii", "replace").lower() for name, _ in sealer.headers}
    include = [name.encode("ascii") for name in headers if name in present]
    made: list[bytes] = sealer.sign(
        selector.encode("ascii"), domain.encode("ascii"), key, authserv_id.encode("ascii"), include_headers=include
    )
    out = []
    for field_bytes in made:
        name, _, value = field_bytes.decode("ascii").partition(":")
        out.append((name.strip(), value.strip().replace("\r\n", "\n")))
    return out
