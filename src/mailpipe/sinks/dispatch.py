"""Hands each captured email to every sink and decides what the client is told."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import replace

from mailpipe.event import CapturedEmail
from mailpipe.metrics import Metrics
from mailpipe.sinks.base import STORE, Sink, SinkError
from mailpipe.sinks.results import (
    ACCEPTED,
    Accepted,
    DeliveryResult,
    Reject,
    SinkResult,
    TempFail,
    outcome_of,
)

log = logging.getLogger("mailpipe.sinks")

RESULT_KINDS = ("tempfail", "reject", "ignored")
# What the client reads when a sink whose policy is `reject` fails; the cause is in the outcomes.
REJECT_ON_FAILURE = Reject("Message could not be delivered", "5.3.0", 554)


class Dispatcher:
    """Runs the sinks for one email and folds their results into one `DeliveryResult`.

    Required sinks are awaited stage by stage (a stage's sinks concurrently), so that
    recording sinks see what delivering ones made of the email. The first refusal in stage
    order decides the reply: after a TempFail nothing else runs (the client sends the email
    again); after a Reject only the STORE stage runs, to keep the email with the refusal in
    its outcomes. Optional sinks get the email in the background once it is accepted.
    """

    def __init__(self, sinks: list[Sink], metrics: Metrics) -> None:
        self.sinks = sinks
        self.metrics = metrics
        self.optional = [s for s in sinks if not s.required]
        stages = sorted({s.stage for s in sinks if s.required})
        self.required_stages = [(st, [s for s in sinks if s.required and s.stage == st])
                                for st in stages]
        self._background: set[asyncio.Task[SinkResult]] = set()
        self._latency = {s.name: metrics.sink_latency.labels(s.name) for s in sinks}
        self._failures = {s.name: metrics.sink_failures.labels(s.name) for s in sinks}
        self._results = {(s.name, kind): metrics.sink_results.labels(s.name, kind)
                         for s in sinks for kind in RESULT_KINDS}

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

    async def deliver(self, email: CapturedEmail) -> DeliveryResult:
        """The reply for this email, once every sink that has a say answered."""
        delivery: DeliveryResult | None = None
        close = False
        for stage, sinks in self.required_stages:
            if delivery is not None and stage < STORE:
                continue  # rejected: only the store still records it
            if len(sinks) == 1:  # the usual case: no gather, no extra task
                results: Sequence[SinkResult] = (await self._run(sinks[0], email),)
            else:
                results = await asyncio.gather(*(self._run(s, email) for s in sinks))
            for sink, result in zip(sinks, results, strict=True):
                if type(result) is Accepted:
                    close = close or result.close
                elif delivery is None:
                    delivery = DeliveryResult.refuse(result, sink.name)
            if delivery is not None and delivery.code < 500:
                return delivery  # tempfail: the client sends it again, so nothing is recorded
        if delivery is not None:
            return delivery
        for sink in self.optional:
            task = asyncio.create_task(self._run(sink, email))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return DeliveryResult.accept(email.uuid, close=close)

    async def _run(self, sink: Sink, email: CapturedEmail) -> SinkResult:
        started = time.perf_counter()
        # No timer at all for a sink without a timeout: this runs for every email.
        deadline = asyncio.timeout(sink.timeout) if sink.timeout else None
        try:
            if deadline is None:
                result = await sink.submit(email)
            else:
                async with deadline:
                    result = await sink.submit(email)
        except Exception as exc:
            timed_out = deadline is not None and deadline.expired()
            return self._failed(sink, email, exc, timed_out=timed_out)
        if type(result) is Accepted:
            # Accepted ones are counted by the latency histogram (its _count).
            self._latency[sink.name].observe(time.perf_counter() - started)
            if result.note is not None:
                email.outcomes[sink.key] = result.note
            return result
        if type(result) not in (TempFail, Reject):
            error = TypeError(f"submit() returned {result!r}, not Accepted, TempFail or Reject")
            return self._failed(sink, email, error, timed_out=False)
        self._refused(sink, email, result)
        log.warning("sink %s refused the email: %d %s %s (%s)", sink.name, result.code,
                    result.enhanced, result.text, result.reason or "no reason given",
                    extra={"uuid": email.uuid})
        return result

    def _refused(self, sink: Sink, email: CapturedEmail, result: TempFail | Reject) -> None:
        email.outcomes[sink.key] = outcome_of(result)
        self._results[sink.name, "tempfail" if type(result) is TempFail else "reject"].inc()

    def _failed(self, sink: Sink, email: CapturedEmail, exc: Exception, *,
                timed_out: bool) -> SinkResult:
        """An exception or a timeout: the sink's failure policy says what it amounts to."""
        self._failures[sink.name].inc()
        reason = f"timeout after {sink.timeout:g}s" if timed_out else str(exc) or repr(exc)
        # Expected failures (a broker down, a worker dead, a timeout) are one line; bugs get
        # a trace.
        log.error("sink %s failed: %s", sink.name, reason, extra={"uuid": email.uuid},
                  exc_info=not (timed_out or isinstance(exc, SinkError | OSError)))
        policy = sink.failure_policy
        if policy == "ignore":
            self._results[sink.name, "ignored"].inc()
            email.outcomes[sink.key] = {"result": "ignored", "reason": reason}
            return ACCEPTED
        result: TempFail | Reject = (TempFail(reason=reason) if policy == "tempfail"
                                     else replace(REJECT_ON_FAILURE, reason=reason))
        self._refused(sink, email, result)
        return result

    def health(self) -> dict[str, object]:
        return {sink.name: sink.health() for sink in self.sinks}
