"""A real authoritative DNS server for tests, on 127.0.0.1 (UDP and TCP, same port).

It serves zone-file text with dnslib in threads of the test process. Unlike dnslib's own
``ZoneResolver``, a name that exists without the asked type answers NOERROR with no
records (NODATA, RFC 2308) rather than NXDOMAIN, so MX fallback logic sees the truth.
Tests can make it answer SERVFAIL for a name, or not answer at all (a timeout)::

    server, port = start_dns(ZONE)
    server.fail("broken.test.example")          # SERVFAIL
    server.drop("slow.test.example", "MX")      # no answer to MX queries for that name
    ...
    server.stop()

or as a context manager: ``with DnsTestServer(ZONE) as server: ...``.
"""

from __future__ import annotations

import threading
from types import TracebackType
from typing import Any

from dnslib import QTYPE, RCODE, RR, DNSRecord
from dnslib.server import DNSError, DNSLogger, DNSServer
from dnslib.zoneresolver import ZoneResolver

__all__ = ["DnsTestServer", "dns_settings", "start_dns"]


class _QuietLogger(DNSLogger):
    def __init__(self) -> None:
        super().__init__(log="-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)

    def log_error(self, handler: Any, e: Any) -> None:  # dropped queries are expected
        pass


def _key(name: str) -> str:
    return name.lower().rstrip(".") + "."


class TestZoneResolver(ZoneResolver):
    """dnslib's zone resolver with NODATA, SERVFAIL and silence on demand."""

    __test__ = False  # not a pytest test class

    def __init__(self, zone: str) -> None:
        super().__init__(zone, glob=False)
        self.lock = threading.Lock()
        self.failing: dict[str, set[str] | None] = {}  # name -> qtypes (None: all)
        self.dropping: dict[str, set[str] | None] = {}
        self.queries: list[tuple[str, str]] = []
        self._names = {_key(str(name)) for name, _, _ in self.zone}
        self._soa = [rr for _, rtype, rr in self.zone if rtype == "SOA"]

    def set_zone(self, zone: str) -> None:
        fresh = [(rr.rname, QTYPE[rr.rtype], rr) for rr in RR.fromZone(zone)]
        with self.lock:
            self.zone = fresh
            self._names = {_key(str(name)) for name, _, _ in fresh}
            self._soa = [rr for _, rtype, rr in fresh if rtype == "SOA"]

    @staticmethod
    def _matches(table: dict[str, set[str] | None], name: str, qtype: str) -> bool:
        if name not in table:
            return False
        types = table[name]
        return types is None or qtype in types

    def _chase_cname(self, reply: DNSRecord, qtype: str) -> None:
        """Add the in-zone target records of a CNAME answer, as an authoritative server does."""
        if qtype == "CNAME":
            return
        for _ in range(8):
            last = reply.rr[-1] if reply.rr else None
            if last is None or QTYPE[last.rtype] != "CNAME":
                return
            target = _key(str(last.rdata.label))
            found = [
                rr for name, rtype, rr in self.zone if _key(str(name)) == target and rtype in (qtype, "CNAME")
            ]
            if not found:
                return
            for rr in found:
                reply.add_answer(rr)

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        name = _key(str(request.q.qname))
        qtype = QTYPE[request.q.qtype]
        request.header.ad = 0  # replies copy the query's flags; a non-validating server never sets AD
        with self.lock:
            self.queries.append((name.rstrip("."), qtype))
            if self._matches(self.dropping, name, qtype):
                raise DNSError("dropped by test")  # dnslib sends nothing back
            if self._matches(self.failing, name, qtype):
                reply = request.reply()
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            reply = super().resolve(request, handler)
            self._chase_cname(reply, qtype)
            if reply.header.rcode == RCODE.NXDOMAIN and name in self._names:
                # RFC 2308 §2.2 NODATA: the name exists, just not with this type.
                reply.header.rcode = RCODE.NOERROR
                for soa in self._soa:
                    reply.add_auth(soa)
            return reply


class DnsTestServer:
    """The server: ``port``, ``resolver`` (programmable), ``stop()``."""

    __test__ = False

    def __init__(self, zone: str, address: str = "127.0.0.1") -> None:
        self.address = address
        self.resolver = TestZoneResolver(zone)
        self.port, self._udp, self._tcp = self._bind()
        self._threads = [
            threading.Thread(target=s.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            for s in (self._udp, self._tcp)
        ]
        for thread in self._threads:
            thread.start()

    def _bind(self) -> tuple[int, DNSServer, DNSServer]:
        logger = _QuietLogger()
        for _ in range(50):
            udp = DNSServer(self.resolver, address=self.address, port=0, logger=logger)
            port = udp.server.server_address[1]
            try:
                tcp = DNSServer(self.resolver, address=self.address, port=port, tcp=True, logger=logger)
            except OSError:
                udp.server.server_close()
                continue
            return port, udp, tcp
        raise RuntimeError("no free port for the test DNS server")

    @property
    def queries(self) -> list[tuple[str, str]]:
        """Every (name, type) asked so far."""
        with self.resolver.lock:
            return list(self.resolver.queries)

    def fail(self, name: str, *qtypes: str) -> None:
        """Answer SERVFAIL for ``name`` (for the given types, or all)."""
        with self.resolver.lock:
            self.resolver.failing[_key(name)] = set(qtypes) or None

    def drop(self, name: str, *qtypes: str) -> None:
        """Never answer queries for ``name`` (for the given types, or all): a timeout."""
        with self.resolver.lock:
            self.resolver.dropping[_key(name)] = set(qtypes) or None

    def heal(self) -> None:
        """Forget every :meth:`fail` and :meth:`drop`."""
        with self.resolver.lock:
            self.resolver.failing.clear()
            self.resolver.dropping.clear()

    def set_zone(self, zone: str) -> None:
        self.resolver.set_zone(zone)

    def stop(self) -> None:
        for server in (self._udp, self._tcp):
            server.server.shutdown()
            server.server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> DnsTestServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_dns(zone: str, address: str = "127.0.0.1") -> tuple[DnsTestServer, int]:
    """Start a test DNS server for ``zone`` (zone-file text); returns it and its port."""
    server = DnsTestServer(zone, address)
    return server, server.port


def dns_settings(port: int, timeout: float = 1.0) -> Any:
    """A ``DnsSettings`` pointing at a test server on 127.0.0.1:``port``."""
    from gateway.policy.model import DnsSettings

    return DnsSettings(nameservers=(f"127.0.0.1:{port}",), timeout=timeout)
