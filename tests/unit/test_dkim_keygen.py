"""``gateway dkim keygen`` as an operator runs it: key file, DNS record, usable keys."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import dkim
import pytest

from gateway.commands.dkim import txt_strings
from plugins._dkim_sync import load_key_in_thread, sign_in_thread

ROOT = Path(__file__).resolve().parents[2]
MESSAGE = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nBody.\r\n"
RECORD = re.compile(r'^(\S+)\. IN TXT ((?:"[^"]*" ?)+)$')


def keygen(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "dkim", "keygen", *args],
        capture_output=True, text=True, timeout=60, env=env,
    )


def parse_record(line: str) -> tuple[str, list[str]]:
    match = RECORD.match(line.strip())
    assert match, line
    return match.group(1), re.findall(r'"([^"]*)"', match.group(2))


@pytest.mark.parametrize(("algorithm", "signing"), [("rsa", "rsa-sha256"), ("ed25519", "ed25519-sha256")])
def test_keygen_writes_a_private_key_and_prints_its_record(tmp_path: Path, algorithm: str, signing: str) -> None:
    out = tmp_path / "keys"
    done = keygen("--domain", "Example.ORG", "--selector", "s2026", "--algorithm", algorithm, "--out", str(out))
    assert done.returncode == 0, done.stderr
    key = out / "example.org.s2026.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    name, strings = parse_record(done.stdout)
    assert name == "s2026._domainkey.example.org"
    assert all(len(s) <= 255 for s in strings)
    record = "".join(strings)
    assert record.startswith(f"v=DKIM1; k={algorithm}; p=")
    # The key signs, and the printed record verifies what it signed.
    value = sign_in_thread(MESSAGE, "example.org", "s2026", load_key_in_thread(key, signing), signing, ("from",), ())
    signed = b"DKIM-Signature: " + value.replace("\n", "\r\n").encode() + b"\r\n" + MESSAGE
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: record.encode())


def test_keygen_never_overwrites_and_checks_its_arguments(tmp_path: Path) -> None:
    args = ("--domain", "example.org", "--selector", "s1", "--algorithm", "ed25519", "--out", str(tmp_path))
    assert keygen(*args).returncode == 0
    before = (tmp_path / "example.org.s1.key").read_bytes()
    again = keygen(*args)
    assert again.returncode == 1 and "not overwriting" in again.stderr
    assert (tmp_path / "example.org.s1.key").read_bytes() == before
    assert keygen("--domain", "bad domain", "--selector", "s1", "--out", str(tmp_path)).returncode == 2
    assert keygen("--domain", "example.org", "--selector", "s1", "--bits", "512", "--out", str(tmp_path)).returncode == 2


def test_txt_strings_split_at_255() -> None:
    assert txt_strings("a" * 600) == ["a" * 255, "a" * 255, "a" * 90]
    assert txt_strings("") == [""]


def test_keygen_without_out_writes_into_the_current_directory(tmp_path: Path) -> None:
    # The README's `gateway dkim keygen --domain D --selector S` works as written.
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "dkim", "keygen", "--domain", "example.org", "--selector", "s3",
         "--algorithm", "ed25519"],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    key = tmp_path / "example.org.s3.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert f"private key written to {key}" in done.stderr
    assert parse_record(done.stdout)[0] == "s3._domainkey.example.org"
