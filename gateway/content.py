"""A message's octets, held in memory or left where they are in an open file.

Small messages travel as ``bytes``. A large one is spooled to the queue's disk while it
arrives (see ``gateway/queue/spool.py``), and from then on its octets stay in the file:
a :class:`Content` names them as a sequence of parts, each either a buffer in memory or
an extent ``(fd, offset, length)`` of a file, and reads them in bounded chunks when asked.

A :class:`Content` never owns a descriptor: whoever made it keeps the file open (the spool,
or the delivery lock's descriptor of a queued message) for as long as the content is used.

Reading is cheap to ask for and explicit about its cost:

- :meth:`Content.chunks` and :meth:`Content.stream` hand out at most ``size`` octets at a
  time; ``stream`` reads file parts on a thread, so an event loop never waits on the disk;
- :meth:`Content.write_to` copies into another file in the kernel (``copy_file_range``,
  or ``sendfile``), never through this process's memory;
- :meth:`Content.read` returns the whole message as one ``bytes`` object: it costs as many
  octets of memory as the message has, every time it is called.
"""

from __future__ import annotations

import asyncio
import errno
import os
from typing import AsyncIterator, Iterator, Sequence

__all__ = ["CHUNK", "Content"]

#: The largest piece :meth:`Content.chunks` and :meth:`Content.stream` hand out by default.
CHUNK = 256 * 1024

_Extent = tuple[int, int, int]  # fd, offset, length
_Part = bytes | memoryview | _Extent


def _pread_all(fd: int, offset: int, length: int) -> bytes:
    """``length`` octets at ``offset``; a short file is an error (the file was damaged)."""
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            raise OSError(errno.EIO, f"file ends {length - got} octets early at offset {offset + got}")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _part_length(part: _Part) -> int:
    if isinstance(part, tuple):
        return part[2]
    return memoryview(part).nbytes


class Content:
    """The octets of one message, as parts in memory or extents of open files.

    Build with :meth:`of_bytes`, :meth:`of_file` or :meth:`join`.
    """

    __slots__ = ("_parts", "size")

    def __init__(self, parts: Sequence[_Part] = ()) -> None:
        kept = [p for p in parts if _part_length(p)]
        self._parts: tuple[_Part, ...] = tuple(kept)
        #: the number of octets
        self.size: int = sum(_part_length(p) for p in kept)

    @classmethod
    def of_bytes(cls, data: bytes | memoryview) -> Content:
        return cls((data,))

    @classmethod
    def of_file(cls, fd: int, extents: Sequence[tuple[int, int]]) -> Content:
        """The extents ``(offset, length)`` of the open file ``fd``, in that order."""
        return cls(tuple((fd, offset, length) for offset, length in extents))

    @classmethod
    def join(cls, *contents: Content | bytes) -> Content:
        """One content of several, in order."""
        parts: list[_Part] = []
        for c in contents:
            if isinstance(c, Content):
                parts.extend(c._parts)
            else:
                parts.append(c)
        return cls(parts)

    @property
    def is_in_memory(self) -> bool:
        """True when no part is in a file (reading never touches a disk)."""
        return not any(isinstance(p, tuple) for p in self._parts)

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        where = "memory" if self.is_in_memory else "file"
        return f"<Content {self.size} octets in {where}>"

    def slice(self, start: int, stop: int | None = None) -> Content:
        """The octets from ``start`` to ``stop`` (default: the end), without reading any."""
        stop = self.size if stop is None else min(stop, self.size)
        start = max(0, start)
        out: list[_Part] = []
        pos = 0
        for part in self._parts:
            length = _part_length(part)
            lo, hi = max(start, pos), min(stop, pos + length)
            if lo < hi:
                if isinstance(part, tuple):
                    fd, offset, _ = part
                    out.append((fd, offset + lo - pos, hi - lo))
                else:
                    out.append(memoryview(part)[lo - pos : hi - pos])
            pos += length
            if pos >= stop:
                break
        return Content(out)

    def read(self) -> bytes:
        """The whole content as one ``bytes`` object: as many octets of memory as it has.
        Blocks on the disk for file parts (call it in a thread from an event loop)."""
        if len(self._parts) == 1 and isinstance(self._parts[0], bytes):
            return self._parts[0]
        return b"".join(self._read_part(p) for p in self._parts)

    def read_at(self, offset: int, length: int) -> bytes:
        """Up to ``length`` octets from ``offset`` (fewer at the end)."""
        return self.slice(offset, offset + length).read()

    def head(self, limit: int = 64 * 1024) -> bytes:
        """The first ``limit`` octets (all of them, if fewer)."""
        return self.read_at(0, limit)

    @staticmethod
    def _read_part(part: _Part) -> bytes:
        if isinstance(part, tuple):
            return _pread_all(part[0], part[1], part[2])
        return bytes(part)

    def chunks(self, size: int = CHUNK) -> Iterator[bytes | memoryview]:
        """The content in pieces of at most ``size`` octets, in order. Memory parts are
        handed out as views (no copy); file parts are read with ``pread`` (blocking: from
        an event loop use :meth:`stream`)."""
        if size <= 0:
            raise ValueError("chunk size must be positive")
        for part in self._parts:
            if isinstance(part, tuple):
                fd, offset, length = part
                end = offset + length
                while offset < end:
                    n = min(size, end - offset)
                    yield _pread_all(fd, offset, n)
                    offset += n
            else:
                view = memoryview(part)
                for i in range(0, view.nbytes, size):
                    yield view[i : i + size]

    async def stream(self, size: int = CHUNK) -> AsyncIterator[bytes | memoryview]:
        """:meth:`chunks` for an event loop: each file read runs on a thread."""
        if self.is_in_memory:
            for chunk in self.chunks(size):
                yield chunk
            return
        pieces = self.chunks(size)

        def step() -> bytes | memoryview | None:
            return next(pieces, None)

        while True:
            got: bytes | memoryview | None = await asyncio.to_thread(step)
            if got is None:
                return
            yield got

    def write_to(self, fd: int) -> None:
        """Append the content to the open file ``fd`` (at its current offset): file parts
        are copied in the kernel (``copy_file_range``, else ``sendfile``, else read and
        written in chunks), memory parts written as they are. Blocks on the disk."""
        for part in self._parts:
            if isinstance(part, tuple):
                _copy_extent(part, fd)
            else:
                _write_all(fd, memoryview(part))


def _write_all(fd: int, view: memoryview) -> None:
    while view.nbytes:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.EIO, "write wrote nothing")
        view = view[n:]


def _copy_extent(extent: _Extent, out: int) -> None:
    src, offset, length = extent
    end = offset + length
    while offset < end:
        try:
            n = os.copy_file_range(src, out, end - offset, offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF):
                raise
            n = -1
        if n == 0:
            raise OSError(errno.EIO, f"file ends {end - offset} octets early at offset {offset}")
        if n < 0:  # no in-kernel copy between these two: read and write in chunks
            for chunk in Content(((src, offset, end - offset),)).chunks():
                _write_all(out, memoryview(chunk))
            return
        offset += n
