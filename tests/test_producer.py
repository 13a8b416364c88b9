"""BatchPusher on real drivers: batches by size and by timer, push_timeout and broker failures
reported to every waiter of the batch, close() flushing what is pending.

The batching drivers are the embedded SQLite one and the machine's Redis (127.0.0.1:6379);
the only test peer is StallingDriver, the memory driver with a switch that makes its pushes
hang the way a silent broker does.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from redis.asyncio import Redis

from conftest import free_port, require_service
from jobs_contract import drain, make_job
from mailpipe.config import MemoryPipelineOptions, RedisPipelineOptions, SQLitePipelineOptions
from mailpipe.jobs.base import Driver, DriverError, Job
from mailpipe.jobs.drivers.memory import MemoryDriver
from mailpipe.jobs.drivers.redis import RedisDriver
from mailpipe.jobs.drivers.sqlite import SQLiteDriver
from mailpipe.jobs.producer import BatchPusher
from mailpipe.metrics import Metrics

T = TypeVar("T")

NEVER = 3600.0  # a flush_interval that never fires within a test
BOUND = 30.0  # every await here ends well within this, or the pusher is stuck
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


class StallingDriver(MemoryDriver):
    """The memory driver; while `stalled`, a push never returns (a broker gone silent)."""

    stalled = False

    async def push_batch(self, jobs: list[Job]) -> None:
        if self.stalled:
            await asyncio.Event().wait()  # nothing sets it: only push_timeout ends this
        await super().push_batch(jobs)


async def bounded(awaitable: Awaitable[T]) -> T:
    """The result, or a failure if the pusher leaves its callers waiting."""
    return await asyncio.wait_for(awaitable, BOUND)


def pusher_for(driver: Driver, **settings: Any) -> BatchPusher:
    options: dict[str, Any] = {"batch_size": 100, "flush_interval": NEVER, "push_timeout": 10.0}
    return BatchPusher(driver, metrics=Metrics(), **{**options, **settings})


def sample(pusher: BatchPusher, name: str) -> float:
    value = pusher.metrics.registry.get_sample_value(name, {"pipeline": pusher.driver.pipeline})
    return value or 0.0


def batches(pusher: BatchPusher) -> tuple[float, float]:
    """(batches sent, jobs in them), as the pusher's histogram counts them."""
    return (
        sample(pusher, "mailpipe_jobs_batch_size_count"),
        sample(pusher, "mailpipe_jobs_batch_size_sum"),
    )


async def push_all(pusher: BatchPusher, jobs: list[Job]) -> list[BaseException | None]:
    """Every job pushed concurrently (as concurrent SMTP sessions do); each one's outcome."""
    return await bounded(
        asyncio.gather(*(pusher.push(job) for job in jobs), return_exceptions=True)
    )


async def stored_ids(driver: Driver, expected: int) -> list[str]:
    return sorted(d.job.id for d in await drain(driver, expected, timeout=10))


@pytest.fixture
async def sqlite_driver(tmp_path: Path) -> AsyncIterator[SQLiteDriver]:
    driver = SQLiteDriver("mail", SQLitePipelineOptions(poll_interval=0.02), data_dir=tmp_path)
    yield driver
    await driver.close()


@pytest.fixture
async def stalling_driver(tmp_path: Path) -> AsyncIterator[StallingDriver]:
    driver = StallingDriver(f"stall-{uuid.uuid4().hex[:8]}", MemoryPipelineOptions(),
                            data_dir=tmp_path)
    yield driver
    await driver.close()


def require_redis() -> None:
    require_service("Redis", REDIS_HOST, REDIS_PORT)


@pytest.fixture
async def redis_driver(tmp_path: Path) -> AsyncIterator[RedisDriver]:
    require_redis()
    stream = f"test-producer:{uuid.uuid4().hex[:10]}"
    driver = RedisDriver("mail", RedisPipelineOptions(stream=stream), data_dir=tmp_path)
    yield driver
    await driver.close()
    client = Redis(host=REDIS_HOST, port=REDIS_PORT, socket_timeout=5)
    try:
        await client.delete(stream, f"{stream}:delayed", f"{stream}:dead")
    finally:
        await client.aclose()


# ---- batching ---------------------------------------------------------------------------------


async def test_a_full_batch_goes_at_once_without_the_timer(sqlite_driver: SQLiteDriver) -> None:
    pusher = pusher_for(sqlite_driver, batch_size=4)
    jobs = [make_job(i) for i in range(8)]

    # With a timer that never fires, only batch_size can send these.
    assert await push_all(pusher, jobs) == [None] * 8

    assert batches(pusher) == (2, 8)
    assert sample(pusher, "mailpipe_jobs_confirmed_total") == 8
    assert await stored_ids(sqlite_driver, 8) == sorted(job.id for job in jobs)
    await pusher.close()


async def test_a_partial_batch_goes_when_the_timer_fires(sqlite_driver: SQLiteDriver) -> None:
    pusher = pusher_for(sqlite_driver, batch_size=100, flush_interval=0.05)
    together = [make_job(i) for i in range(3)]

    assert await push_all(pusher, together) == [None] * 3
    assert batches(pusher) == (1, 3)  # pushed in one loop turn: one batch

    lone = make_job(99)
    await bounded(pusher.push(lone))  # not stuck waiting for 99 more
    assert batches(pusher) == (2, 4)
    assert await stored_ids(sqlite_driver, 4) == sorted(j.id for j in [*together, lone])
    await pusher.close()


async def test_close_flushes_pending_jobs(sqlite_driver: SQLiteDriver) -> None:
    pusher = pusher_for(sqlite_driver, batch_size=100)
    jobs = [make_job(i) for i in range(5)]
    waiting = [asyncio.create_task(pusher.push(job)) for job in jobs]
    await asyncio.sleep(0)  # each push has queued its job; neither size nor timer will send

    assert not any(task.done() for task in waiting)
    await bounded(pusher.close())

    assert batches(pusher) == (1, 5)
    assert sample(pusher, "mailpipe_jobs_confirmed_total") == 5  # before close() returned
    assert await bounded(asyncio.gather(*waiting)) == [None] * 5
    assert await stored_ids(sqlite_driver, 5) == sorted(job.id for job in jobs)


async def test_close_waits_for_batches_in_flight(stalling_driver: StallingDriver) -> None:
    pusher = pusher_for(stalling_driver, batch_size=2, push_timeout=0.2)
    stalling_driver.stalled = True
    in_flight = [asyncio.create_task(pusher.push(make_job(i))) for i in range(2)]
    await asyncio.sleep(0)  # the batch is full: it is being sent, and hangs

    await bounded(pusher.close())  # returns once that batch has its answer (here: timed out)

    assert sample(pusher, "mailpipe_jobs_push_failed_total") == 2
    outcomes = await bounded(asyncio.gather(*in_flight, return_exceptions=True))
    assert all(isinstance(o, DriverError) for o in outcomes), outcomes


# ---- failures: every waiter of the batch learns of it ----------------------------------------


async def test_push_timeout_fails_every_waiter_of_the_batch(
    stalling_driver: StallingDriver,
) -> None:
    pusher = pusher_for(stalling_driver, batch_size=3, push_timeout=0.2)
    stalling_driver.stalled = True

    outcomes = await push_all(pusher, [make_job(i) for i in range(3)])

    assert all(isinstance(o, DriverError) for o in outcomes), outcomes
    assert all(str(o) == f"pipeline {stalling_driver.pipeline}: timed out" for o in outcomes)
    assert pusher.last_error == f"{stalling_driver.pipeline}: timed out"
    assert sample(pusher, "mailpipe_jobs_push_failed_total") == 3
    assert sample(pusher, "mailpipe_jobs_confirmed_total") == 0
    assert (await stalling_driver.stats()).ready == 0  # none of them was stored

    # The broker answers again: the next batch goes through and the error is forgotten.
    stalling_driver.stalled = False
    after = [make_job(i) for i in range(3)]
    assert await push_all(pusher, after) == [None] * 3
    assert pusher.last_error is None
    assert await stored_ids(stalling_driver, 3) == sorted(job.id for job in after)
    await pusher.close()


async def test_unreachable_broker_fails_every_waiter_of_the_batch(tmp_path: Path) -> None:
    closed = free_port()  # nothing listens there
    driver = RedisDriver(
        "mail", RedisPipelineOptions(addr=f"redis://127.0.0.1:{closed}/0"), data_dir=tmp_path
    )
    pusher = pusher_for(driver, batch_size=4)
    try:
        outcomes = await push_all(pusher, [make_job(i) for i in range(4)])
    finally:
        await pusher.close()
        await driver.close()

    assert all(isinstance(o, DriverError) for o in outcomes), outcomes
    assert all(str(o).startswith("pipeline mail: redis connect") for o in outcomes), outcomes
    assert len({str(o) for o in outcomes}) == 1  # one failure, told to each waiter
    assert pusher.last_error is not None and str(closed) in pusher.last_error
    assert sample(pusher, "mailpipe_jobs_push_failed_total") == 4


async def test_broker_refusing_a_batch_fails_each_waiter_then_recovers(
    redis_driver: RedisDriver,
) -> None:
    """Redis answers, but refuses the batch (its stream replaced by a plain string key)."""
    pusher = pusher_for(redis_driver, batch_size=3)
    first = [make_job(i) for i in range(3)]
    assert await push_all(pusher, first) == [None] * 3

    client = Redis(host=REDIS_HOST, port=REDIS_PORT, socket_timeout=5)
    try:
        await client.delete(redis_driver.stream)
        await client.set(redis_driver.stream, "not a stream")
        refused = await push_all(pusher, [make_job(i) for i in range(3)])
        await client.delete(redis_driver.stream)
    finally:
        await client.aclose()

    assert all(isinstance(o, DriverError) for o in refused), refused
    assert all("WRONGTYPE" in str(o) for o in refused), refused
    assert pusher.last_error is not None and "WRONGTYPE" in pusher.last_error
    assert sample(pusher, "mailpipe_jobs_push_failed_total") == 3

    # The key is gone: the driver declares its stream again and the next batch is confirmed.
    after = [make_job(i) for i in range(3)]
    assert await push_all(pusher, after) == [None] * 3
    assert pusher.last_error is None
    assert await stored_ids(redis_driver, 3) == sorted(job.id for job in after)
    await pusher.close()
