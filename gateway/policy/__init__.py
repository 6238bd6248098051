"""Policies: load, validate and scope the gateway's declarative configuration.

``load_policy(path, registry=...)`` reads a TOML policy (``None`` = the embedded default,
``policies/default.toml``) into a frozen :class:`Policy`, or raises :class:`PolicyError`
naming file, line and key. ``policy.scope(listener=..., client_ip=...)`` gives the effective
limits and plugin chain for a connection, ``scope.for_recipient_domain(domain)`` per
recipient. Plugins declare their settings with the field types and :func:`setting` helper
exported here.
"""

from gateway.policy.loader import (
    DEFAULT_POLICY_PATH,
    RESERVED_PLUGIN_KEYS,
    load_policy,
    load_policy_text,
)
from gateway.policy.model import (
    AuthSettings,
    Limits,
    ListenerSettings,
    LocalSettings,
    Match,
    Override,
    PluginEntry,
    Policy,
    RelaySettings,
    Scope,
    ScoringSettings,
    ServerSettings,
    TlsSettings,
)
from gateway.policy.schema import FieldInfo, PolicyError, build, describe, setting
from gateway.policy.units import (
    Duration,
    IPNetwork,
    Size,
    UnitError,
    format_duration,
    format_size,
    parse_duration,
    parse_network,
    parse_size,
)

__all__ = [
    "DEFAULT_POLICY_PATH",
    "RESERVED_PLUGIN_KEYS",
    "AuthSettings",
    "Duration",
    "FieldInfo",
    "IPNetwork",
    "Limits",
    "ListenerSettings",
    "LocalSettings",
    "Match",
    "Override",
    "PluginEntry",
    "Policy",
    "PolicyError",
    "RelaySettings",
    "Scope",
    "ScoringSettings",
    "ServerSettings",
    "Size",
    "TlsSettings",
    "UnitError",
    "build",
    "describe",
    "format_duration",
    "format_size",
    "load_policy",
    "load_policy_text",
    "parse_duration",
    "parse_network",
    "parse_size",
    "setting",
]
