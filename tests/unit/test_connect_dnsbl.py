"""connect_dnsbl and its helpers (plugins/_dnslist.py): query names, codes, settings, cache.

Lookups run against the real test DNS server on loopback; whole sessions are in
tests/integration/dnsbl/.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import inspect
from collections.abc import Iterator
from pathlib import Path

import dns.message
import pytest

import plugins.connect_dnsbl as connect_dnsbl
from gateway import hookspecs
from gateway.app import registry
from gateway.dns import DnsTemporaryError, make_resolver
from gateway.policy import PolicyError, load_policy_text
from gateway.verdicts import Action
from plugins._dnslist import (
    Listing,
    RecordCache,
    classify_code,
    clean_text,
    domain_query_name,
    extract_body_domains,
    ip_query_name,
    lookup_records,
    negative_ttl,
    render_reply,
)
from plugins.connect_dnsbl import CodeRule, Settings, Zone, decide
from tests.conftest import plugin_specs
from tests.dnsserver import DnsTestServer, dns_settings

ZONE = """
$TTL 300
test.                         IN SOA ns.test. hostmaster.test. 1 3600 600 86400 60
2.0.0.127.bl.test.            IN A   127.0.0.2
2.0.0.127.bl.test.            IN TXT "part one, " "part two"
onlytxt.bl.test.              IN TXT "no address here"
"""

# -- query names (RFC 5782) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("192.0.2.99", "99.2.0.192.bl.example"),  # RFC 5782 §2.1
        ("127.0.0.1", "1.0.0.127.bl.example"),
        ("::ffff:192.0.2.99", "99.2.0.192.bl.example"),  # mapped: asked as IPv4
        (  # RFC 5782 §2.4: 32 reversed nibbles
            "2001:db8:1:2:3:4:567:89ab",
            "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.bl.example",
        ),
        ("::1", "1." + "0." * 31 + "bl.example"),
    ],
)
def test_ip_query_name(ip: str, expected: str) -> None:
    assert ip_query_name(ip, "bl.example") == expected


def test_ip_query_name_refuses_a_non_address() -> None:
    with pytest.raises(ValueError):
        ip_query_name("not-an-ip", "bl.example")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Mail.Example.COM.", "mail.example.com.dbl.example"),
        ("bücher.example", "xn--bcher-kva.example.dbl.example"),
        ("[192.0.2.1]", None),  # address literal
        ("localhost", None),  # one label
        ("192.0.2.1", None),  # an IP, not a domain
        ("bad..example", None),
        ("-bad.example", None),
        ("a" * 64 + ".example", None),  # label over 63 octets
        (("a" * 60 + ".") * 4 + "example", None),  # the query name would exceed 253
    ],
)
def test_domain_query_name(name: str, expected: str | None) -> None:
    assert domain_query_name(name, "dbl.example") == expected


@pytest.mark.parametrize(
    ("code", "meaning"),
    [
        ("127.0.0.2", "listed"),
        ("127.0.1.10", "listed"),
        ("127.0.0.1", "error"),  # RFC 5782 §5: never a listing
        ("127.255.255.254", "error"),  # Spamhaus: query through a public resolver
        ("127.0.0.255", "error"),
        ("192.0.2.1", "invalid"),  # outside 127/8: a broken or hijacked list
        ("::1", "invalid"),
        ("garbage", "invalid"),
    ],
)
def test_classify_code(code: str, meaning: str) -> None:
    assert classify_code(code) == meaning


# -- reply text --------------------------------------------------------------------------


def test_clean_text_removes_line_breaks_and_cuts() -> None:
    assert clean_text("see\r\n250 OK\x00 there") == "see 250 OK there"
    assert clean_text("é" * 3 + "x") == "x"
    cut = clean_text("x" * 500, limit=50)
    assert len(cut) == 50 and cut.endswith("...")


def test_render_reply_appends_or_places_the_txt() -> None:
    default = connect_dnsbl.DEFAULT_REPLY
    text = render_reply(default, "client", "192.0.2.1", "bl.example", "127.0.0.2", "https://x/y")
    assert text == "Service unavailable; Client host [192.0.2.1] blocked using bl.example; https://x/y"
    placed = render_reply("{zone}: {txt} ({code})", "helo", "h.example", "bl.example", "127.0.0.2", "why")
    assert placed == "bl.example: why (127.0.0.2)"
    hostile = render_reply(default, "helo", "evil\r\n250 OK", "bl.example", "127.0.0.2", "")
    assert "\r" not in hostile and "\n" not in hostile


# -- settings through the policy loader ---------------------------------------------------

SPECS = plugin_specs(connect_dnsbl=connect_dnsbl)


def load(plugin: str) -> Settings:
    text = f'[[plugins]]\nname = "connect_dnsbl"\n{plugin}\n'
    policy = load_policy_text(text, source="policy.toml", registry=registry(SPECS))
    settings = policy.plugins[0].settings
    assert isinstance(settings, Settings)
    return settings


def test_settings_load_nested_zones() -> None:
    settings = load(
        'reject_at = "connect"\nlookup_timeout = "500ms"\n'
        '[[plugins.zones]]\nzone = "Zen.Example."\n'
        'codes = { "127.0.0.2" = "reject", "127.0.0.10" = { action = "score", score = 2.5 } }\n'
        '[[plugins.zones]]\nzone = "wl.example"\ntype = "ip-allow"\n'
        '[[plugins.zones]]\nzone = "dbl.example"\ntype = "domain"\ntargets = ["mail_from", "body"]\n'
    )
    zen, wl, dbl = settings.zones
    assert settings.reject_at == "connect" and settings.lookup_timeout == 0.5
    assert zen.zone == "zen.example"
    assert zen.rule("127.0.0.2")[:2] == ("reject", 1.0)
    assert zen.rule("127.0.0.10")[:2] == ("score", 2.5)
    assert zen.rule("127.0.0.4")[0] == "reject"  # the default action
    assert wl.rule("127.0.10.2")[0] == "accept"
    assert dbl.targets == ("mail_from", "body")


def test_settings_defaults() -> None:
    settings = Settings()
    assert (settings.reject_at, settings.on_dns_error, settings.cache_size) == ("rcpt", "continue", 10000)
    assert settings.exempt_local_parts == ("postmaster", "abuse")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('zne = "x.example"', "unknown key 'zne'"),
        ('zone = "x.example"\ncodes = { "127.0.0.2" = "rejct" }', "expected one of"),
        ('zone = "x.example"\ncodes = { "192.0.2.1" = "reject" }', "not a 127.0.0.0/8 listing"),
        ('zone = "x.example"\ntype = "domain"\naction = "accept"', "accept is for IP allow lists"),
        ('zone = "x.example"\nreply = "{target} {secret}"', "unknown field {secret}"),
        ('zone = "x.example"\nreply = "{target.__class__}"', "unknown field"),
        ('zone = "single"', "is not a DNS zone name"),
        ('zone = "x.example"\ntargets = ["hello"]', "expected one of"),
    ],
)
def test_settings_errors_name_the_key(table: str, message: str) -> None:
    with pytest.raises(PolicyError) as info:
        load("[[plugins.zones]]\n" + table)
    assert "plugins[0].zones[0]" in str(info.value)
    assert message in str(info.value)


def test_code_rule_defaults_to_the_zone() -> None:
    zone = Zone("bl.example", codes={"127.0.0.3": CodeRule(action="score")}, score=4.0, reply="{zone}")
    assert zone.rule("127.0.0.3") == ("score", 4.0, "{zone}")


# -- the verdict ----------------------------------------------------------------------------


def listing(zone: str, action: str, text: str = "t") -> Listing:
    return Listing(zone, "client", "192.0.2.1", "127.0.0.2", action, 1.0, text)  # type: ignore[arg-type]


def test_decide_prefers_reject_then_tempfail_then_dns_error() -> None:
    settings = Settings(zones=(Zone("a.example"), Zone("b.example"), Zone("c.example")), on_dns_error="tempfail")
    items = [listing("a.example", "error"), listing("b.example", "tempfail"), listing("c.example", "reject", "no")]
    verdict = decide(items, settings, "rcpt")
    assert verdict is not None and verdict.action is Action.REJECT
    assert (verdict.reply.code, verdict.reply.status, verdict.reply.text) == (550, "5.7.1", "no")
    verdict = decide(items[:2], settings, "connect")
    assert verdict is not None and (verdict.reply.code, verdict.reply.status) == (421, "4.7.1")
    verdict = decide(items[:1], settings, "rcpt")
    assert verdict is not None and (verdict.reply.code, verdict.reply.status) == (451, "4.4.3")
    assert decide(items[:1], dataclasses.replace(settings, on_dns_error="continue"), "rcpt") is None
    assert decide([listing("a.example", "score")], settings, "rcpt") is None


def test_decide_ignores_zones_the_settings_in_force_do_not_name() -> None:
    settings = Settings(zones=(Zone("a.example"),))
    assert decide([listing("other.example", "reject")], settings, "rcpt") is None


# -- cache and lookups -----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_cache_honours_ttl_and_evicts_least_recently_used() -> None:
    clock = Clock()
    cache = RecordCache(2, clock=clock)
    cache.put(("a", "A"), ("127.0.0.2",), 10)
    cache.put(("b", "A"), (), 100)
    assert cache.get(("a", "A")) == ("127.0.0.2",)  # a is now the most recent
    cache.put(("c", "A"), (), 100)
    assert cache.get(("b", "A")) is None and len(cache) == 2
    clock.now += 11
    assert cache.get(("a", "A")) is None  # expired
    assert cache.get(("c", "A")) == ()
    off = RecordCache(0)
    off.put(("a", "A"), (), 10)
    assert off.get(("a", "A")) is None


def test_negative_ttl_is_the_soa_minimum() -> None:
    response = dns.message.from_text(
        "id 1\nopcode QUERY\nrcode NXDOMAIN\nflags QR AA\n;QUESTION\nx.bl.test. IN A\n;ANSWER\n"
        ";AUTHORITY\ntest. 300 IN SOA ns.test. h.test. 1 3600 600 86400 60\n;ADDITIONAL\n"
    )
    assert negative_ttl(response, 999.0) == 60.0  # RFC 2308 §5: min(TTL 300, MINIMUM 60)
    assert negative_ttl(None, 999.0) == 999.0


@pytest.fixture(scope="module")
def server() -> Iterator[DnsTestServer]:
    with DnsTestServer(ZONE) as server:
        yield server


def test_lookup_records_caches_answers_and_negative_answers(server: DnsTestServer) -> None:
    server.heal()
    clock = Clock()
    cache = RecordCache(100, clock=clock)
    resolver = make_resolver(dns_settings(server.port, timeout=1.0))

    async def ask(name: str, rdtype: str = "A") -> tuple[str, ...]:
        return await lookup_records(
            resolver, cache, name, rdtype, timeout=0.5, fallback_negative_ttl=30.0, max_ttl=200.0  # type: ignore[arg-type]
        )

    def asked(name: str) -> int:
        return sum(1 for q in server.queries if q[0] == name)

    async def main() -> None:
        assert await ask("2.0.0.127.bl.test") == ("127.0.0.2",)
        assert await ask("2.0.0.127.bl.test", "TXT") == ("part one, part two",)
        assert await ask("9.0.0.127.bl.test") == ()  # NXDOMAIN, no SOA: 30 s
        assert await ask("onlytxt.bl.test") == ()  # NODATA with SOA: 60 s
        for name in ("2.0.0.127.bl.test", "9.0.0.127.bl.test", "onlytxt.bl.test"):
            before = asked(name)
            await ask(name)
            assert asked(name) == before, f"{name} was asked again"
        clock.now += 31  # the fallback negative TTL is over, the SOA minimum is not
        before = asked("9.0.0.127.bl.test"), asked("onlytxt.bl.test")
        await ask("9.0.0.127.bl.test")
        await ask("onlytxt.bl.test")
        assert (asked("9.0.0.127.bl.test"), asked("onlytxt.bl.test")) == (before[0] + 1, before[1])
        clock.now += 200  # max_ttl caps the 300 s of the A record
        before_a = asked("2.0.0.127.bl.test")
        await ask("2.0.0.127.bl.test")
        assert asked("2.0.0.127.bl.test") == before_a + 1
        server.fail("3.0.0.127.bl.test")
        with pytest.raises(DnsTemporaryError):
            await ask("3.0.0.127.bl.test")

    asyncio.run(main())


# -- body domains ----------------------------------------------------------------------------


def test_extract_body_domains_decodes_text_parts() -> None:
    html = base64.b64encode(b'<a href="https://Evil.Example/login">x</a> http://192.0.2.7/raw')
    message = (
        b"Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
        b"--b\r\nContent-Type: text/plain\r\n\r\nwww.first.example/x and http://u:p@second.example:81/\r\n"
        b"again http://first.example www.first.example\r\n"
        b"--b\r\nContent-Type: text/html\r\nContent-Transfer-Encoding: base64\r\n\r\n" + html + b"\r\n"
        b"--b\r\nContent-Type: application/octet-stream\r\n\r\nhttp://binary.example/\r\n--b--\r\n"
    )
    found = extract_body_domains(message, 100_000, 10)
    assert found == ["www.first.example", "second.example", "first.example", "evil.example"]
    assert extract_body_domains(message, 100_000, 2) == ["www.first.example", "second.example"]


# -- the plugin follows the stock plugin rules (tests/unit/test_hookspecs.py) ---------------


def test_plugin_docstring_names_hooks_and_settings_and_hooks_exist() -> None:
    doc = inspect.getdoc(connect_dnsbl) or ""
    impls = [n for n, v in vars(connect_dnsbl.Plugin).items() if hasattr(v, f"{hookspecs.PROJECT}_impl")]
    assert impls and all(hasattr(hookspecs, n) for n in impls)
    names = impls + [f.name for f in dataclasses.fields(Settings)] + [f.name for f in dataclasses.fields(Zone)]
    assert [n for n in names if f"``{n}``" not in doc] == []
    for cls in (Settings, Zone, CodeRule):
        assert all(str(f.metadata.get("doc", "")).strip() for f in dataclasses.fields(cls)), cls


def test_the_documented_example_policy_loads() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "dnsbl.md").read_text(encoding="utf-8")
    example = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    settings = load(example.split('name = "connect_dnsbl"', 1)[1].split("\n", 1)[1])
    wl, zen, dbl = settings.zones
    assert wl.rule("127.0.10.3")[0] == "accept"
    assert zen.rule("127.0.0.10")[:2] == ("score", 2.0) and zen.rule("127.0.0.9")[0] == "ignore"
    assert dbl.targets == ("helo", "mail_from", "body")
