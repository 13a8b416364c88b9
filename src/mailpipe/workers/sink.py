"""The worker pool as a sink: each email is one request to one worker.

The worker's answer decides the SMTP session's fate: CONTINUE keeps it open, CLOSE ends it
with 221 after the 250. A worker's error frame is logged and the email still gets its 250 (a
profiler accepts everything); a worker that dies or runs past exec_ttl, or no free worker in
time, is a failure: `sinks.workers.on_failure` says what the client gets (451 by default).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pydantic import field_validator

from mailpipe.config import PoolConfig
from mailpipe.event import CapturedEmail
from mailpipe.metrics import Metrics
from mailpipe.sinks.base import DELIVER, Sink, SinkContext, SinkError, SinkSettings
from mailpipe.sinks.results import Accepted
from mailpipe.workers.pool import PoolError, WorkerPool
from mailpipe.workers.process import WorkerError

log = logging.getLogger("mailpipe.workers")

CONTINUE = b"CONTINUE"
CLOSE = b"CLOSE"


class WorkerSettings(SinkSettings):
    """`sinks.workers`: the failure policy; the pool itself is `server` and `smtp.pool`."""

    @field_validator("timeout")
    @classmethod
    def _pool_times_out(cls, value: float | None) -> float | None:
        # Abandoning a worker mid-email would leave it busy for ever; the pool's own limits
        # stop and replace it instead.
        if value:
            raise ValueError("the worker pool has its own limits: set smtp.pool.exec_ttl "
                             "and smtp.pool.allocate_timeout")
        return value


class WorkerSink(Sink):
    name = "workers"
    required = True
    stage = DELIVER
    timeout = 0.0  # see WorkerSettings
    outcome_key = "worker"
    Settings = WorkerSettings
    needs_section = False  # on when server.command is set (see Config.delivers_to_workers)

    @classmethod
    def create(cls, settings: SinkSettings, context: SinkContext) -> WorkerSink | None:
        config = context.config
        if not config.delivers_to_workers():
            return None
        pool = WorkerPool(config.smtp.pool or PoolConfig(), config.server,
                          metrics=context.metrics, mode="smtp", rpc_address=config.rr_rpc)
        return cls(pool, context.metrics, include_raw=config.smtp.include_raw)

    def __init__(self, pool: WorkerPool, metrics: Metrics, *, include_raw: bool) -> None:
        self.pool = pool
        self.metrics = metrics
        self.include_raw = include_raw
        # The plugins' notifications (PluginManager.notify): on_delivery_attempt when an email
        # goes to another worker (the capture server fires attempt 1 itself).
        self.notify: Callable[..., None] | None = None

    async def start(self) -> None:
        await self.pool.start()

    async def close(self) -> None:
        await self.pool.stop()

    async def submit(self, email: CapturedEmail) -> Accepted:
        body = email.raw if self.include_raw else b""
        try:
            response = await self.pool.exec(email.json(), body, retried=self._retried(email))
        except (PoolError, WorkerError) as exc:
            raise SinkError(str(exc)) from exc
        if response.error is not None:
            self.metrics.worker_errors.inc()
            log.warning("worker %d answered an error: %s", response.pid, response.error,
                        extra={"uuid": email.uuid})
            return Accepted(note={"pid": response.pid, "error": response.error})
        answer = self._answer(email, response.context)
        return Accepted(note={"pid": response.pid, "response": answer}, close=answer == "CLOSE")

    def _answer(self, email: CapturedEmail, context: bytes) -> str:
        answer = context.strip().upper()
        if answer == CLOSE:
            return "CLOSE"
        if answer != CONTINUE:
            log.warning("worker answered %r, expected CONTINUE or CLOSE: treated as CONTINUE",
                        context[:40], extra={"uuid": email.uuid})
        return "CONTINUE"

    def _retried(self, email: CapturedEmail) -> Callable[[int], None] | None:
        notify = self.notify
        if notify is None:
            return None

        def retried(attempt: int) -> None:
            envelope: Any = email.event.get("envelope") or {}
            for recipient in envelope.get("to") or []:
                notify("on_delivery_attempt", {"recipient": recipient, "attempt": attempt},
                       event=email.event)

        return retried

    def health(self) -> dict[str, object]:
        workers = self.pool.workers
        ready = sum(1 for w in workers if w.alive)
        return {"ok": ready > 0 or self.pool.target == 0, "workers": len(workers), "alive": ready}
