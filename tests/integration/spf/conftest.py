"""SPF test fixtures: a real DNS server on loopback serving SPF records, once per session.

``spf_dns`` serves :data:`ZONE` (the plugin's own cases). Two names are broken on
purpose for the whole session: ``servfail.spf.example`` answers SERVFAIL and
``timeout.spf.example`` never answers its TXT query. ``suite_dns`` is a second server
whose zone the RFC 7208 test-suite module replaces scenario by scenario.
``other_dns`` serves :data:`OTHER_ZONE`, which says the opposite about
``pass.spf.example``: two gateways in one process, each with its own ``[dns]``, must
each get their own server's answer.
"""

from __future__ import annotations

from typing import Iterator

import dns.resolver
import pytest

from plugins._spf_dns import make_sync_resolver
from tests.dnsserver import DnsTestServer, dns_settings

# Clients in the SMTP tests connect from 127.0.0.1; the check-function tests use
# documentation addresses (192.0.2.0/24, RFC 5737) as well.
ZONE = r"""
$ORIGIN spf.example.
$TTL 300
@               IN SOA  ns.spf.example. hostmaster.spf.example. 1 3600 600 86400 300
pass            IN TXT  "v=spf1 ip4:127.0.0.0/8 -all"
fail            IN TXT  "v=spf1 ip4:192.0.2.0/24 -all"
fail-exp        IN TXT  "v=spf1 ip4:192.0.2.0/24 -all exp=why.fail-exp.spf.example"
why.fail-exp    IN TXT  "%{i} may not send mail for %{d}, see https://spf.example/why"
softfail        IN TXT  "v=spf1 ip4:192.0.2.0/24 ~all"
neutral         IN TXT  "v=spf1 ip4:192.0.2.0/24 ?all"
nopolicy        IN A    192.0.2.1
nopolicy        IN TXT  "not an SPF record"
include         IN TXT  "v=spf1 include:pass.spf.example -all"
include-none    IN TXT  "v=spf1 include:nopolicy.spf.example -all"
redirect        IN TXT  "v=spf1 redirect=pass.spf.example"
redirect-split  IN TXT  "v=spf1 ip4:192.0.2.0/24" " redirect=fail.spf.example"
mx              IN TXT  "v=spf1 mx -all"
mx              IN MX   10 mail.mx.spf.example.
mail.mx         IN A    192.0.2.20
macro-i         IN TXT  "v=spf1 exists:%{i}.allow.spf.example -all"
192.0.2.30.allow IN A   127.0.0.2
macro-d         IN TXT  "v=spf1 a:mail.%{d} -all"
mail.macro-d    IN A    192.0.2.40
macro-l         IN TXT  "v=spf1 exists:%{l}.users.%{d} -all"
alice.users.macro-l IN A 127.0.0.2
void            IN TXT  "v=spf1 a:nx1.spf.example a:nx2.spf.example a:nx3.spf.example -all"
two-void        IN TXT  "v=spf1 a:nx1.spf.example a:nx2.spf.example ip4:192.0.2.0/24 -all"
too-many        IN TXT  "v=spf1 a:h.spf.example a:h.spf.example a:h.spf.example a:h.spf.example" " a:h.spf.example a:h.spf.example a:h.spf.example a:h.spf.example a:h.spf.example a:h.spf.example a:h.spf.example -all"
h               IN A    192.0.2.99
syntax          IN TXT  "v=spf1 ip4:192.0.2.300 -all"
two-records     IN TXT  "v=spf1 -all"
two-records     IN TXT  "v=spf1 +all"
servfail        IN TXT  "v=spf1 +all"
timeout         IN TXT  "v=spf1 +all"
include-servfail IN TXT "v=spf1 include:servfail.spf.example -all"
mta             IN A    127.0.0.1
mta             IN TXT  "v=spf1 a -all"
badhelo         IN TXT  "v=spf1 ip4:192.0.2.0/24 -all"
xn--bcher-kva   IN TXT  "v=spf1 ip4:127.0.0.0/8 -all"
"""

OTHER_ZONE = """
pass.spf.example. 300 IN TXT "v=spf1 -all"
"""


@pytest.fixture(scope="session")
def spf_dns() -> Iterator[DnsTestServer]:
    """The test DNS server for :data:`ZONE`, started once per session."""
    with DnsTestServer(ZONE) as server:
        server.fail("servfail.spf.example")
        server.drop("timeout.spf.example", "TXT")
        yield server


@pytest.fixture(scope="session")
def spf_resolver(spf_dns: DnsTestServer) -> dns.resolver.Resolver:
    """A blocking resolver as the plugin builds it, pointed at ``spf_dns``."""
    return make_sync_resolver(dns_settings(spf_dns.port, timeout=1.0))


@pytest.fixture(scope="session")
def suite_dns() -> Iterator[DnsTestServer]:
    """A second server, for zones loaded one test-suite scenario at a time."""
    with DnsTestServer("") as server:
        yield server


@pytest.fixture(scope="session")
def other_dns() -> Iterator[DnsTestServer]:
    """A server that answers differently for ``pass.spf.example``."""
    with DnsTestServer(OTHER_ZONE) as server:
        yield server
