"""Draining pipelines into a worker pool with RoadRunner's jobs worker protocol.

Each delivery goes to a worker as one request: context = the job's metadata JSON, body = the
job's payload (the EMAIL_RECEIVED event), flags CODEC_RAW, as the RoadRunner jobs plugin sends
it, so a PHP consumer written with spiral/roadrunner-jobs works unchanged. The worker answers
in the response body with `{"type": n, "data": {...}}` (docs/protocols.md 3.4). Delivery is at least
once: a job is acked only after its worker succeeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import orjson

from mailpipe.config import PipelineOptions
from mailpipe.jobs.base import Delivery, Driver, DriverError, Notify
from mailpipe.metrics import Metrics
from mailpipe.workers.goridge import CODEC_RAW
from mailpipe.workers.pool import PoolError, WorkerPool
from mailpipe.workers.process import WorkerError, WorkerResponse

log = logging.getLogger("mailpipe.jobs")

# The response types of RoadRunner's jobs protocol.
NO_ERROR, ERROR, ACK, NACK, REQUEUE = 0, 1, 2, 3, 4


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with a delivery once its worker has answered."""

    action: str  # "ack", "requeue", "dead"
    delay: float = 0.0
    reason: str = ""


def verdict_for(response: WorkerResponse) -> Verdict:
    """Read the worker's answer as RoadRunner's jobs listener does."""
    if response.error is not None:
        return Verdict("requeue", reason=f"worker error: {response.error}")
    try:
        answer = orjson.loads(response.body)
        kind = int(answer["type"])
        data = answer.get("data") or {}
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        # RoadRunner acks a malformed answer rather than looping on it forever.
        log.error("malformed jobs response %r: job acked", response.body[:120])
        return Verdict("ack")
    if not isinstance(data, dict):
        data = {}
    delay = float(data.get("delay_seconds") or 0)
    message = str(data.get("message") or "")
    if kind in (NO_ERROR, ACK):
        return Verdict("ack")
    if kind in (ERROR, NACK):
        return Verdict("requeue" if data.get("requeue") else "dead", delay, message)
    if kind == REQUEUE:
        return Verdict("requeue", delay, message or "requeued by the worker")
    log.warning("unknown jobs response type %r: job acked", kind)
    return Verdict("ack")


class PipelineConsumer:
    """Pulls one pipeline's deliveries and hands each to the pool."""

    def __init__(self, driver: Driver, options: PipelineOptions, pool: WorkerPool, *,
                 metrics: Metrics, dead_letter: Driver | None = None,
                 workers: asyncio.Semaphore | None = None,
                 notify: Notify | None = None) -> None:
        self.driver = driver
        self.notify = notify  # on_dequeue and on_queue_retry
        self.options = options
        self.pool = pool
        # One slot per worker, shared by every pipeline on the pool: a job is taken from the
        # broker only when a worker is free for it, so none waits here while its visibility
        # timeout runs out (it would then be delivered again, to us or to another consumer).
        self.workers = workers or asyncio.Semaphore(max(1, pool.target))
        self.dead_letter_driver = dead_letter
        self.paused = False
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._poller: asyncio.Task[None] | None = None
        labels = (driver.pipeline,)
        self._consumed = metrics.jobs_consumed.labels(*labels)
        self._acked = metrics.jobs_acked.labels(*labels)
        self._nacked = metrics.jobs_nacked.labels(*labels)
        self._dead = metrics.jobs_dead.labels(*labels)

    def start(self) -> None:
        self._poller = asyncio.create_task(self._poll())

    def pause(self) -> None:
        self.paused = True
        self._resumed.clear()

    def resume(self) -> None:
        self.paused = False
        self._resumed.set()

    async def stop(self, timeout: float) -> None:
        """Stop pulling, let jobs in hand finish; unfinished ones come back to the broker."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout)

    async def _poll(self) -> None:
        backoff = 0.1
        while True:
            await self._resumed.wait()
            slots = await self._take_slots()
            try:
                await self.driver.connect()
                deliveries = await self.driver.receive(slots, 1.0)
            except DriverError as exc:
                self._give_back(slots)
                log.error("receiving from %s failed: %s; retrying in %.1fs",
                          self.driver.pipeline, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except BaseException:
                self._give_back(slots)
                raise
            backoff = 0.1
            self._give_back(slots - len(deliveries))
            for delivery in deliveries:
                task = asyncio.create_task(self._handle(delivery))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                task.add_done_callback(lambda _: self.workers.release())

    async def _take_slots(self) -> int:
        """Wait for one free worker, then take every other free one, up to prefetch."""
        await self.workers.acquire()
        taken = 1
        while taken < self.options.prefetch and not self.workers.locked():
            await self.workers.acquire()
            taken += 1
        return taken

    def _give_back(self, count: int) -> None:
        for _ in range(count):
            self.workers.release()

    async def _handle(self, delivery: Delivery) -> None:
        try:
            self._consumed.inc()
            if self.notify is not None:
                self.notify("on_dequeue", {"queue_id": delivery.job.id})
            if delivery.job.auto_ack:
                await self._settle(delivery, Verdict("ack"))
            verdict = await self._run(delivery)
            if not delivery.job.auto_ack:
                await self._settle(delivery, verdict)
        except DriverError as exc:
            # The broker keeps the job reserved; it comes back after visibility_timeout.
            log.error("settling job %s failed: %s", delivery.job.id, exc)

    async def _run(self, delivery: Delivery) -> Verdict:
        context = delivery.context(self.driver.name)
        try:
            response = await self.pool.exec(context, delivery.job.payload, CODEC_RAW)
        except (WorkerError, PoolError) as exc:
            return Verdict("requeue", reason=str(exc))
        return verdict_for(response)

    async def _settle(self, delivery: Delivery, verdict: Verdict) -> None:
        if verdict.action == "ack":
            await self.driver.ack(delivery)
            self._acked.inc()
            return
        limit = self.options.max_attempts
        if verdict.action == "dead" or (limit and delivery.attempt >= limit):
            await self._bury(delivery, verdict.reason or f"failed {delivery.attempt} times")
            return
        log.warning("job %s attempt %d failed (%s): requeued", delivery.job.id,
                    delivery.attempt, verdict.reason)
        await self.driver.nack(delivery, requeue=True, delay=verdict.delay)
        self._nacked.inc()
        if self.notify is not None:  # attempt: the one the job goes back for
            self.notify("on_queue_retry", {"queue_id": delivery.job.id,
                                           "attempt": delivery.attempt + 1})

    async def _bury(self, delivery: Delivery, reason: str) -> None:
        log.warning("job %s dead-lettered: %s", delivery.job.id, reason)
        if self.dead_letter_driver is not None:
            job = delivery.job
            job.headers = {**job.headers, "x-dead-reason": [reason],
                           "x-dead-from": [self.driver.pipeline]}
            job.pipeline = self.dead_letter_driver.pipeline
            job.delay = 0.0
            await self.dead_letter_driver.connect()
            await self.dead_letter_driver.push_batch([job])
            await self.driver.ack(delivery)
        else:
            await self.driver.dead_letter(delivery, reason)
        self._dead.inc()


class JobsConsumer:
    """Every consumed pipeline of one process, sharing one worker pool."""

    def __init__(self, consumers: dict[str, PipelineConsumer], pool: WorkerPool) -> None:
        self.consumers = consumers
        self.pool = pool

    async def start(self) -> None:
        await self.pool.start()
        for consumer in self.consumers.values():
            consumer.start()

    async def stop(self, timeout: float) -> None:
        await asyncio.gather(*(c.stop(timeout) for c in self.consumers.values()))
        await self.pool.stop()

    def get(self, pipeline: str) -> PipelineConsumer | None:
        return self.consumers.get(pipeline)

    def info(self) -> dict[str, Any]:
        return {name: {"paused": c.paused} for name, c in self.consumers.items()}
