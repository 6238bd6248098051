"""plugins/rcpt_restrictions.py: restriction classes and protected recipients, from the policy."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from gateway.address import Address
from gateway.app import registry
from gateway.hooks import discover_plugins
from gateway.model import Recipient, Session, Transaction
from gateway.policy import PolicyError, load_policy_text
from gateway.verdicts import Action
from plugins.rcpt_restrictions import REPLY_PROTECTED, REPLY_RESTRICTED, gateway_rcpt

POLICY = """
[local]
domains = ["example.com"]
virtual = { "lists.example.com" = "lists" }

[[plugins]]
name = "rcpt_restrictions"
[[plugins.restrict_senders]]
logins = ["intern"]
networks = ["10.20.0.0/16"]
domains = [".partner.example"]
[[plugins.restrict_senders]]
logins = ["kiosk"]
local_domains = false
domains = ["example.net"]
[[plugins.protect_recipients]]
recipients = ["all-staff@example.com", "@board.example.com"]
senders = ["@example.com", "ceo@Example.ORG"]
logins = ["hr"]
networks = ["192.0.2.0/24"]
"""


def load(text: str = POLICY) -> Any:
    return load_policy_text(text, source="policy.toml", registry=registry(discover_plugins()))


@pytest.fixture(scope="module")
def policy() -> Any:
    return load()


def rcpt(policy: Any, to: str, *, login: str | None = None, ip: str = "198.51.100.1", sender: str = "x@example.net") -> Any:
    session = Session(peer_ip=ip, peer_port=1, listener="submission", auth_login=login)
    local, _, domain = to.partition("@")
    txn = Transaction(sender=Address(*sender.split("@")) if sender else Address.null())
    settings = policy.plugins[0].settings
    return gateway_rcpt(session, txn, Recipient(Address(local, domain)), SimpleNamespace(policy=policy), settings)


def test_restricted_login_or_network_sends_only_to_allowed_domains(policy: Any) -> None:
    assert rcpt(policy, "bob@example.com", login="intern") is None
    assert rcpt(policy, "list@lists.example.com", login="intern") is None
    assert rcpt(policy, "x@shop.partner.example", login="intern") is None
    verdict = rcpt(policy, "x@example.net", login="intern")
    assert verdict.action is Action.REJECT and verdict.reply == REPLY_RESTRICTED
    assert rcpt(policy, "x@example.net", ip="10.20.3.4").reply == REPLY_RESTRICTED
    assert rcpt(policy, "x@example.net", ip="::ffff:10.20.3.4").reply == REPLY_RESTRICTED
    # Everyone else is not restricted (the relay plugin decides further on).
    assert rcpt(policy, "x@example.net", login="alice") is None
    assert rcpt(policy, "x@example.net", ip="10.21.0.1") is None


def test_class_without_local_domains(policy: Any) -> None:
    assert rcpt(policy, "x@example.net", login="kiosk") is None
    assert rcpt(policy, "bob@example.com", login="kiosk").reply == REPLY_RESTRICTED


def test_protected_recipients(policy: Any) -> None:
    assert rcpt(policy, "All-Staff@EXAMPLE.com").reply == REPLY_PROTECTED
    assert rcpt(policy, "chair@board.example.com").reply == REPLY_PROTECTED
    assert rcpt(policy, "all-staff@example.com", sender="anyone@example.com") is None
    assert rcpt(policy, "all-staff@example.com", sender="CEO@example.org") is None
    assert rcpt(policy, "all-staff@example.com", sender="cfo@example.org").reply == REPLY_PROTECTED
    assert rcpt(policy, "all-staff@example.com", sender="").reply == REPLY_PROTECTED
    assert rcpt(policy, "all-staff@example.com", login="hr") is None
    assert rcpt(policy, "all-staff@example.com", ip="192.0.2.77") is None
    assert rcpt(policy, "bob@example.com") is None


@pytest.mark.parametrize(
    ("table", "key", "message"),
    [
        ("[[plugins.restrict_senders]]\ndomains = [\"example.org\"]\n", "plugins[0].restrict_senders[0]", "needs logins or networks"),
        ("[[plugins.restrict_senders]]\nlogins = [\"a\"]\ndomains = [\"bad domain\"]\n", "plugins[0].restrict_senders[0]", "not valid"),
        ("[[plugins.protect_recipients]]\nrecipients = []\n", "plugins[0].protect_recipients[0]", "needs recipients"),
        ("[[plugins.protect_recipients]]\nrecipients = [\"x@y.example\"]\nsenders = [\"nobody\"]\n", "plugins[0].protect_recipients[0]", "'nobody' is not valid"),
        ("[[plugins.protect_recipients]]\nsenders = [\"a@b.example\"]\n", "plugins[0].protect_recipients[0]", "missing required key 'recipients'"),
    ],
)
def test_bad_rules_name_the_key(table: str, key: str, message: str) -> None:
    with pytest.raises(PolicyError) as info:
        load('[[plugins]]\nname = "rcpt_restrictions"\n' + table)
    assert info.value.key.startswith(key) and message in info.value.message
    assert info.value.line is not None
