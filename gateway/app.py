"""The running gateway: queue, plugins, listeners, signals, reload and shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

from gateway import logs, reloads
from gateway.content import Content
from gateway.context import AtOnce, Gateway
from gateway.delivery.scheduler import Scheduler
from gateway.dns import make_resolver
from gateway.hooks import HookRunner, HookStats, PluginSpec, discover_plugins
from gateway.metrics import Counters, report_forever, start_metrics_server
from gateway.model import Envelope
from gateway.policy import Policy, PolicyError, load_policy
from gateway.queue import Claim, QueueStore
from gateway.smtp.handler import SmtpHandler
from gateway.smtp.listener import Listener
from gateway.smtp.tls import server_context
from gateway.threads import ThreadPool

__all__ = ["GatewayApp"]

log = logging.getLogger(__name__)


async def check_aliases(policy: Policy) -> None:
    """Load the aliases file (start-up and reload); log names that go nowhere.

    :raises PolicyError: the aliases file is broken or loops (file, line and alias)
    """
    from gateway.delivery.local.aliases import AliasError
    from gateway.delivery.local.expand import startup_check

    try:
        warnings = await asyncio.to_thread(startup_check, policy.local)
    except AliasError as exc:
        key = f"alias {exc.alias!r}" if exc.alias else "local.aliases"
        raise PolicyError(exc.file, exc.line, key, exc.message) from None
    for warning in warnings:
        log.warning("%s", warning)


async def check_transport_security(policy: Policy) -> None:
    """Start-up and reload: log DANE settings that would hold mail (``dane-only``
    without believed DNSSEC)."""
    from gateway.delivery.remote.tlsa import dane_warnings

    for warning in await asyncio.to_thread(dane_warnings, policy):
        log.warning("%s", warning)


def registry(specs: Mapping[str, PluginSpec]) -> dict[str, type]:
    """Plugin name to Settings class, as the policy loader wants it."""
    return {name: spec.settings_cls for name, spec in specs.items()}


class GatewayApp:
    """One gateway instance: everything ``gateway run`` starts."""

    def __init__(
        self,
        policy: Policy,
        *,
        specs: Mapping[str, PluginSpec] | None = None,
        policy_path: str | os.PathLike[str] | None = None,
        reuse_port: bool = False,
        role: str = "single",
        policy_digest: str = "",
        policy_data: bytes = b"",
        supervisor: Any = None,
        start_report: tuple[str, int, str] | None = None,
    ) -> None:
        """
        :param policy_digest: SHA-256 of the policy file ``policy`` came from, as
            :func:`gateway.reloads.read_policy` gives it (reported to ``gateway reload``)
        :param policy_data: that file's bytes (the master hands them to a worker it
            starts to replace one that died)
        :param supervisor: the master's :class:`gateway.workers.Supervisor`: its
            workers, which SIGHUP is passed on to
        :param start_report: what to report once started instead of ``started``: a
            replacement worker runs its master's policy, so it reports its master's
            last outcome (result, request, error)
        """
        self.policy = policy
        self.policy_digest = policy_digest
        self.policy_data = policy_data
        self.supervisor = supervisor
        self._start_report = start_report
        #: the last (result, request, error) this process reported
        self.last_report: tuple[str, int, str] = (reloads.STARTED, 0, "")
        self._report_lock = threading.Lock()
        self.is_serving = False
        self._is_reloading = False
        # Fixed at start, as the listeners are: where this process reports its policy.
        self.var_dir = Path(policy.server.var_dir)
        self._reload_wanted: asyncio.Event | None = None
        self.specs = dict(specs) if specs is not None else discover_plugins()
        self.policy_path = policy_path
        self.reuse_port = reuse_port
        # "single": one process does everything. With workers, every process accepts
        # mail and delivers what it queued; the "master" also owns the queue's
        # recovery, its scans, the trigger FIFO and every retry (gateway/workers.py).
        self.role = role
        self.queue = QueueStore(policy.server.queue_dir)
        workers = min(32, (os.cpu_count() or 2) * 4)
        self.executor = ThreadPool(max_workers=workers, thread_name_prefix="gateway-pool")
        self.gateway: Gateway | None = None
        self.listeners: dict[str, Listener] = {}
        self._handlers: dict[str, SmtpHandler] = {}
        self.scheduler: Scheduler | None = None
        self.counters = Counters()
        self.hook_stats = HookStats()
        self.metrics_server: Any = None
        self.console: Any = None  # gateway.console.Console, when [console] enabled
        self.index: Any = None  # gateway.tracking.IndexWriter, when [console] enabled and index
        self._reporter: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()

    # -- life cycle --------------------------------------------------------

    async def _build(self, policy: Policy) -> Gateway:
        await check_aliases(policy)
        await check_transport_security(policy)
        runner = HookRunner(self.specs, [entry.name for entry in policy.plugins], stats=self.hook_stats)
        gateway = Gateway(
            policy=policy,
            runner=runner,
            queue=self.queue,
            executor=self.executor,
            hostname=policy.server.hostname,
            resolver=make_resolver(policy.dns),
            notify_queued=self._queued,
            take_claim=self._claimed if policy.delivery.enabled else None,
            at_once=(
                AtOnce(self._at_once_eligible, self._deliver_at_once, self._forget_at_once)
                if policy.delivery.enabled and policy.delivery.at_once else None
            ),
            counters=self.counters,
            is_worker=self.role == "worker",
        )
        await runner.startup(policy.plugins, gateway=gateway)
        return gateway

    def _queued(self, qid: str) -> None:
        if self.scheduler is not None:
            self.scheduler.notify(qid)

    def _at_once_eligible(self, envelope: Envelope) -> bool:
        return self.scheduler is not None and self.scheduler.may_deliver_at_once(envelope)

    async def _deliver_at_once(
        self, qid: str, envelope: Envelope, message: Content, announce: Callable[[], None]
    ) -> bool:
        if self.scheduler is None:
            return False

        def delivered() -> None:
            if self.index is not None:  # the results and Message-ID no log line has
                self.index.handler.note_message(qid, envelope, message)
            announce()

        return await self.scheduler.deliver_at_once(qid, envelope, message, delivered)

    def _forget_at_once(self, qid: str) -> None:
        if self.scheduler is not None:
            self.scheduler.forget_at_once(qid)

    def _claimed(self, claim: Claim) -> None:
        if self.index is not None:  # the results and Message-ID no log line has
            self.index.handler.note_claim(claim)
        if self.scheduler is not None:
            self.scheduler.take(claim)
        else:  # a reload turned delivery on: nothing here delivers (the file stays queued)
            os.close(claim.fd)

    def _watch_trigger(self) -> None:
        """Listen on the queue's trigger FIFO (``gateway queue retry`` writes to it)."""
        path = self.queue.trigger_path
        try:
            if not path.exists():
                os.mkfifo(path, 0o600)
            read_fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            # Hold a writer open ourselves, so the FIFO never reads as end-of-file
            # between two commands (as qmail-send does with lock/trigger).
            self._trigger_fds = (read_fd, os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))
        except OSError as exc:
            log.warning("no queue trigger (%s): commands act at the next rescan", exc)
            return
        self._read_notifications(read_fd)

    def _read_notifications(self, fd: int) -> None:
        buffer = b""

        def readable() -> None:
            nonlocal buffer
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            if not data:
                asyncio.get_running_loop().remove_reader(fd)
                return
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if not line or self.scheduler is None:
                    continue
                if line == b"*":
                    for qid in self.queue.ids():
                        self.scheduler.notify(qid)
                elif line.startswith(b"flush "):  # gateway queue flush, ETRN
                    self.scheduler.request_flush(line[6:].decode("ascii", "replace"))
                else:
                    self.scheduler.notify(line.decode("ascii", "replace"))

        os.set_blocking(fd, False)
        asyncio.get_running_loop().add_reader(fd, readable)

    def handler_for(self, listener_name: str) -> SmtpHandler:
        handler = self._handlers.get(listener_name)
        if handler is None:
            assert self.gateway is not None
            settings = next(l for l in self.gateway.policy.listeners if l.name == listener_name)
            handler = self._handlers[listener_name] = SmtpHandler(self.gateway, settings)
        return handler

    async def start(
        self,
        sockets: Mapping[str, Any] | None = None,
        recovered: list[str] | None = None,
    ) -> None:
        """Open the queue, start the plugins, bind every listener.

        :param sockets: listener name -> an already bound listening socket (workers)
        :param recovered: queue ids found by an :meth:`QueueStore.open` done before
            forking workers; then this process only attaches to the queue
        """
        if recovered is None and self.role == "single":
            found = await asyncio.to_thread(self.queue.open)
        else:
            await asyncio.to_thread(self.queue.attach)
            found = recovered or []
        log.info("queue %s opened with %d messages role=%s", self.policy.server.queue_dir, len(found), self.role)
        if self.policy.console.enabled and self.policy.console.index:
            from gateway.tracking import start_index

            self.index = start_index(self)
        self.gateway = await self._build(self.policy)
        tls_context = None
        if any(l.tls != "none" for l in self.policy.listeners):
            tls_context = await asyncio.to_thread(
                server_context, self.policy.tls, Path(self.policy.server.var_dir), self.policy.server.hostname
            )
        if self.policy.delivery.enabled:
            self.scheduler = Scheduler(
                self, retries=self.role != "worker", share=self.policy.server.workers if self.role != "single" else 1
            )
            await self.scheduler.start(found)
            if self.role != "worker":
                self._watch_trigger()
        for settings in self.policy.listeners:
            sock = sockets.get(settings.name) if sockets else None
            listener = Listener(settings, self.handler_for, tls_context, reuse_port=self.reuse_port, sock=sock)
            await listener.start()
            self.listeners[settings.name] = listener
        report = self._start_report or (reloads.STARTED, reloads.read_request(self.var_dir), "")
        await asyncio.to_thread(self._report, *report)
        if self.role != "worker":
            self._write_pidfile()
        metrics = self.policy.metrics
        if metrics.enabled and self.role != "worker":
            self.metrics_server = await asyncio.to_thread(start_metrics_server, self, metrics.address, metrics.port)
        elif metrics.enabled:  # the master's endpoint adds this worker's counts
            self._reporter = asyncio.create_task(report_forever(self), name="metrics-report")
        if self.policy.console.enabled and self.role != "worker":
            from gateway.console import start_console

            self.console = await start_console(self)
        self.is_serving = True
        log.info("gateway started hostname=%s pid=%d", self.policy.server.hostname, os.getpid())

    @property
    def pidfile(self) -> Path:
        """``<var_dir>/gateway.pid``: where ``gateway reload`` finds the running gateway."""
        return Path(self.policy.server.var_dir) / "gateway.pid"

    def _write_pidfile(self) -> None:
        try:
            self.pidfile.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.pidfile.with_suffix(".tmp")
            tmp.write_text(f"{os.getpid()}\n")
            tmp.replace(self.pidfile)
        except OSError as exc:
            log.warning("cannot write %s: %s", self.pidfile, exc)

    @property
    def workers(self) -> tuple[int, ...]:
        """The master's running workers (none in any other process)."""
        return self.supervisor.pids if self.supervisor is not None else ()

    def _report(self, result: str, request: int, error: str = "") -> None:
        """Publish which policy this process runs (``<var_dir>/reload/<pid>.json``)."""
        if self.role == "single" and result == reloads.STARTED:
            reloads.clear(self.var_dir)  # the master clears before it forks
        with self._report_lock:  # the master rewrites it when a worker comes or goes
            self.last_report = (result, request, error)
            self._write_report()

    def _write_report(self) -> None:
        result, request, error = self.last_report
        status = reloads.ProcessStatus(
            pid=os.getpid(), role=self.role, request=request, result=result,
            policy=self.policy_digest, error=error[:2000], workers=self.workers,
        )
        try:
            reloads.write_status(self.var_dir, status)
        except OSError as exc:
            log.warning("cannot record the running policy in %s: %s", reloads.directory(self.var_dir), exc)

    async def workers_changed(self) -> None:
        """A worker died or a replacement started: the master's report lists the others."""

        def rewrite() -> None:
            with self._report_lock:
                self._write_report()

        await asyncio.to_thread(rewrite)

    def port(self, name: str | None = None) -> int:
        """The bound port of a listener (the first one by default)."""
        listener = self.listeners[name] if name else next(iter(self.listeners.values()))
        return listener.port

    async def reload(self) -> bool:
        """Load the policy file again and swap it in for new sessions.

        An invalid policy is refused, logged with file, line and key, and the running
        one stays. Listener addresses (and ``var_dir``) are not changed by a reload.
        Either way the outcome is reported in ``<var_dir>/reload/`` for ``gateway reload``.
        """
        self._is_reloading = True
        try:
            # Read before the file: an answer to this number means the file was read after it.
            request = await asyncio.to_thread(reloads.read_request, self.var_dir)
            return await self._reload(request)
        finally:
            self._is_reloading = False
            if self.supervisor is not None:
                self.supervisor.reload_done()

    @property
    def is_reload_pending(self) -> bool:
        """Whether a SIGHUP is waiting for a reload, or one runs now."""
        return self._is_reloading or (self._reload_wanted is not None and self._reload_wanted.is_set())

    async def _reload(self, request: int) -> bool:
        if self.policy_path is None:
            log.warning("reload: running on the embedded default, nothing to reload")
            await asyncio.to_thread(
                self._report, reloads.REFUSED, request, "running on the embedded default: no policy file to reload"
            )
            return False
        try:
            policy, data = await asyncio.to_thread(
                reloads.read_policy_data, self.policy_path, registry=registry(self.specs)
            )
            gateway = await self._build(policy)
        except PolicyError as exc:
            log.error("reload refused, keeping the running policy: %s", exc)
            await asyncio.to_thread(self._report, reloads.REFUSED, request, str(exc))
            return False
        except Exception as exc:
            log.exception("reload refused, keeping the running policy")
            await asyncio.to_thread(self._report, reloads.REFUSED, request, f"{type(exc).__name__}: {exc}")
            return False
        old = self.gateway
        self.gateway, self.policy, self._handlers = gateway, policy, {}
        self.policy_digest, self.policy_data = reloads.digest(data), data
        digest = self.policy_digest
        if old is not None:
            # Sessions that began under the old policy finish under it: its plugins
            # are shut down only once those sessions are over.
            running = set().union(*(l.sessions for l in self.listeners.values()))
            task = asyncio.create_task(self._retire(old, running))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        log.info("policy reloaded from %s sha256=%s", self.policy_path, digest[:12])
        await asyncio.to_thread(self._report, reloads.LOADED, request)
        return True

    async def _retire(self, old: Gateway, sessions: set[asyncio.Task[Any]]) -> None:
        if sessions:
            await asyncio.wait(sessions, timeout=old.policy.limits.session_timeout)
        await old.runner.call_all("gateway_shutdown", old.policy.plugins, gateway=old)

    async def stop(self, grace: float = 30.0) -> None:
        """Stop accepting, let sessions finish within ``grace``, close the queue."""
        for listener in self.listeners.values():
            await listener.stop_accepting()
        if self.console is not None:
            await self.console.stop()
        await asyncio.gather(*(l.drain(grace) for l in self.listeners.values()))
        if self.scheduler is not None:
            await self.scheduler.stop(grace)
        if self._retiring:
            await asyncio.wait(set(self._retiring), timeout=grace)
        if self.gateway is not None:
            await self.gateway.runner.call_all(
                "gateway_shutdown", self.gateway.policy.plugins, gateway=self.gateway
            )
        if self.metrics_server is not None:
            await asyncio.to_thread(self.metrics_server.shutdown)
        if self._reporter is not None:
            self._reporter.cancel()
            await asyncio.gather(self._reporter, return_exceptions=True)
        if self.index is not None:
            await asyncio.to_thread(self.index.stop)
        await self.queue.close()
        for fd in getattr(self, "_trigger_fds", ()):
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.role != "worker":
            try:
                if self.pidfile.read_text().strip() == str(os.getpid()):
                    self.pidfile.unlink()
            except OSError:
                pass
        reloads.forget(self.var_dir, os.getpid())
        log.info("gateway stopped")

    async def run_forever(
        self,
        sockets: Mapping[str, Any] | None = None,
        recovered: list[str] | None = None,
    ) -> None:
        """Serve until SIGTERM or SIGINT; SIGHUP reloads the policy.

        The master passes SIGHUP on to its workers here: the event loop's handler
        replaces any installed with :func:`signal.signal`. A SIGHUP that arrived before
        the loop took over (see :func:`gateway.reloads.hold_hangups`) is acted on now.
        Reloads run one at a time, after the start; several SIGHUPs meanwhile make one.
        """
        loop = asyncio.get_running_loop()
        logs.write_from_loop(loop)
        try:
            await self._run_forever(loop, sockets, recovered)
        finally:
            logs.write_from_loop(None)

    async def _run_forever(
        self, loop: asyncio.AbstractEventLoop, sockets: Mapping[str, Any] | None, recovered: list[str] | None
    ) -> None:
        stop = asyncio.Event()
        self._reload_wanted = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.hangup)
        if reloads.take_early_hangup():
            self.hangup()
        await self.start(sockets, recovered)
        settle_collector()
        if self.supervisor is not None:
            self.supervisor.watch(self)
        reloader = asyncio.create_task(self._reload_forever(), name="reload")
        await stop.wait()
        log.info("shutting down")
        if self.supervisor is not None:  # the workers stop accepting now too
            self.supervisor.stop()
        reloader.cancel()
        await asyncio.gather(reloader, return_exceptions=True)
        await self.stop()

    def hangup(self) -> None:
        """SIGHUP: pass it on to the workers, and reload (once the start is done)."""
        for pid in self.workers:
            try:
                os.kill(pid, signal.SIGHUP)
            except ProcessLookupError:
                log.warning("reload: worker pid=%d is gone", pid)
        if self._reload_wanted is not None:
            self._reload_wanted.set()

    async def _reload_forever(self) -> None:
        assert self._reload_wanted is not None
        while True:
            await self._reload_wanted.wait()
            self._reload_wanted.clear()
            try:
                await self.reload()
            except Exception:  # a boundary: the next SIGHUP must still reload
                log.exception("reload failed")


#: the youngest generation is collected after this many allocations (Python's default: 700)
GC_YOUNGEST = 10_000


def settle_collector() -> None:
    """Once serving: keep the cyclic garbage collector off what start-up made.

    Modules, plugins, the policy and the listeners live as long as the process; a full
    collection walked all of them again and again (about 5 % of a worker's CPU at a
    few hundred messages a second, by ``perf``). :func:`gc.freeze` moves them out of
    its sight, and a session's few thousand short-lived objects no longer start a
    collection every 700 allocations. Reference counting still frees nearly
    everything at once; the collector only finds cycles, now somewhat later.
    """
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNGEST, middle, oldest)


def build_app(policy_path: str | None, **kwargs: Any) -> GatewayApp:
    """Load the policy (the embedded default when ``None``) and make the app."""
    specs = discover_plugins()
    policy = load_policy(policy_path, registry=registry(specs))
    return GatewayApp(policy, specs=specs, policy_path=policy_path, **kwargs)
