"""The in-memory pipeline driver (development only): the shared contract, then its own cases."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from jobs_contract import *  # noqa: F403  (the contract's tests run in this module)
from jobs_contract import DriverFactory, drain, make_job, receive_one
from mailpipe.config import MemoryPipelineOptions
from mailpipe.jobs.base import DriverError, Job
from mailpipe.jobs.drivers import DRIVERS
from mailpipe.jobs.drivers import memory as memory_driver
from mailpipe.jobs.drivers.memory import MemoryDriver


@pytest.fixture
async def driver_factory(tmp_path: Path) -> AsyncIterator[DriverFactory]:
    pipeline = f"contract-{uuid.uuid4().hex[:8]}"
    made: list[MemoryDriver] = []

    async def make(**options: Any) -> MemoryDriver:
        driver = MemoryDriver(pipeline, MemoryPipelineOptions(**options), data_dir=tmp_path)
        await driver.connect()
        made.append(driver)
        return driver

    yield make
    if made:
        await made[0].connect()
        await made[0].purge()
        await made[0].purge_dead()
    for driver in made:
        await driver.close()


async def open_driver(tmp_path: Path, pipeline: str = "mail", **options: Any) -> MemoryDriver:
    driver = MemoryDriver(pipeline, MemoryPipelineOptions(**options), data_dir=tmp_path)
    await driver.connect()
    return driver


def test_registered() -> None:
    assert DRIVERS["memory"] == "mailpipe.jobs.drivers.memory:MemoryDriver"


async def test_documented_as_lossy(tmp_path: Path) -> None:
    driver = await open_driver(tmp_path)
    assert "LOSSY" in (memory_driver.__doc__ or "")
    assert driver.health() == {"ok": True, "driver": "memory", "lossy": True}
    await driver.close()
    assert not driver.health()["ok"]
    with pytest.raises(DriverError):
        await driver.push_batch([make_job()])


async def test_every_field_survives_and_is_a_copy(tmp_path: Path) -> None:
    driver = await open_driver(tmp_path)
    job = Job(id="j", payload=bytes(range(256)), name="n", headers={"a": ["1"]},
              pipeline="mail", priority=2, delay=0.1, auto_ack=True)
    await driver.push_batch([job])
    job.headers["a"].append("changed later by the producer")
    delivery = await receive_one(driver)
    assert delivery is not None
    assert delivery.job.headers == {"a": ["1"]}
    assert (delivery.job.id, delivery.job.payload, delivery.job.priority) == ("j", job.payload, 2)
    assert delivery.job.auto_ack and delivery.attempt == 1 and delivery.queue == "mail"
    await driver.close()


async def test_priority_zero_takes_the_pipelines(tmp_path: Path) -> None:
    drv = await open_driver(tmp_path, priority=4)
    try:
        jobs = [make_job(0, priority=5), make_job(1, priority=0), make_job(2, priority=3)]
        await drv.push_batch(jobs)
        got = await drv.receive(10, 1)
        assert [d.job.id for d in got] == [jobs[i].id for i in (2, 1, 0)]
        assert got[1].job.priority == 0  # the job itself is unchanged
    finally:
        await drv.close()


async def test_priority_then_push_order(tmp_path: Path) -> None:
    driver = await open_driver(tmp_path)
    jobs = [make_job(0, priority=5), make_job(1, priority=1), make_job(2, priority=5),
            make_job(3, priority=1)]
    await driver.push_batch(jobs)
    got = await driver.receive(10, 1)
    assert [d.job.id for d in got] == [jobs[i].id for i in (1, 3, 0, 2)]
    await driver.close()


async def test_receive_wakes_at_once_on_push(tmp_path: Path) -> None:
    consumer = await open_driver(tmp_path)
    producer = await open_driver(tmp_path)
    waiting = asyncio.create_task(consumer.receive(5, 10))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await producer.push_batch([make_job()])
    assert len(await waiting) == 1
    assert time.monotonic() - started < 0.5
    await consumer.close()
    await producer.close()


async def test_expiry_counts_attempts_and_stale_refs_are_ignored(tmp_path: Path) -> None:
    driver = await open_driver(tmp_path, visibility_timeout=0.3)
    await driver.push_batch([make_job()])
    stale = await receive_one(driver)
    assert stale is not None and (await driver.stats()).reserved == 1
    current = await receive_one(driver, timeout=3)
    assert current is not None and current.attempt == 2
    await driver.nack(stale, requeue=True)
    await driver.dead_letter(stale, "too late")
    stats = await driver.stats()
    assert (stats.reserved, stats.ready, stats.dead) == (1, 0, 0)
    await driver.ack(current)
    assert (await driver.stats()).reserved == 0
    await driver.close()


async def test_dead_letters_inspectable(tmp_path: Path) -> None:
    driver = await open_driver(tmp_path)
    await driver.push_batch([make_job()])
    delivery = await receive_one(driver)
    assert delivery is not None
    await driver.dead_letter(delivery, "failed 3 times")
    (dead,) = await driver.dead_letters()
    assert dead["job"].id == delivery.job.id and dead["reason"] == "failed 3 times"
    assert await driver.purge() == 0 and await driver.purge_dead() == 1
    assert (await driver.stats()).dead == 0
    await driver.close()


async def test_stats_split_ready_delayed_reserved(tmp_path: Path) -> None:
    driver = await open_driver(tmp_path)
    await driver.push_batch([make_job(0), make_job(1), make_job(2, delay=30)])
    assert len(await driver.receive(1, 1)) == 1
    stats = await driver.stats()
    assert (stats.ready, stats.delayed, stats.reserved, stats.dead) == (1, 1, 1, 0)
    await driver.close()


async def test_pipelines_and_data_dirs_are_separate(tmp_path: Path) -> None:
    a = await open_driver(tmp_path, "a")
    b = await open_driver(tmp_path, "b")
    elsewhere = await open_driver(tmp_path / "other", "a")
    await a.push_batch([make_job()])
    assert await b.receive(1, 0.1) == [] and await elsewhere.receive(1, 0.1) == []
    for driver in (a, b, elsewhere):
        await driver.close()


async def test_ten_thousand_jobs_none_lost_none_twice(tmp_path: Path) -> None:
    producer = await open_driver(tmp_path)
    consumers = [await open_driver(tmp_path) for _ in range(3)]
    jobs = [make_job(i) for i in range(10_000)]
    for start in range(0, len(jobs), 100):
        await producer.push_batch(jobs[start:start + 100])
    got: list[Any] = []
    await asyncio.gather(*(drain(c, len(jobs), timeout=30, got=got) for c in consumers))
    ids = [d.job.id for d in got]
    assert len(ids) == len(set(ids)) == 10_000
    assert set(ids) == {j.id for j in jobs}
    for driver in (producer, *consumers):
        await driver.close()
