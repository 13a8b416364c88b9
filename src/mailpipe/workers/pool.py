"""A pool of worker processes, modelled on RoadRunner's static pool.

An SMTP session borrows a worker for the length of one email and gives it back at once; when
every worker is busy the session waits (backpressure) up to `allocate_timeout`: there is no
queue between SMTP and the workers. Workers that die are replaced, with backoff when they die
at start; the supervisor replaces workers past their ttl, idle_ttl or memory limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson

from mailpipe.config import PoolConfig, ServerConfig
from mailpipe.metrics import Metrics
from mailpipe.workers import PoolError
from mailpipe.workers.goridge import CODEC_JSON
from mailpipe.workers.process import (
    Connection,
    WorkerError,
    WorkerProcess,
    WorkerResponse,
    WorkerStartError,
    WorkerState,
    WorkerStopped,
    handshake,
    split_command,
)

log = logging.getLogger("mailpipe.workers")

RESTART_BACKOFF = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0)


class NoFreeWorker(PoolError):
    """Every worker stayed busy for allocate_timeout."""


class PoisonEmail(PoolError):
    """Every worker given the request asked to stop on it, max_retries_per_email times."""


def _request_id(context: bytes) -> str:
    """The email's uuid (or the job's id) in a request context, for the log."""
    try:
        doc = orjson.loads(context)
        return str(doc.get("uuid") or doc.get("id") or "?")
    except (orjson.JSONDecodeError, AttributeError):
        return "?"


class WorkerListener:
    """`relay: tcp://...` or `unix://...`: workers connect to us; the pid in their handshake
    says which spawned process a connection belongs to."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._server: asyncio.Server | None = None
        self._pending: dict[int, asyncio.Future[Connection]] = {}

    async def start(self) -> None:
        if self.address.startswith("unix://"):
            path = self.address[len("unix://"):]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self._server = await asyncio.start_unix_server(self._accepted, path)
        else:
            host, _, port = self.address[len("tcp://"):].rpartition(":")
            self._server = await asyncio.start_server(self._accepted, host or "127.0.0.1",
                                                      int(port))

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(reader, writer)
        try:
            pid = await asyncio.wait_for(handshake(conn), 10.0)
        except (WorkerError, OSError, TimeoutError, Exception) as exc:
            log.warning("relay connection without a valid handshake: %s", exc)
            conn.close()
            return
        waiter = self._pending.pop(pid, None)
        if waiter is None or waiter.done():
            log.warning("relay connection from pid %d, which is not a worker we started", pid)
            conn.close()
            return
        waiter.set_result(conn)

    async def connect(self, worker: WorkerProcess, timeout: float) -> None:
        waiter: asyncio.Future[Connection] = asyncio.get_running_loop().create_future()
        self._pending[worker.pid] = waiter
        try:
            conn = await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            raise WorkerStartError(
                f"worker {worker.pid} did not connect to {self.address} within {timeout}s"
            ) from None
        finally:
            self._pending.pop(worker.pid, None)
        worker.attach(conn)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class WorkerPool:
    def __init__(
        self,
        config: PoolConfig,
        server: ServerConfig,
        *,
        metrics: Metrics,
        mode: str = "smtp",
        rpc_address: str | None = None,
    ) -> None:
        command = config.command or server.command
        if not command:
            raise PoolError("no worker command: set server.command")
        self.config = config
        self.command = split_command(command)
        self.relay_address = server.relay
        self.relay_timeout = server.relay_timeout
        self.user, self.group = server.user, server.group
        self.metrics = metrics
        self.env = self._environment(server, mode, rpc_address)
        self.target = config.num_workers
        self.workers: list[WorkerProcess] = []
        self._idle: deque[WorkerProcess] = deque()
        self._waiters: deque[asyncio.Future[WorkerProcess]] = deque()
        self._relay = WorkerListener(server.relay) if server.relay != "pipes" else None
        self._failures = 0
        self._stopping = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._supervisor: asyncio.Task[None] | None = None
        self._replenishing = False
        self.on_change: Callable[[], None] | None = None

    @staticmethod
    def _environment(server: ServerConfig, mode: str, rpc: str | None) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"RR_MODE": mode, "RR_RELAY": server.relay, "RR_VERSION": "2024.3.0"})
        if rpc:
            env["RR_RPC"] = rpc
        env.update({k.upper(): os.path.expandvars(v) for k, v in server.env.items()})
        return env

    # ---- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker; a command that cannot start at all fails here, clearly."""
        if self._relay is not None:
            await self._relay.start()
        if self.target == 0:
            return
        try:
            first = await self._spawn()
        except WorkerStartError as exc:
            raise PoolError(str(exc)) from None
        self._make_idle(first)
        # The command works: workers that die at start from now on are retried with backoff.
        await self._start_many(self.target - 1)
        self._supervisor = asyncio.create_task(self._supervise())
        log.info("worker pool ready", extra={"workers": len(self.workers),
                                             "command": " ".join(self.command)})

    async def stop(self, timeout: float | None = None) -> None:
        """Let emails in flight finish (within `timeout`, default destroy_timeout; 0 when the
        shutdown is hurried), then stop every worker."""
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(PoolError("the worker pool is stopping"))
        deadline = time.monotonic() + (self.config.destroy_timeout if timeout is None
                                       else timeout)
        while any(w.state == WorkerState.WORKING for w in self.workers):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
        remaining = max(1.0, deadline - time.monotonic())
        await asyncio.gather(*(w.stop(remaining) for w in list(self.workers)))
        self.workers.clear()
        self._idle.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._relay is not None:
            await self._relay.close()

    # ---- borrowing -----------------------------------------------------------------

    async def exec(self, context: bytes, body: bytes, flags: int = CODEC_JSON,
                   retried: Callable[[int], None] | None = None) -> WorkerResponse:
        """Run one request on a free worker. Raises PoolError (PoisonEmail when every worker
        tried asked to stop on it) or WorkerError. `retried(attempt)` is called before the
        request goes to another worker (attempt 2, 3...)."""
        for attempt in range(1, self.config.max_retries_per_email + 1):
            if attempt > 1 and retried is not None:
                retried(attempt)
            worker = await self._acquire()
            try:
                return await self._exec_on(worker, context, body, flags)
            except WorkerStopped:
                self._retire(worker, "asked to stop")
                # RoadRunner sends the same request to another worker; we do, a bounded number
                # of times, since an email that makes every worker stop would loop for ever.
        raise self._poison(context)

    async def _exec_on(self, worker: WorkerProcess, context: bytes, body: bytes,
                       flags: int) -> WorkerResponse:
        started = time.perf_counter()
        try:
            response = await worker.exec(
                context, body, self.config.effective_exec_ttl or None, flags
            )
        except (WorkerError, asyncio.CancelledError):
            # Cancelled: the session gave up on the email (an administrator closed it); the
            # worker has been killed, as its late answer would otherwise go to the next email.
            self._retire(worker, worker.last_error or "failed")
            raise
        self.metrics.worker_exec.observe(time.perf_counter() - started)
        self.metrics.worker_execs.labels(str(worker.pid)).set(worker.num_execs)
        self._release(worker)
        return response

    def _poison(self, context: bytes) -> PoisonEmail:
        attempts = self.config.max_retries_per_email
        self.metrics.worker_poison.inc()
        request = _request_id(context)
        log.error("poison email %s: %d workers in a row asked to stop on it; giving up (451)",
                  request, attempts, extra={"uuid": request})
        return PoisonEmail(f"poison email: {attempts} workers in a row asked to stop on it "
                           "(pool.max_retries_per_email)")

    async def _acquire(self) -> WorkerProcess:
        if self._stopping:
            raise PoolError("the worker pool is stopping")
        while self._idle:
            worker = self._idle.popleft()
            if worker.state == WorkerState.READY and worker.alive:
                worker.state = WorkerState.WORKING
                return worker
            if not worker.alive:
                self._retire(worker, "exited while idle")
        started = time.perf_counter()
        waiter: asyncio.Future[WorkerProcess] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            worker = await asyncio.wait_for(waiter, self.config.allocate_timeout)
        except TimeoutError:
            raise NoFreeWorker(
                f"no free worker within allocate_timeout ({self.config.allocate_timeout}s)"
            ) from None
        except asyncio.CancelledError:
            self._unclaimed(waiter)
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
        self.metrics.worker_wait.observe(time.perf_counter() - started)
        return worker

    def _unclaimed(self, waiter: asyncio.Future[WorkerProcess]) -> None:
        """A worker handed to a session that gave up in the same instant goes back."""
        if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            self._make_idle(waiter.result())

    def _release(self, worker: WorkerProcess) -> None:
        max_jobs = self.config.max_jobs
        if max_jobs and worker.num_execs >= max_jobs:
            self._retire(worker, None)
        elif worker.retire_when_idle:
            self._retire(worker, None, replace=len(self.workers) <= self.target)
        else:
            self._make_idle(worker)

    def _make_idle(self, worker: WorkerProcess) -> None:
        worker.state = WorkerState.READY
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                worker.state = WorkerState.WORKING
                waiter.set_result(worker)
                return
        self._idle.append(worker)

    # ---- replacing -----------------------------------------------------------------

    def _retire(self, worker: WorkerProcess, reason: str | None, *, replace: bool = True) -> None:
        if worker in self.workers:
            self.workers.remove(worker)
        with contextlib.suppress(ValueError):
            self._idle.remove(worker)
        with contextlib.suppress(KeyError):
            self.metrics.worker_execs.remove(str(worker.pid))
        if reason:
            log.warning("replacing worker %d: %s", worker.pid, reason, extra={"worker": worker.pid})
        self._background(worker.stop(self.config.destroy_timeout))
        if replace and not self._stopping:
            self.metrics.worker_restarts.inc()
            self._background(self._replenish())
        self._changed()

    async def _replenish(self, first_delay: float = 0.0) -> None:
        """Bring the pool back to its target size, backing off while workers fail to start."""
        if self._replenishing:
            return
        self._replenishing = True
        try:
            await asyncio.sleep(first_delay)
            while not self._stopping and len(self.workers) < self.target:
                try:
                    await self._spawn_into_pool()
                    self._failures = 0
                except WorkerStartError as exc:
                    delay = RESTART_BACKOFF[min(self._failures, len(RESTART_BACKOFF) - 1)]
                    self._failures += 1
                    log.error("%s; retrying in %.2fs", exc, delay)
                    await asyncio.sleep(delay)
        finally:
            self._replenishing = False

    async def _spawn(self) -> WorkerProcess:
        worker = WorkerProcess(self.command, self.env, user=self.user, group=self.group)
        self.workers.append(worker)
        try:
            if self._relay is None:
                await worker.start_pipes(self.config.allocate_timeout)
            else:
                await worker.spawn(pipes=False)
                await self._relay.connect(worker, min(self.relay_timeout,
                                                      self.config.allocate_timeout))
        except (WorkerStartError, OSError) as exc:
            self.workers.remove(worker)
            worker.kill()
            await worker.stop(0.5)
            if isinstance(exc, OSError):
                raise WorkerStartError(
                    f"worker command {self.command[0]!r} cannot start: {exc.strerror or exc}"
                ) from exc
            raise
        self._changed()
        return worker

    async def _spawn_into_pool(self) -> WorkerProcess:
        worker = await self._spawn()
        self._make_idle(worker)
        return worker

    def _background(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _changed(self) -> None:
        self.metrics.workers.set(len(self.workers))
        if self.on_change is not None:
            self.on_change()

    # ---- management ----------------------------------------------------------------

    def info(self) -> list[dict[str, Any]]:
        return [w.info() for w in self.workers]

    async def add_worker(self) -> dict[str, Any]:
        self.target += 1
        worker = await self._spawn_into_pool()
        return worker.info()

    async def remove_worker(self) -> dict[str, Any] | None:
        if not self.workers:
            return None
        self.target = max(0, self.target - 1)
        worker = self._idle[-1] if self._idle else self.workers[-1]
        info = worker.info()
        if worker.state == WorkerState.WORKING:
            worker.retire_when_idle = True  # after the email in flight
        else:
            self._retire(worker, None, replace=False)
        return info

    async def reset(self) -> int:
        """Replace every worker without failing an email: fresh workers start first, idle old
        ones stop at once, busy old ones finish their email and then stop."""
        old = list(self.workers)
        for worker in old:
            worker.retire_when_idle = True
        started = await self._start_many(self.target, make_idle=False)
        for worker in list(self._idle):
            if worker in old:
                self._retire(worker, None, replace=False)
        for worker in started:
            self._make_idle(worker)
        return len(old)

    async def _start_many(self, count: int, *, make_idle: bool = True) -> list[WorkerProcess]:
        """Start `count` workers at once; those that fail to start are retried in the
        background with backoff, so a flaky start never leaves the pool short for good."""
        results = await asyncio.wait_for(
            asyncio.gather(*(self._spawn() for _ in range(count)), return_exceptions=True),
            self.config.reset_timeout,
        )
        started = [r for r in results if isinstance(r, WorkerProcess)]
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, WorkerStartError):
                raise result
        if make_idle:
            for worker in started:
                self._make_idle(worker)
        failures = [r for r in results if isinstance(r, WorkerStartError)]
        if failures:
            delay = RESTART_BACKOFF[0]
            for failure in failures:
                log.error("%s; retrying in %.2fs", failure, delay)
            self._failures = 1
            self._background(self._replenish(first_delay=delay))
        return started

    # ---- supervisor ----------------------------------------------------------------

    async def _supervise(self) -> None:
        sup = self.config.supervisor
        while True:
            await asyncio.sleep(sup.watch_tick)
            now = time.monotonic()
            for worker in list(self.workers):
                reason = self._over_limit(worker, now)
                if reason is None:
                    continue
                if worker.state == WorkerState.READY:
                    self._retire(worker, reason)
                elif worker.state == WorkerState.WORKING:
                    worker.retire_when_idle = True
            if len(self.workers) < self.target:
                self._background(self._replenish())

    def _over_limit(self, worker: WorkerProcess, now: float) -> str | None:
        sup = self.config.supervisor
        if worker.state == WorkerState.READY and not worker.alive:
            return "exited while idle"
        if sup.ttl and now - worker.created > sup.ttl:
            return f"ttl of {sup.ttl}s reached"
        idle = now - worker.last_used if worker.state == WorkerState.READY else 0.0
        if sup.idle_ttl and idle > sup.idle_ttl:
            return f"idle for more than {sup.idle_ttl}s"
        if sup.max_worker_memory and worker.rss_bytes() > sup.max_worker_memory * 1024 * 1024:
            return f"memory above max_worker_memory ({sup.max_worker_memory} MB)"
        return None
