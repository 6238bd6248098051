"""Filter benchmark: the accept rate of the gateway with the DNS-based envelope filters and
with the content filters on, as ratios to the empty chain measured in the same run.

    python bench/filters.py                # full run (about 15-20 minutes on a loaded 2-core machine)
    python bench/filters.py --quick        # a short run (a few minutes)
    python bench/filters.py --variants empty,envelope,content -r 3

Variants (every one the gateway on a copy of bench/policies/empty-chain.toml, started
fresh for every point, differing only in ``[dns]`` and the ``[[plugins]]`` chain):

    empty         the reference: rcpt_local_users only (bench/accept.py's "empty chain")
    envelope      connect_dnsbl (two lists, no answer cache) -> mail_spf -> rcpt_greylist
                  -> rcpt_local_users (bench/policies/filters-envelope.toml)
    dnsbl, dnsbl-cached, spf, greylist
                  one filter of that chain at a time (dnsbl-cached: the plugin's default
                  answer cache, so every lookup after the first is a hit)
    content       rcpt_local_users -> data_clamav -> data_dkim_verify -> data_dmarc ->
                  data_spamd (bench/policies/filters-content.toml)
    dkim-dmarc, clamav, spamd
                  parts of that chain, each with rcpt_local_users

Helpers, started once for the whole run (bench/_daemons.py), on 127.0.0.1 only: the
test DNS server (tests/dnsserver.py, in a process of its own), clamd with an EICAR-only
database, spamd with the shipped rules offline. The DNS zone holds two IP block lists
(127.0.0.1 not listed), ``spf.bench.test`` with ``v=spf1 ip4:127.0.0.0/8 -all``, the DKIM
key ``sel1._domainkey.spf.bench.test`` (made with ``gateway dkim keygen``) and
``_dmarc.spf.bench.test`` ``v=DMARC1; p=reject``.

Load: Postfix smtp-source, as in bench/accept.py (CONC sessions, one message per
connection unless --reuse, wall time around the smtp-source process after a warm-up run
against the same server), but every variant sends the same file (``-F``): a 5 KiB
text message from user@spf.bench.test, DKIM-signed (rsa-sha256, relaxed/relaxed) with
the key the DNS serves, MAIL FROM user@spf.bench.test, RCPT TO bench@localhost.

Checks, before timing, for a variant whose chain has them:
- greylisting: the one triplet of the bench is primed with delay 0: one RCPT refused
  (451, first attempt), the next one passed; every timed RCPT then finds a passed triplet
  in the store and refreshes it (a read and a write per recipient);
- DKIM: the same message with one body line changed must be refused (550, DMARC
  p=reject). The content chains have no SPF check, so DMARC passes only on the DKIM
  signature: every accepted message was verified.
After the run the files in the queue's ``msg/`` must equal the messages sent (warm-up and
the latency messages included); smtp-source ends on any refused command, so a refusal
makes the run fail.

Latency: after the timed batch, this script sends --latency-count messages one at a time
(c=1, one per connection) with its own client to the same server and times, for each, the
end of the data (the final ".") to the 250 ("DATA-to-250"), and the whole session
(connect to QUIT's reply). The table gives the p50/p99 of both and the p50 added over the
empty chain of the same round.

Only loopback is used. Each load run has a time limit; servers and helpers are stopped
with SIGTERM (then SIGKILL) by process id, and the temporary directories are removed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shutil
import signal
import smtplib
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any, Iterator

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
# Shared with the accept bench: ports, TOML writing, /proc readings, process stopping.
from _daemons import Daemon, start_clamd, start_dns, start_spamd  # noqa: E402
from accept import (  # noqa: E402
    Load,
    bench_policy,
    cpu_seconds,
    describe_source,
    dump_toml,
    environment,
    export_rev,
    find_tool,
    free_port,
    queue_count,
    read_status,
    run_smtp_source,
    stop,
    wait_ready,
)
from accept import gateway_env as accept_gateway_env  # noqa: E402

EMPTY_POLICY = BENCH / "policies" / "empty-chain.toml"
ENVELOPE_POLICY = BENCH / "policies" / "filters-envelope.toml"
CONTENT_POLICY = BENCH / "policies" / "filters-content.toml"
ROOT = REPO  # the gateway source tree under test; --rev exports another one

HOST = "127.0.0.1"
DOMAIN = "spf.bench.test"
SENDER = f"user@{DOMAIN}"
RECIPIENT = "bench@localhost"
HELO = "client.bench.test"
SELECTOR = "sel1"
DATE = "Wed, 25 Nov 2026 12:00:00 +0000"

REFERENCE = "empty"
ENVELOPE_VARIANTS = ("envelope", "dnsbl", "dnsbl-cached", "spf", "greylist")
CONTENT_VARIANTS = ("content", "dkim-dmarc", "clamav", "spamd")
ALL_VARIANTS = (REFERENCE, *ENVELOPE_VARIANTS, *CONTENT_VARIANTS)
# The plugins of the part variants (rcpt_local_users is added to each).
PARTS = {
    "dnsbl": ("connect_dnsbl",),
    "dnsbl-cached": ("connect_dnsbl",),
    "spf": ("mail_spf",),
    "greylist": ("rcpt_greylist",),
    "dkim-dmarc": ("data_dkim_verify", "data_dmarc"),
    "clamav": ("data_clamav",),
    "spamd": ("data_spamd",),
}
SLOW = ("content", "spamd")  # spamd scans take tens of milliseconds each: fewer messages

FULL = {"counts": {"fast": 2000, "slow": 200}, "warmup": {"fast": 100, "slow": 20}, "rounds": 3,
        "latency": {"fast": 100, "slow": 50}}
QUICK = {"counts": {"fast": 400, "slow": 80}, "warmup": {"fast": 50, "slow": 10}, "rounds": 1,
         "latency": {"fast": 40, "slow": 20}}


# -- the message and the zone -------------------------------------------------------------


WORDS = (
    "the quarterly report is attached below for your review and comments before friday "
    "please check the figures in section three against the numbers we agreed last month "
    "and let me know if anything looks wrong so that we can fix it before the meeting "
).split()


def message_text(size: int) -> str:
    """The unsigned message: LF line ends (smtp-source -F sends CRLF), ``size`` octets of
    plain English-like body in lines of at most 72 characters."""
    head = (
        f"From: Bench User <{SENDER}>\nTo: <{RECIPIENT}>\nSubject: filters bench\nDate: {DATE}\n"
        f"Message-ID: <filters-bench@{DOMAIN}>\nMIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=us-ascii\n\n"
    )
    lines: list[str] = []
    total, i = 0, 0
    while total < size:
        line = ""
        while len(line) < 60:
            line += WORDS[i % len(WORDS)] + " "
            i += 1
        line = line.rstrip()
        lines.append(line)
        total += len(line) + 2  # CRLF on the wire
    return head + "\n".join(lines) + "\n"


def sign(text: str, key_file: Path) -> str:
    """``text`` with a DKIM-Signature by ``SELECTOR._domainkey.DOMAIN`` (dkimpy), LF ends."""
    import dkim

    wire = text.replace("\n", "\r\n").encode()
    header = dkim.sign(
        wire, SELECTOR.encode(), DOMAIN.encode(), key_file.read_bytes(),
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id", b"mime-version", b"content-type"],
    )
    return header.decode().replace("\r\n", "\n") + text


def tampered(signed: str) -> str:
    """The signed message with its first body line changed: the signature no longer holds."""
    head, _, body = signed.partition("\n\n")
    return head + "\n\n" + "X" + body[1:]


def make_keys(base: Path) -> tuple[Path, str]:
    """An RSA 2048 key made by ``gateway dkim keygen``; (key file, its TXT record line)."""
    out = base / "keys"
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "dkim", "keygen", "--domain", DOMAIN, "--selector", SELECTOR,
         "--out", str(out)], env=gateway_env(), capture_output=True, text=True, timeout=60,
    )
    if done.returncode != 0:
        sys.exit(f"filters.py: gateway dkim keygen failed: {done.stderr.strip()}")
    return out / f"{DOMAIN}.{SELECTOR}.key", done.stdout.strip()


def zone_text(key_record: str) -> str:
    return "\n".join([
        "$TTL 300",
        "bench.test. IN SOA ns.bench.test. hostmaster.bench.test. 1 3600 600 86400 300",
        "ns.bench.test. IN A 127.0.0.1",
        # the RFC 5782 test entry is listed on both lists; 127.0.0.1 (the client) is not
        "2.0.0.127.zen.bench.test. IN A 127.0.0.2",
        '2.0.0.127.zen.bench.test. IN TXT "listed for the bench"',
        "2.0.0.127.bl.bench.test. IN A 127.0.0.2",
        f'{DOMAIN}. IN TXT "v=spf1 ip4:127.0.0.0/8 -all"',
        f'_dmarc.{DOMAIN}. IN TXT "v=DMARC1; p=reject"',
        key_record,
    ]) + "\n"


# -- policies ---------------------------------------------------------------------------


def _chain(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    with open(path, "rb") as f:
        data = tomllib.load(f)
    return data.get("dns", {}), data["plugins"]


def chain_for(variant: str) -> tuple[bool, list[dict[str, Any]]]:
    """(whether it needs [dns], the [[plugins]] chain) of ``variant``."""
    if variant == REFERENCE:
        with open(EMPTY_POLICY, "rb") as f:
            return False, tomllib.load(f)["plugins"]
    source = ENVELOPE_POLICY if variant in ENVELOPE_VARIANTS else CONTENT_POLICY
    _, plugins = _chain(source)
    plugins = [dict(p) for p in plugins]
    if variant in PARTS:
        keep = (*PARTS[variant], "rcpt_local_users")
        plugins = [p for p in plugins if p["name"] in keep]
    if variant == "dnsbl-cached":
        for p in plugins:
            p.pop("cache_size", None)
    return True, plugins


def check_same_sections() -> None:
    """Warn when the filter policies' other sections drift from empty-chain.toml's."""
    with open(EMPTY_POLICY, "rb") as f:
        base = tomllib.load(f)
    for path in (ENVELOPE_POLICY, CONTENT_POLICY):
        with open(path, "rb") as f:
            other = tomllib.load(f)
        for key in ("server", "listeners", "local", "limits"):
            if other.get(key) != base.get(key):
                print(f"filters.py: warning: [{key}] of {path.name} differs from {EMPTY_POLICY.name}'s; "
                      "the bench uses empty-chain.toml's", file=sys.stderr)


def policy_text(variant: str, port: int, workdir: Path, daemons: dict[str, Daemon]) -> str:
    data = bench_policy(EMPTY_POLICY, port, workdir)
    data["local"]["users"] = ["postmaster", RECIPIENT.partition("@")[0]]
    data.setdefault("delivery", {})["enabled"] = False  # measure accepting only
    needs_dns, plugins = chain_for(variant)
    if needs_dns:
        data["dns"] = {"nameservers": [daemons["dns"].address], "timeout": "5s"}
    for p in plugins:
        if p["name"] == "data_clamav":
            p["address"] = daemons["clamd"].address
        elif p["name"] == "data_spamd":
            p["address"] = daemons["spamd"].address
    data["plugins"] = plugins
    return dump_toml(data)


def gateway_env() -> dict[str, str]:
    return accept_gateway_env(ROOT)


def check_policies(base: Path, variants: list[str], daemons: dict[str, Daemon]) -> None:
    """Every variant's policy through ``gateway check`` before measuring."""
    workdir = base / "check"
    workdir.mkdir()
    for variant in variants:
        path = workdir / f"{variant}.toml"
        path.write_text(policy_text(variant, free_port(), workdir, daemons))
        done = subprocess.run([sys.executable, "-m", "gateway.cli", "check", str(path)], cwd=workdir,
                              env=gateway_env(), capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            sys.exit(f"filters.py: the {variant} bench policy is refused by this gateway:\n{done.stderr.strip()}")
    shutil.rmtree(workdir, ignore_errors=True)


# -- clients ----------------------------------------------------------------------------


def smtp_source(source: str, port: int, conc: int, count: int, message: Path, reuse: bool,
                timeout: float) -> Load:
    argv = [source, "-c", "-s", str(conc), "-m", str(count), "-F", str(message), "-M", HELO,
            "-f", SENDER, "-t", RECIPIENT, *(["-d"] if reuse else []), f"{HOST}:{port}"]
    return run_smtp_source(argv, count, timeout)


def _wire(text: str) -> bytes:
    """``text`` as DATA content: CRLF ends, dot-stuffed, with the final ``.``."""
    lines = text.rstrip("\n").split("\n")
    return "".join(("." + line if line.startswith(".") else line) + "\r\n" for line in lines).encode() + b".\r\n"


def send_one(port: int, text: str, timeout: float = 60.0) -> tuple[int, str, float, float]:
    """One message, one connection: (final reply code, its text, DATA-to-250 seconds,
    session seconds from connect to QUIT's reply)."""
    start = time.perf_counter()
    with smtplib.SMTP(HOST, port, local_hostname=HELO, timeout=timeout) as s:
        s.ehlo()
        code, reply = s.mail(SENDER)
        if code != 250:
            return code, reply.decode(errors="replace"), 0.0, time.perf_counter() - start
        code, reply = s.rcpt(RECIPIENT)
        if code != 250:
            return code, reply.decode(errors="replace"), 0.0, time.perf_counter() - start
        s.putcmd("data")
        code, reply = s.getreply()
        if code != 354:
            return code, reply.decode(errors="replace"), 0.0, time.perf_counter() - start
        s.send(_wire(text))
        sent = time.perf_counter()
        code, reply = s.getreply()
        data_to_reply = time.perf_counter() - sent
        s.quit()
    return code, reply.decode(errors="replace"), data_to_reply, time.perf_counter() - start


def prime_greylist(port: int) -> str:
    """Refused once, then passed: the bench's triplet is known to the store."""
    with smtplib.SMTP(HOST, port, local_hostname=HELO, timeout=30) as s:
        s.ehlo()
        s.mail(SENDER)
        first, _ = s.rcpt(RECIPIENT)
        second, reply = s.rcpt(RECIPIENT)
        s.rset()
    if second != 250:
        raise RuntimeError(f"greylisting: the retry got {second} {reply.decode(errors='replace')}")
    return f"greylist primed ({first}, then {second})"


# -- a point ----------------------------------------------------------------------------


@dataclasses.dataclass
class Sample:
    variant: str
    round: int
    count: int
    seconds: float
    rate: float | None
    cpu_pct: float | None
    helpers_cpu_pct: float | None
    hwm_kib: int | None
    queued: int | None
    expected: int | None
    data_p50_ms: float | None = None
    data_p99_ms: float | None = None
    wall_p50_ms: float | None = None
    wall_p99_ms: float | None = None
    notes: str = ""
    error: str = ""


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


@contextlib.contextmanager
def gateway_running(variant: str, workdir: Path, daemons: dict[str, Daemon],
                    start_timeout: float) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    workdir.mkdir(parents=True)
    port = free_port()
    policy = workdir / "policy.toml"
    policy.write_text(policy_text(variant, port, workdir, daemons))
    log = workdir / "gateway.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "run", "--policy", str(policy)], cwd=workdir,
            env=gateway_env(), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True,
        )
    try:
        wait_ready(proc, port, start_timeout)
        yield proc, port, log
    finally:
        stop(proc)


def _log_tail(log: Path, lines: int = 5) -> str:
    with contextlib.suppress(OSError):
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])
    return ""


def run_point(variant: str, rnd: int, args: argparse.Namespace, base: Path, tools: dict[str, str],
              daemons: dict[str, Daemon], files: dict[str, Path], texts: dict[str, str]) -> Sample:
    kind = "slow" if variant in SLOW else "fast"
    count, warm = args.counts[kind], args.warmups[kind]
    workdir = base / f"r{rnd}-{variant}"
    _, plugins = chain_for(variant)
    names = {p["name"] for p in plugins}
    notes: list[str] = []

    def failed(seconds: float, error: str, log: Path) -> Sample:
        return Sample(variant, rnd, count, seconds, None, None, None, None, None, None,
                      error=f"{error} {_log_tail(log)}".strip())

    log = workdir / "gateway.log"
    try:
        with gateway_running(variant, workdir, daemons, args.start_timeout) as (proc, port, log):
            if "rcpt_greylist" in names:
                notes.append(prime_greylist(port))
            if "data_dkim_verify" in names:
                code, reply, _, _ = send_one(port, texts["tampered"])
                if code != 550:
                    return failed(0.0, f"DKIM check does not bite: a tampered message got {code} {reply}", log)
                notes.append("tampered message refused (550)")
            if warm:
                w = smtp_source(tools["smtp-source"], port, args.concurrency, warm, files["signed"], args.reuse,
                                args.timeout)
                if not w.ok:
                    return failed(w.seconds, f"warm-up: {w.error}", log)
            helpers0 = sum(d.cpu_seconds() for d in daemons.values())
            cpu0 = cpu_seconds(proc.pid)
            load = smtp_source(tools["smtp-source"], port, args.concurrency, count, files["signed"], args.reuse,
                               args.timeout)
            cpu1 = cpu_seconds(proc.pid)
            helpers1 = sum(d.cpu_seconds() for d in daemons.values())
            data_times: list[float] = []
            wall_times: list[float] = []
            refused = 0
            if load.ok:
                for _ in range(args.latency_counts[kind]):
                    code, reply, data_s, wall_s = send_one(port, texts["signed"])
                    if code != 250:
                        refused += 1
                        notes.append(f"latency message refused: {code} {reply}")
                        break
                    data_times.append(data_s)
                    wall_times.append(wall_s)
            hwm = read_status(proc.pid).get("VmHWM")
            queued = queue_count(workdir / "queue" / "msg")
            expected = warm + count + len(data_times)
            error = load.error or (f"{refused} latency message(s) refused" if refused else "")
            if proc.poll() is not None:
                error = f"gateway exited with status {proc.returncode}; {error}"
            if error:
                error = f"{error} {_log_tail(log)}".strip()
            ms = 1000.0
            return Sample(
                variant, rnd, count, load.seconds, count / load.seconds if load.ok else None,
                100.0 * (cpu1 - cpu0) / load.seconds if load.seconds > 0 else None,
                100.0 * (helpers1 - helpers0) / load.seconds if load.seconds > 0 else None,
                hwm, queued, expected,
                _pct(data_times, 0.5) * ms if data_times else None,
                _pct(data_times, 0.99) * ms if data_times else None,
                _pct(wall_times, 0.5) * ms if wall_times else None,
                _pct(wall_times, 0.99) * ms if wall_times else None,
                "; ".join(notes), error,
            )
    except Exception as exc:
        return failed(0.0, f"{type(exc).__name__}: {exc}", log)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


# -- report -----------------------------------------------------------------------------


def _med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarise(samples: list[Sample], variants: list[str]) -> list[dict[str, Any]]:
    ref = {s.round: s for s in samples if s.variant == REFERENCE and s.rate}
    ref_rate = _med([s.rate for s in ref.values() if s.rate])
    ref_data = _med([s.data_p50_ms for s in ref.values() if s.data_p50_ms is not None])
    ref_wall = _med([s.wall_p50_ms for s in ref.values() if s.wall_p50_ms is not None])
    ref_data99 = _med([s.data_p99_ms for s in ref.values() if s.data_p99_ms is not None])
    ref_wall99 = _med([s.wall_p99_ms for s in ref.values() if s.wall_p99_ms is not None])
    rows = []
    for variant in variants:
        mine = [s for s in samples if s.variant == variant]
        ok = [s for s in mine if s.rate]
        rates = [s.rate for s in ok if s.rate]
        per_round = [s.rate / ref[s.round].rate for s in ok if s.round in ref and s.rate and ref[s.round].rate]
        data50 = _med([s.data_p50_ms for s in ok if s.data_p50_ms is not None])
        wall50 = _med([s.wall_p50_ms for s in ok if s.wall_p50_ms is not None])
        data99 = _med([s.data_p99_ms for s in ok if s.data_p99_ms is not None])
        wall99 = _med([s.wall_p99_ms for s in ok if s.wall_p99_ms is not None])
        mismatched = [s for s in mine if s.expected is not None and s.queued != s.expected]
        rows.append({
            "variant": variant,
            "chain": " -> ".join(p["name"] for p in chain_for(variant)[1]),
            "messages": mine[0].count if mine else 0,
            "rounds": len(mine),
            "median": _med(rates),
            "min": min(rates) if rates else None,
            "max": max(rates) if rates else None,
            "ratio": _med(rates) / ref_rate if rates and ref_rate else None,
            "ratio_rounds": (min(per_round), max(per_round)) if per_round else None,
            "cpu_pct": _med([s.cpu_pct for s in ok if s.cpu_pct is not None]),
            "helpers_cpu_pct": _med([s.helpers_cpu_pct for s in ok if s.helpers_cpu_pct is not None]),
            "hwm_mib": max(s.hwm_kib for s in ok if s.hwm_kib) / 1024 if any(s.hwm_kib for s in ok) else None,
            "data_p50": data50,
            "data_p99": data99,
            "data_added": data50 - ref_data if data50 is not None and ref_data is not None else None,
            "data_added99": (data99 - ref_data99 if data99 is not None and ref_data99 is not None else None),
            "wall_p50": wall50,
            "wall_p99": wall99,
            "wall_added": wall50 - ref_wall if wall50 is not None and ref_wall is not None else None,
            "wall_added99": (wall99 - ref_wall99 if wall99 is not None and ref_wall99 is not None else None),
            "queue_check": ("n/a" if all(s.expected is None for s in mine) else "ok" if not mismatched else
                            "MISMATCH " + ", ".join(f"{s.queued}/{s.expected}" for s in mismatched)),
            "failures": len([s for s in mine if s.error]),
        })
    return rows


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def table(rows: list[dict[str, Any]]) -> str:
    head = ["variant", "msgs/s median", "min-max", "vs empty (per-round range)", "DATA-to-250 p50/p99 ms",
            "added p50/p99 ms", "session c=1 p50/p99 ms", "added p50/p99 ms", "gateway CPU %", "helpers CPU %",
            "peak RSS MiB", "queue check"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    for r in rows:
        if r["median"] is None:
            cells = [r["variant"], "not run" if r["rounds"] == 0 else "FAILED", *[""] * 9, r["queue_check"]]
        else:
            ratio = _f(r["ratio"], ".2f")
            if r["ratio_rounds"] and r["variant"] != REFERENCE:
                ratio += f" ({r['ratio_rounds'][0]:.2f}-{r['ratio_rounds'][1]:.2f})"
            cells = [
                r["variant"], f"{r['median']:,.0f}", f"{r['min']:,.0f}-{r['max']:,.0f}", ratio,
                f"{_f(r['data_p50'], '.1f')} / {_f(r['data_p99'], '.1f')}",
                f"{_f(r['data_added'], '+.1f')} / {_f(r['data_added99'], '+.1f')}" if r["variant"] != REFERENCE else "",
                f"{_f(r['wall_p50'], '.1f')} / {_f(r['wall_p99'], '.1f')}",
                f"{_f(r['wall_added'], '+.1f')} / {_f(r['wall_added99'], '+.1f')}" if r["variant"] != REFERENCE else "",
                _f(r["cpu_pct"], ".0f"), _f(r["helpers_cpu_pct"], ".0f"), _f(r["hwm_mib"], ".1f"),
                r["queue_check"],
            ]
        if r["failures"]:
            cells[-1] += f"; {r['failures']} of {r['rounds']} runs FAILED"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Accept rate with the envelope and content filters vs the empty chain.")
    p.add_argument("--quick", action="store_true", help="short run: fewer messages, 1 round")
    p.add_argument("-c", "--concurrency", type=int, default=20, help="smtp-source sessions (default 20)")
    p.add_argument("-m", "--count", type=int, help="messages per timed run (default 2000, 200 for the variants "
                   "with spamd; --quick 400/80)")
    p.add_argument("-r", "--rounds", type=int, help="interleaved rounds (default 3; --quick 1)")
    p.add_argument("-l", "--size", type=int, default=5120, help="message body octets (default 5120)")
    p.add_argument("--reuse", action="store_true", help="several messages per connection (smtp-source -d); "
                   "default: one message per connection")
    p.add_argument("--latency-count", type=int, help="messages timed one by one after each run (default 100, "
                   "50 for the variants with spamd; --quick 40/20; 0: none)")
    p.add_argument("--variants", default=",".join(ALL_VARIANTS),
                   help=f"comma-separated subset of {','.join(ALL_VARIANTS)} (default: all; empty is always run)")
    p.add_argument("--spamd-children", type=int, default=4, help="spamd's children (default 4)")
    p.add_argument("--timeout", type=float, default=600, help="time limit per smtp-source run, seconds")
    p.add_argument("--start-timeout", type=float, default=30, help="time limit for a server to start, seconds")
    p.add_argument("--tmpdir", help="where the queue directories go (default: the system temp dir, /tmp)")
    p.add_argument("--json", help="also write every sample and the summary to this file")
    p.add_argument("--keep", action="store_true", help="keep the temporary directories (queues, logs)")
    p.add_argument("--rev", help="benchmark the gateway as committed at this git revision instead of the "
                   "work tree, e.g. --rev HEAD")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    args.counts = {k: args.count or v for k, v in preset["counts"].items()}
    args.warmups = dict(preset["warmup"])
    args.rounds = args.rounds or preset["rounds"]
    args.latency_counts = {k: v if args.latency_count is None else args.latency_count
                           for k, v in preset["latency"].items()}
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(chosen) - set(ALL_VARIANTS)
    if unknown:
        p.error(f"unknown variants: {', '.join(sorted(unknown))}")
    args.variant_list = [v for v in ALL_VARIANTS if v in chosen or v == REFERENCE]
    return args


def _terminated(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)
    tools = {"smtp-source": find_tool("smtp-source")}
    check_same_sections()
    global ROOT
    base = Path(tempfile.mkdtemp(prefix="gw-filters-", dir=args.tmpdir))
    daemons: dict[str, Daemon] = {}
    samples: list[Sample] = []
    interrupted = False
    started = time.monotonic()
    try:
        if args.rev:
            ROOT = export_rev(args.rev, base)
        key_file, key_record = make_keys(base)
        signed = sign(message_text(args.size), key_file)
        texts = {"signed": signed, "tampered": tampered(signed)}
        files = {"signed": base / "signed.eml"}
        files["signed"].write_text(signed)
        variants = args.variant_list
        daemons["dns"] = start_dns(zone_text(key_record), base / "dns", "bench.test")
        if any(v in ("content", "clamav") for v in variants):
            daemons["clamd"] = start_clamd(base / "clamd")
        if any(v in ("content", "spamd") for v in variants):
            daemons["spamd"] = start_spamd(args.spamd_children)
        check_policies(base, variants, daemons)
        env = environment(base, {})
        env["gateway"] = describe_source(args.rev)
        print(f"filters.py  {env['date']}  python {env['python']}  aiosmtpd {env['aiosmtpd']}  "
              f"postfix {env['postfix']}  cpus {env['cpus']} ({env['cpu_model']})  kernel {env['kernel']}")
        print(f"queue dirs under {base} ({env['queue_fs']}); gateway: {env['gateway']}; [delivery] enabled = false")
        print(f"load: smtp-source -s {args.concurrency} -F <{len(signed.encode()) + signed.count(chr(10))} octets, "
              f"DKIM-signed> -f {SENDER} -t {RECIPIENT}; "
              f"{'several messages per connection (-d)' if args.reuse else 'one message per connection'}; "
              f"messages {args.counts['fast']} ({args.counts['slow']} for {', '.join(SLOW)}) after a warm-up of "
              f"{args.warmups['fast']} ({args.warmups['slow']}); {args.rounds} rounds; "
              f"then {args.latency_counts['fast']} ({args.latency_counts['slow']}) timed one by one")
        print("helpers: " + ", ".join(f"{d.name} {d.address} pid {d.proc.pid}" for d in daemons.values())
              + (f" ({args.spamd_children} children)" if "spamd" in daemons else ""))
        for v in variants:
            print(f"  {v:<13} {' -> '.join(p['name'] for p in chain_for(v)[1])}")
        for rnd in range(args.rounds):
            order = variants[rnd % len(variants):] + variants[: rnd % len(variants)]
            for variant in order:
                s = run_point(variant, rnd, args, base, tools, daemons, files, texts)
                samples.append(s)
                for d in daemons.values():
                    if not d.alive():
                        raise RuntimeError(f"{d.name} died: {d.log_tail()}")
                rate = f"{s.rate:8.1f} msg/s" if s.rate else "  FAILED    "
                extra = f"  queue {s.queued}/{s.expected}" if s.expected is not None else ""
                flag = "  <-- MISMATCH" if s.expected is not None and s.queued != s.expected else ""
                lat = (f"  DATA-to-250 p50 {s.data_p50_ms:.1f} ms p99 {s.data_p99_ms:.1f} ms"
                       if s.data_p50_ms is not None else "")
                print(f"round {rnd + 1}/{args.rounds}  {variant:<13}{rate}  {s.seconds:6.2f}s{extra}{lat}{flag}"
                      f"{'  [' + s.notes + ']' if s.notes else ''}{'  ' + s.error if s.error else ''}", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted; summarising what was measured", file=sys.stderr)
    finally:
        for d in daemons.values():
            d.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    rows = summarise(samples, args.variant_list)
    print()
    print(f"Finished in {time.monotonic() - started:.0f}s. c={args.concurrency}, "
          f"{'several messages' if args.reuse else 'one message'} per connection. Median of {args.rounds} "
          "interleaved rounds; 'vs empty' = ratio of medians to the empty chain, in parentheses the range of the "
          "per-round ratios; DATA-to-250 = end of data to the 250, session = connect to QUIT's reply, both at "
          "c=1 after the timed run (median over rounds of each round's p50/p99); added = minus the empty "
          "chain's p50/p99; gateway CPU % = its CPU time / wall time (200 = both cores); helpers CPU % = DNS server, "
          "clamd and spamd together.")
    print()
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"args": {k: v for k, v in vars(args).items()}, "samples": [dataclasses.asdict(s) for s in samples],
             "summary": rows}, indent=2, default=str))
    bad = [r for r in rows if r["failures"] or r["queue_check"].startswith("MISMATCH")]
    for r in bad:
        print(f"WARNING: {r['variant']}: {r['queue_check']}"
              + (f", {r['failures']} failed run(s)" if r["failures"] else ""), file=sys.stderr)
    return 130 if interrupted else (1 if bad else 0)


if __name__ == "__main__":
    sys.exit(main())
