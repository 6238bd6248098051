"""Listening sockets: one asyncio server per policy listener."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Any, Callable

from gateway.smtp.handler import SmtpHandler
from gateway.smtp.protocol import ConnectionTracker, GatewaySMTP

__all__ = ["Listener"]

log = logging.getLogger(__name__)


class Listener:
    """Accepts connections for one ``[[listeners]]`` entry.

    ``handler_for`` is asked for the handler at each new connection, so that a policy
    reload applies to new sessions while running ones finish under the old policy.
    """

    def __init__(
        self,
        settings: Any,
        handler_for: Callable[[str], SmtpHandler],
        tls_context: ssl.SSLContext | None,
        *,
        reuse_port: bool = False,
        sock: socket.socket | None = None,
    ) -> None:
        self.settings = settings
        self.handler_for = handler_for
        self.tls_context = tls_context
        self.reuse_port = reuse_port
        self.sock = sock
        self.tracker = ConnectionTracker()
        self.sessions: set[asyncio.Task[Any]] = set()
        self.server: asyncio.base_events.Server | None = None

    def _protocol(self) -> GatewaySMTP:
        return GatewaySMTP(
            self.handler_for(self.settings.name),
            self.tracker,
            self.tls_context,
            implicit_tls=self.settings.tls == "implicit",
            sessions=self.sessions,
        )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        ssl_ctx = self.tls_context if self.settings.tls == "implicit" else None
        if self.sock is not None:
            self.server = await loop.create_server(self._protocol, sock=self.sock, ssl=ssl_ctx, backlog=1024)
        else:
            self.server = await loop.create_server(
                self._protocol,
                host=self.settings.address,
                port=self.settings.port,
                ssl=ssl_ctx,
                backlog=1024,
                reuse_address=True,
                reuse_port=self.reuse_port or None,
            )
        log.info("listening name=%s on %s:%d tls=%s", self.settings.name, self.settings.address, self.port, self.settings.tls)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()

    async def drain(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for running sessions, then cut the rest."""
        if self.sessions:
            _, pending = await asyncio.wait(set(self.sessions), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
