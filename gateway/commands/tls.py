"""``gateway tls check DOMAIN``: what remote delivery would do for a destination's TLS."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.delivery.remote.tlsrpt_send import TlsReporter

_DESCRIPTION = """\
Look up DOMAIN as remote delivery does and print what it would do: the MX hosts
(and their addresses); whether the resolver's DNSSEC validation is trusted ([dns]
dnssec), each MX host's DNSSEC state and its TLSA records (DANE, RFC 7672); the
_mta-sts TXT record, the MTA-STS policy (fetched now over HTTPS from mta-sts.DOMAIN,
or the one in the gateway's cache under var_dir/mta-sts when that is still valid and
has the same id) and its mode; and the verdict for each MX host: whether mail may go
there and what its TLS must be (DANE takes precedence over MTA-STS for a host with
usable TLSA records). Nothing is written (the cache is only read) and no SMTP
connection is made. Exit status: 0 when mail can go somewhere, 1 when it would wait
(an enforce policy naming none of the MX hosts, DANE refusing every host, or the MX
lookup failed), 2 for an invalid policy file.
"""

_REPORT = """\
The TLS reports (RFC 8460) of remote delivery, from the counts the gateway keeps in its
state store ([tls_reporting] state) per policy domain and period: --preview prints the
JSON report of each domain (or of DOMAIN) for the period so far, as it would be sent;
--send sends now what the ended periods owe (or, with --period, that period's reports,
which closes it): a mail to the mailto: destinations of each domain's _smtp._tls TXT
record (through the policy's queue, which the running gateway delivers) and a POST to its
https: ones. A report already sent (by the gateway's daily timer or an earlier --send) is
never sent again. Exit status: 0, 1 nothing to show, 2 usage or policy error, 75 state
store or queue unavailable.
"""


def register(sub: Any) -> None:
    tls = sub.add_parser(
        "tls", help="transport security of remote delivery (DANE, MTA-STS)",
        description="Transport security of remote delivery: DANE (RFC 7672) and MTA-STS (RFC 8461).",
    )
    commands = tls.add_subparsers(dest="tls_command", required=True, metavar="ACTION")
    check = commands.add_parser(
        "check", help="print the MX hosts, their TLSA records, the MTA-STS policy and the verdict for a domain",
        description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("domain", help="the recipient domain")
    check.add_argument("--policy", help="policy file (default: the embedded default)")
    check.set_defaults(func=main)
    report = commands.add_parser(
        "report", help="show the TLS reports (RFC 8460) of a period, or send what is owed",
        description=_REPORT, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = report.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--preview", nargs="?", const="*", metavar="DOMAIN", help="print the JSON report(s) (of DOMAIN) for the period"
    )
    what.add_argument("--send", action="store_true", help="send the reports owed now")
    report.add_argument(
        "--period", default=None, metavar="WHICH",
        help="current, previous, or the period's start (seconds since the epoch); --preview: default current;"
        " --send: default every ended period not yet sent",
    )
    report.add_argument("--domain", action="append", default=None, help="--send --period: only this policy domain")
    report.add_argument("--policy", help="policy file (default: the embedded default)")
    report.set_defaults(func=report_main)


def main(args: argparse.Namespace) -> int:
    from gateway.commands._common import load
    from gateway.policy import PolicyError

    try:
        policy, _ = load(args.policy)
    except PolicyError as exc:
        print(f"gateway tls: invalid policy: {exc}", file=sys.stderr)
        return 2
    lines, status = asyncio.run(_check(policy, args.domain.lower().rstrip(".")))
    print("\n".join(lines))
    return status


async def _check(policy: Any, domain: str) -> tuple[list[str], int]:
    from gateway.delivery.remote.mta_sts import PolicyCache
    from gateway.delivery.remote.mx import Destination, resolve_destinations
    from gateway.delivery.remote.policy import TransportPolicy, TransportSecurity
    from gateway.delivery.remote.tlsa import DaneConfig
    from gateway.dns import make_resolver
    from gateway.verdicts import GatewayError

    settings = policy.delivery
    resolver = make_resolver(policy.dns)
    dane = DaneConfig.from_policy(policy, resolver)
    security = TransportSecurity(settings, resolver, dane=dane)
    security.cache = PolicyCache(Path(policy.server.var_dir) / "mta-sts", is_writable=False)
    lines = [f"domain: {domain}"]
    try:
        destinations = await resolve_destinations(
            domain, security.mx_resolver(domain), port=settings.smtp_port, local_names={policy.server.hostname}
        )
    except GatewayError as exc:
        lines.append(f"MX: {exc.reply.code} {exc.reply.status} {exc.reply.text}")
        return lines, 1
    hosts: dict[str, list[str]] = {}
    first: dict[str, Destination] = {}
    for dest in destinations:
        hosts.setdefault(dest.host, []).append(dest.address)
        first.setdefault(dest.host, dest)
    for host, addresses in hosts.items():
        lines.append(f"MX: {first[host].preference:>3} {host} [{', '.join(addresses)}]")
    lines.extend(await _dane_lines(policy, domain, security, list(first.values())))
    if not settings.mta_sts:
        lines.append("MTA-STS: off ([delivery] mta_sts = false)")
        transport = TransportPolicy(domain, detail="MTA-STS off")
    else:
        transport, _ = await security.discover(domain)
    if transport.is_sts:
        expires = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(transport.expires))
        lines.append(f"MTA-STS: id={transport.policy_id} mode={transport.mode.removeprefix('sts-')}"
                     f" ({transport.detail}), valid until {expires}")
        lines.append(f"MTA-STS mx: {', '.join(transport.mx)}")
    elif transport.problem:
        lines.append(f"MTA-STS: {transport.problem}: {transport.detail}; treated as no policy (RFC 8461 §5)")
    elif settings.mta_sts:
        lines.append(f"MTA-STS: none ({transport.detail or 'no policy'})")
    allowed = 0
    for host, dest in first.items():
        # The same per-host decision as delivery: DANE first (RFC 8461 §2), then MTA-STS.
        host_policy = await security.for_host(transport, dest)
        if host_policy.is_dane:
            if host_policy.problem:
                verdict = f"skip: {host_policy.problem} ({host_policy.detail})"
            else:
                allowed += 1
                verdict = (
                    "deliver only over STARTTLS with a certificate its TLSA records authenticate (DANE)"
                    if host_policy.tlsa else
                    "deliver only over STARTTLS, not authenticated (DANE: no usable TLSA record)"
                )
        elif not transport.is_sts:
            verdict = f"deliver, tls = {settings.tls}"
            allowed += 1
        elif transport.allows(host):
            allowed += 1
            verdict = (
                f"deliver only over STARTTLS with a certificate valid for {host}"
                if transport.is_enforced else
                f"deliver; a missing STARTTLS or a certificate not valid for {host} is logged (testing)"
            )
        elif transport.is_enforced:
            verdict = "skip: not named by the policy"
        else:
            verdict = "deliver; not named by the policy, which is logged (testing)"
        lines.append(f"verdict: {host}: {verdict}")
    if not allowed:
        lines.append("verdict: mail would wait (451 4.7.5): no MX host the transport policy allows")
        return lines, 1
    return lines, 0


async def _dane_lines(policy: Any, domain: str, security: Any, destinations: list[Any]) -> list[str]:
    """What DANE sees: whether the resolver is trusted, each MX host's DNSSEC state and TLSA records."""
    dnssec = policy.dns.dnssec
    mode = security.dane.mode_for(domain)
    if mode == "off":
        return ["DANE: off ([delivery] dane or the route's dane)"]
    if security.dane.resolver is None:
        return [f"DNSSEC: the resolver's validation is not trusted ([dns] dnssec = {dnssec}): no DANE (mode {mode})"]
    lines = [f"DNSSEC: the resolver's validation is trusted ([dns] dnssec = {dnssec}); DANE mode {mode}"]
    for dest in destinations:
        if not dest.is_secure:
            lines.append(f"MX {dest.host}: not DNSSEC-secure: no DANE")
            continue
        alias = f" (an alias of {dest.canonical})" if dest.canonical else ""
        lines.append(f"MX {dest.host}: DNSSEC-secure{alias}")
        _, answer = await security.tlsa_of(dest)
        if answer.records:
            lines.extend(f"TLSA {answer.name}: {answer.state}: {record}" + ("" if record.is_usable else " unusable")
                         for record in answer.records)
        else:
            lines.append(f"TLSA {answer.name}: {answer.state} ({answer.detail})")
    return lines


def report_main(args: argparse.Namespace) -> int:
    from gateway.commands._common import load
    from gateway.delivery.remote.tlsrpt_send import command_reporter
    from gateway.policy import PolicyError
    from gateway.reports import report_command

    try:
        policy, _ = load(args.policy)
    except (PolicyError, OSError) as exc:
        print(f"gateway tls: {exc}", file=sys.stderr)
        return 2
    if not policy.tls_reporting.enabled:
        print("gateway tls: the policy has [tls_reporting] enabled = false", file=sys.stderr)
        return 2
    return report_command(
        args, name="gateway tls", period=float(policy.tls_reporting.period),
        reporter=lambda: command_reporter(policy), preview=_preview, verb="sent",
    )


async def _preview(reporter: TlsReporter, which: str, begin: int) -> int:
    import json

    domain = None if which == "*" else which.strip().rstrip(".").lower()
    documents = await reporter.preview(begin, domain)
    if not documents:
        print(f"gateway tls: no TLS sessions counted{f' for {domain}' if domain else ''}"
              f" in the period from {begin}", file=sys.stderr)
        return 1
    shown: Any = documents[0] if domain else documents
    print(json.dumps(shown, indent=2, ensure_ascii=False))
    return 0
