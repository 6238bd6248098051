"""``gateway reload``: check the policy, make every gateway process load it, say which did.

The policy is validated first, here: an invalid one is reported with file, line and
key, and the running gateway is not disturbed. Then the command raises the reload
number in ``<var_dir>/reload/request``, sends SIGHUP to the gateway (its first process,
found through ``<var_dir>/gateway.pid``, passes it on to its workers) and waits until
every process has answered that number (gateway/reloads.py). Each process validates the
file again and keeps its running policy if that fails (the file may change in between,
or a plugin may fail to start), and says so.

Exit status: 0 when every process loaded the file; 2 when the policy is invalid, or a
process refused it; 1 when there is no running gateway, or a process did not answer
within ``--timeout`` (it is named, with its pid).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from gateway.commands._common import check_aliases


def register(sub: Any) -> None:
    reload = sub.add_parser(
        "reload", help="validate the policy, make every running gateway process load it, report each one"
    )
    reload.add_argument("--policy", "-p", help="the policy file the gateway runs on")
    reload.add_argument(
        "--timeout", type=float, default=30.0,
        help="seconds to wait for every process to answer (default 30)",
    )
    reload.set_defaults(func=main)


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a worker that died but was not reaped yet is a zombie: not running
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def main(args: argparse.Namespace) -> int:
    from gateway.app import registry
    from gateway.hooks import discover_plugins
    from gateway.policy import PolicyError
    from gateway.reloads import read_policy

    try:
        policy, digest = read_policy(args.policy, registry=registry(discover_plugins()))
    except PolicyError as exc:
        print(f"gateway: not reloaded, the policy is invalid: {exc}", file=sys.stderr)
        return 2
    error, _ = check_aliases(policy)
    if error is not None:
        print(f"gateway: not reloaded, the aliases file is invalid: {error}", file=sys.stderr)
        return 2
    var_dir = Path(policy.server.var_dir)
    pidfile = var_dir / "gateway.pid"
    try:
        master = int(pidfile.read_text().strip())
        if not _is_running(master):
            raise ProcessLookupError(f"pid {master} is not running")
    except (OSError, ValueError) as exc:
        print(f"gateway: no running gateway found through {pidfile}: {exc}", file=sys.stderr)
        return 1
    return _reload(var_dir, master, digest, args.timeout)


def _reload(var_dir: Path, master: int, digest: str, timeout: float) -> int:
    from gateway import reloads

    try:
        with reloads.request_lock(var_dir, timeout):
            request = reloads.next_request(var_dir)
            os.kill(master, signal.SIGHUP)
            answers = _wait(var_dir, master, request, time.monotonic() + timeout)
    except (OSError, TimeoutError) as exc:
        print(f"gateway: not reloaded: {exc}", file=sys.stderr)
        return 1
    return _report(answers, digest, timeout)


def _wait(var_dir: Path, master: int, request: int, deadline: float) -> dict[int, Any]:
    """Every process's answer to ``request``: its status, or a string saying why none."""
    from gateway import reloads

    while True:
        status = reloads.read_status(var_dir, master)
        pids = [master, *(status.workers if status is not None else ())]
        answers: dict[int, Any] = {}
        for pid in pids:
            answer = reloads.read_status(var_dir, pid)
            if answer is not None and answer.request >= request and answer.result != reloads.STARTED:
                answers[pid] = answer
            elif not _is_running(pid):
                answers[pid] = "not running"
        if len(answers) == len(pids):
            return answers
        if time.monotonic() > deadline:
            for pid in pids:
                answers.setdefault(pid, "no answer")
            return answers
        time.sleep(0.05)


def _report(answers: dict[int, Any], digest: str, timeout: float) -> int:
    from gateway import reloads

    loaded = [a for a in answers.values() if not isinstance(a, str) and a.result == reloads.LOADED]
    refused = [a for a in answers.values() if not isinstance(a, str) and a.result == reloads.REFUSED]
    lines = []
    for pid, answer in answers.items():
        if isinstance(answer, str):
            why = "no answer within %gs" % timeout if answer == "no answer" else answer
            lines.append(f"  pid {pid}: did not reload ({why})")
        elif answer.result == reloads.LOADED:
            lines.append(f"  pid {pid} ({answer.role}): loaded sha256={answer.policy[:12]}")
        else:
            lines.append(f"  pid {pid} ({answer.role}): refused, keeps sha256={answer.policy[:12]}: {answer.error}")
    digests = {a.policy for a in loaded}
    if len(loaded) == len(answers) and len(digests) == 1:
        print(f"reloaded: every gateway process ({len(answers)}) runs the policy sha256={digest[:12]}")
        print("\n".join(lines))
        if digests != {digest}:
            print("note: the policy file changed after this command checked it", file=sys.stderr)
        return 0
    missing = [pid for pid, a in answers.items() if isinstance(a, str) or a.result != reloads.LOADED]
    if refused:
        head = f"gateway: reload refused by pid {', '.join(str(a.pid) for a in refused)}"
    elif missing:
        head = f"gateway: not every process reloaded; pid {', '.join(map(str, missing))} did not"
    else:  # the file changed while they read it
        head = "gateway: the processes loaded different versions of the policy file; reload again"
    print(head, file=sys.stderr)
    print("\n".join(lines), file=sys.stderr)
    return 2 if refused else 1
