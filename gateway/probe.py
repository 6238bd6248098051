"""Is each daemon a policy names reachable? ``gateway check --probe`` and start-up warnings.

A policy names daemons through its plugins (clamd, spamd, rspamd, Dovecot, a Redis
state store) and through ``[dns]`` (the resolver). The core names no plugin, so each
plugin that talks to a daemon implements ``gateway_probe`` and adds what it finds to a
:class:`Probes`; the core adds the resolver. Every try is bounded by one time limit.

The same tries run once at start-up, inside the plugins' ``gateway_startup``, under
:data:`STARTUP_TIMEOUT`, through :func:`startup_probe`: a daemon that does not answer
is a WARNING saying what it means for mail (every message deferred with 451 when the
plugin fails closed, or passed unchecked when it fails open), and start-up goes on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping

import dns.asyncquery
import dns.message
import dns.rcode

from gateway.policy.model import DnsSettings, Policy

__all__ = [
    "STARTUP_TIMEOUT",
    "ProbeResult",
    "Probes",
    "nameservers",
    "probe_policy",
    "probe_resolver",
    "startup_probe",
    "try_daemon",
]

log = logging.getLogger(__name__)

#: The longest wait for one daemon at start-up: a daemon that is down must not hold the
#: gateway's start (or a reload) for the plugins' full connect and scan timeouts.
STARTUP_TIMEOUT = 3.0

#: What a try returns: a short description of the daemon's answer (``"PONG"``).
Check = Callable[[], Awaitable[str]]


@dataclass
class ProbeResult:
    """One daemon tried: reachable when ``error`` is ``None``.

    :ivar daemon: what it is (``"clamd"``, ``"Redis"``, ``"DNS resolver"``)
    :ivar address: where it was tried (socket path, ``host:port``, URL without password)
    :ivar users: the plugins (or ``"[dns]"``) that name it
    :ivar detail: what it answered, when it did
    :ivar error: why it is unreachable
    """

    daemon: str
    address: str
    users: list[str] = field(default_factory=list)
    detail: str = ""
    error: str | None = None

    @property
    def is_reachable(self) -> bool:
        """Whether the daemon answered."""
        return self.error is None


async def try_daemon(check: Check, timeout: float) -> tuple[str, str | None]:
    """Run one try within ``timeout`` seconds.

    :returns: ``(detail, None)`` when it answered, ``("", error)`` when not
    """
    try:
        async with asyncio.timeout(timeout):
            return await check(), None
    except TimeoutError:
        return "", f"no answer within {timeout:g}s"
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # boundary: any failure of a try means "unreachable"
        log.debug("probe failed", exc_info=True)  # the caller reports it; the trace is for debugging
        return "", str(exc) or type(exc).__name__


class Probes:
    """The daemons tried by one ``gateway check --probe``, in the order first named.

    :param timeout: the longest wait for each daemon
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.results: list[ProbeResult] = []

    async def add(self, user: str, daemon: str, address: str, check: Check) -> ProbeResult:
        """Try a daemon (once per daemon and address, however many plugins name it).

        :param user: the plugin (its name) that names the daemon
        :param daemon: what it is, as the report names it
        :param address: where it is
        :param check: connects, asks something cheap (PING), and returns what it answered;
            raises on any failure
        """
        for result in self.results:
            if (result.daemon, result.address) == (daemon, address):
                if user not in result.users:
                    result.users.append(user)
                return result
        detail, error = await try_daemon(check, self.timeout)
        result = ProbeResult(daemon, address, [user], detail, error)
        self.results.append(result)
        return result

    @property
    def all_reachable(self) -> bool:
        """Whether every daemon tried answered."""
        return all(result.is_reachable for result in self.results)

    def lines(self) -> list[str]:
        """One line per daemon: ``reachable`` / ``UNREACHABLE``, what, where, who, why."""
        out = []
        for r in self.results:
            state = "reachable  " if r.is_reachable else "UNREACHABLE"
            why = r.detail if r.is_reachable else r.error
            out.append(f"{state} {r.daemon} at {r.address} ({', '.join(r.users)}){': ' + why if why else ''}")
        return out


def nameservers(settings: DnsSettings) -> list[tuple[str, int]]:
    """The ``(address, port)`` of each server the gateway's resolver asks.

    Reads ``/etc/resolv.conf`` when ``[dns] nameservers`` is empty (a blocking read:
    call it from a command or a thread, not from a coroutine of a running gateway).
    """
    from gateway.dns import make_resolver

    resolver = make_resolver(settings)
    out = []
    for server in resolver.nameservers:
        if isinstance(server, str):
            out.append((server, 53))
        else:
            out.append((str(getattr(server, "address", server)), int(getattr(server, "port", 53))))
    return out


async def probe_resolver(address: str, port: int) -> str:
    """Ask one DNS server for the root's NS records; any answer at all counts.

    :raises dns.exception.DNSException: or ``OSError``: no answer (the caller bounds the wait)
    """
    query = dns.message.make_query(".", "NS")
    response = await dns.asyncquery.udp(query, address, port=port)
    return f"answers ({dns.rcode.to_text(response.rcode())})"


async def probe_policy(policy: Policy, specs: Mapping[str, Any], timeout: float) -> Probes:
    """Try every daemon ``policy`` names: each plugin entry's (with each override's
    settings for it) through ``gateway_probe``, then each DNS server of ``[dns]``.

    :param policy: the policy to check
    :param specs: the known plugins (:func:`gateway.hooks.discover_plugins`)
    :param timeout: the longest wait for each daemon
    :returns: the outcomes, one per daemon and address
    """
    from gateway.hooks import HookRunner

    runner = HookRunner(specs, [entry.name for entry in policy.plugins])
    entries = []
    for entry in policy.plugins:
        entries.append(entry)
        for override in policy.overrides:
            settings = override.plugins.get(entry.id)
            if settings is not None and settings != entry.settings:
                entries.append(dataclasses.replace(entry, settings=settings))
    probes = Probes(timeout)
    await runner.call_all("gateway_probe", entries, policy=policy, probes=probes)
    servers = await asyncio.to_thread(nameservers, policy.dns)  # may read /etc/resolv.conf
    for address, port in servers:
        where = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        await probes.add("[dns]", "DNS resolver", where, functools.partial(probe_resolver, address, port))
    return probes


async def startup_probe(
    logger: logging.Logger, plugin: str, daemon: str, address: str, check: Check, consequence: str,
) -> bool:
    """Try a daemon once at start-up (at most :data:`STARTUP_TIMEOUT`) and say so.

    :param logger: the plugin's logger
    :param plugin: the plugin's name
    :param daemon: what the daemon is (``"clamd"``)
    :param address: where it is
    :param check: the try (see :meth:`Probes.add`)
    :param consequence: what a missing daemon means for mail under this entry's
        settings, e.g. ``every message will get 451 4.7.1 (on_scanner_error =
        "tempfail")``
    :returns: whether it answered; a daemon that does not is a WARNING, never an error
    """
    detail, error = await try_daemon(check, STARTUP_TIMEOUT)
    if error is None:
        logger.info("%s: %s at %s answers%s", plugin, daemon, address, f" ({detail})" if detail else "")
        return True
    logger.warning("%s: %s not reachable at %s (%s): %s until it answers", plugin, daemon, address, error, consequence)
    return False

