"""The ``[console]`` section: the web console's listener, its admins and its sessions, its
end users, their allow and block lists, and their quarantine digests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.policy.schema import setting
from gateway.policy.units import Duration
from gateway.state.registry import check_url

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
    index_url: str = setting(
        "", 'where the index is: empty for var_dir/console/index.sqlite, or "postgresql://user@host/db" '
        "for a PostgreSQL database that several nodes and their consoles share"
    )
    index_retention: Duration = setting(30 * 86400.0, "tracking and statistics older than this are pruned", min=3600)
    users: bool = setting(
        False, "end users log in with their mail credentials (the gateway_auth chain of users_listener) "
        "and see only their own quarantined mail"
    )
    users_listener: str = setting("", "the listener whose gateway_auth chain checks end users; empty: the first with auth")
    admin_users: tuple[str, ...] = setting(
        (), "mail logins that get an admin session, their password checked as end users' are (users file, Dovecot)"
    )
    user_lists_state: str = setting(
        "sqlite", 'state store of the users\' allow and block lists (rcpt_user_lists reads them): "sqlite" or "redis://..."'
    )
    public_url: str = setting("", "the console's address as users reach it, for digest links; empty: https://<hostname>:<port>/")
    digest: bool = setting(False, "mail each user a digest of their newly quarantined messages (the master process)")
    digest_interval: Duration = setting(86400.0, "how often digests are sent", min=1)
    digest_from: str = setting("", "From and envelope sender of digests; empty: postmaster@<hostname>")
    digest_link_lifetime: Duration = setting(7 * 86400.0, "a digest's release link works this long", min=60)

    def __post_init__(self) -> None:
        check_url(self.user_lists_state)
        if self.index_url and not self.index_url.startswith(("postgresql://", "postgres://")):
            raise ValueError(f"index_url must be empty or a postgresql:// URL, not {self.index_url!r}")
