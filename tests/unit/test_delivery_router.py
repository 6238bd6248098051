"""Built-in routing and the back-off schedule."""

from __future__ import annotations

import textwrap

import pytest

from gateway.app import registry
from gateway.delivery.notices import reply_from_line
from gateway.delivery.router import route_for, split_user
from gateway.delivery.scheduler import backoff
from gateway.delivery.types import LocalRoute, MxRoute, SmarthostRoute, SpecialRoute
from gateway.hooks import discover_plugins
from gateway.policy import load_policy_text
from gateway.verdicts import Reply

POLICY = textwrap.dedent(
    """
    [local]
    domains = ["local.example"]
    users = ["postmaster", "alice", "mary-ann"]
    virtual = { "virt.example" = "alice" }
    [[routes]]
    domain = "corp.example"
    host = "smarthost.corp.example"
    port = 2525
    tls = "required"
    [[routes]]
    domain = ".partner.example"
    host = "mx.partner.example"
    [[routes]]
    domain = "hold.example"
    action = "hold"
    [[routes]]
    domain = "*"
    host = "default.example"
    """
)


@pytest.fixture(scope="module")
def policy():
    return load_policy_text(POLICY, source="test.toml", registry=registry(discover_plugins()))


def test_local_users_and_extensions(policy) -> None:
    assert route_for("alice@local.example", policy) == LocalRoute("alice", "", "local.example")
    assert route_for("Alice-Lists-Foo@LOCAL.example", policy) == LocalRoute("alice", "lists-foo", "local.example")
    assert route_for("mary-ann-x@local.example", policy) == LocalRoute("mary-ann", "x", "local.example")
    assert route_for("postmaster", policy) == LocalRoute("postmaster", "", "local.example")


def test_virtual_domain_maps_to_user_with_local_part_as_extension(policy) -> None:
    assert route_for("sales@virt.example", policy) == LocalRoute("alice", "sales", "virt.example")


def test_routes_exact_suffix_and_default(policy) -> None:
    assert route_for("a@corp.example", policy) == SmarthostRoute("smarthost.corp.example", 2525, "required")
    assert route_for("a@sub.partner.example", policy) == SmarthostRoute("mx.partner.example", 25, "opportunistic")
    assert route_for("a@hold.example", policy) == SpecialRoute("hold")
    assert route_for("a@anywhere.example", policy) == SmarthostRoute("default.example", 25, "opportunistic")


def test_mx_when_no_route_matches() -> None:
    policy = load_policy_text("[local]\ndomains = ['l.example']\n", source="t.toml", registry=registry(discover_plugins()))
    assert route_for("a@example.net", policy) == MxRoute("example.net")


def test_split_user_prefers_the_longest_known_user() -> None:
    assert split_user("mary-ann-x", ("mary", "mary-ann"), "-") == ("mary-ann", "x")
    assert split_user("mary-x", ("mary", "mary-ann"), "-") == ("mary", "x")
    assert split_user("nobody-x", ("mary",), "-") == ("nobody", "x")
    assert split_user("a+b", ("a",), "+") == ("a", "b")
    assert split_user("a-b", ("a",), "") == ("a-b", "")


def test_backoff_is_quadratic_and_capped() -> None:
    assert [backoff(n, 60, 3600) for n in (1, 2, 3, 10)] == [60, 240, 540, 3600]
    assert backoff(0, 60, 3600) == 60


def test_reply_round_trip_through_the_state_file() -> None:
    assert reply_from_line("550 5.1.1 User unknown") == Reply(550, "5.1.1", "User unknown")
    assert reply_from_line("451 Try later") == Reply(451, "", "Try later")
    assert reply_from_line("554 5.4.7 Delivery time expired / 451 4.4.1 x") == Reply(554, "5.4.7", "Delivery time expired")
