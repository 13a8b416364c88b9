"""Pushing jobs in batches: concurrent sessions' jobs share one broker round trip.

A batch goes out when it holds `batch_size` jobs or when `flush_interval` has passed since
its first job, whichever comes first. Each session still waits for the broker's confirmation
of the batch holding its job (commit, publisher confirm, XADD reply, PubAck) before its 250.
"""

from __future__ import annotations

import asyncio
import logging
import time

from mailpipe.jobs.base import Driver, DriverError, Job
from mailpipe.metrics import Metrics

log = logging.getLogger("mailpipe.jobs")


class BatchPusher:
    def __init__(self, driver: Driver, *, batch_size: int, flush_interval: float,
                 push_timeout: float, metrics: Metrics) -> None:
        self.driver = driver
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.push_timeout = push_timeout
        self.metrics = metrics
        self._pending: list[tuple[Job, asyncio.Future[None]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self.last_error: str | None = None
        labels = (driver.pipeline,)
        self._pushed = metrics.jobs_pushed.labels(*labels)
        self._confirmed = metrics.jobs_confirmed.labels(*labels)
        self._failed = metrics.jobs_push_failed.labels(*labels)
        self._batch_sizes = metrics.jobs_batch_size.labels(*labels)
        self._latency = metrics.jobs_push_latency.labels(*labels)

    async def push(self, job: Job) -> None:
        """Returns once the broker confirmed the job; raises DriverError otherwise."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((job, future))
        self._pushed.inc()
        if len(self._pending) >= self.batch_size:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.flush_interval, self._flush)
        await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        task = asyncio.create_task(self._send(batch))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _send(self, batch: list[tuple[Job, asyncio.Future[None]]]) -> None:
        started = time.perf_counter()
        self._batch_sizes.observe(len(batch))
        try:
            await asyncio.wait_for(self._push([job for job, _ in batch]), self.push_timeout)
        except (DriverError, TimeoutError, OSError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else str(exc)
            self.last_error = f"{self.driver.pipeline}: {reason}"
            self._failed.inc(len(batch))
            log.error("push of %d jobs to %s failed: %s", len(batch), self.driver.pipeline,
                      reason)
            error = DriverError(f"pipeline {self.driver.pipeline}: {reason}")
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        self.last_error = None
        self._latency.observe(time.perf_counter() - started)
        self._confirmed.inc(len(batch))
        for _, future in batch:
            if not future.done():
                future.set_result(None)

    async def _push(self, jobs: list[Job]) -> None:
        # connect() is idempotent: after an outage (or a broker down at start) this is
        # where the connection comes back.
        await self.driver.connect()
        await self.driver.push_batch(jobs)

    async def close(self) -> None:
        self._flush()
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)
