"""A DNSSEC world on loopback: zones signed at test time, served and validated by real unbound.

    lab = DnssecLab(tmp_dir)
    lab.sign("dane.example", ZONE, bad_signature=["_25._tcp.mx-bogus.dane.example"])
    lab.serve("unsigned.example", OTHER)              # not signed: answers are insecure
    with lab:
        lab.port                                      # the validating resolver, on 127.0.0.1

Zones are signed with BIND's ``dnssec-keygen`` and ``dnssec-signzone`` (package
``bind9-utils``; a KSK and a ZSK, ECDSA P-256). One unbound (``module-config: iterator``)
serves them as their authority (``auth-zone``); a second unbound validates
(``validator iterator``) with the signed zones' DS records as trust anchors and reaches the
first through ``stub-zone``. Nothing leaves 127.0.0.1; there is no root trust anchor, so a
zone that is not signed here is insecure.

Broken on purpose, for the "bogus" cases: ``bad_signature`` names get a TLSA record
changed after signing (its RRSIG no longer verifies); ``expired`` names get RRSIGs from
a signing run whose validity ended yesterday.
"""

from __future__ import annotations

import datetime
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.processes import free_port

__all__ = ["DnssecLab", "has_tools"]

_TOOLS = ("unbound", "dnssec-keygen", "dnssec-signzone")


def has_tools() -> bool:
    """Whether unbound and BIND's signing tools are installed (scripts/install-system-deps.sh)."""
    return all(shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists() for tool in _TOOLS)


def _unbound() -> str:
    return shutil.which("unbound") or "/usr/sbin/unbound"


def _stamp(when: datetime.datetime) -> str:
    return when.strftime("%Y%m%d%H%M%S")


def _owner_type(line: str) -> tuple[str, str, str]:
    """Owner, type, and the type an RRSIG covers, of one ``-O full`` line."""
    fields = line.split()
    if len(fields) < 5:
        return "", "", ""
    owner, rtype = fields[0].lower().rstrip("."), fields[3].upper()
    return owner, rtype, fields[4].upper() if rtype == "RRSIG" else ""


class DnssecLab:
    """Signed and unsigned zones, an authoritative unbound and a validating one.

    :param directory: where keys, zone files, configuration and logs go
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.auth_port = free_port()
        self.port = free_port()
        self._zones: dict[str, Path] = {}
        self._anchors: list[str] = []
        self._processes: list[subprocess.Popen[bytes]] = []

    def _run(self, *args: str) -> str:
        done = subprocess.run(args, cwd=self.directory, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {done.stderr or done.stdout}")
        return done.stdout

    def serve(self, origin: str, text: str) -> Path:
        """Serve ``origin`` unsigned."""
        path = self.directory / f"{origin}.zone"
        path.write_text(text)
        self._zones[origin] = path
        return path

    def sign(
        self, origin: str, text: str, *, bad_signature: tuple[str, ...] = (), expired: tuple[str, ...] = ()
    ) -> Path:
        """Sign ``origin`` (KSK + ZSK), serve it, and trust its DS records.

        :param bad_signature: owner names whose TLSA record is altered after signing
        :param expired: owner names whose TLSA RRSIG is replaced by an expired one
        """
        source = self.serve(origin, text)
        keys = self.directory / f"keys-{origin}"
        keys.mkdir(exist_ok=True)
        for flags in (("-f", "KSK"), ()):
            self._run("dnssec-keygen", "-q", "-K", str(keys), "-a", "ECDSAP256SHA256", *flags, origin)
        signed = self.directory / f"{origin}.signed"
        self._run(
            "dnssec-signzone", "-q", "-S", "-K", str(keys), "-d", str(keys), "-O", "full",
            "-o", origin, "-f", str(signed), str(source),
        )
        lines = signed.read_text().splitlines()
        if expired:
            now = datetime.datetime.now(datetime.timezone.utc)
            old = self.directory / f"{origin}.expired"
            scratch = self.directory / f"dsset-scratch-{origin}"
            scratch.mkdir(exist_ok=True)
            # -P: the post-signing check would refuse signatures that are no longer valid.
            self._run(
                "dnssec-signzone", "-q", "-P", "-S", "-K", str(keys), "-d", str(scratch),
                "-O", "full", "-s", _stamp(now - datetime.timedelta(days=10)),
                "-e", _stamp(now - datetime.timedelta(days=1)), "-o", origin, "-f", str(old), str(source),
            )
            wanted = {n.lower().rstrip(".") for n in expired}
            stale = [line for line in old.read_text().splitlines() if _is_tlsa_sig(line, wanted)]
            lines = [line for line in lines if not _is_tlsa_sig(line, wanted)] + stale
        if bad_signature:
            wanted = {n.lower().rstrip(".") for n in bad_signature}
            lines = [_altered(line) if _owner_type(line)[:2] in {(n, "TLSA") for n in wanted} else line for line in lines]
        signed.write_text("\n".join(lines) + "\n")
        self._zones[origin] = signed
        dsset = (keys / f"dsset-{origin}.").read_text()
        self._anchors.extend(re.sub(r"\sIN\s+DS\s", " DS ", line) for line in dsset.splitlines() if line.strip())
        return signed

    # -- processes ---------------------------------------------------------------------------

    def _common(self, port: int) -> str:
        return f"""server:
    interface: 127.0.0.1@{port}
    port: {port}
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "{self.directory}"
    pidfile: ""
    use-syslog: no
    logfile: ""
    verbosity: 1
    access-control: 127.0.0.0/8 allow
    do-ip4: yes
    do-ip6: no
"""

    def start(self) -> DnssecLab:
        authority = self._common(self.auth_port) + '    module-config: "iterator"\n'
        for origin, path in self._zones.items():
            authority += (
                f'auth-zone:\n    name: "{origin}"\n    zonefile: "{path}"\n'
                "    for-downstream: yes\n    for-upstream: no\n"
            )
        anchors = self.directory / "trust-anchors"
        anchors.write_text("\n".join(self._anchors) + "\n")
        validator = self._common(self.port) + (
            "    do-not-query-localhost: no\n"
            '    module-config: "validator iterator"\n'
            f'    trust-anchor-file: "{anchors}"\n'
            "    val-log-level: 2\n"
            "    qname-minimisation: no\n"
            "    ede: yes\n"
        )
        for origin in self._zones:
            validator += f'stub-zone:\n    name: "{origin}"\n    stub-addr: 127.0.0.1@{self.auth_port}\n'
        for name, config in (("authority", authority), ("validator", validator)):
            conf = self.directory / f"{name}.conf"
            conf.write_text(config)
            log = (self.directory / f"{name}.log").open("wb")
            self._processes.append(subprocess.Popen([_unbound(), "-d", "-c", str(conf)], stdout=log, stderr=log))
        first = next(iter(self._zones))
        self._wait(self.auth_port, first)
        self._wait(self.port, first)
        return self

    def _wait(self, port: int, name: str) -> None:
        import dns.exception
        import dns.message
        import dns.query

        deadline = time.monotonic() + 15
        while True:
            for proc in self._processes:
                if proc.poll() is not None:
                    raise RuntimeError(f"unbound exited: {self.logs()}")
            try:
                dns.query.udp(dns.message.make_query(name, "SOA"), "127.0.0.1", port=port, timeout=0.5)
                return
            except (dns.exception.Timeout, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"unbound on port {port} did not answer: {self.logs()}") from None
                time.sleep(0.05)

    def logs(self) -> str:
        return "\n".join(
            path.read_text(errors="replace")[-3000:] for path in sorted(self.directory.glob("*.log"))
        )

    def stop(self) -> None:
        for proc in self._processes:
            proc.terminate()
        for proc in self._processes:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._processes = []

    def __enter__(self) -> DnssecLab:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _is_tlsa_sig(line: str, names: set[str]) -> bool:
    owner, rtype, covered = _owner_type(line)
    return owner in names and rtype == "RRSIG" and covered == "TLSA"


def _altered(line: str) -> str:
    """The record with its last hex digit changed: the data no longer fits its RRSIG."""
    last = line.rstrip()[-1]
    return line.rstrip()[:-1] + ("0" if last != "0" else "1")

