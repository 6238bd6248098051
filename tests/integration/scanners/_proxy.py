"""A TCP forwarder on loopback in front of a real scanner daemon, for watching when the
gateway talks to it: it records, per connection, when the gateway connected and when the
daemon's answer went back, and can hold each answer back for a while (a daemon that
takes its time), so that what runs at the same time shows without a timing guess."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Exchange:
    """One connection through the proxy: monotonic times."""

    connected: float
    answered: float | None = None


@dataclass
class HoldingProxy:
    """Forwards 127.0.0.1:<port> to ``upstream``, holding each answer ``hold`` seconds."""

    upstream: tuple[str, int]
    hold: float = 0.0
    exchanges: list[Exchange] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._server = socket.socket()
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(16)
        self.port: int = self._server.getsockname()[1]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            exchange = Exchange(time.monotonic())
            with self._lock:
                self.exchanges.append(exchange)
            threading.Thread(target=self._serve, args=(client, exchange), daemon=True).start()

    def _serve(self, client: socket.socket, exchange: Exchange) -> None:
        with client, socket.create_connection(self.upstream, timeout=60) as upstream:
            threading.Thread(target=_pump, args=(client, upstream), daemon=True).start()
            while True:
                try:
                    data = upstream.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                if exchange.answered is None:
                    time.sleep(self.hold)
                    exchange.answered = time.monotonic()
                try:
                    client.sendall(data)
                except OSError:
                    break
            try:
                client.shutdown(socket.SHUT_WR)
            except OSError:
                pass


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """The gateway's request to the daemon, then end of file when the gateway stops."""
    while True:
        try:
            data = source.recv(65536)
        except OSError:
            break
        if not data:
            break
        try:
            sink.sendall(data)
        except OSError:
            return
    try:
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass
