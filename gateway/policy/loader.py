"""Load a policy file into a validated :class:`~gateway.policy.model.Policy`.

Loading is all or nothing: the first problem raises :class:`PolicyError` naming the file, the
line and the dotted key (``plugins[1].zones``), so the gateway refuses to start (or a reload
keeps the old policy). Lines come from :class:`~gateway.policy.source.SourceMap`, which scans
the source text, since TOML parsers do not report where a key was.

Each ``[[plugins]]`` table has reserved keys (``name``, ``id``, ``mode``, ``timeout``,
``on_error``); every other key is a setting validated against that plugin's ``Settings``
dataclass from the registry. Override tables refer to plugins by id (the name unless ``id``
is given) and are merged onto the base values at load time, so every error surfaces before
the gateway starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

from gateway.policy.model import (
    AuthSettings,
    CaptureSettings,
    ConsoleSettings,
    Limits,
    ListenerSettings,
    DeliverySettings,
    DnsSettings,
    LocalSettings,
    MetricsSettings,
    RouteSettings,
    Match,
    Override,
    PluginEntry,
    Policy,
    RelaySettings,
    EtrnSettings,
    ScoringSettings,
    ServerSettings,
    TlsReportingSettings,
    TlsSettings,
)
from gateway.policy.schema import PolicyError, build, convert
from gateway.policy.source import SourceMap

__all__ = ["DEFAULT_POLICY_PATH", "RESERVED_PLUGIN_KEYS", "load_policy", "load_policy_text"]

DEFAULT_POLICY_PATH = Path(__file__).parent / "default.toml"
"""The embedded default policy (a symlink to ``policies/default.toml`` in a source tree)."""

RESERVED_PLUGIN_KEYS = ("name", "id", "mode", "timeout", "on_error")
"""Keys of a ``[[plugins]]`` entry that belong to the chain, not to the plugin's Settings."""

_SECTIONS: dict[str, type] = {
    "server": ServerSettings,
    "tls": TlsSettings,
    "auth": AuthSettings,
    "limits": Limits,
    "local": LocalSettings,
    "relay": RelaySettings,
    "etrn": EtrnSettings,
    "scoring": ScoringSettings,
    "dns": DnsSettings,
    "delivery": DeliverySettings,
    "metrics": MetricsSettings,
    "capture": CaptureSettings,
    "console": ConsoleSettings,
    "tls_reporting": TlsReportingSettings,
}
_TOP_LEVEL = (*_SECTIONS, "listeners", "routes", "plugins", "overrides")
_OVERRIDE_KEYS = ("match", "disable", "plugins", "limits")
T = TypeVar("T")
_SYNTAX_WHERE = re.compile(r"\s*\(at line (\d+), column (\d+)\)|\s*\(at end of document\)")


def load_policy(path: str | os.PathLike[str] | None, *, registry: Mapping[str, type]) -> Policy:
    """Read and validate a policy file.

    :param path: the TOML file, or ``None`` for the embedded default (whose ``source`` is
        ``"<embedded default>"``; errors still name the real file).
    :param registry: plugin name -> that plugin's ``Settings`` dataclass.
    :returns: the validated policy.
    :raises PolicyError: when the file cannot be read or is invalid.
    """
    file = os.fspath(path) if path is not None else str(DEFAULT_POLICY_PATH)
    try:
        text = Path(file).read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(
            file, None, "<file>", f"cannot read policy: {exc.strerror or exc}"
        ) from None
    except UnicodeDecodeError as exc:
        raise PolicyError(file, None, "<file>", f"not UTF-8: {exc.reason}") from None
    source = file if path is not None else "<embedded default>"
    return _Loader(text, file, registry).load(source)


def load_policy_text(text: str, *, source: str, registry: Mapping[str, type]) -> Policy:
    """Validate a policy given as text (tests, ``gateway check -``).

    :param text: the TOML document.
    :param source: the name used in errors and as :attr:`Policy.source`.
    :param registry: plugin name -> that plugin's ``Settings`` dataclass.
    :raises PolicyError: when the text is invalid.
    """
    return _Loader(text, source, registry).load(source)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _unknown(key: str, valid: tuple[str, ...] | list[str], what: str = "key") -> str:
    message = f"unknown {what} {key!r}"
    close = difflib.get_close_matches(key, list(valid), n=1)
    if close:
        message += f" (did you mean {close[0]!r}?)"
    return f"{message}; valid {what}s: {', '.join(sorted(valid))}"


class _Loader:
    """One load: the text, where errors point, and the plugin registry."""

    def __init__(self, text: str, file: str, registry: Mapping[str, type]) -> None:
        self.text = text
        self.file = file
        self.registry = registry
        self.locate = SourceMap(text).locate

    def error(self, path: str, message: str) -> PolicyError:
        return PolicyError(self.file, self.locate(path), path, message)

    def parse(self) -> dict[str, object]:
        try:
            return tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as exc:
            message = str(exc)
            where = _SYNTAX_WHERE.search(message)
            line: int | None = None
            if where is not None:
                line = int(where.group(1)) if where.group(1) else self.text.count("\n") + 1
                if where.group(2):
                    message = f"{message[: where.start()]} (column {where.group(2)})"
                else:
                    message = f"{message[: where.start()]} (at end of document)"
            raise PolicyError(self.file, line, "<syntax>", message) from None

    def table(self, value: object, path: str) -> Mapping[str, object]:
        if not isinstance(value, Mapping):
            raise self.error(path, f"expected a table, got {type(value).__name__} {value!r}")
        return value

    def tables(self, value: object, path: str) -> list[Mapping[str, object]]:
        if not isinstance(value, list):
            raise self.error(path, f"expected an array of tables ([[{path}]]), got {value!r}")
        return [self.table(item, f"{path}[{i}]") for i, item in enumerate(value)]

    def build(
        self, cls: type[T], data: Mapping[str, object], path: str, base: T | None = None
    ) -> T:
        return build(cls, data, path=path, locate=self.locate, file=self.file, base=base)

    def section(self, data: Mapping[str, object], cls: type[T], name: str) -> T:
        return self.build(cls, self.table(data.get(name, {}), name), name)

    def load(self, source: str) -> Policy:
        data = self.parse()
        for key in data:
            if key not in _TOP_LEVEL:
                raise self.error(key, _unknown(key, _TOP_LEVEL, "section"))
        server = self.section(data, ServerSettings, "server")
        if not server.hostname:
            server = dataclasses.replace(server, hostname=socket.getfqdn())
        local = self.section(data, LocalSettings, "local")
        local = dataclasses.replace(
            local,
            domains=self.domains(local.domains, "local.domains"),
            users=tuple(u.lower() for u in local.users)
            + tuple(a.user.lower() for a in local.assign if a.user.lower() not in local.users),
            virtual={
                self.domains((d,), f"local.virtual.{d}")[0]: u.lower() for d, u in local.virtual.items()
            },
        )
        routes: tuple[RouteSettings, ...] = ()
        if "routes" in data:
            tables = self.tables(data["routes"], "routes")
            routes = tuple(self.build(RouteSettings, t, f"routes[{i}]") for i, t in enumerate(tables))
            routes = tuple(
                r if r.domain == "*" else dataclasses.replace(r, domain=self.domains((r.domain,), f"routes[{i}].domain")[0])
                for i, r in enumerate(routes)
            )
        relay = self.section(data, RelaySettings, "relay")
        relay = dataclasses.replace(relay, domains=self.domains(relay.domains, "relay.domains"))
        tls = self.section(data, TlsSettings, "tls")
        limits = self.section(data, Limits, "limits")
        scoring = self.section(data, ScoringSettings, "scoring")
        self.check_scoring(scoring)
        listeners = Policy(source).listeners
        if "listeners" in data:
            tables = self.tables(data["listeners"], "listeners")
            listeners = tuple(
                self.build(ListenerSettings, t, f"listeners[{i}]") for i, t in enumerate(tables)
            )
        self.check_listeners(listeners, tls)
        tables = self.tables(data.get("plugins", []), "plugins")
        plugins = tuple(self.plugin(t, f"plugins[{i}]") for i, t in enumerate(tables))
        self.check_ids(plugins)
        tables = self.tables(data.get("overrides", []), "overrides")
        overrides = tuple(
            self.override(t, f"overrides[{i}]", limits, plugins, listeners)
            for i, t in enumerate(tables)
        )
        return Policy(
            source=source,
            server=server,
            listeners=listeners,
            tls=tls,
            auth=self.section(data, AuthSettings, "auth"),
            limits=limits,
            local=local,
            relay=relay,
            etrn=self.section(data, EtrnSettings, "etrn"),
            scoring=scoring,
            dns=self.section(data, DnsSettings, "dns"),
            delivery=self.section(data, DeliverySettings, "delivery"),
            metrics=self.section(data, MetricsSettings, "metrics"),
            capture=self.section(data, CaptureSettings, "capture"),
            console=self.section(data, ConsoleSettings, "console"),
            tls_reporting=self.section(data, TlsReportingSettings, "tls_reporting"),
            routes=routes,
            plugins=plugins,
            overrides=overrides,
        )

    def domains(self, domains: tuple[str, ...], path: str) -> tuple[str, ...]:
        result = []
        for i, domain in enumerate(domains):
            name = domain.strip().lower().rstrip(".")
            if not name or any(c.isspace() or c in "@/" for c in name):
                raise self.error(f"{path}[{i}]", f"invalid domain {domain!r}")
            result.append(name)
        return tuple(result)

    def check_listeners(self, listeners: tuple[ListenerSettings, ...], tls: TlsSettings) -> None:
        if not listeners:
            raise self.error("listeners", "at least one listener is required")
        if (tls.cert is None) != (tls.key is None):
            missing = "tls.key" if tls.key is None else "tls.cert"
            raise self.error(missing, "tls.cert and tls.key must be set together")
        names: dict[str, int] = {}
        sockets: dict[tuple[str, int], int] = {}
        for i, listener in enumerate(listeners):
            path = f"listeners[{i}]"
            if listener.name in names:
                raise self.error(
                    f"{path}.name",
                    f"duplicate listener name {listener.name!r}"
                    f" (also listeners[{names[listener.name]}])",
                )
            names[listener.name] = i
            if (listener.address, listener.port) in sockets:
                other = sockets[(listener.address, listener.port)]
                raise self.error(
                    f"{path}.port",
                    f"{listener.address}:{listener.port} is already used by listeners[{other}]",
                )
            sockets[(listener.address, listener.port)] = i
            if listener.tls != "none" and tls.cert is None and not tls.self_signed:
                raise self.error(
                    f"{path}.tls",
                    f"tls = {listener.tls!r} needs tls.cert and tls.key, or tls.self_signed = true",
                )
            if listener.require_tls and listener.tls == "none":
                raise self.error(
                    f"{path}.require_tls", 'require_tls needs tls = "starttls" or "implicit"'
                )
            if listener.require_auth and not listener.auth:
                raise self.error(f"{path}.require_auth", "require_auth needs auth = true")
            if listener.require_auth and listener.tls == "none":
                # AUTH is offered only inside TLS, so such a listener could never take mail.
                raise self.error(
                    f"{path}.require_auth", 'require_auth needs tls = "starttls" or "implicit" (AUTH only after TLS)'
                )

    def check_scoring(self, scoring: ScoringSettings) -> None:
        if scoring.reject is None:
            return
        for name in ("tempfail", "quarantine"):
            value = getattr(scoring, name)
            if value is not None and value > scoring.reject:
                raise self.error(
                    f"scoring.{name}",
                    f"{name} threshold {value} is above the reject threshold {scoring.reject}",
                )

    def plugin(self, table: Mapping[str, object], path: str) -> PluginEntry:
        name = table.get("name")
        if name is None:
            raise self.error(f"{path}.name", "missing required key 'name'")
        if not isinstance(name, str):
            raise self.error(f"{path}.name", f"expected string, got {name!r}")
        settings_cls = self.registry.get(name)
        if settings_cls is None:
            known = ", ".join(sorted(self.registry)) or "none"
            raise self.error(f"{path}.name", f"unknown plugin {name!r}; known plugins: {known}")
        fields = _settings_fields(name, settings_cls)
        for key in table:
            if key not in RESERVED_PLUGIN_KEYS and key not in fields:
                raise self.error(
                    _join(path, key),
                    _unknown(key, [*RESERVED_PLUGIN_KEYS, *fields]) + f" (plugin {name!r})",
                )
        settings: object = self.build(
            settings_cls, {k: v for k, v in table.items() if k not in RESERVED_PLUGIN_KEYS}, path
        )
        reserved = {k: v for k, v in table.items() if k in RESERVED_PLUGIN_KEYS}
        return self.build(PluginEntry, {**reserved, "settings": settings}, path)

    def check_ids(self, plugins: tuple[PluginEntry, ...]) -> None:
        seen: dict[str, int] = {}
        for i, entry in enumerate(plugins):
            if entry.id in seen:
                key = "id" if entry.id != entry.name else "name"
                raise self.error(
                    f"plugins[{i}].{key}",
                    f"plugin id {entry.id!r} is already used by plugins[{seen[entry.id]}];"
                    " give each entry a distinct id",
                )
            seen[entry.id] = i

    def override(
        self,
        table: Mapping[str, object],
        path: str,
        limits: Limits,
        plugins: tuple[PluginEntry, ...],
        listeners: tuple[ListenerSettings, ...],
    ) -> Override:
        for key in table:
            if key not in _OVERRIDE_KEYS:
                raise self.error(_join(path, key), _unknown(key, _OVERRIDE_KEYS))
        if "match" not in table:
            raise self.error(f"{path}.match", "missing required key 'match'")
        match = self.build(Match, self.table(table["match"], f"{path}.match"), f"{path}.match")
        if match.listener is not None and all(item.name != match.listener for item in listeners):
            known = ", ".join(item.name for item in listeners)
            raise self.error(
                f"{path}.match.listener",
                f"no listener named {match.listener!r}; listeners: {known}",
            )
        chain = {entry.id: entry for entry in plugins}
        ids = ", ".join(chain) or "none"
        disable: tuple[str, ...] = ()
        if "disable" in table:
            disable = convert(
                tuple[str, ...],
                table["disable"],
                path=f"{path}.disable",
                locate=self.locate,
                file=self.file,
            )  # type: ignore[assignment]
            for i, plugin_id in enumerate(disable):
                if plugin_id not in chain:
                    raise self.error(
                        f"{path}.disable[{i}]",
                        f"no plugin {plugin_id!r} in the chain; plugin ids: {ids}",
                    )
        merged_limits: Limits | None = None
        limits_keys: frozenset[str] | None = None
        if "limits" in table:
            limits_table = self.table(table["limits"], f"{path}.limits")
            merged_limits = self.build(Limits, limits_table, f"{path}.limits", base=limits)
            limits_keys = frozenset(limits_table)
        settings: dict[str, object] = {}
        keys: dict[str, frozenset[str]] = {}
        for plugin_id, value in self.table(table.get("plugins", {}), f"{path}.plugins").items():
            plugin_path = f"{path}.plugins.{plugin_id}"
            if plugin_id not in chain:
                raise self.error(
                    plugin_path, f"no plugin {plugin_id!r} in the chain; plugin ids: {ids}"
                )
            plugin_table = self.table(value, plugin_path)
            for key in plugin_table:
                if key in RESERVED_PLUGIN_KEYS:
                    raise self.error(
                        _join(plugin_path, key),
                        f"{key!r} cannot be overridden; only plugin settings can",
                    )
            settings[plugin_id] = self.build(
                type(chain[plugin_id].settings),
                plugin_table,
                plugin_path,
                base=chain[plugin_id].settings,
            )
            keys[plugin_id] = frozenset(plugin_table)
        return Override(match, disable, settings, merged_limits, limits_keys, keys)


def _settings_fields(name: str, cls: type) -> tuple[str, ...]:
    """The init field names of a plugin's Settings; a reserved name is a plugin bug."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"plugin {name!r}: Settings {cls!r} is not a dataclass")
    fields = tuple(f.name for f in dataclasses.fields(cls) if f.init)
    clash = [f for f in fields if f in RESERVED_PLUGIN_KEYS]
    if clash:
        raise TypeError(
            f"plugin {name!r}: Settings fields {clash} clash with the reserved keys"
            f" {RESERVED_PLUGIN_KEYS}"
        )
    return fields
