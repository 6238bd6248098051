"""The blocking dkimpy work of the DKIM plugins, run only through ``gateway.run_in_thread``.

dkimpy is synchronous (hashing, RSA, and its own DNS lookups), so the plugins split the
work: :func:`parse_signatures_in_thread` reads the signatures, the plugin fetches the
keys with the gateway's asynchronous resolver, and :func:`verify_in_thread` checks
each signature against the key record it was handed (dkimpy never touches the network).
:func:`load_key_in_thread` and :func:`sign_in_thread` serve ``queue_dkim_sign``; they live in
:mod:`gateway.dkim_sync` (the core signs its own reports with them) and are named here too.

Verification results follow RFC 8601 §2.7.1: ``pass``; ``fail`` (the signature or body
hash does not verify); ``neutral`` (a signature with syntax errors, or one that cannot
be processed); ``permerror`` (no usable key, a key too small, a message dkimpy cannot
parse); ``temperror`` (set by the plugin when the key lookup failed temporarily).
"""

from __future__ import annotations

import binascii
import logging
from dataclasses import dataclass

import dkim
from dkim.util import InvalidTagValueList, parse_tag_value

from gateway.dkim_sync import MIN_SIGNING_BITS, load_key_in_thread, sign_in_thread

__all__ = [
    "MIN_SIGNING_BITS",
    "SignatureInfo",
    "load_key_in_thread",
    "parse_signatures_in_thread",
    "sign_in_thread",
    "verify_in_thread",
]

log = logging.getLogger("plugins.dkim")
# dkimpy logs every failed check at ERROR level; a bad signature is not our error.
_QUIET = logging.getLogger("plugins._dkim_sync.dkimpy")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


@dataclass(frozen=True, slots=True)
class SignatureInfo:
    """What one DKIM-Signature field claims, read before its key is fetched.

    :param index: position among the message's DKIM-Signature fields (top first)
    :param domain: the ``d=`` tag (the signing domain)
    :param selector: the ``s=`` tag
    :param identity: the ``i=`` tag, empty when absent
    :param algorithm: the ``a=`` tag
    :param b_prefix: the first 8 characters of ``b=`` (RFC 6008 ``header.b``)
    :param error: why the field cannot be processed (the result is then ``neutral``
        or, when the message itself is unparsable, ``permerror``)
    """

    index: int
    domain: str = ""
    selector: str = ""
    identity: str = ""
    algorithm: str = ""
    b_prefix: str = ""
    error: str = ""

    @property
    def key_name(self) -> str:
        """The DNS name of the key record (RFC 6376 §3.6.2.1)."""
        return f"{self.selector}._domainkey.{self.domain}"


def _text(value: bytes | None) -> str:
    return (value or b"").decode("ascii", "replace")


def _tags(field: bytes) -> dict[bytes, bytes]:
    try:
        tags: dict[bytes, bytes] = parse_tag_value(field)
    except (InvalidTagValueList, ValueError):
        return {}
    return tags


def parse_signatures_in_thread(raw: bytes, limit: int) -> tuple[list[SignatureInfo], int]:
    """The message's DKIM-Signature fields (at most ``limit``) and how many there are.

    :param raw: the message as received, CRLF line ends
    :param limit: verify no more than this many signatures (hostile input is bounded)
    :returns: one :class:`SignatureInfo` per signature considered, and the total count
    """
    try:
        checker = dkim.DKIM(raw, logger=_QUIET)
    except Exception as exc:  # boundary: dkimpy's parser on hostile input
        if b"dkim-signature:" not in raw[:65536].lower():
            return [], 0
        return [SignatureInfo(0, error=f"message format: {exc}")], 1
    fields = [value for name, value in checker.headers if name.lower() == b"dkim-signature"]
    infos = []
    for index, field in enumerate(fields[:limit]):
        tags = _tags(field)
        b_value = b"".join(tags.get(b"b", b"").split())
        base = SignatureInfo(
            index,
            domain=_text(tags.get(b"d")).lower(),
            selector=_text(tags.get(b"s")),
            identity=_text(tags.get(b"i")),
            algorithm=_text(tags.get(b"a")),
            b_prefix=_text(b_value[:8]),
        )
        try:
            prep = checker.verify_headerprep(index)
        except Exception as exc:  # boundary: DKIMException, or an IndexError on odd i= tags
            infos.append(_replace_error(base, f"signature syntax: {exc}"))
            continue
        if not prep:
            continue
        _, include_headers, _ = prep
        if b"from" not in include_headers:
            # RFC 6376 §5.4: the From field MUST be signed; verifiers treat its absence as an error.
            infos.append(_replace_error(base, "From header not signed"))
            continue
        infos.append(base)
    return infos, len(fields)


def _replace_error(info: SignatureInfo, error: str) -> SignatureInfo:
    return SignatureInfo(
        info.index, info.domain, info.selector, info.identity, info.algorithm, info.b_prefix, error[:200]
    )


def verify_in_thread(
    raw: bytes, keys: dict[int, tuple[str, bytes]], min_key_bits: int
) -> dict[int, tuple[str, str]]:
    """Check each signature against the key record fetched for it.

    :param raw: the message as received
    :param keys: signature index -> (its ``a=`` algorithm, the TXT key record, strings joined)
    :param min_key_bits: RSA keys shorter than this make the result ``permerror``
        (RFC 8301 §3.2: verifiers MUST NOT accept keys under 1024 bits)
    :returns: signature index -> (RFC 8601 result, reason)
    """
    out: dict[int, tuple[str, str]] = {}
    for index, (algorithm, record) in keys.items():
        try:
            out[index] = _verify_one(raw, index, algorithm, record, min_key_bits)
        except Exception as exc:  # boundary: hostile input must not crash the library's caller
            log.warning("dkimpy failed on signature %d: %r", index, exc)
            out[index] = ("neutral", "signature could not be processed")
    return out


def _verify_one(raw: bytes, index: int, algorithm: str, record: bytes, min_key_bits: int) -> tuple[str, str]:
    tags = _tags(record)
    if b"p" in tags and not tags[b"p"].strip():
        # RFC 6376 §3.6.1: an empty p= means the key was revoked.
        return "permerror", "key revoked"
    key_type = tags.get(b"k", b"rsa").strip().decode("ascii", "replace")
    if algorithm.partition("-")[0] != key_type:
        # RFC 6376 §6.1.2 step 7: a key unsuitable for a= is a permanent failure.
        return "permerror", f"inappropriate key algorithm ({key_type} key for {algorithm})"
    try:
        dkim.evaluate_pk(b"key", record)
    except (dkim.DKIMException, binascii.Error, ValueError, KeyError) as exc:
        return "permerror", f"key record: {str(exc)[:120]}"
    checker = dkim.DKIM(raw, logger=_QUIET, minkey=min_key_bits)
    try:
        ok = checker.verify(index, dnsfunc=lambda name, timeout=5: record)
    except dkim.ValidationError as exc:
        # A body hash mismatch (RFC 6376 §6.1.3) is a failed check; anything else
        # raised here means the signature could not be processed.
        if "body hash" in str(exc):
            return "fail", "body hash did not verify"
        return "neutral", str(exc)[:200]
    except dkim.KeyFormatError as exc:
        return "permerror", str(exc)[:200]
    except dkim.DKIMException as exc:
        return "neutral", str(exc)[:200]
    return ("pass", "") if ok else ("fail", "signature did not verify")
