"""The policy as typed, frozen objects, and scoped overrides.

A :class:`Policy` is what :mod:`gateway.policy.loader` builds from a TOML file: the gateway's
own settings sections, the ordered plugin chain (each entry carrying that plugin's validated
``Settings`` instance) and the scoped overrides. The SMTP front end asks
:meth:`Policy.scope` once per connection for the effective limits and plugin chain, and
:meth:`Scope.for_recipient_domain` per recipient.

Override specificity, least to most specific: the base policy, ``listener``, ``network`` (a
longer prefix beats a shorter one), ``recipient_domain`` (an exact domain beats a
``.parent`` suffix, a longer suffix beats a shorter one). Overrides apply in increasing
specificity, so the most specific wins; equally specific ones apply in file order. Each
override changes only the keys it names, so a listener override of ``max_message_size`` and a
network override of ``max_recipients`` both take effect.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gateway.policy.console import ConsoleSettings
from gateway.policy.tls_reporting import TlsReportingSettings
from gateway.policy.local import LocalAssign, LocalSettings, QuotaLimit, QuotaSettings
from gateway.policy.schema import setting
from gateway.policy.units import Duration, IPNetwork, Size

__all__ = [
    "AuthSettings",
    "CaptureSettings",
    "ConsoleSettings",
    "TlsReportingSettings",
    "DeliverySettings",
    "DnsSettings",
    "EtrnSettings",
    "LocalAssign",
    "MetricsSettings",
    "RouteSettings",
    "Limits",
    "ListenerSettings",
    "LocalSettings",
    "Match",
    "Override",
    "PluginEntry",
    "Policy",
    "QuotaLimit",
    "QuotaSettings",
    "RelaySettings",
    "Scope",
    "ScoringSettings",
    "ServerSettings",
    "TlsSettings",
]


@dataclass(frozen=True)
class ServerSettings:
    """Process-wide settings: ``[server]``."""

    hostname: str = setting(
        "", "name in the greeting and Received headers; empty = this host's FQDN"
    )
    queue_dir: Path = setting(
        Path("var/queue"), "queue directory (relative to the working directory)"
    )
    var_dir: Path = setting(
        Path("var"), "state directory: generated TLS certificate, state databases"
    )
    log_level: Literal["debug", "info", "warning", "error"] = setting("info", "logging threshold")
    workers: int = setting(
        1, "processes accepting SMTP on the same ports (SO_REUSEPORT); each delivers what it accepted", min=1
    )

    def effective_hostname(self) -> str:
        """The configured hostname, or this host's FQDN when empty."""
        return self.hostname or socket.getfqdn()


@dataclass(frozen=True)
class ListenerSettings:
    """One SMTP listening socket: an entry of ``[[listeners]]``."""

    name: str = field(metadata={"doc": "unique name, used by overrides' match.listener"})
    address: str = setting("127.0.0.1", 'address to bind ("0.0.0.0" or "::" for all)')
    port: int = setting(2525, "TCP port", min=1, max=65535)
    tls: Literal["none", "starttls", "implicit"] = setting(
        "starttls", "offer STARTTLS, wrap the socket in TLS from the start (port 465), or no TLS"
    )
    require_tls: bool = setting(False, "refuse MAIL until the session is encrypted")
    auth: bool = setting(True, "offer AUTH (only ever after TLS)")
    require_auth: bool = setting(
        False, "refuse MAIL until the client has authenticated (submission)"
    )


@dataclass(frozen=True)
class TlsSettings:
    """Certificate for STARTTLS and implicit TLS: ``[tls]``."""

    cert: Path | None = setting(None, "PEM certificate chain file")
    key: Path | None = setting(None, "PEM private key file")
    self_signed: bool = setting(
        True, "without cert/key, make a self-signed one under var_dir/tls on first run"
    )
    min_version: Literal["TLSv1.2", "TLSv1.3"] = setting("TLSv1.2", "lowest TLS version accepted")


@dataclass(frozen=True)
class AuthSettings:
    """SMTP AUTH: ``[auth]``."""

    users_file: Path | None = setting(
        None, "file of user credentials; AUTH has no users without one"
    )
    max_failures: int = setting(3, "failed AUTH attempts before the session is dropped", min=1)


@dataclass(frozen=True)
class Limits:
    """Per-session bounds: ``[limits]``; overrides may change any of them."""

    max_message_size: Size = setting(
        25 * 1024**2, 'largest message accepted (SIZE), e.g. "25MB"', min=1
    )
    spool_threshold: Size = setting(
        64 * 1024, "a message past this size goes to the queue's disk as it arrives, not memory", min=0
    )
    max_recipients: int = setting(100, "recipients per transaction", min=1)
    max_command_line: int = setting(
        512, "command line length incl. CRLF (RFC 5321 §4.5.3.1.4)", min=512
    )
    max_line_length: int = setting(
        1000, "message text line length incl. CRLF (RFC 5321 §4.5.3.1.6)", min=1000
    )
    idle_timeout: Duration = setting(
        300.0, "wait for the next command (RFC 5321 §4.5.3.2.7: 5m)", min=0.001
    )
    data_timeout: Duration = setting(600.0, "wait for the whole DATA content", min=0.001)
    session_timeout: Duration = setting(1800.0, "total session length", min=0.001)
    max_connections: int = setting(1000, "concurrent sessions per listener", min=1)
    max_connections_per_ip: int = setting(20, "concurrent sessions per client address", min=1)
    per_ip_exempt_networks: tuple[IPNetwork, ...] = setting(
        (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
        "clients max_connections_per_ip does not limit (default: loopback)",
    )
    per_ip_exempt_relay_clients: bool = setting(
        True, "[relay] clients are not limited by max_connections_per_ip either"
    )
    max_bad_commands: int = setting(10, "unknown or out-of-order commands before disconnect", min=1)
    max_transactions: int = setting(100, "mail transactions per session", min=1)

    def limit_per_ip(self, client_ip: str, is_relay_client: bool) -> int | None:
        """``max_connections_per_ip`` for this client, or ``None`` when it is exempt.

        Postfix exempts its own networks the same way
        (``smtpd_client_connection_limit_exceptions = $mynetworks``): local submitters
        and content filters open many sessions on purpose. ``max_connections`` still
        counts exempt clients.

        :param client_ip: the client's address; an unparsable one is never exempt
        :param is_relay_client: whether the client is in ``[relay] clients``
        """
        if is_relay_client and self.per_ip_exempt_relay_clients:
            return None
        if self.per_ip_exempt_networks:
            address = _parse_ip(client_ip)
            if address is not None and any(address in net for net in self.per_ip_exempt_networks):
                return None
        return self.max_connections_per_ip


@dataclass(frozen=True)
class MetricsSettings:
    """The Prometheus endpoint: ``[metrics]``."""

    enabled: bool = setting(False, "serve /metrics over HTTP")
    address: str = setting("127.0.0.1", "address to bind (keep it on loopback or a management network)")
    port: int = setting(9125, "TCP port (0: any free port)", min=0, max=65535)


@dataclass(frozen=True)
class DnsSettings:
    """The resolver the gateway uses: ``[dns]``."""

    nameservers: tuple[str, ...] = setting(
        (), "\"ip\" or \"ip:port\" entries; empty = /etc/resolv.conf"
    )
    timeout: Duration = setting(5.0, "time limit of one lookup", min=0.001)
    dnssec: Literal["auto", "trusted", "off"] = setting(
        "auto",
        "believe the resolvers' DNSSEC validation (the AD bit), which DANE needs: auto = only when every "
        "nameserver is on loopback (a validating resolver on this host); trusted = the nameservers are "
        "validating resolvers on a trusted path; off = never (no DANE)",
    )


@dataclass(frozen=True)
class CaptureSettings:
    """Recording of SMTP sessions for ``gateway replay``: ``[capture]`` (docs/replay.md).

    Each session is written when it ends, as one JSON line in ``var_dir/capture/``
    (files 0600), best effort: a full disk or a slow one drops records, never a session.
    """

    enabled: bool = setting(False, "record every SMTP session (off by default)")
    headers_only: bool = setting(False, "keep only the header section of each message, not its body")
    file_size: Size = setting(64 * 1024 * 1024, "start a new capture file past this size", min=1)
    max_size: Size = setting(1024 * 1024 * 1024, "remove the oldest capture files past this total", min=1)
    max_age: Duration = setting(7 * 86400.0, "remove capture files older than this", min=1)


@dataclass(frozen=True)
class DeliverySettings:
    """The scheduler and delivery agents: ``[delivery]``."""

    enabled: bool = setting(True, "deliver from the queue (false: only accept into it)")
    at_once: bool = setting(
        True, "deliver a message that is plain deliveries (local users' Maildirs, one relay transaction) before"
        " the 250, instead of queuing it",
    )
    at_once_wait: Duration = setting(
        5.0, "longest a relay at once may take to reach the next hop's final dot before the message is queued"
        " instead (0: relayed mail is always queued first)", min=0,
    )
    local_concurrency: int = setting(
        20, "local deliveries at once (qmail concurrencylocal; 20 as Postfix's per-destination default)", min=1
    )
    remote_concurrency: int = setting(20, "remote deliveries at once (qmail concurrencyremote)", min=1)
    destination_concurrency: int = setting(5, "connections at once to one destination", min=1)
    queue_lifetime: Duration = setting(7 * 86400.0, "bounce what is still undelivered after this", min=1)
    retry_base: Duration = setting(
        60.0, "back-off unit: attempt n is tried (n * base)^2 / base after arrival, qmail-like", min=0.001
    )
    retry_max: Duration = setting(3600.0 * 4, "longest wait between two attempts", min=0.001)
    delay_warning: Duration | None = setting(None, "send a delay DSN once after this (None: never)")
    postmaster: str = setting("", "double bounces go here; empty = postmaster@<first local domain>")
    smtp_port: int = setting(25, "port of MX hosts", min=1, max=65535)
    helo: str = setting("", "name in our EHLO; empty = server.hostname")
    tls: Literal["none", "opportunistic", "required", "verify"] = setting(
        "opportunistic", "STARTTLS towards MX hosts"
    )
    tls_ca_file: Path | None = setting(
        None, "CA bundle for tls = \"verify\" and MTA-STS (MX certificates, policy fetch); default: the system's"
    )
    mta_sts: bool = setting(True, "apply the MTA-STS policies (RFC 8461) of recipient domains to MX delivery")
    mta_sts_https_port: int = setting(
        443, "port of the MTA-STS policy fetch; RFC 8461 says 443, another port is for tests", min=1, max=65535
    )
    mta_sts_timeout: Duration = setting(10.0, "limit for one MTA-STS policy fetch over HTTPS", min=0.001)
    mta_sts_refresh: Duration = setting(
        3600.0, "how often the master checks each cached MTA-STS policy's TXT id and age, and fetches "
        "a changed or half-expired one in the background (RFC 8461 §5.1)", min=0.01
    )
    dane: Literal["dane", "dane-only", "off"] = setting(
        "dane",
        "DANE (RFC 7672) for MX delivery, with a trusted validating resolver ([dns] dnssec): dane = a host "
        "with DNSSEC-valid TLSA records gets mail only over TLS its certificate matches; dane-only = also "
        "defer a host without them; off = ignore TLSA records",
    )
    connect_timeout: Duration = setting(30.0, "TCP connect and 220 greeting", min=0.001)
    command_timeout: Duration = setting(300.0, "MAIL, RCPT (RFC 5321 4.5.3.2: 5m)", min=0.001)
    data_timeout: Duration = setting(600.0, "after the final dot (RFC 5321 4.5.3.2.6: 10m)", min=0.001)
    poll_interval: Duration = setting(5.0, "how often to look for work another process queued", min=0.01)


@dataclass(frozen=True)
class RouteSettings:
    """A smarthost route: ``[[routes]]`` (qmail smtproutes)."""

    domain: str = field(metadata={"doc": "recipient domain; \".example.com\" covers subdomains; \"*\" is the default route"})
    host: str = setting("", "smarthost name or address; empty: MX lookup for the domain")
    port: int = setting(25, "smarthost port", min=1, max=65535)
    tls: Literal["none", "opportunistic", "required", "verify"] = setting(
        "opportunistic", "STARTTLS: required refuses plaintext, verify also checks the certificate"
    )
    dane: Literal["", "dane", "dane-only", "off"] = setting(
        "", "DANE for this domain's MX hosts (host empty): as [delivery] dane when empty"
    )
    auth_user: str = setting("", "AUTH login at the smarthost")
    auth_password_env: str = setting("", "environment variable holding the AUTH password")
    action: Literal["relay", "hold", "discard"] = setting(
        "relay", "hold: keep in the queue until flushed; discard: drop (logged)"
    )
    hold: bool = setting(
        False, "keep this route's mail queued until `gateway queue flush` or ETRN releases it (serialmail)"
    )


@dataclass(frozen=True)
class RelaySettings:
    """Who may relay and where to: ``[relay]``."""

    domains: tuple[str, ...] = setting((), "remote domains accepted from anyone (we are their MX)")
    clients: tuple[IPNetwork, ...] = setting((), "client networks allowed to relay anywhere")
    authenticated: bool = setting(True, "authenticated clients may relay anywhere")


@dataclass(frozen=True)
class EtrnSettings:
    """Who may ask for a flush of held mail with ETRN (RFC 1985): ``[etrn]``.

    ETRN is offered (in the EHLO answer) when ``clients`` is not empty or
    ``authenticated`` is true; other clients get 459.
    """

    clients: tuple[IPNetwork, ...] = setting((), "client networks allowed to use ETRN")
    authenticated: bool = setting(False, "authenticated clients may use ETRN")

    @property
    def is_enabled(self) -> bool:
        """Whether anyone at all may use ETRN."""
        return bool(self.clients) or self.authenticated


@dataclass(frozen=True)
class ScoringSettings:
    """Thresholds on the summed plugin scores: ``[scoring]``; unset = off."""

    reject: float | None = setting(None, "reject (5xx) at or above this score")
    quarantine: float | None = setting(None, "quarantine at or above this score")
    tempfail: float | None = setting(None, "tempfail (4xx) at or above this score")


@dataclass(frozen=True)
class PluginEntry:
    """One link of the plugin chain: an entry of ``[[plugins]]``."""

    name: str = field(metadata={"doc": "plugin module name (<phase>_<what>)"})
    settings: object = field(metadata={"doc": "the plugin's validated Settings instance"})
    id: str = setting("", "unique id in the chain, for overrides; defaults to name")
    mode: Literal["enforce", "observe"] = setting(
        "enforce", "observe: run and log, ignore verdicts"
    )
    timeout: Duration = setting(30.0, "per-hook time limit", min=0.001)
    on_error: Literal["tempfail", "continue"] = setting(
        "tempfail", "on timeout or exception: tempfail (fail closed) or continue (fail open)"
    )

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", self.name)


@dataclass(frozen=True)
class Match:
    """What an override applies to; exactly one field is set."""

    listener: str | None = setting(None, "listener name")
    network: IPNetwork | None = setting(None, "client network")
    recipient_domain: str | None = setting(
        None, 'recipient domain; ".example.com" matches subdomains'
    )

    def __post_init__(self) -> None:
        count = sum(v is not None for v in (self.listener, self.network, self.recipient_domain))
        if count != 1:
            raise ValueError("set exactly one of listener, network, recipient_domain")
        if self.recipient_domain is not None:
            object.__setattr__(self, "recipient_domain", _normalize_domain(self.recipient_domain))

    def matches_domain(self, domain: str) -> bool:
        """Whether this is a recipient-domain match for ``domain`` (already normalized)."""
        pattern = self.recipient_domain
        if pattern is None:
            return False
        return domain.endswith(pattern) if pattern.startswith(".") else domain == pattern

    def specificity(self) -> tuple[int, int, int]:
        """Sort key: listener < network (by prefix length) < domain (suffix < exact, by length)."""
        if self.listener is not None:
            return (1, 0, 0)
        if self.network is not None:
            return (2, self.network.prefixlen, 0)
        domain = self.recipient_domain or ""
        return (3, 0 if domain.startswith(".") else 1, len(domain))


@dataclass(frozen=True)
class Override:
    """Scoped changes: an entry of ``[[overrides]]``.

    ``plugins`` and ``limits`` hold full, validated objects (base merged with the override's
    table); ``plugin_keys`` and ``limits_keys`` record which keys the override set, so that
    layered overrides change only those. A ``None`` key set means "replace the whole object".
    """

    match: Match = field(metadata={"doc": "what the override applies to"})
    disable: tuple[str, ...] = setting((), "plugin ids removed from the chain")
    plugins: Mapping[str, object] = setting({}, "plugin id -> Settings with the override applied")
    limits: Limits | None = setting(None, "limits with the override applied")
    limits_keys: frozenset[str] | None = setting(None, "limits keys the override set")
    plugin_keys: Mapping[str, frozenset[str]] = setting(
        {}, "plugin id -> settings keys the override set"
    )


def _normalize_domain(domain: str) -> str:
    return domain.strip().lower().rstrip(".")


def _apply(
    limits: Limits, plugins: tuple[PluginEntry, ...], overrides: tuple[Override, ...]
) -> tuple[Limits, tuple[PluginEntry, ...]]:
    """Layer ``overrides`` (already in increasing specificity) onto limits and a chain."""
    disabled: set[str] = set()
    for override in overrides:
        disabled.update(override.disable)
        if override.limits is not None:
            limits = _merge(limits, override.limits, override.limits_keys)
    chain = []
    for entry in plugins:
        if entry.id in disabled:
            continue
        settings = entry.settings
        for override in overrides:
            if entry.id in override.plugins:
                keys = override.plugin_keys.get(entry.id)
                settings = _merge(settings, override.plugins[entry.id], keys)
        chain.append(
            entry if settings is entry.settings else dataclasses.replace(entry, settings=settings)
        )
    return limits, tuple(chain)


def _merge(current: Any, new: Any, keys: frozenset[str] | None) -> Any:
    if keys is None:
        return new
    if not keys:
        return current
    return dataclasses.replace(current, **{key: getattr(new, key) for key in keys})


@dataclass(frozen=True)
class Scope:
    """The effective limits and plugin chain for one connection (or one recipient)."""

    limits: Limits
    plugins: tuple[PluginEntry, ...]
    domain_overrides: tuple[Override, ...] = field(default=(), repr=False, compare=False)
    _cache: dict[tuple[int, ...], Scope] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def for_recipient_domain(self, domain: str) -> Scope:
        """Apply the ``recipient_domain`` overrides matching ``domain`` on top of this scope.

        :param domain: the recipient's domain (any case, trailing dot allowed).
        :returns: this scope itself when no override matches, else a (cached) derived scope.
        """
        if not self.domain_overrides:
            return self
        name = _normalize_domain(domain)
        matched = tuple(
            i for i, o in enumerate(self.domain_overrides) if o.match.matches_domain(name)
        )
        if not matched:
            return self
        scope = self._cache.get(matched)
        if scope is None:
            limits, plugins = _apply(
                self.limits, self.plugins, tuple(self.domain_overrides[i] for i in matched)
            )
            scope = self._cache.setdefault(matched, Scope(limits, plugins))
        return scope

    @functools.cached_property
    def largest_message_size(self) -> int:
        """The largest ``max_message_size`` a recipient can have in this scope: this
        scope's own or one a ``recipient_domain`` override sets (never exceeded by
        any recipient's). The EHLO ``SIZE`` advertises it and ``MAIL ... SIZE=`` is
        checked against it (RFC 1870 §4, §6.1); each RCPT is then checked against
        its own domain's limit (:meth:`for_recipient_domain`)."""
        sizes = [self.limits.max_message_size]
        for override in self.domain_overrides:
            if override.limits is not None:
                merged = _merge(self.limits, override.limits, override.limits_keys)
                sizes.append(merged.max_message_size)
        return max(sizes)

    def plugin(self, plugin_id: str) -> PluginEntry | None:
        """The chain entry with this id, or ``None`` when absent or disabled here."""
        return next((entry for entry in self.plugins if entry.id == plugin_id), None)


@dataclass(frozen=True)
class Policy:
    """A whole, validated policy. Build it with :func:`gateway.policy.load_policy`."""

    source: str = field(metadata={"doc": 'file the policy came from, or "<embedded default>"'})
    server: ServerSettings = setting(ServerSettings(), "process-wide settings")
    listeners: tuple[ListenerSettings, ...] = setting(
        (ListenerSettings(name="smtp"),), "listening sockets"
    )
    tls: TlsSettings = setting(TlsSettings(), "TLS certificate")
    auth: AuthSettings = setting(AuthSettings(), "SMTP AUTH")
    limits: Limits = setting(Limits(), "per-session bounds")
    local: LocalSettings = setting(LocalSettings(), "local domains and users")
    relay: RelaySettings = setting(RelaySettings(), "relay permissions")
    etrn: EtrnSettings = setting(EtrnSettings(), "ETRN: who may flush held mail")
    scoring: ScoringSettings = setting(ScoringSettings(), "score thresholds")
    dns: DnsSettings = setting(DnsSettings(), "resolver")
    metrics: MetricsSettings = setting(MetricsSettings(), "Prometheus endpoint")
    capture: CaptureSettings = setting(CaptureSettings(), "session recording for gateway replay")
    console: ConsoleSettings = setting(ConsoleSettings(), "the web console")
    delivery: DeliverySettings = setting(DeliverySettings(), "scheduler and delivery agents")
    tls_reporting: TlsReportingSettings = setting(TlsReportingSettings(), "SMTP TLS reports (RFC 8460)")
    routes: tuple[RouteSettings, ...] = setting((), "smarthost routes, first match wins")
    plugins: tuple[PluginEntry, ...] = setting((), "the ordered plugin chain")
    overrides: tuple[Override, ...] = setting((), "scoped overrides")
    _network_overrides: tuple[Override, ...] = field(
        default=(), init=False, repr=False, compare=False
    )
    _domain_overrides: tuple[Override, ...] = field(
        default=(), init=False, repr=False, compare=False
    )
    _scopes: dict[tuple[str, tuple[int, ...]], Scope] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        by_specificity = sorted(self.overrides, key=lambda o: o.match.specificity())  # stable
        domain = tuple(o for o in by_specificity if o.match.recipient_domain is not None)
        networks = tuple(o for o in by_specificity if o.match.network is not None)
        object.__setattr__(self, "_domain_overrides", domain)
        object.__setattr__(self, "_network_overrides", networks)

    def listener(self, name: str) -> ListenerSettings | None:
        """The listener with this name, or ``None``."""
        return next((item for item in self.listeners if item.name == name), None)

    def scope(self, *, listener: str, client_ip: str) -> Scope:
        """The effective limits and chain for a connection (cached; cheap per connection).

        :param listener: the name of the listener that accepted the connection.
        :param client_ip: the client's address; an unparsable one matches no network.
        :returns: a :class:`Scope` with listener and network overrides applied; call
            :meth:`Scope.for_recipient_domain` per recipient for domain overrides.
        """
        networks = self._network_overrides
        matched: tuple[int, ...] = ()
        if networks:
            address = _parse_ip(client_ip)
            if address is not None:
                matched = tuple(
                    i
                    for i, o in enumerate(networks)
                    if o.match.network and address in o.match.network
                )
        key = (listener, matched)
        scope = self._scopes.get(key)
        if scope is None:
            chosen = [o for o in self.overrides if o.match.listener == listener]
            chosen += [networks[i] for i in matched]
            limits, plugins = _apply(self.limits, self.plugins, tuple(chosen))
            scope = Scope(limits, plugins, self._domain_overrides)
            scope = self._scopes.setdefault(key, scope)
        return scope


@functools.lru_cache(maxsize=4096)  # per connection, twice (scope, per-IP limit); clients come back
def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
