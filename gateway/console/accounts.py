"""Who may log in to the console: the admins file, and the password of the first start.

The admins file has the users file's format, ``login:hash`` lines made with ``gateway
passwd LOGIN``. With no ``[console] admins_file`` it is ``var_dir/console/admins``; when
that does not exist yet, :func:`ensure_first_admin` creates it with the login ``admin``
and a random password, which it writes once to ``var_dir/console/initial-password``
(mode 0600) for the operator to read. The password is never logged.

Everything here reads or writes files, or hashes: call it in the thread pool.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
from pathlib import Path

from gateway.passwords import hash_password, read_users_file, verify_password

__all__ = ["Admins", "ensure_first_admin"]

log = logging.getLogger(__name__)

FIRST_LOGIN = "admin"


@functools.cache
def _dummy_hash() -> str:
    """Checked against when the login is unknown, so both cases cost the same scrypt."""
    return hash_password(secrets.token_urlsafe(16))


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def ensure_first_admin(var_dir: Path) -> tuple[Path, Path | None]:
    """The default admins file, created with a random password on the first start.

    :returns: the admins file, and the file holding the new password when this call
        made it (``None`` when the admins file was already there)
    """
    directory = var_dir / "console"
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    admins = directory / "admins"
    if admins.exists():
        return admins, None
    password = secrets.token_urlsafe(15)
    secret_file = directory / "initial-password"
    secret_file.unlink(missing_ok=True)
    _write_private(secret_file, password + "\n")
    tmp = directory / "admins.tmp"
    tmp.unlink(missing_ok=True)
    _write_private(tmp, f"# console admins: login:hash lines (gateway passwd LOGIN)\n{FIRST_LOGIN}:{hash_password(password)}\n")
    os.replace(tmp, admins)
    return admins, secret_file


class Admins:
    """The admins file, read again when it changes (its mtime and size)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._admins: dict[str, str] = {}

    def _refresh(self) -> dict[str, str]:
        try:
            st = self.path.stat()
        except OSError as exc:
            if self._stamp is not None:
                log.warning("console: cannot read the admins file %s: %s; nobody can log in", self.path, exc)
            self._stamp, self._admins = None, {}
            return self._admins
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                self._admins = read_users_file(self.path)
            except (OSError, ValueError, UnicodeDecodeError) as exc:
                log.error("console: admins file unusable, nobody can log in: %s", exc)
                self._admins = {}
            self._stamp = stamp
        return self._admins

    def count(self) -> int:
        """How many admins the file names now."""
        return len(self._refresh())

    def check(self, login: str, password: str) -> bool:
        """Whether ``login`` is an admin with this password (always one scrypt)."""
        hashed = self._refresh().get(login)
        is_match = verify_password(password, hashed or _dummy_hash())
        return hashed is not None and is_match
