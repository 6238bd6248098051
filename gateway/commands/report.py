"""``gateway report``: summarise the gateway's logs (qmailanalog's zoverall and friends).

Reads the named log files in order (``.gz`` too, recognised by their magic bytes), or
standard input when none is named, and prints received, delivered, bounced and deferred
counts, rejections per plugin and reason, delivery delay percentiles, top senders and top
recipient domains; ``--json`` prints the same as one JSON object. The counting lives in
:mod:`gateway.logreport`; this module reads files and writes the report.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from typing import IO, Any, Iterator, cast

from gateway.logreport import LogReport, format_duration

# A log line longer than this is read in pieces (which then do not parse): our own
# lines are short, so only a damaged or foreign file has such lines.
_MAX_LINE = 65536
_GZIP_MAGIC = b"\x1f\x8b"


def register(sub: Any) -> None:
    report = sub.add_parser(
        "report", help="summarise gateway logs (files, .gz files, or standard input)"
    )
    report.add_argument("logfiles", nargs="*", metavar="LOGFILE", help="log files in order (default: standard input)")
    report.add_argument("--json", action="store_true", help="machine-readable output")
    report.add_argument("--top", type=int, default=10, metavar="N", help="length of the top lists (default 10)")
    report.add_argument("--quiet", "-q", action="store_true", help="no progress on standard error")
    report.add_argument(
        "--progress-every", type=int, default=100_000, metavar="LINES",
        help="report progress on standard error every LINES lines (default 100000)",
    )
    report.set_defaults(func=main)


class _Input:
    """The log files (or standard input) as one stream of lines, with progress."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        self.total = sum(os.path.getsize(p) for p in paths) if paths else 0
        self.done = 0  # bytes of the files already finished
        self._raw: IO[bytes] | None = None

    @property
    def position(self) -> int:
        """Bytes read so far (of the files as stored, compressed or not)."""
        try:
            return self.done + (self._raw.tell() if self._raw is not None else 0)
        except (OSError, ValueError):
            return self.done

    @staticmethod
    def _decompressed(raw: IO[bytes]) -> IO[bytes]:
        # Both open(..., "rb") and sys.stdin.buffer are buffered readers that can peek.
        peek = getattr(raw, "peek", None)
        if peek is not None and peek(2)[:2] == _GZIP_MAGIC:
            return cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb"))
        return raw

    def _lines(self, raw: IO[bytes]) -> Iterator[str]:
        stream = self._decompressed(raw)
        while True:
            line = stream.readline(_MAX_LINE)
            if not line:
                return
            yield line.decode("utf-8", "replace")

    def lines(self) -> Iterator[str]:
        if not self.paths:
            yield from self._lines(sys.stdin.buffer)
            return
        for path in self.paths:
            with open(path, "rb") as raw:
                self._raw = raw
                yield from self._lines(raw)
                self._raw = None
            self.done += os.path.getsize(path)


def _progress(report: LogReport, source: _Input) -> str:
    if source.total:
        percent = 100 * source.position / source.total
        return f"gateway report: {percent:.0f}% read, {report.lines} lines"
    return f"gateway report: {report.lines} lines"


def main(args: argparse.Namespace) -> int:
    try:
        source = _Input(args.logfiles)
    except OSError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    report = LogReport()
    every = max(1, args.progress_every)
    try:
        for line in source.lines():
            report.feed(line)
            if not args.quiet and report.lines % every == 0:
                print(_progress(report, source), file=sys.stderr, flush=True)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        print(f"gateway: reading logs: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    summary = report.summary(top=args.top)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        sys.stdout.write(render(summary))
    return 0


def _delay(value: float | None) -> str:
    return "-" if value is None else format_duration(value)


def render(s: dict[str, Any]) -> str:
    """The summary as the text report (what ``gateway report`` prints without ``--json``)."""
    out: list[str] = []
    add = out.append
    period = f"{s['first']} .. {s['last']}" if s["first"] else "no log lines understood"
    add(f"gateway report: {period}; {s['lines']} lines ({s['unparsed']} not understood)")
    add("")
    m, r = s["messages"], s["recipients"]
    add(f"{'Connections':<26}{s['connections']:>10}")
    add(f"{'Messages received':<26}{m['received']:>10}  ({m['bytes']} bytes)")
    add(f"{'  quarantined':<26}{m['quarantined']:>10}")
    add(f"{'Messages generated':<26}{m['generated']:>10}  (bounces and forwards)")
    add(f"{'Recipients delivered':<26}{r['delivered']:>10}")
    add(f"{'Recipients bounced':<26}{r['bounced']:>10}  ({r['expired']} expired)")
    add(f"{'Deferrals':<26}{r['deferred']:>10}  (delivery attempts to retry)")
    add(f"{'Still queued at the end':<26}{m['in_queue_at_end']:>10}")
    d = s["delay"]
    add("")
    add(f"Delivery delay, queued to delivered ({d['count']} recipients):")
    add("  " + "  ".join(f"{k} {_delay(d[k])}" for k in ("p50", "p90", "p99", "max")))
    rejects = s["rejects"]
    add("")
    add(f"Rejections: {rejects['total']}")
    if rejects["by_plugin"]:
        add(f"  {'count':>7}  {'stage':<8}{'action':<11}plugin")
        for row in rejects["by_plugin"]:
            add(f"  {row['count']:>7}  {row['stage']:<8}{row['action']:<11}{row['plugin']}")
        add("Top rejection reasons:")
        for row in rejects["reasons"]:
            reply = f" [{row['reply']}]" if row["reply"] else ""
            add(f"  {row['count']:>7}  {row['plugin']}: {row['reason'] or '-'}{reply}")
    if s["observe"]:
        add("")
        add("Observe-mode plugins, what they would have done:")
        for row in s["observe"]:
            add(f"  {row['count']:>7}  {row['plugin']} would {row['would']} at {row['stage']}")
    if s["quarantine"]:
        add("")
        add("Quarantined by:")
        for row in s["quarantine"]:
            add(f"  {row['count']:>7}  {row['plugin']}")
    add("")
    add("Top senders:")
    add(f"  {'messages':>8}  {'bytes':>12}  sender")
    for row in s["senders"]:
        add(f"  {row['messages']:>8}  {row['bytes']:>12}  <{row['sender']}>")
    add("")
    add("Top recipient domains:")
    add(f"  {'delivered':>9}  {'bounced':>7}  {'deferred':>8}  domain")
    for row in s["recipient_domains"]:
        add(f"  {row['delivered']:>9}  {row['bounced']:>7}  {row['deferred']:>8}  {row['domain']}")
    if s["approximate"]:
        add("")
        add("(top lists are approximate: too many distinct keys to count them all)")
    return "\n".join(out) + "\n"
