"""The ``[console]`` section: the web console's listener, its admins and its sessions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.policy.schema import setting
from gateway.policy.units import Duration

__all__ = ["ConsoleSettings"]


@dataclass(frozen=True)
class ConsoleSettings:
    """The web console (HTTPS, the ``[tls]`` certificate): ``[console]`` (docs/console.md)."""

    enabled: bool = setting(False, "serve the web console (off unless set)")
    address: str = setting("127.0.0.1", "address to bind (keep it on loopback or a management network)")
    port: int = setting(8443, "TCP port of the HTTPS listener (0: any free port)", min=0, max=65535)
    admins_file: Path | None = setting(
        None, "admins' login:hash lines (gateway passwd); default var_dir/console/admins, "
        "made at first start with a random password for 'admin'"
    )
    session_timeout: Duration = setting(1800.0, "a session unused this long ends", min=1)
    session_lifetime: Duration = setting(43200.0, "a session ends this long after the login anyway", min=1)
    max_login_failures: int = setting(5, "failed logins per client address within login_window before refusal", min=1)
    login_window: Duration = setting(300.0, "how long a failed login counts", min=1)
    index: bool = setting(
        True, "while the console is on, every process records what happens to mail (tracking, "
        "statistics) in var_dir/console/index.sqlite"
    )
    index_retention: Duration = setting(30 * 86400.0, "tracking and statistics older than this are pruned", min=3600)
