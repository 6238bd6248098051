"""Console sessions (idle and absolute expiry, bounded), the login limiter, CSRF tokens."""

from __future__ import annotations

from gateway.console.sessions import LoginLimiter, SessionTable, csrf_pair_ok, new_login_token


def test_a_session_ends_when_idle_or_too_old_or_logged_out() -> None:
    table = SessionTable(idle=60, lifetime=300)
    token, session = table.create("ops", "admin", now=1000)
    assert table.get(token, now=1050) is session
    assert table.get(token, now=1100) is session  # used at 1050: still alive
    assert table.get(token, now=1161) is None  # unused for 61 s
    token, _ = table.create("ops", "admin", now=2000)
    for t in range(2050, 2300, 50):
        assert table.get(token, now=t) is not None
    assert table.get(token, now=2301) is None  # 12h-style absolute lifetime
    token, _ = table.create("ops", "admin", now=3000)
    table.end(token)
    assert table.get(token, now=3001) is None
    assert table.get("not-a-token") is None and table.get(None) is None and table.get("x" * 500) is None


def test_sessions_are_bounded_and_tokens_are_not_kept() -> None:
    table = SessionTable(idle=60, lifetime=300, max_sessions=3)
    tokens = [table.create("ops", "admin", now=10)[0] for _ in range(4)]
    assert len(table) == 3
    assert table.get(tokens[0], now=11) is None and table.get(tokens[3], now=11) is not None
    assert not any(t in repr(table._sessions) for t in tokens)  # only their hashes


def test_each_session_has_its_own_csrf_token() -> None:
    table = SessionTable(idle=60, lifetime=300)
    (_, a), (_, b) = table.create("ops", "admin"), table.create("ops", "admin")
    assert a.csrf != b.csrf and len(a.csrf) >= 40


def test_the_limiter_refuses_after_max_failures_within_the_window() -> None:
    limiter = LoginLimiter(max_failures=5, window=300)
    for i in range(5):
        assert limiter.retry_after("192.0.2.1", now=1000 + i) == 0
        limiter.failed("192.0.2.1", now=1000 + i)
    assert limiter.retry_after("192.0.2.1", now=1010) == 290  # until the first failure is 5 min old
    assert limiter.retry_after("192.0.2.2", now=1010) == 0  # per address
    assert limiter.retry_after("192.0.2.1", now=1300) == 0  # the window has passed


def test_the_limiter_forgets_the_oldest_addresses_first() -> None:
    limiter = LoginLimiter(max_failures=1, window=300, max_addresses=2)
    for address in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        limiter.failed(address, now=1000)
    assert limiter.retry_after("192.0.2.1", now=1001) == 0
    assert limiter.retry_after("192.0.2.3", now=1001) > 0


def test_the_login_token_must_match_its_cookie_and_be_signed() -> None:
    secret = b"s" * 32
    token = new_login_token(secret)
    assert csrf_pair_ok(secret, token, token)
    assert not csrf_pair_ok(secret, token, None) and not csrf_pair_ok(secret, None, token)
    assert not csrf_pair_ok(secret, token, new_login_token(secret))
    assert not csrf_pair_ok(b"t" * 32, token, token)  # made by another process
    forged = token.split(".")[0] + "." + "0" * 64
    assert not csrf_pair_ok(secret, forged, forged)
