"""``gateway reload``: check the policy, then tell the running gateway to load it.

The policy is validated first, here: an invalid one is reported with file, line and
key, and the running gateway is not disturbed. The gateway validates it again on
SIGHUP and keeps its running policy if that fails (the file may change in between).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

from gateway.commands._common import check_aliases, load


def register(sub: Any) -> None:
    reload = sub.add_parser("reload", help="validate the policy and make the running gateway load it (SIGHUP)")
    reload.add_argument("--policy", "-p", help="the policy file the gateway runs on")
    reload.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from gateway.policy import PolicyError

    try:
        policy, _ = load(args.policy)
    except PolicyError as exc:
        print(f"gateway: not reloaded, the policy is invalid: {exc}", file=sys.stderr)
        return 2
    error, _ = check_aliases(policy)
    if error is not None:
        print(f"gateway: not reloaded, the aliases file is invalid: {error}", file=sys.stderr)
        return 2
    pidfile = Path(policy.server.var_dir) / "gateway.pid"
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        print(f"gateway: no running gateway found through {pidfile}: {exc}", file=sys.stderr)
        return 1
    print(f"sent SIGHUP to the gateway (pid {pid})")
    return 0
