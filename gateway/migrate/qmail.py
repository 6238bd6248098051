"""Read a qmail control directory (and ``users/assign``) into a gateway policy.

:func:`convert` reads the files qmail itself reads, the way it reads them (control
files: one item a line, trailing blanks stripped, empty and ``#`` lines skipped;
single-value files: the first line), checks every line, and returns the policy as TOML
text plus the warnings. A line qmail would refuse (a non-number in ``databytes``, a
``smtproutes`` line without ``:``, an ``assign`` line with the wrong number of fields)
raises :class:`QmailFormatError` naming the file and line. Whatever has no equivalent
here is written into the output as a comment under "Not converted" and listed as a
warning, never dropped.

The mapping (``docs/migrating.md`` has the whole table):

======================== ================================================================
qmail                    policy
======================== ================================================================
me                       ``server.hostname``
locals                   ``local.domains`` (default: ``me``)
virtualdomains           ``local.virtual`` (``domain:prefix``)
users/assign             ``[[local.assign]]`` (``=name`` and ``+name-`` lines)
rcpthosts, morercpthosts ``relay.domains`` for those neither local nor virtual
smtproutes               ``[[routes]]`` (``:host`` is the ``"*"`` route)
databytes                ``limits.max_message_size``
timeoutsmtpd             ``limits.idle_timeout``
concurrencylocal/remote  ``delivery.local_concurrency`` / ``remote_concurrency``
queuelifetime            ``delivery.queue_lifetime``
helohost                 ``delivery.helo``
timeoutconnect           ``delivery.connect_timeout``
timeoutremote            ``delivery.command_timeout`` and ``data_timeout``
doublebounceto/host      ``delivery.postmaster``
defaultdelivery          ``local.mailbox`` (``./Maildir/`` or ``./mbox``)
servercert.pem           ``tls.cert`` and ``tls.key`` (the same file)
======================== ================================================================
"""

from __future__ import annotations

import dataclasses
import json
import re
import textwrap
from pathlib import Path

from gateway.migrate import _qmail_assign as assign_file
from gateway.migrate._qmail_assign import Assign, Line, QmailFormatError

__all__ = ["Conversion", "QmailFormatError", "convert", "locate"]

_DOMAIN = re.compile(r"^\.?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$")
_LITERAL = re.compile(r"^\[[0-9a-f.:]+\]$")
_HOST = re.compile(r"^(\[[0-9.]+\]|[0-9.]+|[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?)$", re.IGNORECASE)

# Control files with no equivalent, and why (the reason goes into the comment).
_NO_EQUIVALENT = {
    "badmailfrom": "no sender block list plugin: refuse these senders with a plugin of your own",
    "bouncefrom": "bounces come from <> with From: MAILER-DAEMON@<server.hostname>",
    "bouncehost": "bounces come from <> with From: MAILER-DAEMON@<server.hostname>",
    "defaultdomain": "qmail-inject host rewriting; `gateway inject` does not rewrite host names",
    "defaulthost": "`gateway inject` adds the first of [local] domains to names without @: put this one first",
    "plusdomain": "qmail-inject host rewriting; `gateway inject` does not rewrite host names",
    "idhost": "`gateway inject` makes Message-IDs with server.hostname",
    "envnoathost": "recipients without @ are refused at RCPT (only <postmaster> is taken bare)",
    "localiphost": "[address] literals are not taken as local domains",
    "percenthack": "% routing is refused (rcpt_relay refuse_routing_syntax)",
    "smtpgreeting": "the greeting is server.hostname followed by a fixed text",
    "qmqpservers": "no QMQP",
}
_CONVERTED = (
    "me", "locals", "rcpthosts", "morercpthosts", "virtualdomains", "smtproutes", "databytes",
    "timeoutsmtpd", "concurrencylocal", "concurrencyremote", "queuelifetime", "helohost",
    "timeoutconnect", "timeoutremote", "doublebounceto", "doublebouncehost", "defaultdelivery",
    "servercert.pem",
)


@dataclasses.dataclass
class Conversion:
    """The result of :func:`convert`: the policy text and what the operator must review."""

    policy: str
    warnings: list[str]


def locate(path: Path) -> tuple[Path, Path]:
    """Find the control directory and the ``users/assign`` file from what the operator gave.

    Accepts the qmail root (``/var/qmail``) or its control directory (``/var/qmail/control``).

    :returns: (control directory, assign file path; the file may not exist)
    :raises QmailFormatError: neither form holds a ``me`` file
    """
    if (path / "control" / "me").is_file():
        return path / "control", path / "users" / "assign"
    if (path / "me").is_file():
        return path, path.absolute().parent / "users" / "assign"
    raise QmailFormatError(
        str(path), None, "no control/me or me file here: give the qmail root or its control directory"
    )


def convert(path: Path) -> Conversion:
    """Convert the qmail configuration under ``path`` (see :func:`locate`).

    :raises QmailFormatError: a file cannot be read, or a line is malformed (file:line)
    """
    control, assign_path = locate(path)
    return _Converter(control, assign_path).run()


def _q(value: str) -> str:
    """A TOML basic string (JSON's escapes are a subset TOML accepts)."""
    return json.dumps(value, ensure_ascii=False)


@dataclasses.dataclass
class _Route:
    pattern: str  # "" = qmail's default route (":host")
    host: str
    port: int
    where: str


class _Converter:
    def __init__(self, control: Path, assign_path: Path) -> None:
        self.control = control
        self.assign_path = assign_path
        self.read: list[str] = []
        self.warnings: list[str] = []
        self.skipped: list[tuple[str, str, str]] = []  # (where, original text, reason)
        self.sections: dict[str, list[str]] = {}
        self.has_assign = False

    # -- reading ------------------------------------------------------------------------

    def _file(self, name: str) -> Path:
        return self.control / name

    def lines(self, name: str) -> list[Line] | None:
        """qmail's control_readfile: trailing blanks stripped, empty and # lines skipped."""
        raw = self._raw(self._file(name))
        if raw is None:
            return None
        self.read.append(name)
        return [line for line in raw if line.text and not line.text.startswith("#")]

    def _raw(self, path: Path) -> list[Line] | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise QmailFormatError(str(path), None, f"cannot read: {exc.strerror or exc}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("latin-1")
        return [
            Line(str(path), number, item.rstrip(" \t\r"))
            for number, item in enumerate(text.split("\n"), start=1)
            if number <= text.count("\n") or item
        ]

    def value(self, name: str) -> Line | None:
        """qmail's control_readline: the first line; later lines are ignored (and reported)."""
        raw = self._raw(self._file(name))
        if raw is None or not raw:
            return None
        self.read.append(name)
        extra = [line for line in raw[1:] if line.text]
        if extra:
            self.warn(extra[0].where, f"ignored: qmail reads only the first line of {name}")
        return raw[0]

    def integer(self, name: str) -> tuple[int, Line] | None:
        line = self.value(name)
        if line is None:
            return None
        if not line.text.isdigit():
            raise QmailFormatError(line.file, line.number, f"{name}: expected a number, got {line.text!r}")
        return int(line.text), line

    def domain(self, line: Line, text: str | None = None) -> str:
        name = (line.text if text is None else text).strip().lower().rstrip(".")
        if not (_DOMAIN.match(name) or _LITERAL.match(name)):
            raise QmailFormatError(line.file, line.number, f"not a domain name: {(text or line.text)!r}")
        return name

    # -- reporting ------------------------------------------------------------------------

    def short(self, line: Line) -> str:
        """``rcpthosts:3`` or ``users/assign:5`` for comments in the output."""
        path = Path(line.file)
        prefix = "users/" if path == self.assign_path else ""
        return f"{prefix}{path.name}:{line.number}"

    def warn(self, where: str, message: str) -> None:
        self.warnings.append(f"{where}: {message}")

    def skip(self, where: str, text: str, reason: str) -> None:
        self.skipped.append((where, text, reason))
        self.warn(where, f"not converted: {reason}")

    def put(self, section: str, key: str, value: str, comment: str) -> None:
        self.sections.setdefault(section, []).append(f"{key} = {value}  # {comment}")

    # -- conversion ---------------------------------------------------------------------

    def run(self) -> Conversion:
        me = self.value("me")
        assert me is not None  # locate() checked it
        hostname = self.domain(me)
        self.put("server", "hostname", _q(hostname), self.short(me))
        assignments = self.users()
        locals_ = self.local_domains(hostname)
        virtual = self.virtual_domains(locals_)
        rcpthosts = self.rcpthosts()
        self.numbers()
        self.delivery(hostname)
        routes = self.routes()
        self.tls()
        self.others()
        return Conversion(self.render(hostname, locals_, virtual, assignments, rcpthosts, routes), self.warnings)

    def users(self) -> Assign:
        raw = self._raw(self.assign_path)
        if raw is None:
            cdb = self.assign_path.with_name("cdb")
            if cdb.exists():
                self.skip(str(cdb), "", "only the compiled users/cdb is here; convert its source users/assign")
            return Assign()
        self.has_assign = True
        return assign_file.parse(raw, self.skip, self.warn)

    def local_domains(self, hostname: str) -> list[tuple[str, str]]:
        lines = self.lines("locals")
        if lines is None:
            return [(hostname, "qmail's default for locals: me")]
        return [(self.domain(line), self.short(line)) for line in lines]

    def virtual_domains(self, locals_: list[tuple[str, str]]) -> list[tuple[str, str, Line]]:
        local_names = {d for d, _ in locals_}
        result: list[tuple[str, str, Line]] = []
        for line in self.lines("virtualdomains") or []:
            target, colon, prefix = line.text.partition(":")  # at the first colon, as qmail-send
            if not colon:
                raise QmailFormatError(line.file, line.number, f"expected domain:prefix, got {line.text!r}")
            if not target:
                self.skip(line.where, line.text, "a catch-all virtual domain (':prefix') has no equivalent")
                continue
            if "@" in target:
                self.skip(line.where, line.text, "single-address virtual users (user@domain:prefix) have no equivalent")
                continue
            domain = self.domain(line, target)
            if domain.startswith("."):
                self.skip(line.where, line.text, "wildcard virtual domains (.domain:prefix) have no equivalent; list each domain")
                continue
            if not prefix:
                # domain: (empty prefix) is qmail's way to exempt a domain from a wildcard.
                self.skip(line.where, line.text, "an exception to a wildcard virtual domain; nothing to do here")
                continue
            if domain in local_names:
                self.warn(line.where, f"{domain} is also in locals, which wins (as in qmail); virtual entry left out")
                continue
            result.append((domain, prefix.lower(), line))
        return result

    def rcpthosts(self) -> list[tuple[str, Line]] | None:
        lines = self.lines("rcpthosts")
        more = self.lines("morercpthosts")
        if more is None and self._file("morercpthosts.cdb").exists():
            self.skip(
                str(self._file("morercpthosts.cdb")), "",
                "only the compiled morercpthosts.cdb is here; convert its source morercpthosts",
            )
        if lines is None and more is None:
            return None
        return [(self.domain(line), line) for line in (lines or []) + (more or [])]

    def numbers(self) -> None:
        databytes = self.integer("databytes")
        if databytes is not None:
            size, line = databytes
            if size == 0:
                self.skip(line.where, line.text, "databytes 0 (no limit): a limit is required; max_message_size keeps its default 25MB")
            else:
                self.put("limits", "max_message_size", str(size), self.short(line))
        timeout = self.integer("timeoutsmtpd")
        if timeout is not None:
            self.put_seconds("limits", "idle_timeout", timeout, "qmail waits this long for each read")
        for name, key in (("concurrencylocal", "local_concurrency"), ("concurrencyremote", "remote_concurrency")):
            found = self.integer(name)
            if found is None:
                continue
            count, line = found
            if count == 0:
                self.skip(line.where, line.text, f"{name} 0 stops delivery; use [delivery] enabled = false for that")
            else:
                self.put("delivery", key, str(count), self.short(line))
        for name, key in (("queuelifetime", "queue_lifetime"), ("timeoutconnect", "connect_timeout")):
            found = self.integer(name)
            if found is not None:
                self.put_seconds("delivery", key, found)
        found = self.integer("timeoutremote")
        if found is not None:
            self.put_seconds("delivery", "command_timeout", found)
            self.put_seconds("delivery", "data_timeout", found)

    def put_seconds(self, section: str, key: str, found: tuple[int, Line], note: str = "") -> None:
        seconds, line = found
        if seconds == 0:
            self.skip(line.where, line.text, f"a zero {Path(line.file).name} has no equivalent; {key} keeps its default")
            return
        comment = self.short(line) + (f"; {note}" if note else "")
        self.put(section, key, _q(f"{seconds}s"), comment)

    def delivery(self, hostname: str) -> None:
        helo = self.value("helohost")
        if helo is not None:
            self.put("delivery", "helo", _q(self.domain(helo)), self.short(helo))
        to = self.value("doublebounceto")
        host = self.value("doublebouncehost")
        if to is not None and not to.text:
            self.skip(to.where, "", "an empty doublebounceto discards double bounces; they go to postmaster here")
        elif to is not None or host is not None:
            local = to.text if to is not None else "postmaster"
            domain = self.domain(host) if host is not None else hostname
            where = ", ".join(self.short(line) for line in (to, host) if line is not None)
            self.put("delivery", "postmaster", _q(f"{local}@{domain}"), where)
        default = self.value("defaultdelivery")
        if default is not None:
            kinds = {"./Maildir/": "maildir", "./mbox": "mbox"}
            if default.text in kinds:
                self.put("local", "mailbox", _q(kinds[default.text]), self.short(default))
            else:
                self.skip(default.where, default.text, 'only "./Maildir/" and "./mbox" have an equivalent (local.mailbox)')

    def routes(self) -> list[_Route]:
        routes: list[_Route] = []
        seen: dict[str, str] = {}
        for line in self.lines("smtproutes") or []:
            pattern, colon, relay = line.text.partition(":")
            if not colon:
                raise QmailFormatError(line.file, line.number, f"expected domain:relay[:port], got {line.text!r}")
            pattern = self.domain(line, pattern) if pattern else ""
            host, _, port_text = relay.partition(":")
            port = 25
            if port_text:
                if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
                    raise QmailFormatError(line.file, line.number, f"bad port {port_text!r} (1-65535)")
                port = int(port_text)
            if host and not _HOST.match(host):
                raise QmailFormatError(line.file, line.number, f"not a host name or [address]: {host!r}")
            if pattern in seen:
                self.warn(line.where, f"{pattern or 'the default route'} is also routed at {seen[pattern]}; the last line is used, as in qmail")
                routes = [r for r in routes if r.pattern != pattern]
            seen[pattern] = line.where
            if not pattern and not host:
                self.skip(line.where, line.text, "an empty default route is the default (MX lookup)")
                continue
            routes.append(_Route(pattern, host.lower(), port, self.short(line)))
        # qmail's ".example.com" covers subdomains only; ours also covers example.com itself,
        # so give the parent the route qmail would have chosen for it.
        explicit = {r.pattern for r in routes}
        for route in list(routes):
            parent = route.pattern[1:]
            if route.pattern.startswith(".") and parent not in explicit:
                qmail_choice = _qmail_route(parent, routes)
                routes.append(
                    _Route(
                        parent,
                        qmail_choice.host if qmail_choice else "",
                        qmail_choice.port if qmail_choice else 25,
                        f"added: {route.pattern} does not cover {parent} in qmail",
                    )
                )
                explicit.add(parent)
        return routes

    def tls(self) -> None:
        cert = self._file("servercert.pem")
        if cert.exists():
            self.read.append("servercert.pem")
            comment = "servercert.pem (qmail TLS patch): certificate and key in one file"
            self.put("tls", "cert", _q(str(cert)), comment)
            self.put("tls", "key", _q(str(cert)), comment)
            self.put("tls", "self_signed", "false", "a certificate is given")

    def others(self) -> None:
        try:
            names = sorted(p.name for p in self.control.iterdir())
        except OSError as exc:
            raise QmailFormatError(str(self.control), None, f"cannot list: {exc.strerror or exc}") from None
        for name in names:
            if name in _CONVERTED or name == "morercpthosts.cdb":  # the cdb: see rcpthosts()
                continue
            path = self._file(name)
            if name in _NO_EQUIVALENT:
                lines = self.lines(name) or []
                for line in lines:
                    self.skipped.append((line.where, line.text, _NO_EQUIVALENT[name]))
                count = f"{len(lines)} line{'s' if len(lines) != 1 else ''}"
                self.warn(str(path), f"not converted ({count}): {_NO_EQUIVALENT[name]}")
                if not lines:
                    self.skipped.append((str(path), "", _NO_EQUIVALENT[name]))
            else:
                self.skip(str(path), "", "not a stock qmail control file (a patch's?); review it by hand")

    # -- output -----------------------------------------------------------------------------

    def render(
        self,
        hostname: str,
        locals_: list[tuple[str, str]],
        virtual: list[tuple[str, str, Line]],
        assignments: Assign,
        rcpthosts: list[tuple[str, Line]] | None,
        routes: list[_Route],
    ) -> str:
        local_names = {d for d, _ in locals_}
        virtual_names = {d for d, _, _ in virtual}
        out = [
            "# Gateway policy converted from qmail by `gateway import-qmail`.",
            "#",
            f"# Made from: {self.control.absolute()}",
            *textwrap.wrap(", ".join(self.read), 86, initial_indent="#   ", subsequent_indent="#   "),
            *([f"# and {self.assign_path.absolute()}"] if self.has_assign else []),
            "# Each converted value names the qmail file and line it came from. What has no",
            '# equivalent here is listed under "Not converted" at the end (and was printed as a',
            "# warning). Keys not written keep the defaults shown in policies/default.toml.",
            "# Review, then check with `gateway check FILE`.",
            "",
            "[server]",
            *self.sections.get("server", []),
            'queue_dir = "/var/spool/gateway/queue"',
            'var_dir = "/var/lib/gateway"',
            "",
            "# qmail-smtpd under tcpserver: port 25 on every address. STARTTLS is offered (a",
            "# self-signed certificate unless [tls] names one); no AUTH on this port.",
            "[[listeners]]",
            'name = "smtp"',
            'address = "0.0.0.0"',
            "port = 25",
            'tls = "starttls"',
            "auth = false",
            "",
        ]
        if "tls" in self.sections:
            out += ["[tls]", *self.sections["tls"], ""]
        if "limits" in self.sections:
            out += ["[limits]", *self.sections["limits"], ""]
        out += ["[local]", "domains = ["]
        out += [f"  {_q(d)},  # {where}" for d, where in locals_]
        users = assignments.users(virtual, self.warn)
        out += [
            "]",
            "# Only these users (and the [[local.assign]] ones below) are accepted at RCPT in",
            "# local domains. qmail also delivered to system accounts (qmail-getpw) and to",
            "# ~alias/.qmail-NAME: add those names here.",
            "users = [",
            '  "postmaster",',
            *[f"  {_q(user)},  # {why}" for user, why in users],
            "]",
            'mail_root = "/var/lib/gateway/mail"  # homes of users without an assign entry',
            'extension_delimiter = "-"  # as qmail',
            *self.sections.get("local", []),
        ]
        if virtual:
            out += ["", "# virtualdomains: domain -> user; the local part becomes the extension.", "[local.virtual]"]
            out += [f"{_q(d)} = {_q(u)}  # {self.short(line)}" for d, u, line in virtual]
        out += assignments.render(_q)
        relay = [(d, w) for d, w in rcpthosts or [] if d not in local_names and d not in virtual_names]
        out += ["", "[relay]", "# rcpthosts entries that are neither local nor virtual: we are their MX.", "domains = ["]
        out += [f"  {_q(d)},  # {self.short(line)}" for d, line in relay]
        out += [
            "]",
            "# qmail's relay clients (RELAYCLIENT in the tcpserver rules, tcp.smtp) are not in",
            "# the control directory: list their networks here.",
            "clients = []",
            "",
        ]
        self.warn(str(self.control), "relay clients (RELAYCLIENT in tcpserver rules) are not converted: set [relay] clients")
        self.coverage(rcpthosts, locals_, virtual)
        if "delivery" in self.sections:
            out += ["[delivery]", *self.sections["delivery"], ""]
        if routes:
            out += ["# smtproutes. qmail-remote never used TLS; these try STARTTLS when offered."]
        for route in routes:
            out += ["[[routes]]", f"domain = {_q(route.pattern or '*')}  # {route.where}", f"host = {_q(route.host)}"]
            if route.port != 25:
                out.append(f"port = {route.port}")
            out.append("")
        out += [
            "# The chain: relay control (rcpthosts), then local and virtual recipients.",
            "[[plugins]]",
            'name = "rcpt_relay"',
            "",
            "[[plugins]]",
            'name = "rcpt_local_users"',
            "",
            "[[plugins]]",
            'name = "queue_received_header"',
        ]
        if self.skipped:
            out += ["", "# ---- Not converted (no equivalent here) ----"]
            for where, text, reason in self.skipped:
                out.append(f"# {where}: {reason}")
                if text:
                    out.append(f"#     {text}")
        return "\n".join(out) + "\n"

    def coverage(
        self,
        rcpthosts: list[tuple[str, Line]] | None,
        locals_: list[tuple[str, str]],
        virtual: list[tuple[str, str, Line]],
    ) -> None:
        """Warn where this policy accepts more than qmail-smtpd did."""
        if rcpthosts is None:
            self.warn(str(self._file("rcpthosts")), "missing: qmail-smtpd accepted every domain (an open relay); this policy accepts only local, virtual and relay clients' mail")
            return
        names = {d for d, _ in rcpthosts}

        def covered(domain: str) -> bool:
            return domain in names or any(domain.endswith(p) for p in names if p.startswith("."))

        for domain in [d for d, _ in locals_] + [d for d, _, _ in virtual]:
            if not covered(domain):
                self.warn(str(self._file("rcpthosts")), f"{domain} is local but not in rcpthosts: qmail-smtpd refused it from strangers, this policy accepts it")
        for domain, line in rcpthosts:
            if domain.startswith(".") and domain[1:] not in names:
                self.warn(line.where, f"{domain} also covers {domain[1:]} itself here (qmail: subdomains only)")


def _qmail_route(domain: str, routes: list[_Route]) -> _Route | None:
    """The route qmail-remote picks: the whole domain, then each .suffix, then the default."""
    by_pattern = {r.pattern: r for r in routes}
    if domain in by_pattern:
        return by_pattern[domain]
    for i, char in enumerate(domain):
        if char == "." and domain[i:] in by_pattern:
            return by_pattern[domain[i:]]
    return by_pattern.get("")
