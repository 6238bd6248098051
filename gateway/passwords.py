"""Password hashes for the users file: scrypt, with the parameters in the hash.

Format: ``$scrypt$ln=<log2 N>,r=<r>,p=<p>$<salt, base64>$<hash, base64>``. Checking a
password costs tens of milliseconds of CPU on purpose, so callers run it in the
gateway's thread pool, never on the event loop.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from pathlib import Path

__all__ = ["hash_password", "read_users_file", "verify_password"]

_LN, _R, _P = 14, 8, 1


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, ln: int = _LN) -> str:
    """A new salted scrypt hash of ``password``."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=2**ln, r=_R, p=_P, dklen=32)
    return f"$scrypt$ln={ln},r={_R},p={_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, hashed: str) -> bool:
    """True if ``password`` matches ``hashed``; malformed hashes never match."""
    try:
        _, scheme, params, salt, digest = hashed.split("$")
        if scheme != "scrypt":
            return False
        values = dict(item.split("=", 1) for item in params.split(","))
        ln, r, p = int(values["ln"]), int(values["r"]), int(values["p"])
        if not (1 <= ln <= 20 and 1 <= r <= 32 and 1 <= p <= 16):
            return False
        expected = _unb64(digest)
        actual = hashlib.scrypt(
            password.encode("utf-8"), salt=_unb64(salt), n=2**ln, r=r, p=p,
            dklen=len(expected), maxmem=256 * 1024 * 1024,
        )
    except (ValueError, KeyError):
        return False
    return hmac.compare_digest(actual, expected)


def read_users_file(path: Path) -> dict[str, str]:
    """Parse a users file (``login:hash`` lines, as ``gateway passwd`` prints them; blank
    lines and ``#`` comments skipped) into login -> hash.

    :raises ValueError: a line is not ``login:hash``, naming the file and line number
    """
    users: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        login, sep, hashed = line.partition(":")
        if not sep or not login or not hashed.startswith("$"):
            raise ValueError(f"{path}:{number}: expected login:hash")
        users[login] = hashed
    return users
