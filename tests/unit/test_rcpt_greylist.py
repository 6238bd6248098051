"""rcpt_greylist's decisions, called hook by hook with the embedded SQLite store."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.address import Address
from gateway.model import Recipient, Session, Transaction
from gateway.policy import parse_network
from gateway.verdicts import Action, Verdict
from plugins import rcpt_greylist
from plugins.rcpt_greylist import REPLY_GREYLISTED, Plugin, Settings, triplet_key

SENDER = Address("Sender", "Example.ORG")
RCPT = Address("alice", "local.example")


class Harness:
    """One plugin instance with a fake clock; ``rcpt`` asks it about one recipient."""

    def __init__(self, tmp_path: Path, **settings: Any) -> None:
        self.gateway = SimpleNamespace(policy=SimpleNamespace(server=SimpleNamespace(var_dir=tmp_path)))
        self.settings = Settings(**settings)
        self.plugin = Plugin()
        self.now = 1_000_000.0
        self.plugin.clock = lambda: self.now

    async def __aenter__(self) -> Harness:
        await self.plugin.gateway_startup(self.gateway, self.settings)  # type: ignore[arg-type]
        # Expiry is the store's business: give it the same fake clock.
        self.plugin._stores.get(self.settings.state)._clock = self.plugin.clock  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.plugin.gateway_shutdown(self.settings)

    async def rcpt(
        self, ip: str = "192.0.2.10", sender: Address = SENDER, rcpt: Address = RCPT, **session: Any
    ) -> Verdict | None:
        s = Session(peer_ip=ip, peer_port=4000, listener="smtp", **session)
        return await self.plugin.gateway_rcpt(s, Transaction(sender), Recipient(rcpt), self.settings)


def is_greylisted(verdict: Verdict | None) -> bool:
    return verdict is not None and verdict.action is Action.TEMPFAIL and verdict.reply == REPLY_GREYLISTED


def test_first_attempt_early_retry_then_pass(tmp_path: Path) -> None:
    async def main() -> None:
        async with Harness(tmp_path, delay=300.0) as h:
            assert is_greylisted(await h.rcpt())
            h.now += 299
            assert is_greylisted(await h.rcpt())
            h.now += 2
            assert await h.rcpt() is None  # passes: no opinion, never accept

    asyncio.run(main())


def test_retry_from_the_same_network_passes_another_address_does_not(tmp_path: Path) -> None:
    async def main() -> None:
        async with Harness(tmp_path, delay=60.0) as h:
            assert is_greylisted(await h.rcpt(ip="192.0.2.10"))
            h.now += 61
            assert await h.rcpt(ip="192.0.2.200") is None  # same /24
            assert is_greylisted(await h.rcpt(ip="198.51.100.10"))  # another network: new triplet

    asyncio.run(main())


def test_pending_entry_expires_and_passed_entry_is_refreshed(tmp_path: Path) -> None:
    async def main() -> None:
        async with Harness(tmp_path, delay=60.0, expiry=600.0, pass_ttl=1000.0) as h:
            assert is_greylisted(await h.rcpt())
            h.now += 601  # too late: forgotten, starts over
            assert is_greylisted(await h.rcpt())
            h.now += 61
            assert await h.rcpt() is None
            for _ in range(3):  # each pass refreshes pass_ttl
                h.now += 900
                assert await h.rcpt() is None
            h.now += 1001
            assert is_greylisted(await h.rcpt())

    asyncio.run(main())


def test_triplet_is_case_insensitive_and_null_sender_is_its_own(tmp_path: Path) -> None:
    s = Settings()
    assert triplet_key("192.0.2.1", SENDER, RCPT, s) == triplet_key(
        "192.0.2.99", Address("sender", "example.org"), Address("ALICE", "Local.Example"), s
    )
    assert triplet_key("192.0.2.1", Address.null(), RCPT, s) != triplet_key("192.0.2.1", SENDER, RCPT, s)
    assert triplet_key("2001:db8::1", SENDER, RCPT, s) == triplet_key("2001:db8::ffff:1", SENDER, RCPT, s)
    assert triplet_key("2001:db8::1", SENDER, RCPT, s) != triplet_key("2001:db8:0:1::1", SENDER, RCPT, s)
    narrow = Settings(ipv4_prefix=32)
    assert triplet_key("192.0.2.1", SENDER, RCPT, narrow) != triplet_key("192.0.2.2", SENDER, RCPT, narrow)


@pytest.mark.parametrize(
    "settings,kwargs",
    [
        ({"allow_networks": (parse_network("192.0.2.0/24"),)}, {}),
        ({"allow_sender_domains": (".example.org",)}, {}),
        ({"allow_sender_domains": ("example.org",)}, {}),
        ({"allow_recipient_domains": ("local.example",)}, {}),
        ({}, {"is_relay_client": True}),
        ({}, {"auth_login": "alice"}),
    ],
)
def test_allow_lists_and_trusted_sessions_skip_greylisting(
    tmp_path: Path, settings: dict[str, Any], kwargs: dict[str, Any]
) -> None:
    async def main() -> None:
        async with Harness(tmp_path, **settings) as h:
            assert await h.rcpt(**kwargs) is None

    asyncio.run(main())


def test_postmaster_and_abuse_are_never_greylisted_unless_the_setting_says_so(tmp_path: Path) -> None:
    # RFC 5321 §4.5.1, RFC 2142: a site must reach them at first contact.
    async def main() -> None:
        async with Harness(tmp_path) as h:
            ours = (Address("PostMaster", "local.example"), Address("abuse", "relayed.example"))
            for rcpt in (*ours, Address("postmaster", "")):  # the last: bare <postmaster>
                assert await h.rcpt(rcpt=rcpt) is None, rcpt
            assert is_greylisted(await h.rcpt())
        async with Harness(tmp_path, exempt_local_parts=()) as h:
            assert is_greylisted(await h.rcpt(rcpt=Address("postmaster", "local.example")))

    asyncio.run(main())


def test_state_errors_fail_open_by_default_or_tempfail_if_configured(tmp_path: Path) -> None:
    async def main() -> list[Verdict | None]:
        out = []
        for mode in ("continue", "tempfail"):
            h = Harness(tmp_path, on_state_error=mode)
            # never started: no store, as for a late call after shutdown
            out.append(await h.rcpt())
        return out

    open_, closed = asyncio.run(main())
    assert open_ is None
    assert closed is not None and closed.action is Action.TEMPFAIL
    assert closed.reply.code == 451 and closed.reply.status == "4.3.0"


def test_settings_refuse_an_expiry_shorter_than_the_delay_and_unknown_stores() -> None:
    with pytest.raises(ValueError):
        Settings(delay=600.0, expiry=300.0)
    with pytest.raises(ValueError):
        Settings(state="memcached://x")


def test_module_docstring_names_hooks_and_settings() -> None:
    import dataclasses

    doc = rcpt_greylist.__doc__ or ""
    names = ["gateway_startup", "gateway_rcpt", "gateway_shutdown"]
    names += [f.name for f in dataclasses.fields(Settings)]
    assert [n for n in names if f"``{n}``" not in doc] == []


def test_policy_with_an_unknown_state_store_is_refused_at_load() -> None:
    from gateway.app import registry
    from gateway.policy import PolicyError, load_policy_text
    from tests.conftest import plugin_specs

    text = '[[plugins]]\nname = "rcpt_greylist"\nstate = "memcached://127.0.0.1"\n'
    with pytest.raises(PolicyError, match="memcached"):
        load_policy_text(text, source="p.toml", registry=registry(plugin_specs(rcpt_greylist=rcpt_greylist)))
