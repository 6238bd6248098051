"""Console sessions, login rate limits and CSRF tokens, all server-side and bounded.

A session is a random token (the ``__Host-console`` cookie: HttpOnly, Secure,
SameSite=Strict) that maps, in memory, to the login, its scope (``admin``, or ``user`` for an end user
with the mail addresses that are theirs) and its own CSRF token. The table keeps only a hash of each token,
so a memory dump does not hand out live cookies. Sessions end when unused for
``session_timeout``, ``session_lifetime`` after the login, at logout, and when the
gateway stops. Failed logins are counted per client address over ``login_window``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

__all__ = ["LoginLimiter", "Session", "SessionTable", "csrf_pair_ok", "new_login_token"]

MAX_SESSIONS = 1000
"""Most live sessions; past that the least recently used one ends."""
MAX_TRACKED_ADDRESSES = 10000
"""Most client addresses whose failures are remembered; the oldest are forgotten first."""


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()


@dataclass
class Session:
    """One logged-in browser."""

    login: str
    scope: str
    csrf: str
    created: float
    last_seen: float = field(default=0.0)
    addresses: frozenset[str] = frozenset()
    """An end user's own addresses, lower case (the login and its aliases); empty for an admin."""

    @property
    def is_admin(self) -> bool:
        return self.scope == "admin"


class SessionTable:
    """Live sessions by token hash, with idle and absolute expiry."""

    def __init__(self, *, idle: float, lifetime: float, max_sessions: int = MAX_SESSIONS) -> None:
        self.idle = idle
        self.lifetime = lifetime
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def create(
        self, login: str, scope: str, now: float | None = None, addresses: frozenset[str] = frozenset(),
    ) -> tuple[str, Session]:
        """A new session for ``login``: its cookie token (given out once) and the session.

        :param addresses: an end user's own addresses (see :attr:`Session.addresses`)
        """
        now = time.time() if now is None else now
        token = secrets.token_urlsafe(32)
        session = Session(login=login, scope=scope, csrf=secrets.token_urlsafe(32), created=now, last_seen=now,
                          addresses=addresses)
        self._sessions[_digest(token)] = session
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
        return token, session

    def get(self, token: str | None, now: float | None = None) -> Session | None:
        """The live session of ``token`` (its use noted), or ``None``."""
        if not token or len(token) > 200:
            return None
        now = time.time() if now is None else now
        key = _digest(token)
        session = self._sessions.get(key)
        if session is None:
            return None
        if now - session.last_seen > self.idle or now - session.created > self.lifetime:
            del self._sessions[key]
            return None
        session.last_seen = now
        self._sessions.move_to_end(key)
        return session

    def end(self, token: str | None) -> None:
        """Log out: forget the session of ``token``."""
        if token:
            self._sessions.pop(_digest(token), None)

    def clear(self) -> None:
        self._sessions.clear()


class LoginLimiter:
    """Failed logins per client address in a sliding window (e.g. 5 in 5 minutes)."""

    def __init__(self, *, max_failures: int, window: float, max_addresses: int = MAX_TRACKED_ADDRESSES) -> None:
        self.max_failures = max_failures
        self.window = window
        self.max_addresses = max_addresses
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, address: str, now: float) -> deque[float] | None:
        times = self._failures.get(address)
        if times is None:
            return None
        while times and now - times[0] >= self.window:
            times.popleft()
        if not times:
            del self._failures[address]
            return None
        return times

    def retry_after(self, address: str, now: float | None = None) -> float:
        """Seconds until ``address`` may try again; 0 when it may now."""
        now = time.time() if now is None else now
        times = self._recent(address, now)
        if times is None or len(times) < self.max_failures:
            return 0.0
        return max(1.0, self.window - (now - times[-self.max_failures]))

    def failed(self, address: str, now: float | None = None) -> None:
        """Count one failed login from ``address``."""
        now = time.time() if now is None else now
        times = self._recent(address, now)
        if times is None:
            times = self._failures[address] = deque(maxlen=self.max_failures)
        times.append(now)
        self._failures.move_to_end(address)
        while len(self._failures) > self.max_addresses:
            self._failures.popitem(last=False)


def new_login_token(secret: bytes) -> str:
    """A token for the login form (before any session): random, and signed with the
    console's secret, sent both as a cookie and in the form (checked by :func:`csrf_pair_ok`)."""
    nonce = secrets.token_urlsafe(24)
    mac = hmac.new(secret, nonce.encode("ascii"), hashlib.sha256).hexdigest()
    return f"{nonce}.{mac}"


def csrf_pair_ok(secret: bytes, cookie: str | None, form: str | None) -> bool:
    """Whether the login form's token matches its cookie and carries our signature."""
    if not cookie or not form or len(form) > 200 or not hmac.compare_digest(cookie, form):
        return False
    nonce, _, mac = form.partition(".")
    expected = hmac.new(secret, nonce.encode("ascii", "replace"), hashlib.sha256).hexdigest()
    return hmac.compare_digest(mac, expected)
