"""``gateway check`` as an operator runs it: the chains and overrides it prints."""

from __future__ import annotations

from tests.integration.test_cli import ROOT, gateway


def _listener_chain(stdout: str, name: str) -> list[str]:
    line = next(l for l in stdout.splitlines() if l.startswith(f"listener {name} "))
    return line.split(": ", 1)[1].split(" -> ")


def _override_block(stdout: str, title: str) -> list[str]:
    """The indented lines under ``  <title>:`` in the overrides section."""
    lines = stdout.splitlines()
    start = lines.index(f"  {title}:")
    block = []
    for line in lines[start + 1 :]:
        if not line.startswith("    "):
            break
        block.append(line.strip())
    return block


def test_check_shows_the_mx_chain_without_the_office_network_override() -> None:
    # The office network's override disables these three; a listener's chain is what
    # strangers get, so they must be in it.
    result = gateway("check", str(ROOT / "policies/edge-relay.toml"))
    assert result.returncode == 0, result.stderr
    mx = _listener_chain(result.stdout, "mx")
    for plugin in ("connect_earlytalker", "connect_dnsbl", "rcpt_greylist"):
        assert plugin in mx
    # Listener overrides do apply to their listener's chain.
    submission = _listener_chain(result.stdout, "submission")
    assert "connect_dnsbl" not in submission and "data_clamav" in submission


def test_check_prints_what_each_override_changes() -> None:
    result = gateway("check", str(ROOT / "policies/edge-relay.toml"))
    assert result.returncode == 0, result.stderr
    office = _override_block(result.stdout, "network 192.0.2.0/24")
    assert office[0] == "disables: connect_dnsbl, rcpt_greylist, connect_earlytalker"
    assert office[1].startswith("limits: idle_timeout 5m -> 15m")
    assert _override_block(result.stdout, "recipient_domain example.org") == [
        "limits: max_message_size 25MB -> 100MB",
    ]
    assert "limits: max_message_size 25MB -> 50MB, max_recipients 100 -> 500" in _override_block(
        result.stdout, "listener submission"
    )


def test_check_prints_an_override_of_plugin_settings(tmp_path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(
        '[[plugins]]\nname = "rcpt_greylist"\ndelay = "5m"\n[[plugins]]\nname = "rcpt_relay"\n'
        '[[overrides]]\nmatch = { recipient_domain = ".example.net" }\n'
        '[overrides.plugins.rcpt_greylist]\ndelay = "1m"\n'
    )
    result = gateway("check", str(policy))
    assert result.returncode == 0, result.stderr
    assert _override_block(result.stdout, "recipient_domain .example.net") == [
        "plugin rcpt_greylist: delay 5m -> 1m",
    ]
