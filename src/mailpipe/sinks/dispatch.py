"""Hands each captured email to every sink and decides what the client is told."""

from __future__ import annotations

import asyncio
import logging
import time

from mailpipe.event import CapturedEmail
from mailpipe.metrics import Metrics
from mailpipe.sinks.base import Sink, SinkError

log = logging.getLogger("mailpipe.sinks")


class Dispatcher:
    """Runs the sinks for one email: required ones are awaited (all must accept before the
    250), optional ones run in the background and only log their failures."""

    def __init__(self, sinks: list[Sink], metrics: Metrics) -> None:
        self.sinks = sinks
        self.metrics = metrics
        self.optional = [s for s in sinks if not s.required]
        stages = sorted({s.stage for s in sinks if s.required})
        self.required_stages = [[s for s in sinks if s.required and s.stage == st]
                                for st in stages]
        self._background: set[asyncio.Task[bool]] = set()
        self._latency = {s.name: metrics.sink_latency.labels(s.name) for s in sinks}
        self._failures = {s.name: metrics.sink_failures.labels(s.name) for s in sinks}

    async def start(self) -> None:
        for sink in self.sinks:
            await sink.start()

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        for sink in reversed(self.sinks):
            try:
                await sink.close()
            except Exception:
                log.exception("sink %s failed to close", sink.name)

    async def deliver(self, email: CapturedEmail) -> bool:
        """True when every required sink accepted the email.

        Required sinks run stage by stage (a stage's sinks concurrently), so that recording
        sinks (the store) see what delivering ones (workers) made of the email; a failure
        stops there, since the client will send the email again. Optional sinks get it once
        the required ones have accepted it, in the background.
        """
        for stage in self.required_stages:
            if len(stage) == 1:
                ok = await self._run(stage[0], email)
            else:
                ok = all(await asyncio.gather(*(self._run(s, email) for s in stage)))
            if not ok:
                return False
        for sink in self.optional:
            task = asyncio.create_task(self._run(sink, email))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return True

    async def _run(self, sink: Sink, email: CapturedEmail) -> bool:
        started = time.perf_counter()
        try:
            await sink.submit(email)
        except Exception as exc:
            self._failures[sink.name].inc()
            # Expected failures (a broker down, a worker dead) are one line; bugs get a trace.
            log.error("sink %s failed: %s", sink.name, exc, extra={"uuid": email.uuid},
                      exc_info=not isinstance(exc, SinkError | OSError))
            return False
        self._latency[sink.name].observe(time.perf_counter() - started)
        return True

    def health(self) -> dict[str, object]:
        return {sink.name: sink.health() for sink in self.sinks}
