"""One running mailpipe: builds the parts from the config, starts them, stops them in order.

Shutdown (see lifecycle.py): the first SIGINT/SIGTERM stops accepting, lets messages in
flight finish within `shutdown_timeout`, answers 421 to idle sessions, flushes the sinks and
exits 0; a second signal skips the waiting but still flushes and closes.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from mailpipe.admin import AdminMixin, JobsAdminMixin, PluginsAdminMixin
from mailpipe.capture.attachments import AttachmentStorage, run_sweeper
from mailpipe.capture.message import EventOptions
from mailpipe.capture.server import CaptureServer, format_addr
from mailpipe.capture.verdicts import Verdicts
from mailpipe.config import Config, is_loopback, split_host_port
from mailpipe.discovery import remove_state, write_state
from mailpipe.lifecycle import Lifecycle
from mailpipe.metrics import Metrics
from mailpipe.plugins.base import PluginError
from mailpipe.plugins.manager import PluginManager
from mailpipe.sinks.base import Sink
from mailpipe.sinks.dispatch import Dispatcher
from mailpipe.sinks.registry import build_sinks
from mailpipe.store.sqlite import SQLiteStore, StoreSink
from mailpipe.workers import PoolError

if TYPE_CHECKING:
    from aiohttp import web

    from mailpipe.capture.inject import Injector
    from mailpipe.checks.spam import SpamChecker
    from mailpipe.checks.spamd_daemon import SpamdDaemon
    from mailpipe.jobs.base import Driver
    from mailpipe.jobs.consumer import JobsConsumer
    from mailpipe.jobs.sink import JobsSink
    from mailpipe.pop3.server import POP3Server
    from mailpipe.rpc.server import RPCServer
    from mailpipe.web.app import HttpAuth
    from mailpipe.workers.pool import WorkerPool
    from mailpipe.workers.sink import WorkerSink

log = logging.getLogger("mailpipe")
# The cyclic collector's first threshold for a running server (Python's default is 700): see
# tune_gc().
GC_YOUNG_THRESHOLD = 10_000


def _loaded_class(module: str, name: str) -> type | None:
    """`module.name` if that module has been imported, else None (see _make_sinks)."""
    found = sys.modules.get(module)
    return getattr(found, name, None) if found is not None else None


class StartupError(Exception):
    """A part cannot start (for example a worker command that does not run)."""


class Mailpipe(AdminMixin, JobsAdminMixin, PluginsAdminMixin):
    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.data_dir = Path(config.data_dir)
        self.store: SQLiteStore | None = None
        self.pool: WorkerPool | None = None
        self.jobs_sink: JobsSink | None = None
        self.worker_sink: WorkerSink | None = None
        self.consumer: JobsConsumer | None = None
        self.jobs_drivers: dict[str, Driver] = {}
        self.declared_at_runtime: set[str] = set()  # pipelines from jobs.Declare
        self.dispatcher = Dispatcher(self._make_sinks(), self.metrics)
        storage = config.smtp.attachment_storage
        self.attachments = AttachmentStorage(
            mode=storage.mode, temp_dir=storage.temp_dir, cleanup_after=storage.cleanup_after
        )
        self.verdicts = Verdicts()  # plugins register here: an answer at every SMTP stage
        self.plugins = PluginManager(config.plugins, self.verdicts)
        self._plugins_notify_sinks()
        self.capture = CaptureServer(
            config.smtp.listeners(),
            dispatcher=self.dispatcher,
            metrics=self.metrics,
            event_options=EventOptions(
                include_raw=config.smtp.include_raw, attachments=self.attachments
            ),
            transcript=config.smtp.transcript,
            spool_threshold=config.smtp.spool_threshold,
            data_dir=self.data_dir,
            verdicts=self.verdicts,
        )
        self.spam_checker = _spam_checker(config)  # also for the compatible APIs' routes
        self.spamd: SpamdDaemon | None = None  # spamassassin.start's own spamd
        self._http_runner: object | None = None
        self._compat_runners: dict[str, web.AppRunner] = {}
        self._compat_shared: dict[str, object] = {}  # CompatContext.shared, one per server
        self.rpc_server: RPCServer | None = None
        self.pop3: POP3Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.lifecycle = Lifecycle()

    def _make_sinks(self) -> list[Sink]:
        sinks = build_sinks(self.config, self.metrics)
        # The HTTP and admin APIs reach into three built-ins: the store, the pool, the pipeline.
        # build_sinks imports a sink's module only when it is configured (the workers and jobs
        # ones are heavy: idle memory, issue 13), so their classes are looked up among the
        # modules already imported: one not imported has no instance here.
        worker_sink = _loaded_class("mailpipe.workers.sink", "WorkerSink")
        jobs_sink = _loaded_class("mailpipe.jobs.sink", "JobsSink")
        for sink in sinks:
            if isinstance(sink, StoreSink):
                self.store = sink.store
            elif worker_sink is not None and isinstance(sink, worker_sink):
                self.pool = sink.pool
                self.worker_sink = sink
            elif jobs_sink is not None and isinstance(sink, jobs_sink):
                self.jobs_sink = sink
        return sinks

    def _plugins_notify_sinks(self) -> None:
        """The sinks that fire plugin hooks where things happen: on_enqueue (jobs) and
        on_delivery_attempt for an email retried on another worker."""
        if self.jobs_sink is not None:
            self.jobs_sink.notify = self.plugins.notify
        if self.worker_sink is not None:
            self.worker_sink.notify = self.plugins.notify

    def health(self) -> dict[str, object]:
        sinks = self.dispatcher.health()
        ok = all(bool(item.get("ok", True)) for item in sinks.values())
        return {"ok": ok, "sinks": sinks, "smtp": self.capture.addresses()}

    async def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.config.server.on_init is not None:
            # The workers' process helpers are imported only when there is a command to run.
            from mailpipe.workers.on_init import OnInitError, run_on_init

            try:
                await run_on_init(self.config.server)
            except OnInitError as exc:
                raise StartupError(str(exc)) from None
        if self.config.rpc.listen:
            await self._start_rpc()  # before the workers, which may call it as they start
        try:
            await self.dispatcher.start()
        except PoolError as exc:
            raise StartupError(f"worker pool: {exc}") from exc
        try:
            await self.plugins.start()
        except PluginError as exc:
            raise StartupError(str(exc)) from None
        self.metrics.watch_plugins(self.plugins)
        await self.capture.start()
        if self.config.pop3.addr:  # before the API: ready (/healthz) means POP3 is too
            await self._start_pop3()
        if self.config.spamassassin.start:
            await self._start_spamd()
        if self.config.jobs.consume:
            await self._start_consumer()
        if self.config.http.enabled:
            await self._start_http()
        if self.attachments.mode == "tempfile":
            interval = max(1.0, min(60.0, self.attachments.cleanup_after / 4))
            self._tasks.append(asyncio.create_task(run_sweeper(self.attachments, interval)))
        self._watch_jobs()
        self._write_state_file()

    def _write_state_file(self) -> None:
        """Where admin commands find this server (what it bound, not only what was asked)."""
        runner = self._http_runner
        bound = runner.addresses if runner is not None else []  # type: ignore[attr-defined]
        try:
            write_state(self.data_dir, http_addr=format_addr(bound[0]) if bound else None,
                        smtp=self.capture.addresses())
        except OSError as exc:  # serving matters more than being found without --api
            log.warning("cannot write the state file for admin commands: %s", exc)

    def _watch_jobs(self) -> None:
        drivers = {c.driver.pipeline: c.driver for c in
                   (self.consumer.consumers.values() if self.consumer else [])}
        if self.jobs_sink is not None:
            drivers.setdefault(self.jobs_sink.driver.pipeline, self.jobs_sink.driver)
        if drivers:
            from mailpipe.jobs.runner import watch_queue_depth

            watcher = watch_queue_depth(list(drivers.values()), self.metrics)
            self._tasks.append(asyncio.create_task(watcher))

    async def _start_rpc(self) -> None:
        from mailpipe.admin.rpc import register as admin_methods
        from mailpipe.jobs.rpc import register as jobs_methods
        from mailpipe.rpc import Registry
        from mailpipe.rpc.server import RPCServer

        registry = Registry()
        admin_methods(registry, self)
        jobs_methods(registry, self, self.config)
        rpc = self.config.rpc
        assert rpc.listen is not None
        self.rpc_server = RPCServer(rpc.listen, registry, max_frame_size=rpc.max_frame_size,
                                    read_timeout=rpc.read_timeout)
        try:
            await self.rpc_server.start()
        except OSError as exc:
            raise StartupError(f"rpc.listen {rpc.listen}: {exc.strerror or exc}") from None
        self._point_at_rpc(self.pool)

    def _point_at_rpc(self, pool: WorkerPool | None) -> None:
        """Workers' RR_RPC: the address the endpoint bound (a port 0 in rpc.listen is known
        only now)."""
        if pool is not None and self.rpc_server is not None:
            pool.env["RR_RPC"] = self.rpc_server.bound_address()

    async def _start_spamd(self) -> None:
        """spamd on spamassassin.addr; ready a few seconds later (logged), not waited for."""
        from mailpipe.checks.spamd_daemon import SpamdDaemon, SpamdStartError

        assert self.config.spamassassin.addr is not None
        self.spamd = SpamdDaemon(self.config.spamassassin.addr, self.data_dir / "spamd.log")
        try:
            await self.spamd.start()
        except SpamdStartError as exc:
            raise StartupError(str(exc)) from None

    async def _start_consumer(self) -> None:
        from mailpipe.jobs.runner import build_consumer

        self.consumer = build_consumer(self.config, self.config.jobs.consume, self.metrics,
                                       notify=self.plugins.notify)
        self._point_at_rpc(self.consumer.pool)
        try:
            await self.consumer.start()
        except PoolError as exc:
            raise StartupError(f"jobs worker pool: {exc}") from exc

    async def _start_http(self) -> None:
        from mailpipe.web.app import HttpAuth, create_app, start_http

        if self.store is None:
            log.warning("the store is disabled: the HTTP API serves health and metrics only")
        host, port = split_host_port(self.config.http.addr)
        if not is_loopback(host) and self.config.http.auth is None:
            log.warning(
                "HTTP API bound to %s, reachable from other machines: mailpipe is a development "
                "tool and shows every captured email; set http.auth or bind to 127.0.0.1",
                self.config.http.addr,
            )
        _warn_host_check(host, self.config.http.allowed_hosts)
        auth_cfg = self.config.http.auth
        auth = (
            HttpAuth(kind=auth_cfg.type, username=auth_cfg.username,
                     password=auth_cfg.password, token=auth_cfg.token)
            if auth_cfg
            else None
        )
        http = self.config.http
        compat = {name: self._compat_app(name) for name in self._compat_apis(prefixed=True)}
        app = create_app(self.store, self.metrics, health=self.health, auth=auth, admin=self,
                         bind_host=host, allowed_hosts=http.allowed_hosts,
                         base_path=http.base_path, code_pattern=http.code_pattern,
                         compat=compat, injector=self.injector,
                         checks=self.config.checks, spam_checker=self.spam_checker)
        self._http_runner = await start_http(app, host, port)
        log.info("HTTP API on http://%s:%d%s/", *self.http_address(), http.base_path)
        for name in self._compat_apis(prefixed=False):
            await self._start_compat_listener(name, auth)

    def _compat_apis(self, *, prefixed: bool) -> list[str]:
        """The compatible APIs (compat/) served under /compat/ (`prefixed`) or on their own
        listeners; none without the store, which they all read."""
        from mailpipe.compat import APIS

        if self.store is None:
            return []
        settings = {name: getattr(self.config.compat, name) for name in APIS}
        if prefixed:
            return [name for name, api in settings.items() if api.enabled]
        return [name for name, api in settings.items() if api.addr is not None]

    def _compat_app(self, name: str) -> web.Application:
        from mailpipe.compat import CompatContext, create_compat_app

        assert self.store is not None
        context = CompatContext(self.store, self, self.metrics, self.config,
                                self._compat_shared)
        return create_compat_app(name, context)

    async def _start_compat_listener(self, name: str, auth: HttpAuth | None) -> None:
        from mailpipe.web.app import create_compat_root, start_http

        addr = getattr(self.config.compat, name).addr
        host, port = split_host_port(addr)
        root = create_compat_root(self._compat_app(name), auth=auth, bind_host=host,
                                  allowed_hosts=self.config.http.allowed_hosts)
        try:
            runner = await start_http(root, host, port)
        except OSError as exc:
            raise StartupError(f"compat.{name}.addr {addr}: {exc.strerror or exc}") from None
        self._compat_runners[name] = runner
        bound_host, bound_port = runner.addresses[0][:2]
        log.info("%s-compatible API on http://%s:%d/", name, bound_host, bound_port)

    def compat_address(self, name: str) -> tuple[str, int]:
        """Where compatible API `name` listens on its own (the port bound for port 0)."""
        host, port = self._compat_runners[name].addresses[0][:2]
        return str(host), int(port)

    async def _start_pop3(self) -> None:
        from mailpipe.pop3.server import POP3Server

        if self.store is None:
            raise StartupError("pop3.addr is set but the store is disabled: POP3 serves the "
                               "store's messages (set store.enabled: true)")
        host, _ = split_host_port(self.config.pop3.addr)
        if self.config.pop3.auth == "any" and not is_loopback(host):
            log.warning("POP3 bound to %s with `pop3.auth: any`: anyone who reaches it can "
                        "download and delete every captured email; set credentials",
                        self.config.pop3.addr)
        self.pop3 = POP3Server(self.config.pop3, self.store, self.data_dir)
        try:
            await self.pop3.start()
        except OSError as exc:
            raise StartupError(f"pop3.addr {self.config.pop3.addr}: "
                               f"{exc.strerror or exc}") from None

    @cached_property
    def injector(self) -> Injector:
        """What POST /api/v1/send injects messages through: this server's capture pipeline,
        as the listener "api" with the smtp section's limits (capture/inject.py). One for
        every route that sends, so that they share its connection limits."""
        from mailpipe.capture.inject import Injector

        smtp = self.config.smtp
        return Injector(self.capture, smtp, transcript=smtp.transcript,
                        spool_threshold=smtp.spool_threshold)

    def http_address(self) -> tuple[str, int]:
        """Where the HTTP API listens (the port it bound when asked for port 0)."""
        runner = self._http_runner
        if runner is None:
            raise RuntimeError("the HTTP API is not running")
        host, port = runner.addresses[0][:2]  # type: ignore[attr-defined]
        return str(host), int(port)

    async def drain(self, hurry: bool) -> None:
        """Stop taking email; let what is in flight finish within shutdown_timeout (the
        workers within destroy_timeout). In a hurry wait for nothing: a worker busy with an
        email is stopped and that email's client, which got no 250, sends it again."""
        grace = 0.0 if hurry else self.config.shutdown_timeout
        log.info("shutting down: %s", "not waiting for messages in flight" if hurry
                 else "finishing messages in flight")
        await self.capture.stop(grace)
        if self.pop3 is not None:
            await self.pop3.stop()
        if hurry:  # busy workers are stopped now, not after destroy_timeout
            pools = [self.pool, self.consumer.pool if self.consumer else None]
            await asyncio.gather(*(pool.stop(0.0) for pool in pools if pool is not None))
        if self.consumer is not None:
            await self.consumer.stop(grace)
        if self.pool is not None:
            await self.pool.stop()

    async def close(self) -> None:
        """Flush and close what is open: jobs drivers, the API, the sinks (the store commits
        what it holds)."""
        await self.close_jobs_drivers()
        if self.consumer is not None:
            from mailpipe.jobs.runner import close_drivers

            await close_drivers(self.consumer)
        for task in self._tasks:
            task.cancel()
        if self.rpc_server is not None:
            await self.rpc_server.close()
        if self.pop3 is not None:  # stopped by drain(), unless start() failed
            await self.pop3.stop()
        if self._http_runner is not None:
            from mailpipe.web.app import stop_http

            await stop_http(self._http_runner)  # type: ignore[arg-type]
            for runner in self._compat_runners.values():
                await stop_http(runner)
        if self.spamd is not None:
            await self.spamd.stop()
        await self.plugins.close()
        await self.dispatcher.close()
        remove_state(self.data_dir)
        log.info("stopped")

    async def shutdown(self, hurry: bool = False) -> None:
        """Drain, then close: the whole shutdown, for a Mailpipe embedded without `run()`
        (tests, or an application hosting mailpipe in its own event loop)."""
        try:
            await self.drain(hurry)
        finally:
            await self.close()

    def stop(self) -> None:
        """AdminOps.stop: a graceful shutdown, as SIGTERM starts one."""
        self.lifecycle.stop()

    async def run(self) -> None:
        await self.lifecycle.run(self._start_serving, self.drain, self.close)

    async def _start_serving(self) -> None:
        await self.start()
        tune_gc()


def _spam_checker(config: Config) -> SpamChecker | None:
    """The spamd client (checks/spam.py), imported only when spamassassin.addr is set."""
    if config.spamassassin.addr is None:
        return None
    from mailpipe.checks.spam import SpamChecker

    return SpamChecker.from_config(config.spamassassin)


def _warn_host_check(host: str, allowed_hosts: list[str]) -> None:
    """Once, at startup: what the Host check (DNS rebinding protection) lets through."""
    from mailpipe.web.guard import ANY_HOST

    if ANY_HOST in allowed_hosts:
        log.warning("http.allowed_hosts has \"*\": any Host is served, so a web page can use "
                    "DNS rebinding to read and delete captured email; list the names instead")
    elif not is_loopback(host) and not allowed_hosts:
        log.warning(
            "HTTP API bound to %s with no http.allowed_hosts: it answers requests whose Host is "
            "the bind address, localhost or (bound to all interfaces) an IP address; a name "
            "other machines use to reach it, and that a rebinding page could use, is refused "
            "until listed in http.allowed_hosts", host)


def tune_gc() -> None:
    """Once started, for `serve` (not for servers started in a test process). Under smtp-source
    load the collector took about 5% of the loop thread, 20-25 us per email: full collections
    walked everything start-up made (modules, config, the app), which lives as long as the
    process, so it is frozen out of their sight; and the young generation was collected every
    700 net allocations, a few times per email, where each email's objects are freed by
    reference counting anyway. 10,000 leaves cycles waiting a little longer (a few MB at most)."""
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def install_uvloop() -> bool:
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True
