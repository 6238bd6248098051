"""Tests for gateway.policy.loader and the scoped overrides of gateway.policy.model."""

from __future__ import annotations

import ipaddress
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.policy import (
    DEFAULT_POLICY_PATH,
    Limits,
    Match,
    Override,
    PluginEntry,
    Policy,
    PolicyError,
    load_policy,
    load_policy_text,
    setting,
)
from gateway.policy.source import SourceMap
from gateway.policy.units import Duration

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "policies"


@dataclass(frozen=True)
class EmptySettings:
    """Settings of a plugin without settings."""


@dataclass(frozen=True)
class DnsblSettings:
    zones: tuple[str, ...] = setting(("zen.example",), "DNS block list zones")
    score: float = setting(5.0, "score per listing")
    lookup_timeout: Duration = setting(5.0, "per-lookup time limit")


@dataclass(frozen=True)
class SpamdSettings:
    reject_score: float = setting(10.0, "spamd score that rejects")
    host: str = setting("127.0.0.1", "spamd address")


REGISTRY: dict[str, type] = {
    "auth_users_file": EmptySettings,
    "rcpt_relay": EmptySettings,
    "rcpt_local_users": EmptySettings,
    "queue_received_header": EmptySettings,
    "connect_dnsbl": DnsblSettings,
    "data_spamd": SpamdSettings,
}


def load(text: str) -> Policy:
    return load_policy_text(textwrap.dedent(text), source="test.toml", registry=REGISTRY)


def fails(text: str) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        load(text)
    return info.value


# -- shipped policies ---------------------------------------------------------------------


def test_embedded_default_loads() -> None:
    policy = load_policy(None, registry=REGISTRY)
    assert policy.source == "<embedded default>"
    assert [entry.name for entry in policy.plugins] == [
        "auth_users_file",
        "rcpt_relay",
        "rcpt_local_users",
        "queue_received_header",
    ]
    assert [(item.name, item.address, item.port, item.tls) for item in policy.listeners] == [
        ("smtp", "127.0.0.1", 2525, "starttls")
    ]
    assert policy.tls.self_signed and policy.tls.cert is None
    assert policy.local.domains == ("localhost",) and policy.local.users == ("postmaster",)
    assert policy.relay.clients == () and policy.relay.domains == ()
    assert policy.scoring.reject is None
    assert policy.limits == Limits()
    assert policy.server.hostname  # empty in the file: filled with the FQDN
    assert policy.overrides == ()


def test_embedded_default_is_the_shipped_file() -> None:
    assert DEFAULT_POLICY_PATH.resolve() == (REPO / "policies" / "default.toml").resolve()


def test_embedded_default_errors_name_the_real_file() -> None:
    with pytest.raises(PolicyError) as info:
        load_policy(None, registry={"auth_users_file": EmptySettings, "rcpt_relay": EmptySettings})
    assert info.value.file == str(DEFAULT_POLICY_PATH)
    assert info.value.key == "plugins[2].name" and "rcpt_local_users" in info.value.message


def test_edge_relay_example_loads() -> None:
    # The shipped example names the whole stock chain: load it against the real plugins.
    from gateway.app import registry
    from gateway.hooks import discover_plugins

    policy = load_policy(REPO / "policies" / "edge-relay.toml", registry=registry(discover_plugins()))
    assert policy.source.endswith("edge-relay.toml")
    assert [item.name for item in policy.listeners] == ["mx", "submission", "submissions"]
    assert policy.relay.domains == ("example.com", "example.org")
    submission = policy.scope(listener="submission", client_ip="198.51.100.1")
    assert submission.limits.max_message_size == 50 * 1024**2


def test_fixture_policies_load() -> None:
    for path in sorted(FIXTURES.glob("*.toml")):
        load_policy(path, registry=REGISTRY)


def test_missing_file() -> None:
    with pytest.raises(PolicyError) as info:
        load_policy("/nonexistent/policy.toml", registry=REGISTRY)
    assert str(info.value).startswith("/nonexistent/policy.toml: <file>: cannot read policy")


# -- errors name file, line and key --------------------------------------------------------


def test_unknown_key_names_line_and_key() -> None:
    exc = fails(
        """\
        [server]
        hostname = "mx.example.net"

        [limits]
        max_recipients = 10
        # a comment
        max_mesage_size = "25MB"
        """
    )
    assert exc.line == 7 and exc.key == "limits.max_mesage_size"
    assert str(exc).startswith("test.toml:7: limits.max_mesage_size: unknown key")
    assert "did you mean 'max_message_size'" in exc.message and "valid keys:" in exc.message


def test_wrong_type_names_line_and_key() -> None:
    exc = fails('[server]\nhostname = "h"\n[limits]\nmax_recipients = "many"\n')
    assert (exc.line, exc.key) == (4, "limits.max_recipients")
    assert "expected integer, got string 'many'" in exc.message


def test_unknown_section() -> None:
    exc = fails('[server]\nhostname = "h"\n\n[limit]\nmax_recipients = 5\n')
    assert (exc.line, exc.key) == (4, "limit") and "did you mean 'limits'" in exc.message


def test_syntax_error_has_line() -> None:
    exc = fails('[server]\nhostname = "h"\n[limits]\nmax_recipients = = 3\n')
    assert exc.key == "<syntax>" and exc.line == 4
    assert str(exc).startswith("test.toml:4: <syntax>: ")


def test_syntax_error_at_end_and_duplicate_key() -> None:
    exc = fails("[limits]\nmax_recipients =")
    assert (exc.line, exc.key) == (2, "<syntax>") and "end of document" in exc.message
    exc = fails("[limits]\nmax_recipients = 1\nmax_recipients = 2\n")
    assert (exc.line, exc.key) == (3, "<syntax>") and "overwrite" in exc.message


def test_bad_plugin_setting_names_index_and_line() -> None:
    exc = fails(
        """\
        [server]
        hostname = "h"
        [[plugins]]
        name = "rcpt_relay"
        [[plugins]]
        name = "connect_dnsbl"
        zones = "zen.example"
        """
    )
    assert (exc.line, exc.key) == (
        7,
        "plugins[1].zones",
    ) and "expected array of string" in exc.message


def test_bad_plugin_array_item_in_multiline_array() -> None:
    exc = fails(
        """\
        [server]
        hostname = "h"
        [[plugins]]
        name = "connect_dnsbl"
        zones = [
            "a.example",  # first
            3,
        ]
        """
    )
    assert (exc.line, exc.key) == (7, "plugins[0].zones[1]")


def test_unknown_plugin_setting_lists_settings_and_reserved_keys() -> None:
    exc = fails('[server]\nhostname = "h"\n[[plugins]]\nname = "connect_dnsbl"\nzone = ["x"]\n')
    assert (exc.line, exc.key) == (5, "plugins[0].zone")
    assert (
        "did you mean 'zones'" in exc.message
        and "on_error" in exc.message
        and "connect_dnsbl" in exc.message
    )


def test_unknown_plugin_names_known_plugins() -> None:
    exc = fails('[[plugins]]\nname = "rcpt_relay"\n\n\n[[plugins]]\nname = "data_clamav"\n')
    assert (exc.line, exc.key) == (6, "plugins[1].name")
    assert "unknown plugin 'data_clamav'" in exc.message and "connect_dnsbl" in exc.message


def test_plugin_entry_reserved_keys() -> None:
    policy = load(
        """\
        [[plugins]]
        name = "connect_dnsbl"
        mode = "observe"
        timeout = "2s"
        on_error = "continue"
        lookup_timeout = "500ms"
        """
    )
    entry = policy.plugins[0]
    assert (entry.id, entry.mode, entry.timeout, entry.on_error) == (
        "connect_dnsbl",
        "observe",
        2.0,
        "continue",
    )
    assert entry.settings == DnsblSettings(lookup_timeout=0.5)
    assert fails('[[plugins]]\nname = "rcpt_relay"\nmode = "audit"\n').key == "plugins[0].mode"
    assert fails('[[plugins]]\nmode = "observe"\n').key == "plugins[0].name"


def test_duplicate_plugin_needs_distinct_ids() -> None:
    exc = fails('[[plugins]]\nname = "connect_dnsbl"\n[[plugins]]\nname = "connect_dnsbl"\n')
    assert (exc.line, exc.key) == (4, "plugins[1].name") and "distinct id" in exc.message
    policy = load(
        """\
        [[plugins]]
        name = "connect_dnsbl"
        [[plugins]]
        name = "connect_dnsbl"
        id = "dnsbl_backup"
        zones = ["backup.example"]
        """
    )
    assert [entry.id for entry in policy.plugins] == ["connect_dnsbl", "dnsbl_backup"]


def test_reserved_settings_field_is_a_plugin_bug() -> None:
    @dataclass(frozen=True)
    class Clashing:
        timeout: float = 1.0

    with pytest.raises(TypeError, match="reserved"):
        load_policy_text('[[plugins]]\nname = "x"\n', source="t", registry={"x": Clashing})


@pytest.mark.parametrize(
    ("text", "line", "key", "words"),
    [
        ("listeners = []\n", 1, "listeners", "at least one"),
        (
            '[[listeners]]\nname = "a"\n[[listeners]]\nname = "a"\nport = 26\n',
            4,
            "listeners[1].name",
            "duplicate",
        ),
        (
            '[[listeners]]\nname = "a"\n[[listeners]]\nname = "b"\n',
            3,
            "listeners[1].port",
            "already used",
        ),
        ('[[listeners]]\nname = "a"\nport = 70000\n', 3, "listeners[0].port", "at most 65535"),
        ('[[listeners]]\nname = "a"\nport = 0\n', 3, "listeners[0].port", "at least 1"),
        (
            '[tls]\nself_signed = false\n[[listeners]]\nname = "a"\n',
            3,
            "listeners[0].tls",
            "tls.cert",
        ),
        ('[tls]\ncert = "c.pem"\n', 1, "tls.key", "together"),
        (
            '[[listeners]]\nname = "a"\nauth = false\nrequire_auth = true\n',
            4,
            "listeners[0].require_auth",
            "auth",
        ),
        (
            '[[listeners]]\nname = "a"\ntls = "none"\nrequire_auth = true\n',
            4,
            "listeners[0].require_auth",
            "AUTH only after TLS",
        ),
        (
            '[[listeners]]\nname = "a"\ntls = "none"\nrequire_tls = true\n',
            4,
            "listeners[0].require_tls",
            "tls",
        ),
        ("[scoring]\nreject = 5.0\ntempfail = 6\n", 3, "scoring.tempfail", "above the reject"),
        ('[local]\ndomains = ["ok", "bad domain"]\n', 2, "local.domains[1]", "invalid domain"),
        ('[relay]\nclients = ["10.0.0.0/8", "nope"]\n', 2, "relay.clients[1]", "invalid network"),
        ("[limits]\nmax_command_line = 100\n", 2, "limits.max_command_line", "at least 512"),
        ('[limits]\nidle_timeout = "soon"\n', 2, "limits.idle_timeout", "invalid duration"),
        ("plugins = 3\n", 1, "plugins", "array of tables"),
        ("server = 3\n", 1, "server", "expected a table"),
    ],
)
def test_semantic_errors(text: str, line: int, key: str, words: str) -> None:
    exc = fails(text)
    assert (exc.line, exc.key) == (line, key), str(exc)
    assert words in exc.message


def test_tls_none_needs_no_certificate() -> None:
    policy = load('[tls]\nself_signed = false\n[[listeners]]\nname = "a"\ntls = "none"\n')
    assert policy.listeners[0].tls == "none"


def test_values_are_normalized() -> None:
    policy = load(
        """\
        [server]
        hostname = "mx.example.net"
        queue_dir = "spool/q"
        [local]
        domains = ["Example.COM."]
        [relay]
        domains = ["Partner.Example"]
        clients = ["192.0.2.9/24", "::1"]
        [limits]
        max_message_size = "10MB"
        data_timeout = 90
        """
    )
    assert policy.server.hostname == "mx.example.net"
    assert policy.server.queue_dir == Path("spool/q")  # relative paths stay relative
    assert policy.local.domains == ("example.com",)
    assert policy.relay.domains == ("partner.example",)
    assert policy.relay.clients == (
        ipaddress.ip_network("192.0.2.0/24"),
        ipaddress.ip_network("::1/128"),
    )
    assert policy.limits.max_message_size == 10 * 1024**2 and policy.limits.data_timeout == 90.0


# -- overrides -----------------------------------------------------------------------------

CHAIN = """\
[server]
hostname = "h"
[[listeners]]
name = "mx"
port = 25
[[listeners]]
name = "submission"
port = 587
[limits]
max_message_size = "10MB"
[[plugins]]
name = "connect_dnsbl"
[[plugins]]
name = "rcpt_relay"
[[plugins]]
name = "data_spamd"
"""


def chain(overrides: str) -> Policy:
    return load(CHAIN + textwrap.dedent(overrides))


def test_listener_override_disables_and_merges() -> None:
    policy = chain(
        """\
        [[overrides]]
        match = { listener = "submission" }
        disable = ["connect_dnsbl"]
        limits = { max_message_size = "50MB" }
        [overrides.plugins.data_spamd]
        reject_score = 8.0
        """
    )
    base = policy.scope(listener="mx", client_ip="203.0.113.5")
    assert [entry.id for entry in base.plugins] == ["connect_dnsbl", "rcpt_relay", "data_spamd"]
    assert base.limits.max_message_size == 10 * 1024**2
    scope = policy.scope(listener="submission", client_ip="203.0.113.5")
    assert [entry.id for entry in scope.plugins] == ["rcpt_relay", "data_spamd"]
    assert scope.limits.max_message_size == 50 * 1024**2
    assert scope.limits.max_recipients == 100  # untouched keys keep the base value
    spamd = scope.plugin("data_spamd")
    assert spamd is not None and spamd.settings == SpamdSettings(reject_score=8.0)
    assert scope.plugin("connect_dnsbl") is None
    override = policy.overrides[0]
    assert override.limits is not None and override.limits.max_message_size == 50 * 1024**2
    assert override.plugins["data_spamd"] == SpamdSettings(reject_score=8.0)  # full settings


def test_specificity_listener_network_domain() -> None:
    policy = chain(
        """\
        [[overrides]]
        match = { recipient_domain = "big.example" }
        limits = { max_message_size = "100MB" }
        [[overrides]]
        match = { network = "10.1.0.0/16" }
        limits = { max_message_size = "30MB", max_recipients = 7 }
        [[overrides]]
        match = { network = "10.0.0.0/8" }
        limits = { max_message_size = "20MB", idle_timeout = "1m" }
        [[overrides]]
        match = { listener = "submission" }
        limits = { max_message_size = "40MB", max_transactions = 3 }
        """
    )
    scope = policy.scope(listener="submission", client_ip="10.1.2.3")
    # the longer prefix wins over the shorter one and over the listener; others layer
    assert scope.limits.max_message_size == 30 * 1024**2
    assert (
        scope.limits.max_recipients,
        scope.limits.idle_timeout,
        scope.limits.max_transactions,
    ) == (7, 60.0, 3)
    assert (
        policy.scope(listener="submission", client_ip="10.9.9.9").limits.max_message_size
        == 20 * 1024**2
    )
    assert (
        policy.scope(listener="submission", client_ip="192.0.2.1").limits.max_message_size
        == 40 * 1024**2
    )
    assert scope.for_recipient_domain("BIG.example.").limits.max_message_size == 100 * 1024**2
    assert scope.for_recipient_domain("big.example").limits.max_recipients == 7
    assert scope.for_recipient_domain("other.example") is scope


def test_domain_matching_exact_and_subdomains() -> None:
    policy = chain(
        """\
        [[overrides]]
        match = { recipient_domain = "example.com" }
        limits = { max_recipients = 1 }
        [[overrides]]
        match = { recipient_domain = ".example.com" }
        limits = { max_recipients = 2 }
        [[overrides]]
        match = { recipient_domain = ".eu.example.com" }
        limits = { max_recipients = 3 }
        """
    )
    scope = policy.scope(listener="mx", client_ip="203.0.113.5")
    assert scope.for_recipient_domain("example.com").limits.max_recipients == 1
    assert scope.for_recipient_domain("mail.example.com").limits.max_recipients == 2
    assert scope.for_recipient_domain("a.eu.example.com").limits.max_recipients == 3
    assert scope.for_recipient_domain("notexample.com").limits.max_recipients == 100


def test_domain_override_disables_and_settings_layer() -> None:
    policy = chain(
        """\
        [[overrides]]
        match = { listener = "mx" }
        [overrides.plugins.data_spamd]
        reject_score = 8.0
        [[overrides]]
        match = { recipient_domain = "lists.example" }
        disable = ["rcpt_relay"]
        [overrides.plugins.data_spamd]
        host = "spamd.internal"
        """
    )
    scope = policy.scope(listener="mx", client_ip="203.0.113.5").for_recipient_domain(
        "lists.example"
    )
    assert [entry.id for entry in scope.plugins] == ["connect_dnsbl", "data_spamd"]
    assert scope.plugins[1].settings == SpamdSettings(reject_score=8.0, host="spamd.internal")


def test_network_matches_ipv4_mapped_and_ipv6() -> None:
    policy = chain(
        """\
        [[overrides]]
        match = { network = "192.0.2.0/24" }
        disable = ["connect_dnsbl"]
        [[overrides]]
        match = { network = "2001:db8::/32" }
        disable = ["data_spamd"]
        """
    )

    def ids(ip: str) -> list[str]:
        return [entry.id for entry in policy.scope(listener="mx", client_ip=ip).plugins]

    assert ids("::ffff:192.0.2.1") == ["rcpt_relay", "data_spamd"]
    assert ids("2001:db8::1") == ["connect_dnsbl", "rcpt_relay"]
    assert ids("not-an-ip") == ["connect_dnsbl", "rcpt_relay", "data_spamd"]


def test_scopes_are_cached() -> None:
    policy = chain('[[overrides]]\nmatch = { network = "10.0.0.0/8" }\ndisable = ["rcpt_relay"]\n')
    first = policy.scope(listener="mx", client_ip="10.0.0.1")
    assert policy.scope(listener="mx", client_ip="10.200.0.1") is first
    assert policy.scope(listener="mx", client_ip="11.0.0.1") is not first
    domain = first.for_recipient_domain("x.example")
    assert domain is first


@pytest.mark.parametrize(
    ("override", "line", "key", "words"),
    [
        ('match = { listener = "nope" }', 1, "overrides[0].match.listener", "no listener named"),
        (
            'match = { network = "10.0.0.0/8", listener = "mx" }',
            1,
            "overrides[0].match",
            "exactly one",
        ),
        ("match = {}", 1, "overrides[0].match", "exactly one"),
        ('disable = ["x"]', 0, "overrides[0].match", "missing required key 'match'"),
        (
            'match = { listener = "mx" }\ndisable = ["rcpt_relay", "dnsbl"]',
            2,
            "overrides[0].disable[1]",
            "no plugin",
        ),
        (
            'match = { listener = "mx" }\nlimits = { max_recipents = 5 }',
            2,
            "overrides[0].limits.max_recipents",
            "did you mean",
        ),
        (
            'match = { listener = "mx" }\n[overrides.plugins.clamav]\nx = 1',
            2,
            "overrides[0].plugins.clamav",
            "no plugin",
        ),
        (
            'match = { listener = "mx" }\n[overrides.plugins.data_spamd]\nreject_score = "high"',
            3,
            "overrides[0].plugins.data_spamd.reject_score",
            "expected float",
        ),
        (
            'match = { listener = "mx" }\n[overrides.plugins.data_spamd]\nmode = "observe"',
            3,
            "overrides[0].plugins.data_spamd.mode",
            "cannot be overridden",
        ),
        ('match = { network = "300.0.0.0/8" }', 1, "overrides[0].match.network", "invalid network"),
        ('match = { listener = "mx" }\nenable = ["x"]', 2, "overrides[0].enable", "unknown key"),
    ],
)
def test_override_errors(override: str, line: int, key: str, words: str) -> None:
    offset = CHAIN.count("\n") + 1
    exc = fails(CHAIN + "[[overrides]]\n" + override + "\n")
    assert (exc.line, exc.key) == (offset + line, key), str(exc)
    assert words in exc.message


def test_model_objects_can_be_built_directly() -> None:
    entry = PluginEntry(name="data_spamd", settings=SpamdSettings())
    override = Override(match=Match(listener="smtp"), limits=Limits(max_recipients=5))
    policy = Policy(source="code", plugins=(entry,), overrides=(override,))
    scope = policy.scope(listener="smtp", client_ip="127.0.0.1")
    assert scope.limits.max_recipients == 5 and scope.plugins == (entry,)
    with pytest.raises(ValueError):
        Match()


# -- source map ------------------------------------------------------------------------------


def test_source_map_tracks_tables_arrays_and_keys() -> None:
    text = textwrap.dedent(
        """\
        title = "x"          # line 1
        [a]
        "quoted key" = 1
        b.c = 2
        s = '''
        [not_a_table]
        fake = 1
        '''
        [[arr]]
        name = "one"
        [[arr]]
        name = "two"
        inline = { k = 1, nested = { z = 2 } }
        [arr.sub]
        q = 3
        list = [
          1,
          [2, 3],
        ]
        "tricky \\" ]" = "]] # not a comment"
        after = 1
        """
    )
    locate = SourceMap(text).locate
    assert locate("title") == 1
    assert (
        locate("a") == 2
        and locate("a.quoted key") == 3
        and locate("a.b.c") == 4
        and locate("a.b") == 4
    )
    assert locate("not_a_table") is None and locate("a.fake") == 2
    assert locate("arr") == 9 and locate("arr[0].name") == 10 and locate("arr[1]") == 11
    assert locate("arr[1].name") == 12 and locate("arr[1].inline.nested.z") == 13
    assert locate("arr[1].sub.q") == 15 and locate("arr[1].sub.missing") == 14
    assert locate("arr[1].sub.list[1][0]") == 18 and locate("arr[1].sub.list[1]") == 18
    assert locate('arr[1].sub.tricky " ]') == 20 and locate("arr[1].sub.after") == 21
    assert locate("nowhere.at.all") is None


def test_full_fixture() -> None:
    policy = load_policy(FIXTURES / "full.toml", registry=REGISTRY)
    assert policy.server.workers == 2 and policy.tls.min_version == "TLSv1.3"
    assert policy.listeners[1].require_auth and policy.listeners[1].tls == "implicit"
    assert policy.limits.data_timeout == 90.0 and policy.limits.max_message_size == 1024**2
    assert policy.local.domains == ("test.example", "localhost")
    assert policy.scoring.reject == 10.0 and policy.scoring.quarantine == 5.5
    assert [entry.id for entry in policy.plugins][:2] == ["dnsbl_main", "rcpt_relay"]
    submission = policy.scope(listener="submission", client_ip="192.0.2.1")
    assert [entry.id for entry in submission.plugins] == [
        "rcpt_relay",
        "rcpt_local_users",
        "data_spamd",
        "queue_received_header",
    ]
    assert submission.limits.max_message_size == 10 * 1024**2
    spamd = submission.plugin("data_spamd")
    assert (
        spamd is not None
        and spamd.mode == "observe"
        and spamd.settings == SpamdSettings(reject_score=20.0)
    )
    loopback = policy.scope(listener="submission", client_ip="127.0.0.1")
    assert loopback.plugin("data_spamd") is None and loopback.plugin("dnsbl_main") is None
    partner = loopback.for_recipient_domain("mx.partner.example")
    assert partner.limits.max_recipients == 1000 and partner.limits.max_message_size == 10 * 1024**2
