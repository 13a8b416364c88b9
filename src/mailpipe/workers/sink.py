"""The worker pool as a sink: each email is one request to one worker.

The worker's answer decides the SMTP session's fate: CONTINUE keeps it open, CLOSE ends it
with 221 after the 250. A worker's error frame is logged and the email still gets its 250 (a
profiler accepts everything); a worker that dies or runs past exec_ttl, or no free worker in
time, makes the client retry (451).
"""

from __future__ import annotations

import logging

from mailpipe.event import CapturedEmail
from mailpipe.metrics import Metrics
from mailpipe.sinks.base import DELIVER, Sink, SinkError
from mailpipe.workers.pool import PoolError, WorkerPool
from mailpipe.workers.process import WorkerError

log = logging.getLogger("mailpipe.workers")

CONTINUE = b"CONTINUE"
CLOSE = b"CLOSE"


class WorkerSink(Sink):
    name = "workers"
    required = True
    stage = DELIVER

    def __init__(self, pool: WorkerPool, metrics: Metrics, *, include_raw: bool) -> None:
        self.pool = pool
        self.metrics = metrics
        self.include_raw = include_raw

    async def start(self) -> None:
        await self.pool.start()

    async def close(self) -> None:
        await self.pool.stop()

    async def submit(self, email: CapturedEmail) -> None:
        body = email.raw if self.include_raw else b""
        try:
            response = await self.pool.exec(email.json(), body)
        except (PoolError, WorkerError) as exc:
            raise SinkError(str(exc)) from exc
        outcome: dict[str, object] = {"pid": response.pid}
        if response.error is not None:
            self.metrics.worker_errors.inc()
            log.warning("worker %d answered an error: %s", response.pid, response.error,
                        extra={"uuid": email.uuid})
            outcome["error"] = response.error
        else:
            outcome["response"] = self._verdict(email, response.context)
        email.outcomes["worker"] = outcome

    def _verdict(self, email: CapturedEmail, context: bytes) -> str:
        verdict = context.strip().upper()
        if verdict == CLOSE:
            email.close_connection = True
            return "CLOSE"
        if verdict != CONTINUE:
            log.warning("worker answered %r, expected CONTINUE or CLOSE: treated as CONTINUE",
                        context[:40], extra={"uuid": email.uuid})
        return "CONTINUE"

    def health(self) -> dict[str, object]:
        workers = self.pool.workers
        ready = sum(1 for w in workers if w.alive)
        return {"ok": ready > 0 or self.pool.target == 0, "workers": len(workers), "alive": ready}
