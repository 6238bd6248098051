"""Queue backup and restore: ``gateway queue export`` / ``import`` as a tar stream.

The stream (POSIX tar) holds a manifest, then per message its state file (when it has
one) followed by its queue file, both exactly as the store keeps them::

    GATEWAY-QUEUE                 {"format": 1, "created": ..., "source": ...}
    state/<qid>                   the recorded per-recipient state (JSON)
    msg/<qid> | quarantine/<qid>  the immutable queue file (header, envelope, message)

Export reads each message under the store's locks: with ``hold`` or ``move`` it first
waits for any delivery attempt on the message to end (the scheduler holds
:meth:`QueueStore.lock_delivery` for an attempt) and puts the message on hold, so what
the tar records is the last state the source will ever have. ``move`` removes the
exported messages once the whole stream is written (and synced, for a file).

Import writes each message as the store would: state first (a state file without a
message is garbage :meth:`QueueStore.open` removes), then the message, each synced and
renamed into place with the directory synced. Recorded recipient states are kept, so a
recipient delivered before the export is never delivered again. A message already
queued here (same bytes) or imported here before (the ``imported`` journal in the queue
directory) is skipped; a queue id already in use gets a new one.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator, Literal

from gateway.model import Envelope, QueuedRecipient
from gateway.queue.committer import fsync_dir, write_all
from gateway.queue.damage import QID_RE as _QID_RE
from gateway.queue.damage import check_fd as _check_fd
from gateway.queue.store import AREAS, CorruptQueueFile, QueueStore

__all__ = ["ExportResult", "ImportResult", "TransferError", "export_queue", "import_queue"]

log = logging.getLogger(__name__)

MANIFEST = "GATEWAY-QUEUE"
FORMAT = 1
JOURNAL = "imported"  # in the queue root: "<sha256> <qid>" per imported message
_STATE_MAX = 16 * 1024 * 1024
_CHUNK = 1024 * 1024

Mode = Literal["keep", "hold", "move"]


class TransferError(Exception):
    """The stream is not a queue export, or cannot be read or written."""


@dataclass
class ExportResult:
    """What an export wrote."""

    exported: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    held: list[str] = field(default_factory=list)


@dataclass
class ImportResult:
    """What an import did, per queue id of the stream."""

    imported: dict[str, str] = field(default_factory=dict)  # qid in the stream -> qid here
    duplicates: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


# -- export ---------------------------------------------------------------------------


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(mtime), 0o600
    tar.addfile(info, io.BytesIO(data))


def export_queue(
    store: QueueStore, out: IO[bytes], *, mode: Mode = "hold",
    qids: list[str] | None = None, areas: tuple[str, ...] = AREAS, source: str = "",
) -> ExportResult:
    """Write the queue (or the messages ``qids``) to ``out`` as a tar stream.

    :param store: the queue
    :param out: a binary stream; synced when it is a regular file
    :param mode: ``keep`` (a backup: the source goes on delivering), ``hold`` (the
        exported messages are put on hold here) or ``move`` (they are removed here
        after the stream is complete)
    :param qids: only these queue ids (looked for in every area of ``areas``)
    :param areas: which areas to export
    :param source: a name for the manifest (the exporting host)
    :raises TransferError: when the stream cannot be written; messages this call put
        on hold are released again and nothing is removed
    """
    result = ExportResult()
    now = time.time()
    try:
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            manifest = {"format": FORMAT, "created": now, "source": source, "mode": mode}
            _add_bytes(tar, MANIFEST, json.dumps(manifest).encode(), now)
            for area in areas:
                wanted = store.ids(area) if qids is None else [
                    q for q in qids if _QID_RE.fullmatch(q) and (store.root / area / q).exists()
                ]
                for qid in wanted:
                    if _export_one(store, tar, qid, area, mode, result):
                        result.exported.append(qid)
        out.flush()
        try:
            os.fsync(out.fileno())
        except (OSError, ValueError, io.UnsupportedOperation):
            pass  # a pipe or a terminal: nothing to sync
    except (OSError, tarfile.TarError) as exc:
        for qid in result.held:
            try:
                store.update_state(qid, store.load(qid).envelope, held=False)
            except (OSError, CorruptQueueFile) as undo:
                log.error("export failed and qid=%s stays held: %s", qid, undo)
        raise TransferError(f"export failed: {exc}") from exc
    if mode == "move":
        for qid in result.exported:
            for area in areas:
                try:
                    store.remove(qid, area)
                    result.removed.append(qid)
                    break
                except FileNotFoundError:
                    continue
    return result


def _export_one(
    store: QueueStore, tar: tarfile.TarFile, qid: str, area: str, mode: Mode, result: ExportResult
) -> bool:
    """Add one message; False when it left the queue meanwhile."""
    try:
        with _message_fd(store, qid, area, exclusive=mode != "keep") as fd:
            state = store.read_state(qid)
            if mode != "keep" and area == "msg" and not (state or {}).get("held", False):
                store.update_state(qid, store.load(qid, area).envelope, held=True)
                result.held.append(qid)
            size = os.fstat(fd).st_size
            _check_fd(fd, qid)
            mtime = os.fstat(fd).st_mtime
            if state is not None:
                _add_bytes(tar, f"state/{qid}", json.dumps(state, separators=(",", ":")).encode(), mtime)
            info = tarfile.TarInfo(f"{area}/{qid}")
            info.size, info.mtime, info.mode = size, int(mtime), 0o600
            with os.fdopen(os.dup(fd), "rb") as f:
                tar.addfile(info, f)
    except FileNotFoundError:
        return False  # delivered or deleted meanwhile
    except CorruptQueueFile as exc:
        log.error("export: skipping damaged qid=%s: %s", qid, exc)
        return False
    return True


class _message_fd:
    """The message file's descriptor; with ``exclusive``, after every delivery attempt
    on it has ended and with new ones kept out (``QueueStore.lock_exclusive``)."""

    def __init__(self, store: QueueStore, qid: str, area: str, *, exclusive: bool) -> None:
        self._cm: Any = store.lock_exclusive(qid, area) if exclusive and area == "msg" else None
        self._path = store.root / area / qid
        self._fd = -1

    def __enter__(self) -> int:
        if self._cm is not None:
            return int(self._cm.__enter__())
        self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        return self._fd

    def __exit__(self, *exc: object) -> None:
        if self._cm is not None:
            self._cm.__exit__(*exc)
        elif self._fd >= 0:
            os.close(self._fd)


# -- import ---------------------------------------------------------------------------


def _journal(store: QueueStore) -> set[str]:
    try:
        text = (store.root / JOURNAL).read_text("ascii", "replace")
    except FileNotFoundError:
        return set()
    return {line.split(" ", 1)[0] for line in text.splitlines() if line}


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _queued_sizes(store: QueueStore) -> dict[int, list[Path]]:
    """Size -> message files already queued here (only equal sizes can be equal)."""
    sizes: dict[int, list[Path]] = {}
    for area in AREAS:
        for entry in os.scandir(store.root / area):
            try:
                sizes.setdefault(entry.stat(follow_symlinks=False).st_size, []).append(Path(entry.path))
            except FileNotFoundError:
                continue
    return sizes


def _members(tar: tarfile.TarFile) -> Iterator[tuple[tarfile.TarInfo, str, str]]:
    for info in tar:  # iterating starts again at the first member: the manifest
        if info.name == MANIFEST:
            continue
        area, _, qid = info.name.partition("/")
        yield info, area, qid


def import_queue(store: QueueStore, source: IO[bytes]) -> ImportResult:
    """Load an export into ``store`` (which :meth:`QueueStore.open` has prepared).

    :param store: the queue to fill
    :param source: the tar stream, read once from start to end
    :raises TransferError: when the stream is not a queue export or ends early; what
        was imported before that point stays imported (each message is atomic)
    """
    result = ImportResult()
    journal = _journal(store)
    sizes = _queued_sizes(store)
    states: dict[str, dict[str, Any]] = {}
    try:
        with tarfile.open(fileobj=source, mode="r|*") as tar:
            first = tar.next()
            if first is None or first.name != MANIFEST:
                raise TransferError("not a queue export: the manifest is missing")
            manifest = json.loads(_read_member(tar, first, _STATE_MAX))
            if manifest.get("format") != FORMAT:
                raise TransferError(f"unsupported export format {manifest.get('format')!r}")
            for info, area, qid in _members(tar):
                if not info.isfile() or not _QID_RE.fullmatch(qid) or area not in ("state", *AREAS):
                    result.errors.append(f"{info.name}: not a queue file, ignored")
                    continue
                if area == "state":
                    states[qid] = json.loads(_read_member(tar, info, _STATE_MAX))
                    continue
                _import_one(store, tar, info, area, qid, states.pop(qid, None), journal, sizes, result)
    except (tarfile.TarError, EOFError, ValueError) as exc:
        raise TransferError(f"bad export stream: {exc}") from exc
    except OSError as exc:  # disk full, permissions: what is imported so far stays
        raise TransferError(f"import stopped: {exc}") from exc
    return result


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo, limit: int) -> bytes:
    if info.size > limit:
        raise TransferError(f"{info.name}: {info.size} octets is too large")
    f = tar.extractfile(info)
    if f is None:
        raise TransferError(f"{info.name}: not a regular file")
    return f.read()


def _check_state(state: dict[str, Any]) -> dict[str, Any]:
    """Validate a state record and make it due now (attempts and hold are kept)."""
    recipients = [QueuedRecipient.from_dict(r).to_dict() for r in state["recipients"]]
    return {
        "recipients": recipients,
        "next_try": time.time(),
        "attempts": int(state["attempts"]),
        "held": bool(state["held"]),
    }


def _import_one(
    store: QueueStore, tar: tarfile.TarFile, info: tarfile.TarInfo, area: str, origin: str,
    state: dict[str, Any] | None, journal: set[str], sizes: dict[int, list[Path]], result: ImportResult,
) -> None:
    tmp = store.root / "tmp" / f"import.{os.getpid():x}.{origin}"
    member = tar.extractfile(info)
    if member is None:
        result.errors.append(f"{info.name}: not a regular file")
        return
    digest = hashlib.sha256()
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)  # read back to check
    try:
        try:
            while chunk := member.read(_CHUNK):
                digest.update(chunk)
                write_all(fd, [chunk])
            layout = _check_fd(fd, origin)
            Envelope.from_dict(json.loads(os.pread(fd, layout.env_length, layout.env_offset)))
            checked = _check_state(state) if state is not None else None
            os.fdatasync(fd)
        finally:
            os.close(fd)
        key = digest.hexdigest()
        if key in journal or any(_file_digest(p) == key for p in sizes.get(info.size, []) if p.exists()):
            result.duplicates.append(origin)
            log.info("import: qid=%s is already here, skipped", origin)
            return
        qid = origin
        if any((store.root / a / qid).exists() for a in (*AREAS, "state")):
            qid = store.new_id()
        if checked is not None:
            store.write_state(qid, checked)
        os.rename(tmp, store.root / area / qid)
        fsync_dir(store.root / area)
        _append_journal(store, key, qid)
        journal.add(key)
        result.imported[origin] = qid
        log.info("import: qid=%s as qid=%s area=%s", origin, qid, area)
    except (CorruptQueueFile, KeyError, TypeError, ValueError) as exc:
        result.errors.append(f"{info.name}: {exc}")
    finally:
        tmp.unlink(missing_ok=True)


def _append_journal(store: QueueStore, key: str, qid: str) -> None:
    fd = os.open(store.root / JOURNAL, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, [f"{key} {qid}\n".encode("ascii")])
        os.fdatasync(fd)
    finally:
        os.close(fd)
