"""SMTP AUTH against a users file with hashed passwords (the embedded default backend).

Hook: ``gateway_auth``, ``gateway_startup``. The file (``[auth] users_file`` in the
policy, or this plugin's ``path``) holds one ``login:hash`` per line; ``#`` starts a
comment. Hashes are made with ``gateway passwd`` (scrypt). The file is read again when
its modification time changes. Password checks run in the gateway's thread pool.

A login not in the file gets no opinion (another backend may know it); a wrong
password is refused with 535 5.7.8. With no users file at all, AUTH always fails.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from gateway.context import Gateway
from gateway.hooks import hookimpl
from gateway.passwords import read_users_file, verify_password
from gateway.verdicts import Reply, Verdict

__all__ = ["Plugin", "Settings", "read_users"]

log = logging.getLogger("plugins.auth_users_file")
REPLY_INVALID = Reply(535, "5.7.8", "Authentication credentials invalid")


@dataclass(frozen=True)
class Settings:
    """Settings of ``auth_users_file``."""

    path: Path | None = field(default=None, metadata={"doc": "users file; default: [auth] users_file"})


def read_users(path: Path) -> dict[str, str]:
    """Parse a users file into login -> hash (:func:`gateway.passwords.read_users_file`).

    :raises ValueError: a line is not ``login:hash``, naming the line number
    """
    return read_users_file(path)


class Plugin:
    """Holds the parsed users file, reloaded on change."""

    def __init__(self) -> None:
        self._users: dict[str, str] = {}
        self._mtime: float | None = None

    def _path(self, gateway: Gateway, settings: Settings) -> Path | None:
        return settings.path or gateway.policy.auth.users_file

    def _refresh(self, path: Path) -> dict[str, str]:
        try:
            mtime = os.stat(path).st_mtime
        except FileNotFoundError:
            self._users, self._mtime = {}, None
            return self._users
        if mtime != self._mtime:
            self._users, self._mtime = read_users(path), mtime
            log.info("loaded %d users from %s", len(self._users), path)
        return self._users

    @hookimpl
    async def gateway_startup(self, gateway: Gateway, settings: Settings) -> None:
        path = self._path(gateway, settings)
        if path is not None:
            await gateway.run_in_thread(self._refresh, Path(path))

    def _check(self, path: Path, login: str, password: str) -> bool | None:
        hashed = self._refresh(path).get(login)
        if hashed is None:
            return None
        return verify_password(password, hashed)

    @hookimpl
    async def gateway_auth(
        self, login: str, password: str, gateway: Gateway, settings: Settings
    ) -> Verdict | None:
        path = self._path(gateway, settings)
        if path is None:
            return None
        ok = await gateway.run_in_thread(self._check, Path(path), login, password)
        if ok is None:
            return None
        if ok:
            return Verdict.accept(reason="users file")
        return Verdict.reject(REPLY_INVALID, reason="wrong password")
