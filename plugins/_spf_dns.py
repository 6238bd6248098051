"""The DNS side of ``mail_spf``: pyspf's lookups through the policy's resolver settings.

pyspf 2.0 looks names up through its module-level ``spf.DNSLookup``, which asks
dnspython's process-wide default resolver (``/etc/resolv.conf``), not the policy's
``[dns]`` section. Replacing that global would make every gateway in the process (two
in one test run, or the old and new generation during a reload) share one resolver.
Instead :class:`SpfQuery` subclasses ``spf.query`` and overrides its single DNS entry
point, ``query.dns``, so each check asks the resolver it was given and nothing global
changes. The override keeps pyspf's contract: a list of values (addresses, ``(pref,
exchange)`` pairs, PTR names, TXT string tuples), ``[]`` for no data, ``spf.TempError``
for a failure to find out, and the void-lookup limit of RFC 7208 §4.6.4.

The resolver is the blocking view of the gateway's own (``gateway.resolver.blocking()``,
see ``gateway/dns.py``): under capture it records each lookup for ``gateway replay``, and
in a replay it answers from the record.

Everything here blocks: it runs in the gateway's thread pool (``gateway.run_in_thread``).
"""

from __future__ import annotations

import time
from typing import Any

import dns.exception
import dns.name
import dns.resolver
import spf

from gateway.dns import BlockingResolver, make_resolver
from gateway.policy.model import DnsSettings

__all__ = ["SpfQuery", "make_sync_resolver"]

# RFC 7208 §4.6.4: more than two lookups that return nothing is a permerror.
MAX_VOID_LOOKUPS = 2
_QTYPES = frozenset({"A", "AAAA", "MX", "PTR", "TXT"})


def make_sync_resolver(settings: DnsSettings) -> BlockingResolver:
    """A blocking resolver for the policy's ``[dns]`` section, for a gateway without a
    resolver of its own: :func:`gateway.dns.make_resolver`'s blocking view.

    :param settings: the ``[dns]`` section: nameservers (empty: the system's) and the
        time limit of one lookup
    :raises ValueError: a nameserver entry is malformed
    """
    return make_resolver(settings).blocking()


class _OutOfTime(spf.TempError):  # type: ignore[misc]
    """The check's time is up: always temperror, never a skipped name."""


class SpfQuery(spf.query):  # type: ignore[misc]  # pyspf ships no type hints
    """One pyspf check whose DNS lookups go to ``resolver`` and end by ``deadline``.

    :param resolver: the blocking resolver to ask (shared by threads: it keeps no
        per-query state on the object)
    :param deadline: ``time.monotonic()`` value after which lookups give temperror;
        this caps the whole check (pyspf's own ``querytime`` defaults to 20 s)
    :param kwargs: ``spf.query`` arguments (``i``, ``s``, ``h``, ``receiver``, ``strict``)
    """

    def __init__(self, resolver: BlockingResolver, deadline: float, **kwargs: Any) -> None:
        # querytime=0: pyspf's clock is not used; our deadline bounds every lookup.
        super().__init__(querytime=0, **kwargs)
        self._resolver = resolver
        self._deadline = deadline

    def dns(self, name: str, qtype: str, cnames: Any = None, ignore_void: bool = False) -> list[Any]:
        """Look ``name`` up (pyspf's hook), with pyspf's caching and void-lookup count.

        :param name: the name to look up, possibly with a trailing dot
        :param qtype: ``A``, ``AAAA``, ``MX``, ``PTR`` or ``TXT``
        :param cnames: pyspf's CNAME bookkeeping; unused, dnspython follows CNAMEs
        :param ignore_void: do not count an empty answer towards the void limit
        :returns: the values, ``[]`` for NXDOMAIN or no records of that type
        :raises spf.TempError: SERVFAIL, timeout, or the check's time is up
        :raises spf.PermError: the void-lookup limit is exceeded
        """
        name = str(name)
        if name.endswith("."):
            name = name[:-1]
        # As pyspf: a name with an empty or over-long label has no records (RFC 7208 §4.3).
        if not name or not all(0 < len(label) < 64 for label in name.split(".")):
            return []
        name = name.lower()
        key = (name, qtype)
        cached: list[Any] | None = self.cache.get(key)
        if cached:
            return cached
        result = self._lookup(name, qtype)
        if result:
            self.cache[key] = result
        elif not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > MAX_VOID_LOOKUPS:
                raise spf.PermError(f"Void lookup limit of {MAX_VOID_LOOKUPS} exceeded")
        return result

    def validated_ptrs(self) -> list[str]:
        """The client's PTR names whose addresses include it (RFC 7208 §5.5), for ``ptr`` and ``%{p}``.

        As pyspf's, except for DNS errors: §5.5 says a failed PTR lookup makes the
        mechanism not match, and a failed address lookup skips that one name, where
        pyspf would end the whole check with temperror.
        """
        try:
            names = self.dns_ptr(self.i)
        except _OutOfTime:
            raise
        except spf.TempError:
            return []
        validated = []
        for name in names[: spf.MAX_PTR]:  # §4.6.4: at most 10 PTR names are looked up
            try:
                addresses = self.dns_a(name, self.A)
            except _OutOfTime:
                raise
            except spf.TempError:
                continue
            if self.cidrmatch(addresses, self.cidrmax):
                validated.append(name)
        return validated

    def _lookup(self, name: str, qtype: str) -> list[Any]:
        if qtype not in _QTYPES:  # pyspf asks SPF (type 99) only in "harsh" mode
            return []
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise _OutOfTime("DNS Error: exceeded max query lookup time")
        try:
            qname = dns.name.from_text(name)
        except (dns.exception.DNSException, UnicodeError, ValueError):
            return []  # not a valid DNS name: it can have no records
        try:
            answer = self._resolver.resolve(
                qname,
                qtype,
                search=False,
                raise_on_no_answer=False,
                lifetime=min(remaining, float(self._resolver.lifetime)),
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.YXDOMAIN):
            return []
        except dns.resolver.LifetimeTimeout:
            raise spf.TempError(f"DNS timeout looking up {name} {qtype}") from None
        except dns.resolver.NoNameservers:
            # RFC 7208 §2.6.6: SERVFAIL (or no server answering) is a temporary error.
            raise spf.TempError(f"DNS failure looking up {name} {qtype}") from None
        except dns.exception.DNSException as exc:
            raise spf.TempError(f"DNS error looking up {name} {qtype}: {exc}") from None
        if answer.rrset is None:
            return []
        return [value for rdata in answer.rrset if (value := _value(rdata, qtype)) is not None]


def _value(rdata: Any, qtype: str) -> Any:
    """One record in the form pyspf's own dnspython adapter returns."""
    if qtype in ("A", "AAAA"):
        return rdata.address
    if qtype == "MX":
        # The root name (a null MX, RFC 7505) comes out as "." and looks up nothing.
        return (rdata.preference, rdata.exchange.to_text())
    if qtype == "PTR":
        return rdata.target.to_text(omit_final_dot=True)
    # TXT: the character-strings, joined by pyspf (RFC 7208 §3.3). A TXT record
    # without strings is malformed; pyspf would crash on it, so it is left out.
    return tuple(rdata.strings) or None
