"""SMTP AUTH (RFC 4954) on the server side: the command's checks and the exchange of
credentials for PLAIN (RFC 4616) and LOGIN.

The protocol object (:class:`~gateway.smtp.protocol.GatewaySMTP`) sends the replies and
runs the challenges (aiosmtpd's ``challenge_auth``); the handler's plugins decide whether
the credentials are good. Neither the credentials nor the blobs they came in are logged.
"""

from __future__ import annotations

import asyncio
import binascii
from base64 import b64decode
from typing import Any

from gateway.verdicts import Reply

__all__ = ["auth_command"]

R_NO_AUTH = Reply(502, "5.5.1", "AUTH not available")
R_AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
R_NEED_HELO = Reply(503, "5.5.1", "Send HELO or EHLO first")
R_TOO_MANY_FAILURES = Reply(421, "4.7.0", "Too many authentication failures")


async def auth_command(proto: Any, arg: str) -> bool:
    """Answer one AUTH command on ``proto``.

    :returns: whether the session ends after the replies sent (too many failures, or
        the handler's answer closes it)
    """
    session = proto.gsession
    if not proto.listener.auth:
        await proto.reply(R_NO_AUTH, bad=True)
        return False
    if not session.has_tls:
        await proto.reply(R_AUTH_NEEDS_TLS)
        return False
    if not session.is_esmtp or session.helo is None:
        await proto.reply(R_NEED_HELO, bad=True)
        return False
    if session.is_authenticated:
        await proto.reply(Reply(503, "5.5.1", "Already authenticated"), bad=True)
        return False
    if proto.txn is not None:
        await proto.reply(Reply(503, "5.5.1", "AUTH not permitted during a mail transaction"), bad=True)
        return False
    mechanism, _, initial = arg.partition(" ")
    mechanism = mechanism.upper()
    credentials = await _credentials(proto, mechanism, initial.strip())
    if credentials is None:
        return False
    login, password = credentials
    answer = await proto.handler.auth(session, proto.scope, mechanism, login, password)
    if not answer.reply.is_positive and answer.reply.code == 535:
        proto.auth_failures += 1
        if proto.auth_failures >= proto.handler.policy.auth.max_failures:
            await proto.reply(answer.reply)
            await proto.reply(R_TOO_MANY_FAILURES)
            return True
    await proto.reply(answer.reply)
    return bool(answer.close)


async def _challenge(proto: Any, prompt: bytes) -> bytes | None:
    async with asyncio.timeout(proto.scope.limits.idle_timeout):
        value = await proto.challenge_auth(prompt)
    return None if not isinstance(value, bytes) else value


async def _credentials(proto: Any, mechanism: str, initial: str) -> tuple[str, str] | None:
    """Collect (login, password) for PLAIN or LOGIN; ``None`` if already answered."""
    try:
        if mechanism == "PLAIN":
            if initial:
                blob: bytes | None = b"" if initial == "=" else b64decode(initial, validate=True)
            else:
                blob = await _challenge(proto, b"")
            if blob is None:
                return None
            parts = blob.split(b"\x00")
            if len(parts) != 3 or (parts[0] and parts[0] != parts[1]):
                await proto.reply(Reply(501, "5.5.2", "Malformed PLAIN credentials"), bad=True)
                return None
            return parts[1].decode("utf-8"), parts[2].decode("utf-8")
        if mechanism == "LOGIN":
            user = b64decode(initial, validate=True) if initial else await _challenge(proto, b"Username:")
            if user is None:
                return None
            password = await _challenge(proto, b"Password:")
            if password is None:
                return None
            return user.decode("utf-8"), password.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        await proto.reply(Reply(501, "5.5.2", "Cannot decode credentials"), bad=True)
        return None
    await proto.reply(Reply(504, "5.5.4", "Unrecognized authentication type"), bad=True)
    return None
