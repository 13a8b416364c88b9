"""Jobs and the one small interface every pipeline driver implements (as dramatiq's and arq's
brokers do): push a confirmed batch; receive, ack, nack and dead-letter deliveries.

Delivery is at least once: a job is removed only by `ack`; a job reserved by a consumer that
dies comes back after the pipeline's `visibility_timeout`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from mailpipe.config import PipelineOptions

JOB_NAME = "smtp.email"

# The plugins' notification hooks, as PluginManager.notify(hook, args, event=...): fired in
# the background, returns at once (and does nothing when no plugin has that hook).
Notify = Callable[..., None]


class DriverError(Exception):
    """The broker could not do what was asked (unreachable, refused, timed out)."""


@dataclass(slots=True)
class Job:
    """RoadRunner's job: name, id, payload, headers and options (jobs.proto `Job`)."""

    id: str
    payload: bytes
    name: str = JOB_NAME
    headers: dict[str, list[str]] = field(default_factory=dict)
    pipeline: str = ""
    priority: int = 10
    delay: float = 0.0  # seconds before the job may be delivered
    auto_ack: bool = False

    def encode(self) -> bytes:
        """One self-describing blob, for drivers that store a job as a single value."""
        return orjson.dumps({
            "id": self.id,
            "job": self.name,
            "headers": self.headers,
            "pipeline": self.pipeline,
            "priority": self.priority,
            "delay": self.delay,
            "auto_ack": self.auto_ack,
            "payload": self.payload.decode("latin-1"),
        })

    @classmethod
    def decode(cls, blob: bytes) -> Job:
        doc = orjson.loads(blob)
        return cls(
            id=doc["id"],
            payload=doc["payload"].encode("latin-1"),
            name=doc.get("job", JOB_NAME),
            headers=doc.get("headers") or {},
            pipeline=doc.get("pipeline", ""),
            priority=int(doc.get("priority", 10)),
            delay=float(doc.get("delay", 0.0)),
            auto_ack=bool(doc.get("auto_ack", False)),
        )


@dataclass(slots=True)
class Delivery:
    """One delivery of a job to a consumer. `attempt` is 1 the first time, and counts
    redeliveries whatever caused them (nack with requeue, a consumer that died)."""

    job: Job
    attempt: int
    ref: Any  # the driver's handle: a row id, a stream entry id, a delivery tag, a message
    queue: str = ""

    def context(self, driver: str) -> bytes:
        """The worker-protocol context RoadRunner sends a jobs worker (docs/protocols.md 3.3)."""
        return orjson.dumps({
            "id": self.job.id,
            "job": self.job.name,
            "driver": driver,
            "queue": self.queue or self.job.pipeline,
            "headers": self.job.headers or None,
            "pipeline": self.job.pipeline,
            # Additive (RoadRunner sends no such field; its PHP client ignores unknown ones).
            "attempt": self.attempt,
        })


@dataclass(slots=True)
class PipelineStats:
    pipeline: str
    driver: str
    queue: str
    ready: int = 0  # waiting to be delivered
    delayed: int = 0  # waiting for their delay to pass
    reserved: int = 0  # delivered, not yet acked
    dead: int = 0  # dead-lettered (where the driver can count them)
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline, "driver": self.driver, "queue": self.queue,
            "ready": self.ready, "delayed": self.delayed, "reserved": self.reserved,
            "dead": self.dead, **self.extra,
        }


class Driver(ABC):
    """A pipeline's broker. One instance per pipeline per process; safe for concurrent use by
    one event loop. Every method raises DriverError when the broker fails."""

    name: str = "driver"

    def __init__(self, pipeline: str, options: PipelineOptions, *, data_dir: Path) -> None:
        self.pipeline = pipeline
        self.options = options
        self.data_dir = data_dir

    @abstractmethod
    async def connect(self) -> None:
        """Connect and declare what is needed (queue, stream, group, table). Idempotent."""

    @abstractmethod
    async def push_batch(self, jobs: list[Job]) -> None:
        """Store every job durably; return only once the broker has confirmed all of them."""

    @abstractmethod
    async def receive(self, max_items: int, timeout: float) -> list[Delivery]:
        """Up to max_items deliveries, waiting at most `timeout` seconds for the first; []
        when none came. Jobs reserved longer than visibility_timeout are delivered again."""

    @abstractmethod
    async def ack(self, delivery: Delivery) -> None:
        """Done: the job is removed for good."""

    @abstractmethod
    async def nack(self, delivery: Delivery, *, requeue: bool, delay: float = 0.0) -> None:
        """Failed: back in the queue after `delay` seconds (requeue), else dead-lettered."""

    @abstractmethod
    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Move the job to the pipeline's dead letters (the configured dead_letter pipeline is
        the consumer's business; this is the driver's own place for it)."""

    @abstractmethod
    async def stats(self) -> PipelineStats: ...

    @abstractmethod
    async def purge(self) -> int:
        """Delete every waiting job; how many."""

    @abstractmethod
    async def close(self) -> None: ...

    def health(self) -> dict[str, Any]:
        return {"ok": True, "driver": self.name}
