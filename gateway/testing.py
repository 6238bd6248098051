"""Test helpers: a real gateway on a free loopback port, for the suite and for plugins.

    with running_gateway(policy_text, tmp_path) as gw:
        with smtplib.SMTP("127.0.0.1", gw.port) as client:
            ...
        assert gw.queue_ids()

The gateway runs its own event loop in a background thread with asyncio debug mode
on; a callback that holds the loop for longer than ``slow_callback`` seconds is
recorded and fails the test when the gateway stops, so blocking code cannot hide.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping

from gateway.app import GatewayApp, registry
from gateway.hooks import PluginSpec, discover_plugins
from gateway.policy import Policy, load_policy_text
from gateway.queue import QueueStore

__all__ = ["RunningGateway", "running_gateway", "prepare_policy"]


class _SlowCallbacks(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Executing") and "took" in message:
            self.records.append(message)


def prepare_policy(
    policy_text: str,
    workdir: Path,
    *,
    specs: Mapping[str, PluginSpec] | None = None,
    keep_ports: bool = False,
) -> Policy:
    """Load ``policy_text`` with its queue and state under ``workdir`` and free ports."""
    specs = specs if specs is not None else discover_plugins()
    policy = load_policy_text(policy_text, source=str(workdir / "policy.toml"), registry=registry(specs))
    server = policy.server
    if not Path(server.queue_dir).is_absolute():
        server = dataclasses.replace(server, queue_dir=workdir / server.queue_dir)
    if not Path(server.var_dir).is_absolute():
        server = dataclasses.replace(server, var_dir=workdir / server.var_dir)
    local = policy.local
    if not Path(local.mail_root).is_absolute():
        local = dataclasses.replace(local, mail_root=workdir / local.mail_root)
    policy = dataclasses.replace(policy, local=local)
    listeners = policy.listeners
    if not keep_ports:
        listeners = tuple(dataclasses.replace(l, port=0) for l in listeners)
    return dataclasses.replace(policy, server=server, listeners=listeners)


class RunningGateway:
    """A gateway serving in a background thread."""

    def __init__(self, policy: Policy, specs: Mapping[str, PluginSpec] | None = None, *, slow_callback: float = 1.0) -> None:
        self.policy = policy
        self.specs = specs
        self.slow_callback = slow_callback
        self.loop = asyncio.new_event_loop()
        self.app: GatewayApp | None = None
        self._thread = threading.Thread(target=self._run, name="gateway-under-test", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._slow = _SlowCallbacks()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.set_debug(True)
        self.loop.slow_callback_duration = self.slow_callback
        try:
            self.app = GatewayApp(self.policy, specs=self.specs)
            self.loop.run_until_complete(self.app.start())
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    def start(self) -> RunningGateway:
        logging.getLogger("asyncio").addHandler(self._slow)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def call(self, coro: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the gateway's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 5.0) -> None:
        if self.app is not None and self.loop.is_running():
            self.call(self.app.stop(grace), timeout=grace + 30)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
        logging.getLogger("asyncio").removeHandler(self._slow)
        if self._slow.records:
            raise AssertionError(f"the event loop was blocked: {self._slow.records}")

    @property
    def port(self) -> int:
        assert self.app is not None
        return self.app.port()

    def listener_port(self, name: str) -> int:
        assert self.app is not None
        return self.app.port(name)

    @property
    def queue(self) -> QueueStore:
        return QueueStore(self.policy.server.queue_dir)

    def queue_ids(self, area: str = "msg") -> list[str]:
        return self.queue.ids(area)


@contextlib.contextmanager
def running_gateway(
    policy_text: str,
    workdir: Path,
    *,
    specs: Mapping[str, PluginSpec] | None = None,
) -> Iterator[RunningGateway]:
    """Start a gateway on ``policy_text`` under ``workdir``; stop it afterwards."""
    gw = RunningGateway(prepare_policy(policy_text, workdir, specs=specs), specs).start()
    try:
        yield gw
    finally:
        gw.stop()
