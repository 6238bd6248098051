"""Reading capture files: one JSON record per line, a damaged one named and skipped.

A record that cannot be used (a line cut short by a full disk or a crash, bad JSON, a
missing field, bad base64) becomes a :class:`Damaged` entry naming the file, the line
and, when it can be read, the session; the records after it are read as usual.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from gateway.capture import CAPTURE_VERSION

__all__ = ["Damaged", "capture_files", "read_records"]

# One record's line: a session with a few 25 MB messages in base64 stays below this.
_MAX_LINE = 1024 * 1024 * 1024


@dataclass(frozen=True)
class Damaged:
    """A record that could not be replayed, and why."""

    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


def capture_files(paths: Iterable[str | Path]) -> list[Path]:
    """The capture files named, a directory standing for its ``*.jsonl`` files (oldest first)."""
    out: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            found = [p for p in path.glob("*.jsonl") if p.is_file()]
            out += sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name))
        else:
            out.append(path)
    return out


def _check(record: Any) -> dict[str, Any]:
    """``record`` with its base64 fields decoded; ValueError names what is wrong."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    if record.get("v") != CAPTURE_VERSION:
        raise ValueError(f"unknown record version {record.get('v')!r}")
    for key, kind in (("client", str), ("listener", str), ("txns", list), ("dns", list)):
        if not isinstance(record.get(key), kind):
            raise ValueError(f"field {key!r} missing or not a {kind.__name__}")
    try:
        for entry in record["dns"]:
            name, rdtype, outcome, wire = entry
            entry[3] = base64.b64decode(wire, validate=True) if wire is not None else None
        for i, txn in enumerate(record["txns"]):
            if not isinstance(txn, dict) or not isinstance(txn.get("mail"), str) or not isinstance(txn.get("rcpts"), list):
                raise ValueError(f"transaction {i + 1} is malformed")
            data = txn.get("data")
            if data is not None:
                data["message"] = base64.b64decode(data["message"], validate=True)
    except (binascii.Error, TypeError, KeyError) as exc:
        raise ValueError(f"undecodable field ({exc})") from None
    return record


def read_records(paths: Iterable[str | Path]) -> Iterator[dict[str, Any] | Damaged]:
    """Each record of the capture files, in order, or a :class:`Damaged` in its place."""
    for path in capture_files(paths):
        try:
            f = open(path, "rb")
        except OSError as exc:
            yield Damaged(str(path), f"cannot read: {exc.strerror or exc}")
            continue
        with f:
            for number, line in enumerate(iter(lambda: f.readline(_MAX_LINE), b""), 1):
                where = f"{path}:{number}"
                if not line.strip():
                    continue
                if not line.endswith(b"\n"):
                    yield Damaged(where, f"record {number} is cut short ({len(line)} bytes, no end of line)")
                    continue
                try:
                    record = _check(json.loads(line))
                except json.JSONDecodeError as exc:
                    yield Damaged(where, f"record {number}{_session_id(line)} is damaged: bad JSON at byte {exc.pos} ({exc.msg})")
                    continue
                except ValueError as exc:
                    session = _session_id(line)
                    yield Damaged(where, f"record {number}{session} is damaged: {exc}")
                    continue
                record["_where"] = where
                yield record


def _session_id(line: bytes) -> str:
    start = line.find(b'"session":"')
    if start < 0:
        return ""
    end = line.find(b'"', start + 11)
    return f" (session {line[start + 11:end].decode('ascii', 'replace')[:40]})" if end > 0 else ""
