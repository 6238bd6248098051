"""auth_lockout with Redis: failures on one gateway lock the login out on another; Redis down."""

from __future__ import annotations

import base64
from pathlib import Path

from gateway.passwords import hash_password
from tests.conftest import RawClient

POLICY = """
[server]
hostname = "mx.test.example"

[[listeners]]
name = "submission"
address = "127.0.0.1"
port = 2587
tls = "starttls"
require_tls = true
require_auth = true

[auth]
users_file = "{users}"

[delivery]
enabled = false

[[plugins]]
name = "auth_lockout"
state = "{url}"
max_failures_per_ip = 0
max_failures_per_login = 2
{extra}

[[plugins]]
name = "auth_users_file"
"""


def auth(port: int, login: str, password: str) -> tuple[int, str]:
    """One session: STARTTLS, AUTH PLAIN; the AUTH reply."""
    client = RawClient(port)
    try:
        client.reply()
        client.cmd("EHLO client.test.example")
        client.cmd("STARTTLS")
        client.starttls()
        client.cmd("EHLO client.test.example")
        token = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
        code, text = client.cmd(f"AUTH PLAIN {token}")
        return code, text[0]
    finally:
        client.close()


def users(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    path.write_text(f"alice:{hash_password('alice-pw', ln=4)}\n")
    return path


def test_failures_on_one_gateway_lock_the_login_on_another(gateway_factory, redis_url: str, tmp_path: Path) -> None:
    policy = POLICY.format(users=users(tmp_path), url=redis_url, extra="")
    first, second = gateway_factory(policy), gateway_factory(policy)
    assert auth(second.port, "alice", "alice-pw")[0] == 235
    assert auth(first.port, "alice", "wrong")[0] == 535
    assert auth(second.port, "alice", "wrong")[0] == 535
    for gw in (first, second):
        code, text = auth(gw.port, "alice", "alice-pw")
        assert (code, text.split(",")[0]) == (421, "4.7.0 Too many authentication failures")


def test_redis_down_fail_open_and_fail_closed(gateway_factory, redis_factory, tmp_path: Path) -> None:
    redis = redis_factory()  # private: this test stops it
    path = users(tmp_path)
    fail_open = gateway_factory(POLICY.format(users=path, url=redis.url, extra=""))
    fail_closed = gateway_factory(POLICY.format(users=path, url=redis.url, extra='on_state_error = "tempfail"'))
    redis.stop()
    assert auth(fail_open.port, "alice", "alice-pw")[0] == 235
    assert auth(fail_open.port, "alice", "wrong")[0] == 535
    assert auth(fail_closed.port, "alice", "alice-pw")[0] == 454
