"""The public SPF test suite (RFC 7208 test cases, openspf.org release 2014.04) against ``check_spf``.

The suite ships in pyspf's source distribution (``test/rfc7208-tests.yml``), not in the
installed wheel. It is fetched at test time with ``pip download`` into a cache
directory outside the repository and read from the archive there: it is never copied
into this repository (it carries its own licence). Without network access, PyPI or
PyYAML the test is skipped, saying why.

For each scenario the zone data is loaded into the real test DNS server and every case
runs through ``plugins.mail_spf.check_spf``: our DNS adapter (``plugins/_spf_dns.py``)
and result mapping are what is under test, on top of pyspf's evaluation. The result
must be one the suite allows; a given ``explanation`` must match.

How the suite's zone data becomes a real zone (as pyspf's own driver reads it):

- ``SPF`` (type 99) records become TXT records unless the name has TXT records of its
  own: RFC 7208 §3.1 dropped type SPF, and the suite's comments ask drivers to do so;
- ``TXT: NONE`` means "no TXT record";
- ``TIMEOUT`` makes the server drop the queries for that name (all types, or the types
  not listed before it), so they end in a real timeout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import spf

from plugins._spf_dns import make_sync_resolver
from plugins.mail_spf import check_spf
from tests.dnsserver import DnsTestServer, dns_settings

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the RFC 7208 test suite")

SUITE_MEMBER = "test/rfc7208-tests.yml"
_TYPES = ("A", "AAAA", "MX", "PTR", "TXT", "CNAME", "SPF")

# Cases left out, and why. None is at present: every case of the 2014.04 release can be
# expressed as a real zone. Two details of the data are adapted instead: the
# "null-text" case's TXT record without any string cannot be written in a zone file
# (it is left out; the case still checks that strings are joined), and "bytes-bug",
# written for pyspf's strict=2 mode, runs at the normal strictness the plugin uses
# (its comment allows that).
SKIPPED: dict[str, str] = {}

# The suite's sections, so that a section added upstream is noticed, not silently run
# or silently dropped.
SECTIONS = (
    "Initial processing",
    "Record lookup",
    "Selecting records",
    "Record evaluation",
    "ALL mechanism syntax",
    "PTR mechanism syntax",
    "A mechanism syntax",
    "Include mechanism semantics and syntax",
    "MX mechanism syntax",
    "EXISTS mechanism syntax",
    "IP4 mechanism syntax",
    "IP6 mechanism syntax",
    "Semantics of exp and other modifiers",
    "Macro expansion rules",
    "Processing limits",
    "Test cases from implementation bugs",
)


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gateway-tests"


@lru_cache(maxsize=1)
def _suite_text() -> bytes | str:
    """The YAML text from the cached sdist, downloading it first; a str is a skip reason."""
    version = spf.__version__
    archive = _cache_dir() / f"pyspf-{version}.tar.gz"
    if not archive.exists():
        with tempfile.TemporaryDirectory() as tmp:
            try:
                proc = subprocess.run(
                    [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                     "--disable-pip-version-check", "--quiet", f"pyspf=={version}", "-d", tmp],
                    capture_output=True, text=True, timeout=300,
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                return f"could not run pip download for pyspf {version}: {exc}"
            found = list(Path(tmp).glob("pyspf-*.tar.gz"))
            if proc.returncode != 0 or not found:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                return f"could not download the pyspf {version} sdist from PyPI: {tail[0]}"
            archive.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(found[0]), archive)
    try:
        with tarfile.open(archive) as tar:
            member = tar.extractfile(f"pyspf-{version}/{SUITE_MEMBER}")
            if member is None:
                return f"{archive} has no {SUITE_MEMBER}"
            return member.read()
    except (KeyError, tarfile.TarError) as exc:
        return f"cannot read {SUITE_MEMBER} from {archive}: {exc}"


@pytest.fixture(scope="module")
def scenarios() -> dict[str, dict[str, Any]]:
    text = _suite_text()
    if isinstance(text, str):
        pytest.skip(text)
    return {doc["description"]: doc for doc in yaml.safe_load_all(text)}


def _absolute(name: str) -> str:
    """The name with its final dot, quoted if it holds a space (a macro-expansion case)."""
    name = name if name.endswith(".") else name + "."
    return f'"{name}"' if " " in name else name


def _txt_string(value: str) -> str:
    """A zone-file character-string; dnslib reads ``\\xHH`` escapes, and UTF-8 as is."""
    out = []
    for char in value:
        if char in '"\\' or ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def zone_for(zonedata: dict[str, list[Any]]) -> tuple[str, dict[str, tuple[str, ...]]]:
    """The scenario's zone text, and the (name, types) whose queries must time out."""
    lines: list[str] = []
    drops: dict[str, tuple[str, ...]] = {}
    for name, records in zonedata.items():
        owner = _absolute(name)
        has_txt = any(isinstance(r, dict) and "TXT" in r for r in records)
        present: set[str] = set()
        for record in records:
            if record == "TIMEOUT":
                drops[name] = tuple(t for t in _TYPES if t not in present)
                continue
            ((rtype, value),) = record.items()
            if rtype == "SPF":
                if has_txt:
                    continue
                rtype = "TXT"
            if value == "NONE":
                continue
            present.add(rtype)
            if rtype == "TXT":
                strings = [value] if isinstance(value, str) else list(value)
                if not strings:
                    continue  # a TXT record without strings cannot be written in a zone
                rdata = " ".join(_txt_string(s) for s in strings)
            elif rtype == "MX":
                preference, exchange = value
                rdata = f"{preference} {_absolute(exchange) if exchange else '.'}"
            elif rtype in ("PTR", "CNAME"):
                rdata = _absolute(value)
            else:
                rdata = str(value)
            lines.append(f"{owner} 300 IN {rtype} {rdata}")
    return "\n".join(lines) + "\n", drops


def _load(server: DnsTestServer, zonedata: dict[str, list[Any]]) -> None:
    text, drops = zone_for(zonedata)
    server.heal()
    server.set_zone(text)
    for name, types in drops.items():
        server.drop(name, *types)


def test_the_suite_has_the_expected_sections(scenarios: dict[str, dict[str, Any]]) -> None:
    assert sorted(scenarios) == sorted(SECTIONS)


@pytest.mark.parametrize("section", SECTIONS)
def test_section(section: str, scenarios: dict[str, dict[str, Any]], suite_dns: DnsTestServer) -> None:
    scenario = scenarios.get(section)
    if scenario is None:
        pytest.skip(f"section {section!r} is not in this version of the suite")
    _load(suite_dns, scenario["zonedata"])
    # Small timeouts: the TIMEOUT cases wait for them.
    resolver = make_sync_resolver(dns_settings(suite_dns.port, timeout=0.3))
    failures = []
    ran = 0
    for case_id, case in scenario["tests"].items():
        if case_id in SKIPPED:
            continue
        ran += 1
        expected = case["result"]
        allowed = [expected] if isinstance(expected, str) else list(expected)
        got = check_spf(resolver, case["host"], case["mailfrom"], case["helo"], max_time=5.0)
        if got.result not in allowed:
            failures.append(f"{case_id} ({case['spec']}): {got.result}, expected {allowed}; {got.problem}")
            continue
        if "explanation" in case and got.result == "fail":
            want = None if case["explanation"] == "DEFAULT" else case["explanation"]
            if got.explanation != want:
                failures.append(f"{case_id}: explanation {got.explanation!r}, expected {want!r}")
    assert not failures, "\n".join(failures)
    assert ran, f"every case of {section!r} is skipped"
