"""gateway/smtp/tls.py: the self-signed pair made once and whole, a broken pair replaced,
a configured pair that does not match named."""

from __future__ import annotations

import logging
import multiprocessing
import os
import ssl
from pathlib import Path

import pytest

from gateway.policy import TlsSettings
from gateway.smtp.tls import TlsSetupError, ensure_self_signed, server_context


def _loads(cert: Path, key: Path) -> bool:
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError):
        return False
    return True


def _first_start(directory: str, barrier: multiprocessing.synchronize.Barrier) -> None:
    barrier.wait()
    try:
        cert, key = ensure_self_signed(Path(directory), "gw.test.example")
        os._exit(0 if _loads(cert, key) else 3)
    except BaseException:
        os._exit(2)


def test_processes_starting_at_once_all_get_one_matching_pair(tmp_path: Path) -> None:
    """Each worker made var/tls on a first start, with the same temporary names and the
    key and certificate renamed apart: some got another's key with their certificate."""
    fork = multiprocessing.get_context("fork")
    for round in range(5):
        directory = tmp_path / f"var{round}" / "tls"
        barrier = fork.Barrier(8)
        procs = [fork.Process(target=_first_start, args=(str(directory), barrier)) for _ in range(8)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(60)
        assert [proc.exitcode for proc in procs] == [0] * 8, f"round {round}"
        assert _loads(directory / "cert.pem", directory / "key.pem")
        assert sorted(p.name for p in directory.parent.iterdir()) == ["tls"], "nothing left behind"
        assert (directory / "key.pem").stat().st_mode & 0o077 == 0


def test_a_mismatched_self_signed_pair_is_moved_aside_and_remade(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A pair left mismatched on disk used to stop every later start."""
    directory = tmp_path / "var" / "tls"
    cert, key = ensure_self_signed(directory, "gw.test.example")
    other_cert, other_key = ensure_self_signed(tmp_path / "other", "gw.test.example")
    key.write_bytes(other_key.read_bytes())
    old_cert = cert.read_bytes()
    with caplog.at_level(logging.WARNING, logger="gateway.smtp.tls"):
        assert ensure_self_signed(directory, "gw.test.example") == (cert, key)
    assert _loads(cert, key) and cert.read_bytes() != old_cert
    (aside,) = [p for p in directory.parent.iterdir() if p.name.startswith("tls.bad-")]
    assert (aside / "cert.pem").read_bytes() == old_cert
    warning = caplog.text
    assert str(cert) in warning and str(key) in warning and "KEY_VALUES_MISMATCH" in warning


def test_a_half_pair_is_remade(tmp_path: Path) -> None:
    directory = tmp_path / "tls"
    directory.mkdir()
    (directory / "key.pem").write_text("left by an interrupted first start\n")
    cert, key = ensure_self_signed(directory, "gw.test.example")
    assert _loads(cert, key)


def test_a_configured_pair_that_does_not_match_is_an_error_naming_both_files(tmp_path: Path) -> None:
    cert, _ = ensure_self_signed(tmp_path / "a", "gw.test.example")
    _, key = ensure_self_signed(tmp_path / "b", "gw.test.example")
    with pytest.raises(TlsSetupError) as caught:
        server_context(TlsSettings(cert=cert, key=key), tmp_path / "var", "gw.test.example")
    assert str(cert) in str(caught.value) and str(key) in str(caught.value)
    assert "KEY_VALUES_MISMATCH" in str(caught.value)
    assert not (tmp_path / "var").exists(), "a configured pair is never replaced by a self-signed one"
