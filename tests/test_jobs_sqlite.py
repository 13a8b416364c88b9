"""The SQLite pipeline driver: the shared contract, then what is SQLite's own (one transaction per
batch, group commit, the file shared by processes, kill -9, a locked file)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from jobs_contract import *  # noqa: F403  (the contract's tests run in this module)
from jobs_contract import DriverFactory, drain, make_job, receive_one
from mailpipe.config import SQLitePipelineOptions
from mailpipe.jobs.base import DriverError, Job
from mailpipe.jobs.drivers import sqlite as sqlite_driver
from mailpipe.jobs.drivers.sqlite import SQLiteDriver


@pytest.fixture
async def driver_factory(tmp_path: Path) -> AsyncIterator[DriverFactory]:
    pipeline = f"contract-{uuid.uuid4().hex[:8]}"
    made: list[SQLiteDriver] = []

    async def make(**options: Any) -> SQLiteDriver:
        driver = SQLiteDriver(
            pipeline, SQLitePipelineOptions(**options), data_dir=tmp_path / "data"
        )
        await driver.connect()
        made.append(driver)
        return driver

    yield make
    if made:
        await made[0].connect()  # the contract may have closed it (a "crashed" consumer)
        await made[0].purge()
        await made[0].purge_dead()
    for driver in made:
        await driver.close()


@pytest.fixture
async def driver(tmp_path: Path) -> AsyncIterator[SQLiteDriver]:
    drv = SQLiteDriver("mail", SQLitePipelineOptions(visibility_timeout=30), data_dir=tmp_path)
    await drv.connect()
    yield drv
    await drv.close()


async def open_driver(path: Path, pipeline: str = "mail", **options: Any) -> SQLiteDriver:
    drv = SQLiteDriver(
        pipeline, SQLitePipelineOptions(path=str(path), **options), data_dir=path.parent
    )
    await drv.connect()
    return drv


# ---- storage -----------------------------------------------------------------------------


async def test_file_under_data_dir_in_wal_mode(tmp_path: Path) -> None:
    drv = SQLiteDriver("mail", SQLitePipelineOptions(synchronous="NORMAL"), data_dir=tmp_path)
    await drv.connect()
    await drv.connect()  # idempotent
    try:
        assert drv.path == tmp_path / "jobs.db" and drv.path.exists()
        with sqlite3.connect(drv.path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert drv.health()["ok"]
    finally:
        await drv.close()
    await drv.close()  # idempotent
    assert not drv.health()["ok"]


async def test_options_path_is_used(tmp_path: Path) -> None:
    drv = await open_driver(tmp_path / "elsewhere" / "q.db")
    try:
        await drv.push_batch([make_job()])
        assert (tmp_path / "elsewhere" / "q.db").exists()
        assert not (tmp_path / "elsewhere" / "jobs.db").exists()
    finally:
        await drv.close()


async def test_every_field_survives_the_round_trip(driver: SQLiteDriver) -> None:
    job = Job(
        id="job-1", payload=bytes(range(256)) * 4, name="custom.name",
        headers={"uuid": ["u"], "x": ["1", "2"]}, pipeline="mail", priority=3, delay=0.2,
        auto_ack=True,
    )
    await driver.push_batch([job])
    delivery = await receive_one(driver)
    assert delivery is not None
    assert delivery.job == job
    assert delivery.attempt == 1 and delivery.queue == "mail"


async def test_calls_before_connect_raise_driver_error(tmp_path: Path) -> None:
    drv = SQLiteDriver("mail", SQLitePipelineOptions(), data_dir=tmp_path)
    with pytest.raises(DriverError):
        await drv.push_batch([make_job()])
    with pytest.raises(DriverError):
        await drv.receive(1, 0.1)


async def test_unwritable_location_fails_connect_with_driver_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    drv = SQLiteDriver(
        "mail", SQLitePipelineOptions(path=str(tmp_path / "file" / "jobs.db")), data_dir=tmp_path
    )
    with pytest.raises(DriverError):
        await drv.connect()
    assert not drv.health()["ok"]


# ---- batching ----------------------------------------------------------------------------


async def test_a_batch_is_one_transaction(driver: SQLiteDriver) -> None:
    before = driver.counters["commits"]
    await driver.push_batch([make_job(i, payload=b"x" * 1024) for i in range(100)])
    assert driver.counters["commits"] == before + 1
    assert (await driver.stats()).ready == 100


async def test_concurrent_batches_share_commits(driver: SQLiteDriver) -> None:
    before = driver.counters["commits"]
    batches = [[make_job(i) for i in range(50)] for _ in range(40)]
    await asyncio.gather(*(driver.push_batch(batch) for batch in batches))
    assert (await driver.stats()).ready == 2000
    assert driver.counters["commits"] - before < 40
    assert driver.counters["max_ops_per_commit"] > 1


async def test_a_bad_job_fails_its_own_batch_only(driver: SQLiteDriver) -> None:
    bad = make_job(headers={"x": [object()]})  # not serialisable
    good = [make_job(i) for i in range(3)]
    results = await asyncio.gather(
        driver.push_batch([bad]), driver.push_batch(good), return_exceptions=True
    )
    assert isinstance(results[0], TypeError) and results[1] is None
    assert (await driver.stats()).ready == 3


# ---- delivery ----------------------------------------------------------------------------


async def test_priority_zero_takes_the_pipelines(tmp_path: Path) -> None:
    drv = await open_driver(tmp_path / "jobs.db", priority=4)
    try:
        jobs = [make_job(0, priority=5), make_job(1, priority=0), make_job(2, priority=3)]
        await drv.push_batch(jobs)
        got = await drv.receive(10, 1)
        assert [d.job.id for d in got] == [jobs[i].id for i in (2, 1, 0)]
        assert got[1].job.priority == 0  # the job itself is unchanged
    finally:
        await drv.close()


async def test_priority_then_push_order(driver: SQLiteDriver) -> None:
    jobs = [make_job(0, priority=5), make_job(1, priority=1), make_job(2, priority=5),
            make_job(3, priority=1)]
    await driver.push_batch(jobs)
    got = await driver.receive(10, 1)
    assert [d.job.id for d in got] == [jobs[i].id for i in (1, 3, 0, 2)]


async def test_receive_wakes_at_once_on_a_push_in_this_process(tmp_path: Path) -> None:
    consumer = await open_driver(tmp_path / "jobs.db", poll_interval=30)
    producer = await open_driver(tmp_path / "jobs.db", poll_interval=30)
    try:
        waiting = asyncio.create_task(consumer.receive(5, 10))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await producer.push_batch([make_job()])
        assert len(await waiting) == 1
        assert time.monotonic() - started < 1
    finally:
        await consumer.close()
        await producer.close()


async def test_close_ends_a_waiting_receive(driver: SQLiteDriver) -> None:
    waiting = asyncio.create_task(driver.receive(5, 30))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    await driver.close()
    assert await waiting == []
    assert time.monotonic() - started < 2


async def test_expired_reservation_comes_back_with_next_attempt(tmp_path: Path) -> None:
    drv = await open_driver(tmp_path / "jobs.db", visibility_timeout=0.5)
    try:
        await drv.push_batch([make_job()])
        first = await receive_one(drv)
        assert first is not None and first.attempt == 1
        assert (await drv.stats()).reserved == 1
        assert await drv.receive(1, 0.2) == []
        second = await receive_one(drv, timeout=5)
        assert second is not None and second.attempt == 2
        assert second.job.id == first.job.id
    finally:
        await drv.close()


async def test_a_stale_delivery_cannot_undo_the_current_one(tmp_path: Path) -> None:
    drv = await open_driver(tmp_path / "jobs.db", visibility_timeout=0.3)
    try:
        await drv.push_batch([make_job()])
        stale = await receive_one(drv)
        await asyncio.sleep(0.4)
        current = await receive_one(drv)
        assert stale is not None and current is not None and current.attempt == 2
        await drv.nack(stale, requeue=True)  # too late: the job is someone else's now
        await drv.dead_letter(stale, "too late")
        stats = await drv.stats()
        assert (stats.reserved, stats.ready, stats.dead) == (1, 0, 0)
        await drv.ack(current)
        assert (await drv.stats()).reserved == 0
    finally:
        await drv.close()


async def test_dead_letters_are_kept_inspectable_and_durable(tmp_path: Path) -> None:
    drv = await open_driver(tmp_path / "jobs.db")
    job = make_job()
    await drv.push_batch([job])
    delivery = await receive_one(drv)
    assert delivery is not None
    await drv.dead_letter(delivery, "failed 3 times")
    await drv.close()
    reopened = await open_driver(tmp_path / "jobs.db")
    try:
        (dead,) = await reopened.dead_letters()
        assert dead["job"] == job and dead["reason"] == "failed 3 times"
        assert dead["attempts"] == 1
        assert (await reopened.stats()).dead == 1
        assert await reopened.purge() == 0  # purge leaves dead letters
        assert await reopened.purge_dead() == 1
    finally:
        await reopened.close()


async def test_pipelines_sharing_a_file_are_separate(tmp_path: Path) -> None:
    a = await open_driver(tmp_path / "jobs.db", "a")
    b = await open_driver(tmp_path / "jobs.db", "b")
    try:
        await a.push_batch([make_job(i) for i in range(3)])
        assert await b.receive(10, 0.2) == []
        assert (await b.stats()).ready == 0 and (await a.stats()).ready == 3
    finally:
        await a.close()
        await b.close()


async def test_ten_thousand_jobs_none_lost_none_twice(tmp_path: Path) -> None:
    producer = await open_driver(tmp_path / "jobs.db")
    consumers = [await open_driver(tmp_path / "jobs.db") for _ in range(3)]
    try:
        jobs = [make_job(i, payload=b"x" * 1024) for i in range(10_000)]
        await asyncio.gather(*(
            producer.push_batch(jobs[start:start + 100]) for start in range(0, 10_000, 100)
        ))
        got: list[Any] = []
        await asyncio.gather(*(drain(c, len(jobs), timeout=60, got=got) for c in consumers))
        ids = [d.job.id for d in got]
        assert len(ids) == len(set(ids)) == 10_000
        assert set(ids) == {j.id for j in jobs}
        assert (await producer.stats()).ready == 0
    finally:
        for drv in (producer, *consumers):
            await drv.close()


# ---- failure -----------------------------------------------------------------------------


async def test_locked_file_gives_driver_error_then_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_driver, "BUSY_TIMEOUT_MS", 300)
    drv = await open_driver(tmp_path / "jobs.db")
    blocker = sqlite3.connect(tmp_path / "jobs.db", isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another process holding the write lock
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticking = asyncio.create_task(ticker())
        started = time.monotonic()
        with pytest.raises(DriverError, match="locked"):
            await drv.push_batch([make_job()])
        assert time.monotonic() - started < 3
        ticking.cancel()
        assert ticks >= 10  # the event loop kept running while SQLite waited
        assert not drv.health()["ok"]
        blocker.execute("ROLLBACK")
        await drv.push_batch([make_job()])
        assert drv.health()["ok"]
        assert (await drv.stats()).ready == 1
    finally:
        blocker.close()
        await drv.close()


# ---- other processes ---------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import asyncio, json, sys, uuid
    from pathlib import Path
    from mailpipe.config import SQLitePipelineOptions
    from mailpipe.jobs.base import Job
    from mailpipe.jobs.drivers.sqlite import SQLiteDriver

    def say(**fields):
        sys.stdout.write(json.dumps(fields) + "\\n")
        sys.stdout.flush()

    async def main(path, mode, count, visibility):
        options = SQLitePipelineOptions(path=path, visibility_timeout=visibility)
        drv = SQLiteDriver("mail", options, data_dir=Path(path).parent)
        await drv.connect()
        if mode == "push-forever":  # until killed: report each batch once it returned
            while True:
                batch = [Job(id=str(uuid.uuid4()), payload=b"x" * 1024) for _ in range(count)]
                await drv.push_batch(batch)
                say(pushed=[job.id for job in batch])
        elif mode == "push":
            batch = [Job(id=f"child-{i}", payload=b"c") for i in range(count)]
            await drv.push_batch(batch)
            say(pushed=[job.id for job in batch])
        elif mode == "consume":  # receive and ack until `count` or 5s of nothing
            say(ready=True)
            ids, idle = [], 0
            while len(ids) < count and idle < 10:
                got = await drv.receive(50, 0.5)
                idle = 0 if got else idle + 1
                for delivery in got:
                    await drv.ack(delivery)
                ids += [d.job.id for d in got]
            say(consumed=ids)
        elif mode == "reserve-and-hang":  # take jobs, never ack, wait to be killed
            got = []
            while len(got) < count:
                got += await drv.receive(count - len(got), 1.0)
            say(reserved=[d.job.id for d in got])
            await asyncio.sleep(3600)
        await drv.close()

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
""")


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for child in started:
        if child.poll() is None:
            child.kill()
        child.wait()


def spawn(children: list[subprocess.Popen[str]], path: Path, mode: str, count: int,
          visibility: float = 30.0) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), mode, str(count), str(visibility)],
        stdout=subprocess.PIPE, text=True,
    )
    children.append(child)
    return child


async def read_line(child: subprocess.Popen[str], timeout: float = 20) -> dict[str, Any]:
    assert child.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), timeout)
    assert line, f"child exited with {child.wait()}"
    return json.loads(line)


async def drain_until_empty(drv: SQLiteDriver, timeout: float = 30) -> list[Any]:
    """Receive and ack until nothing is left for anyone (other processes drain too)."""
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = await drv.receive(100, 0.2)
        for delivery in batch:
            await drv.ack(delivery)
        got += batch
        stats = await drv.stats()
        if not batch and stats.ready + stats.reserved + stats.delayed == 0:
            break
    return got


async def test_another_process_consumes_what_this_one_pushed(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    path = tmp_path / "jobs.db"
    drv = await open_driver(path, poll_interval=0.02)
    try:
        jobs = [make_job(i) for i in range(1000)]
        other = spawn(children, path, "consume", len(jobs))
        assert (await read_line(other))["ready"]
        for start in range(0, len(jobs), 100):
            await drv.push_batch(jobs[start:start + 100])
        await asyncio.sleep(0.3)  # let the other process start on them before this one does
        mine, theirs = await asyncio.gather(drain_until_empty(drv), read_line(other, timeout=60))
        ids = [d.job.id for d in mine] + theirs["consumed"]
        assert len(ids) == len(set(ids)), "a job went to both processes"
        assert set(ids) == {job.id for job in jobs}
        assert theirs["consumed"], "the other process got nothing"
    finally:
        await drv.close()


async def test_a_push_from_another_process_is_received(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    path = tmp_path / "jobs.db"
    drv = await open_driver(path, poll_interval=0.05)
    try:
        waiting = asyncio.create_task(drv.receive(10, 20))
        pushed = (await read_line(spawn(children, path, "push", 5)))["pushed"]
        got = await waiting
        while len(got) < 5:
            got += await drv.receive(10, 1)
        assert [d.job.id for d in got] == pushed
    finally:
        await drv.close()


async def test_kill_9_of_a_producer_loses_no_confirmed_job(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    path = tmp_path / "jobs.db"
    producer = spawn(children, path, "push-forever", 100)
    confirmed: list[str] = []
    for _ in range(30):
        confirmed += (await read_line(producer))["pushed"]
    os.kill(producer.pid, signal.SIGKILL)
    producer.wait()
    drv = await open_driver(path)
    try:
        # until empty, not for a fixed time: a loaded machine drains slowly
        stored = {d.job.id for d in await drain_until_empty(drv, timeout=120)}
        assert set(confirmed) <= stored, f"{len(set(confirmed) - stored)} confirmed jobs lost"
        assert len(stored) % 100 == 0  # whole batches or nothing
    finally:
        await drv.close()


async def test_kill_9_of_a_consumer_hands_its_jobs_to_another_process(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    path = tmp_path / "jobs.db"
    drv = await open_driver(path, visibility_timeout=1.0)
    try:
        jobs = [make_job(i) for i in range(10)]
        await drv.push_batch(jobs)
        consumer = spawn(children, path, "reserve-and-hang", 10, visibility=1.0)
        reserved = (await read_line(consumer))["reserved"]
        assert sorted(reserved) == sorted(job.id for job in jobs)
        assert await drv.receive(10, 0.1) == []  # theirs while the reservation holds
        os.kill(consumer.pid, signal.SIGKILL)
        consumer.wait()
        got = await drain(drv, 10, timeout=10)
        assert sorted(d.job.id for d in got) == sorted(reserved)
        assert {d.attempt for d in got} == {2}
    finally:
        await drv.close()
