"""The in-memory pipeline: for development only. LOSSY: every job, waiting or reserved, is gone
when the process exits or restarts; the queue is never shared with another process.

Otherwise it behaves as the durable drivers do: delay, priority then push order, visibility
timeout (a reservation that expires makes the job available again, with attempt + 1), nack with
requeue and delay, and dead letters kept (and counted) until `purge_dead()`.

Driver instances of one process for the same pipeline (and data dir) share one queue, so a
consumer instance that stops acking hands its jobs on to another, as across processes elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mailpipe.config import PipelineOptions
from mailpipe.jobs.base import Delivery, Driver, DriverError, Job, PipelineStats


@dataclass(slots=True)
class _Entry:
    seq: int
    job: Job
    rank: int  # the order of delivery: the job's priority, or the pipeline's for 0
    available_at: float  # monotonic; while reserved, the end of the reservation
    state: str = "ready"  # ready | reserved | dead
    attempts: int = 0
    version: int = 0  # bumped on every change: heap items of older versions are stale
    reason: str = ""
    dead_at: float = 0.0  # wall clock, for people


class _Queue:
    """One pipeline's jobs. Thread-safe, loop-agnostic: drivers on different loops may share it.

    Entries available now sit in `ready` (a heap by priority, then push order); those waiting
    for a delay or a reservation to end sit in `waiting` (a heap by time). Moves are lazy:
    every heap item carries the entry's version and is dropped when it no longer matches.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: dict[int, _Entry] = {}  # live and dead, by seq
        self.ready: list[tuple[int, int, int]] = []  # (rank, seq, version)
        self.waiting: list[tuple[float, int, int]] = []  # (available_at, seq, version)
        self.listeners: set[Callable[[], None]] = set()
        self._seq = itertools.count(1)

    def push(self, jobs: list[Job], now: float, default_priority: int) -> None:
        with self.lock:
            for job in jobs:
                # A copy: what the producer does with its Job afterwards is not the queue's.
                job = replace(job, headers={k: list(v) for k, v in job.headers.items()})
                rank = job.priority or default_priority
                entry = _Entry(next(self._seq), job, rank, now + max(job.delay, 0.0))
                self.entries[entry.seq] = entry
                self._schedule(entry, now)

    def reserve(self, max_items: int, now: float, visibility: float) -> list[_Entry]:
        with self.lock:
            self._promote(now)
            taken: list[_Entry] = []
            while self.ready and len(taken) < max_items:
                _, seq, version = heapq.heappop(self.ready)
                entry = self.entries.get(seq)
                if entry is None or entry.version != version:
                    continue
                entry.state, entry.attempts = "reserved", entry.attempts + 1
                entry.available_at = now + visibility
                self._schedule(entry, now)
                taken.append(entry)
            return taken

    def settle(self, seq: int, attempt: int, change: Callable[[_Entry], None],
               now: float) -> bool:
        """Apply `change` if the (seq, attempt) reservation is still the current one."""
        with self.lock:
            entry = self.entries.get(seq)
            if entry is None or entry.state != "reserved" or entry.attempts != attempt:
                return False
            change(entry)
            if entry.state != "dead":
                self._schedule(entry, now)
            else:
                entry.version += 1
            return True

    def remove(self, seq: int) -> None:
        with self.lock:
            entry = self.entries.get(seq)
            if entry is not None and entry.state != "dead":
                del self.entries[seq]

    def next_due(self) -> float | None:
        with self.lock:
            return self.waiting[0][0] if self.waiting else None

    def counts(self, now: float) -> tuple[int, int, int, int]:
        ready = delayed = reserved = dead = 0
        with self.lock:
            for entry in self.entries.values():
                if entry.state == "dead":
                    dead += 1
                elif entry.available_at <= now:
                    ready += 1  # including reservations that have expired
                elif entry.state == "reserved":
                    reserved += 1
                else:
                    delayed += 1
        return ready, delayed, reserved, dead

    def drop(self, dead: bool) -> int:
        with self.lock:
            doomed = [s for s, e in self.entries.items() if (e.state == "dead") == dead]
            for seq in doomed:
                del self.entries[seq]
            if not dead:
                self.ready.clear()
                self.waiting.clear()
            return len(doomed)

    def dead(self, limit: int) -> list[_Entry]:
        with self.lock:
            return [e for e in self.entries.values() if e.state == "dead"][:limit]

    def notify(self) -> None:
        for listener in list(self.listeners):
            listener()

    def _schedule(self, entry: _Entry, now: float) -> None:
        entry.version += 1
        if entry.available_at <= now:
            heapq.heappush(self.ready, (entry.rank, entry.seq, entry.version))
        else:
            heapq.heappush(self.waiting, (entry.available_at, entry.seq, entry.version))

    def _promote(self, now: float) -> None:
        # Delays and reservations that have run out: to the ready heap (expired reservations
        # keep state "reserved" until taken again, which is when attempts goes up).
        while self.waiting and self.waiting[0][0] <= now:
            _, seq, version = heapq.heappop(self.waiting)
            entry = self.entries.get(seq)
            if entry is not None and entry.version == version:
                heapq.heappush(self.ready, (entry.rank, seq, version))


_QUEUES: dict[tuple[str, str], _Queue] = {}
_QUEUES_LOCK = threading.Lock()


def _shared_queue(data_dir: Path, pipeline: str) -> _Queue:
    with _QUEUES_LOCK:
        return _QUEUES.setdefault((str(Path(data_dir).resolve()), pipeline), _Queue())


class MemoryDriver(Driver):
    name = "memory"

    def __init__(self, pipeline: str, options: PipelineOptions, *, data_dir: Path) -> None:
        super().__init__(pipeline, options, data_dir=data_dir)
        self._queue = _shared_queue(data_dir, pipeline)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup = asyncio.Event()
        self._connected = False

    async def connect(self) -> None:
        if self._connected:
            return
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._queue.listeners.add(self._listener)
        self._connected = True

    async def close(self) -> None:
        if not self._connected:
            return
        self._connected = False
        self._queue.listeners.discard(self._listener)
        self._wake()

    def health(self) -> dict[str, Any]:
        return {"ok": self._connected, "driver": self.name, "lossy": True}

    async def push_batch(self, jobs: list[Job]) -> None:
        self._check()
        self._queue.push(jobs, time.monotonic(), self.options.priority)
        self._queue.notify()

    async def receive(self, max_items: int, timeout: float) -> list[Delivery]:
        self._check()
        if max_items < 1:
            return []
        deadline = time.monotonic() + max(timeout, 0.0)
        visibility = self.options.visibility_timeout
        while True:
            wakeup = self._wakeup
            now = time.monotonic()
            taken = self._queue.reserve(max_items, now, visibility)
            if taken or now >= deadline:
                return [self._delivery(entry) for entry in taken]
            # Sleep until a push, the next delay or reservation running out, or the deadline.
            due = self._queue.next_due()
            wait = deadline - now if due is None else min(deadline, due) - now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wakeup.wait(), max(wait, 0.001))
            if not self._connected:
                return []

    async def ack(self, delivery: Delivery) -> None:
        self._check()
        seq, _ = delivery.ref
        self._queue.remove(seq)  # whoever holds it now: the job is done

    async def nack(self, delivery: Delivery, *, requeue: bool, delay: float = 0.0) -> None:
        self._check()
        if not requeue:
            await self.dead_letter(delivery, "nacked without requeue")
            return
        now = time.monotonic()

        def requeue_entry(entry: _Entry) -> None:
            entry.state, entry.available_at = "ready", now + max(delay, 0.0)

        seq, attempt = delivery.ref
        if self._queue.settle(seq, attempt, requeue_entry, now) and delay <= 0:
            self._queue.notify()

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        self._check()

        def bury(entry: _Entry) -> None:
            entry.state, entry.reason, entry.dead_at = "dead", reason, time.time()

        seq, attempt = delivery.ref
        self._queue.settle(seq, attempt, bury, time.monotonic())

    async def stats(self) -> PipelineStats:
        self._check()
        ready, delayed, reserved, dead = self._queue.counts(time.monotonic())
        return PipelineStats(
            pipeline=self.pipeline, driver=self.name, queue=self.pipeline,
            ready=ready, delayed=delayed, reserved=reserved, dead=dead,
            extra={"lossy": True},
        )

    async def purge(self) -> int:
        """Delete the pipeline's live jobs (waiting, delayed and reserved); dead letters stay,
        see `purge_dead()`."""
        self._check()
        return self._queue.drop(dead=False)

    async def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """The oldest dead letters: job, attempts, reason, dead_at (unix time)."""
        self._check()
        return [
            {"job": e.job, "attempts": e.attempts, "reason": e.reason, "dead_at": e.dead_at}
            for e in self._queue.dead(limit)
        ]

    async def purge_dead(self) -> int:
        self._check()
        return self._queue.drop(dead=True)

    def _delivery(self, entry: _Entry) -> Delivery:
        return Delivery(
            job=entry.job, attempt=entry.attempts, ref=(entry.seq, entry.attempts),
            queue=self.pipeline,
        )

    def _check(self) -> None:
        if not self._connected:
            raise DriverError(f"memory pipeline {self.pipeline!r} is not connected")

    def _listener(self) -> None:
        # Called from whichever thread pushed: hop onto this driver's own loop.
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # that loop is closed
                self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        wakeup, self._wakeup = self._wakeup, asyncio.Event()
        wakeup.set()
