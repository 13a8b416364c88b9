"""The contract every jobs pipeline driver meets, run against each real broker.

A driver's test module imports these tests and provides one fixture:

    from jobs_contract import *  # noqa: F403  (the contract's tests run in this module)

    @pytest.fixture
    async def driver_factory(...) -> AsyncIterator[DriverFactory]:
        # yields `async def make(**options) -> Driver`: a connected driver for ONE pipeline
        # that is the same for every call within a test (two calls = two processes sharing
        # it) and fresh for each test; `options` override the PipelineOptions fields
        # (visibility_timeout, max_attempts, prefetch...). It closes what it made and
        # removes the pipeline afterwards.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from mailpipe.jobs.base import Delivery, Driver, Job

DriverFactory = Callable[..., Awaitable[Driver]]

__all__ = [
    "DriverFactory",
    "test_contract_ack_removes_for_good",
    "test_contract_dead_letter_is_counted",
    "test_contract_delay_is_honoured",
    "test_contract_many_jobs_none_lost_none_twice",
    "test_contract_nack_requeue_redelivers_with_next_attempt",
    "test_contract_nack_without_requeue_dead_letters",
    "test_contract_purge",
    "test_contract_push_then_receive_round_trip",
    "test_contract_receive_times_out_empty",
    "test_contract_reserved_job_not_given_to_another_consumer",
    "test_contract_unacked_job_returns_to_another_consumer",
]


def make_job(index: int = 0, **fields: Any) -> Job:
    payload = fields.pop("payload", f'{{"n":{index},"text":"caf\u00e9"}}'.encode())
    return Job(id=str(uuid.uuid4()), payload=payload, **fields)


async def drain(driver: Driver, expected: int, timeout: float = 20.0,
                got: list[Delivery] | None = None) -> list[Delivery]:
    """Receive (and ack) until `got` (shared between consumers) holds `expected` deliveries
    or `timeout` passed."""
    got = [] if got is None else got
    deadline = time.monotonic() + timeout
    while len(got) < expected and time.monotonic() < deadline:
        batch = await driver.receive(100, 0.5)
        for delivery in batch:
            await driver.ack(delivery)
        got.extend(batch)
    return got


async def receive_one(driver: Driver, timeout: float = 10.0) -> Delivery | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = await driver.receive(1, 0.5)
        if batch:
            return batch[0]
    return None


async def test_contract_push_then_receive_round_trip(driver_factory: DriverFactory) -> None:
    driver = await driver_factory()
    job = make_job(
        headers={"uuid": ["u-1"], "x-multi": ["a", "b"]}, priority=7, name="smtp.email",
        payload=b'{"event":"EMAIL_RECEIVED","bytes":"\xc3\xa9"}',
    )
    job.pipeline = driver.pipeline
    await driver.push_batch([job])
    delivery = await receive_one(driver)
    assert delivery is not None
    got = delivery.job
    assert (got.id, got.name, got.payload) == (job.id, job.name, job.payload)
    assert got.headers == job.headers
    assert got.pipeline == driver.pipeline
    assert delivery.attempt == 1
    await driver.ack(delivery)


async def test_contract_receive_times_out_empty(driver_factory: DriverFactory) -> None:
    driver = await driver_factory()
    started = time.monotonic()
    assert await driver.receive(10, 0.3) == []
    assert time.monotonic() - started < 5


async def test_contract_ack_removes_for_good(driver_factory: DriverFactory) -> None:
    driver = await driver_factory(visibility_timeout=1.0)
    await driver.push_batch([make_job()])
    delivery = await receive_one(driver)
    assert delivery is not None
    await driver.ack(delivery)
    await asyncio.sleep(1.5)  # past the visibility timeout: an acked job must not come back
    assert await driver.receive(10, 0.5) == []
    stats = await driver.stats()
    assert stats.ready == 0 and stats.reserved == 0


async def test_contract_nack_requeue_redelivers_with_next_attempt(
    driver_factory: DriverFactory,
) -> None:
    driver = await driver_factory()
    job = make_job()
    await driver.push_batch([job])
    first = await receive_one(driver)
    assert first is not None and first.attempt == 1
    await driver.nack(first, requeue=True)
    second = await receive_one(driver)
    assert second is not None
    assert second.job.id == job.id and second.job.payload == job.payload
    assert second.attempt == 2
    await driver.ack(second)


async def test_contract_delay_is_honoured(driver_factory: DriverFactory) -> None:
    driver = await driver_factory()
    await driver.push_batch([make_job(delay=2.0)])
    assert await driver.receive(10, 0.8) == []
    delivery = await receive_one(driver, timeout=10)
    assert delivery is not None
    await driver.nack(delivery, requeue=True, delay=2.0)
    assert await driver.receive(10, 0.8) == []
    again = await receive_one(driver, timeout=10)
    assert again is not None and again.job.id == delivery.job.id
    await driver.ack(again)


async def test_contract_nack_without_requeue_dead_letters(driver_factory: DriverFactory) -> None:
    driver = await driver_factory()
    await driver.push_batch([make_job()])
    delivery = await receive_one(driver)
    assert delivery is not None
    await driver.nack(delivery, requeue=False)
    assert await driver.receive(10, 0.5) == []
    assert (await driver.stats()).dead == 1


async def test_contract_dead_letter_is_counted(driver_factory: DriverFactory) -> None:
    driver = await driver_factory()
    await driver.push_batch([make_job(), make_job(1)])
    deliveries = await drain_unacked(driver, 2)
    for delivery in deliveries:
        await driver.dead_letter(delivery, "max_attempts reached")
    assert await driver.receive(10, 0.5) == []
    stats = await driver.stats()
    assert stats.dead == 2 and stats.ready == 0


async def drain_unacked(driver: Driver, expected: int) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + 10
    while len(got) < expected and time.monotonic() < deadline:
        got.extend(await driver.receive(expected - len(got), 0.5))
    assert len(got) == expected
    return got


async def test_contract_unacked_job_returns_to_another_consumer(
    driver_factory: DriverFactory,
) -> None:
    crashed = await driver_factory(visibility_timeout=1.0)
    survivor = await driver_factory(visibility_timeout=1.0)
    job = make_job()
    await crashed.push_batch([job])
    taken = await receive_one(crashed)
    assert taken is not None
    await crashed.close()  # the consumer dies without acking
    again = await receive_one(survivor, timeout=15)
    assert again is not None and again.job.id == job.id
    assert again.attempt >= 2
    await survivor.ack(again)


async def test_contract_reserved_job_not_given_to_another_consumer(
    driver_factory: DriverFactory,
) -> None:
    first = await driver_factory(visibility_timeout=30.0)
    second = await driver_factory(visibility_timeout=30.0)
    await first.push_batch([make_job()])
    taken = await receive_one(first)
    assert taken is not None
    assert await second.receive(10, 1.0) == []
    await first.ack(taken)


async def test_contract_purge(driver_factory: DriverFactory) -> None:
    driver = await driver_factory()
    await driver.push_batch([make_job(i) for i in range(5)])
    assert await driver.purge() == 5
    assert await driver.receive(10, 0.5) == []


async def test_contract_many_jobs_none_lost_none_twice(driver_factory: DriverFactory) -> None:
    producer = await driver_factory()
    consumers = [await driver_factory(), await driver_factory()]
    jobs = [make_job(i) for i in range(2000)]
    for start in range(0, len(jobs), 100):
        await producer.push_batch(jobs[start:start + 100])
    await drain_all_once(consumers, jobs, timeout=60)


async def drain_all_once(consumers: list[Driver], jobs: list[Job], timeout: float,
                         *also: Awaitable[Any]) -> list[Delivery]:
    """Drain `jobs` with every consumer at once (beside `also`, e.g. the producer still
    pushing) and check each job came exactly once, with its payload intact."""
    got: list[Delivery] = []
    await asyncio.gather(*also, *(drain(c, len(jobs), timeout=timeout, got=got)
                                  for c in consumers))
    await asyncio.sleep(0.5)  # anything delivered twice would show up now
    for consumer in consumers:
        got.extend(await consumer.receive(100, 0.2))
    ids = [d.job.id for d in got]
    assert len(ids) == len(set(ids)), "a job was delivered twice"
    assert set(ids) == {j.id for j in jobs}, f"{len(jobs) - len(set(ids))} jobs lost"
    payloads = {j.id: j.payload for j in jobs}
    assert all(d.job.payload == payloads[d.job.id] for d in got)
    return got
