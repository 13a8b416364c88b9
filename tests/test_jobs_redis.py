"""The Redis Streams driver against the real Redis on 127.0.0.1:6379: the shared contract,
then what is Redis-specific (stored layout, attempts across reclaims, stale nacks, delayed
moves, maxlen, connection loss, a consumer process killed, 10,000 jobs)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from unittest.mock import patch

import orjson
import pytest
from redis.asyncio import Redis

from conftest import ROOT, free_port, require_service
from jobs_contract import *  # noqa: F403  (the contract's tests run in this module)
from jobs_contract import DriverFactory, drain, drain_all_once, make_job, receive_one
from mailpipe.config import RedisPipelineOptions
from mailpipe.jobs.base import Delivery, DriverError, Job
from mailpipe.jobs.drivers.redis import RedisDriver

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"


def _require_redis() -> None:
    require_service("Redis", REDIS_HOST, REDIS_PORT)


@pytest.fixture
async def admin() -> AsyncIterator[Redis]:
    """A plain client for looking at (and breaking) what the driver does."""
    _require_redis()
    client = Redis.from_url(REDIS_URL, socket_timeout=5)
    yield client
    await client.aclose()


Maker = Callable[..., Awaitable[RedisDriver]]


@pytest.fixture
async def make_driver(admin: Redis, tmp_path: Path) -> AsyncIterator[Maker]:
    """Drivers of one fresh pipeline (a uuid in the stream name); everything removed after."""
    pipeline = f"test-{uuid.uuid4().hex[:12]}"
    made: list[RedisDriver] = []

    async def make(*, addr: str = REDIS_URL, **options: Any) -> RedisDriver:
        opts = RedisPipelineOptions(addr=addr, **options)
        driver = RedisDriver(pipeline, opts, data_dir=tmp_path)
        await driver.connect()
        made.append(driver)
        return driver

    yield make
    for driver in made:
        await driver.close()
    stream = f"mailpipe:{pipeline}"
    await admin.delete(stream, f"{stream}:delayed", f"{stream}:dead")


@pytest.fixture
async def driver_factory(make_driver: Maker) -> AsyncIterator[DriverFactory]:
    yield make_driver


async def kill_clients(admin: Redis, driver: RedisDriver) -> int:
    """Close the driver's connections from the server side (CLIENT KILL ID, only ours)."""
    killed = 0
    for client in await admin.client_list():
        if client.get("name") == driver.consumer:
            killed += await admin.execute_command("CLIENT", "KILL", "ID", client["id"]) == 1
    return killed


# ---- what is stored ------------------------------------------------------------------------


async def test_job_fields_are_stored_natively_in_the_stream(
    make_driver: Maker, admin: Redis,
) -> None:
    driver = await make_driver()
    payload = bytes(range(256)) * 4
    job = Job(id="job-1", payload=payload, headers={"uuid": ["u"]}, pipeline=driver.pipeline,
              priority=3, auto_ack=True)
    await driver.push_batch([job])
    [(entry_id, fields)] = await admin.xrange(driver.stream)
    assert fields[b"id"] == b"job-1" and fields[b"job"] == b"smtp.email"
    assert fields[b"payload"] == payload
    assert orjson.loads(fields[b"headers"]) == {"uuid": ["u"]}
    assert (fields[b"priority"], fields[b"auto_ack"]) == (b"3", b"1")
    delivery = await receive_one(driver)
    assert delivery is not None and delivery.ref == entry_id.decode()
    got = delivery.job
    assert (got.payload, got.priority, got.auto_ack, got.pipeline) == (
        payload, 3, True, driver.pipeline)
    assert delivery.queue == driver.stream
    await driver.ack(delivery)
    assert await admin.xlen(driver.stream) == 0  # acked entries are deleted, not kept


async def test_delayed_job_keeps_its_fields_exactly(make_driver: Maker, admin: Redis) -> None:
    driver = await make_driver()
    job = Job(id="late", payload=bytes(range(256)), headers={"h": ["1", "2"]}, priority=1,
              delay=0.3, auto_ack=True)
    await driver.push_batch([job])
    assert await admin.xlen(driver.stream) == 0 and await admin.zcard(driver.delayed_key) == 1
    delivery = await receive_one(driver)
    assert delivery is not None and delivery.attempt == 1
    got = delivery.job
    assert (got.id, got.payload, got.headers, got.priority, got.auto_ack, got.delay) == (
        job.id, job.payload, job.headers, 1, True, 0.3)
    await driver.ack(delivery)


async def test_consumers_that_died_holding_nothing_are_pruned(
    make_driver: Maker, admin: Redis,
) -> None:
    driver = await make_driver()
    await admin.xgroup_createconsumer(driver.stream, driver.group, "gone-host-1-dead")
    await driver.close()
    with patch("mailpipe.jobs.drivers.redis._PRUNE_IDLE_MS", 0):
        await asyncio.sleep(0.01)
        await make_driver()
    names = {c["name"] for c in await admin.xinfo_consumers(driver.stream, driver.group)}
    assert b"gone-host-1-dead" not in names


async def test_consumer_names_are_unique_per_instance(make_driver: Maker, admin: Redis) -> None:
    first, second = await make_driver(), await make_driver()
    assert first.consumer != second.consumer
    assert first.consumer.startswith(f"{socket.gethostname()}-{os.getpid()}-")
    await first.push_batch([make_job(0), make_job(1)])
    assert len(await first.receive(1, 1.0)) == 1
    assert len(await second.receive(1, 1.0)) == 1
    consumers = {c["name"].decode(): c["pending"]
                 for c in await admin.xinfo_consumers(first.stream, first.group)}
    assert consumers == {first.consumer: 1, second.consumer: 1}


async def test_custom_stream_group_and_maxlen(make_driver: Maker, admin: Redis) -> None:
    stream = f"custom-{uuid.uuid4().hex[:8]}"
    try:
        driver = await make_driver(stream=stream, group="workers", maxlen=100)
        for start in range(0, 2000, 200):
            await driver.push_batch([make_job(i) for i in range(start, start + 200)])
        [group] = await admin.xinfo_groups(stream)
        assert group["name"] == b"workers"
        assert 100 <= await admin.xlen(stream) < 400  # MAXLEN ~ trims whole nodes only
    finally:
        await admin.delete(stream, f"{stream}:delayed", f"{stream}:dead")


# ---- attempts, visibility, nack, dead letters ---------------------------------------------


async def test_attempt_counts_every_redelivery(make_driver: Maker) -> None:
    first = await make_driver(visibility_timeout=0.5)
    second = await make_driver(visibility_timeout=0.5)
    job = make_job()
    await first.push_batch([job])
    attempts = []
    delivery = await receive_one(first)
    assert delivery is not None
    attempts.append(delivery.attempt)
    # Left unacked: reclaimed by the other consumer after the visibility timeout.
    delivery = await receive_one(second)
    assert delivery is not None
    attempts.append(delivery.attempt)
    await second.nack(delivery, requeue=True)  # a fresh entry must carry the count on
    delivery = await receive_one(first)
    assert delivery is not None
    attempts.append(delivery.attempt)
    delivery = await receive_one(first)  # reclaimed by the same consumer
    assert delivery is not None and delivery.job.id == job.id
    attempts.append(delivery.attempt)
    await first.nack(delivery, requeue=True, delay=0.3)
    delivery = await receive_one(second)
    assert delivery is not None
    attempts.append(delivery.attempt)
    assert attempts == [1, 2, 3, 4, 5]
    await second.ack(delivery)


async def test_stale_nack_after_reclaim_does_not_copy_the_job(make_driver: Maker) -> None:
    slow = await make_driver(visibility_timeout=0.5)
    other = await make_driver(visibility_timeout=0.5)
    await slow.push_batch([make_job()])
    stale = await receive_one(slow)
    assert stale is not None
    taken = await receive_one(other)  # the visibility timeout passed: now it is other's
    assert taken is not None and taken.attempt == 2
    await slow.nack(stale, requeue=True)  # too late: must neither requeue nor drop it
    await slow.dead_letter(stale, "too late")
    await other.ack(taken)
    stats = await other.stats()
    assert (stats.ready, stats.reserved, stats.delayed, stats.dead) == (0, 0, 0, 0)
    assert await other.receive(10, 1.0) == []


async def test_dead_letters_are_inspectable(make_driver: Maker, admin: Redis) -> None:
    driver = await make_driver()
    job = make_job(headers={"uuid": ["u-9"]})
    await driver.push_batch([job])
    delivery = await receive_one(driver)
    assert delivery is not None
    await driver.dead_letter(delivery, "max_attempts reached")
    [(_, fields)] = await admin.xrange(driver.dead_key)
    assert fields[b"id"] == job.id.encode() and fields[b"payload"] == job.payload
    assert fields[b"reason"] == b"max_attempts reached"
    assert fields[b"attempts"] == b"1" and fields[b"origin"] == delivery.ref.encode()
    stats = await driver.stats()
    assert (stats.dead, stats.ready, stats.reserved) == (1, 0, 0)


async def test_delayed_jobs_are_moved_once_with_competing_consumers(make_driver: Maker) -> None:
    consumers = [await make_driver() for _ in range(3)]
    jobs = [make_job(i, delay=0.5) for i in range(300)]
    started = time.monotonic()
    await consumers[0].push_batch(jobs)
    assert (await consumers[0].stats()).delayed == 300
    got: list[Delivery] = []
    await asyncio.gather(*(drain(c, len(jobs), timeout=20, got=got) for c in consumers))
    assert time.monotonic() - started >= 0.5
    ids = [d.job.id for d in got]
    assert sorted(ids) == sorted(j.id for j in jobs)
    assert {d.attempt for d in got} == {1}


async def test_purge_removes_waiting_and_delayed_but_not_reserved(make_driver: Maker) -> None:
    driver = await make_driver()
    await driver.push_batch([make_job(i) for i in range(5)] + [make_job(9, delay=60)])
    held = await driver.receive(2, 1.0)
    assert len(held) == 2
    assert await driver.purge() == 4  # 3 ready + 1 delayed
    stats = await driver.stats()
    assert (stats.ready, stats.delayed, stats.reserved) == (0, 0, 2)
    for delivery in held:
        await driver.ack(delivery)
    assert (await driver.stats()).reserved == 0
    await driver.push_batch([make_job(10)])  # the group still works after a purge
    assert len(await drain(driver, 1, timeout=5)) == 1


async def test_close_forgets_an_idle_consumer_only(make_driver: Maker, admin: Redis) -> None:
    idle, holding = await make_driver(), await make_driver()
    await idle.push_batch([make_job()])
    assert await receive_one(holding) is not None
    await idle.close()
    await holding.close()
    names = {c["name"].decode() for c in await admin.xinfo_consumers(idle.stream, idle.group)}
    assert names == {holding.consumer}  # its pending entry must stay reclaimable


async def test_stream_deleted_under_the_driver_is_declared_again(
    make_driver: Maker, admin: Redis,
) -> None:
    driver = await make_driver()
    await admin.delete(driver.stream)
    assert await driver.receive(10, 0.2) == []
    await driver.push_batch([make_job()])
    assert len(await drain(driver, 1, timeout=5)) == 1


# ---- broker failures ----------------------------------------------------------------------


async def test_client_kill_mid_receive_raises_promptly_then_recovers(
    make_driver: Maker, admin: Redis,
) -> None:
    driver = await make_driver()
    receiving = asyncio.create_task(driver.receive(10, 10.0))
    await asyncio.sleep(0.3)
    started = time.monotonic()
    while not receiving.done():  # until one kill lands on the blocked XREADGROUP
        await kill_clients(admin, driver)
        await asyncio.sleep(0.05)
    with pytest.raises(DriverError):
        await receiving
    assert time.monotonic() - started < 2.0
    assert driver.health()["ok"] is False
    job = make_job()
    await driver.push_batch([job])  # the next call reconnects
    delivery = await receive_one(driver)
    assert delivery is not None and delivery.job.id == job.id
    await driver.ack(delivery)
    assert driver.health()["ok"] is True


async def test_connections_killed_during_traffic_lose_nothing(
    make_driver: Maker, admin: Redis,
) -> None:
    producer = await make_driver(visibility_timeout=1.0)
    consumer = await make_driver(visibility_timeout=1.0)
    jobs = [make_job(i) for i in range(1000)]
    received: set[str] = set()
    errors: list[float] = []
    done = asyncio.Event()

    async def attempt(call: Awaitable[Any]) -> tuple[bool, Any]:
        started = time.monotonic()
        try:
            return True, await call
        except DriverError:
            errors.append(time.monotonic() - started)
            return False, None

    async def produce() -> None:
        for start in range(0, len(jobs), 20):
            # A failed batch is pushed again, as an SMTP client retries after a 451.
            while not (await attempt(producer.push_batch(jobs[start:start + 20])))[0]:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.005)

    async def consume() -> None:
        deadline = time.monotonic() + 60
        while len(received) < len(jobs) and time.monotonic() < deadline:
            _, batch = await attempt(consumer.receive(50, 0.5))
            for delivery in batch or []:
                received.add(delivery.job.id)
                await attempt(consumer.ack(delivery))  # a lost ack: it comes back, harmless
        done.set()

    async def kill() -> None:
        while not done.is_set():
            await asyncio.sleep(0.15)
            await kill_clients(admin, producer)
            await kill_clients(admin, consumer)

    await asyncio.gather(produce(), consume(), kill())
    assert received == {j.id for j in jobs}
    assert all(took < 3.0 for took in errors), f"slow failures: {sorted(errors)[-3:]}"
    print(f"{len(errors)} calls failed during the kills")


class Proxy:
    """A TCP relay to Redis that a test can cut (refuse) or turn into a black hole."""

    def __init__(self) -> None:
        self.port = free_port()
        self.blackhole = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port,
                                                  reuse_address=True)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        if self.blackhole:
            return  # accept, never answer
        up_reader, up_writer = await asyncio.open_connection(REDIS_HOST, REDIS_PORT)
        self._writers.add(up_writer)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_broker_unreachable_fails_fast_then_recovers(make_driver: Maker) -> None:
    proxy = Proxy()
    await proxy.start()
    try:
        driver = await make_driver(addr=f"redis://127.0.0.1:{proxy.port}/0")
        driver.command_timeout = 1.0
        await driver.push_batch([make_job(0)])
        await proxy.stop()  # refused: the broker is down
        for call in (driver.push_batch([make_job(1)]), driver.receive(10, 1.0), driver.stats()):
            started = time.monotonic()
            with pytest.raises(DriverError):
                await call
            assert time.monotonic() - started < 1.0
        proxy.blackhole = True  # up but silent: bounded by the timeouts
        await proxy.start()
        started = time.monotonic()
        with pytest.raises(DriverError):
            await driver.push_batch([make_job(2)])
        assert time.monotonic() - started < 4.0
        assert driver.health()["ok"] is False
        await proxy.stop()
        proxy.blackhole = False
        await proxy.start()  # back: the very next call works
        await driver.push_batch([make_job(3)])
        got = await drain(driver, 2, timeout=10)
        assert {d.job.payload for d in got} >= {make_job(0).payload, make_job(3).payload}
        assert driver.health()["ok"] is True
    finally:
        await proxy.stop()


async def test_connect_to_a_closed_port_raises_driver_error(tmp_path: Path) -> None:
    opts = RedisPipelineOptions(addr=f"redis://127.0.0.1:{free_port()}/0")
    driver = RedisDriver("nowhere", opts, data_dir=tmp_path)
    started = time.monotonic()
    with pytest.raises(DriverError):
        await driver.connect()
    assert time.monotonic() - started < 3.0
    await driver.close()


# ---- crash recovery and volume ------------------------------------------------------------

CRASHING_CONSUMER = textwrap.dedent("""
    import asyncio, os, sys
    from pathlib import Path
    from mailpipe.config import RedisPipelineOptions
    from mailpipe.jobs.drivers.redis import RedisDriver

    async def main():
        opts = RedisPipelineOptions(visibility_timeout=1.0, stream=sys.argv[1])
        driver = RedisDriver("crash", opts, data_dir=Path("."))
        got = []
        while len(got) < int(sys.argv[2]):
            got += await driver.receive(100, 1.0)
        print(" ".join(d.job.id for d in got), flush=True)
        await asyncio.sleep(60)  # holds them unacked until killed

    asyncio.run(main())
""")


async def test_consumer_process_killed_its_jobs_come_back(make_driver: Maker) -> None:
    survivor = await make_driver(visibility_timeout=1.0)
    jobs = [make_job(i) for i in range(20)]
    await survivor.push_batch(jobs)
    child = subprocess.Popen(
        [sys.executable, "-c", CRASHING_CONSUMER, survivor.stream, "20"],
        stdout=subprocess.PIPE, cwd=ROOT,
    )
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 20)
        assert set(line.decode().split()) == {j.id for j in jobs}
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    got = await drain(survivor, 20, timeout=15)
    assert sorted(d.job.id for d in got) == sorted(j.id for j in jobs)
    assert {d.attempt for d in got} == {2}


async def test_ten_thousand_jobs_none_lost_none_twice(make_driver: Maker) -> None:
    producer = await make_driver()
    consumers = [await make_driver() for _ in range(3)]
    jobs = [make_job(i, payload=os.urandom(1024)) for i in range(10_000)]
    started = time.monotonic()
    await asyncio.gather(*(
        producer.push_batch(jobs[start:start + 100]) for start in range(0, len(jobs), 100)
    ))
    pushed = time.monotonic() - started
    await drain_all_once(consumers, jobs, 90)
    stats = await producer.stats()
    assert (stats.ready, stats.reserved, stats.extra["length"]) == (0, 0, 0)
    print(f"pushed 10,000 1 KB jobs in {pushed:.2f}s ({len(jobs) / pushed:.0f}/s)")
