"""The `roadrunner` pipeline driver: mailpipe's jobs pushed to a RoadRunner server's
jobs.PushBatch over Goridge RPC. A second `mailpipe serve` with its RPC endpoint on stands in
for RoadRunner; what it stored is read back with its pipeline's own SQLite driver.

- the driver contract where it applies (everything goes in through the roadrunner driver;
  receive, ack, nack and the rest are the RoadRunner side's own driver, on a pipeline
  declared for each test with jobs.Declare);
- SMTP: each 250 is a job on RoadRunner's pipeline, in RoadRunner's push format; kill -9 of
  the pushing mailpipe after its 250s loses nothing; RoadRunner refusing (unknown pipeline)
  or unreachable gives 451; RoadRunner's own consumers (the PHP consumer) take the jobs.
"""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, MailpipeServer, free_port, require_tool, start_mailpipe
from jobs_contract import *  # noqa: F403  (the contract's tests run in this module)
from jobs_contract import DriverFactory
from mailpipe.config import RoadRunnerPipelineOptions, SQLitePipelineOptions
from mailpipe.jobs.base import Delivery, Driver, DriverError, Job, PipelineStats
from mailpipe.jobs.drivers import DRIVERS
from mailpipe.jobs.drivers.roadrunner import RoadRunnerDriver
from mailpipe.jobs.drivers.sqlite import SQLiteDriver
from mailpipe.rpc.client import RPCClient
from mailpipe.rpc.proto import jobs_pb2 as pb
from test_jobs_e2e import accepted, drain, send_many, send_one

PHP_CONSUMER = ROOT / "examples" / "php" / "goridge_consumer.php"


class RoadRunner:
    """The stand-in: a mailpipe with its RPC endpoint, storing jobs in one SQLite file."""

    def __init__(self, workdir: Path, **config: Any) -> None:
        self.db = workdir / "rr-jobs.db"
        self.addr = f"tcp://127.0.0.1:{free_port()}"
        pipelines = {"emails": {"driver": "sqlite", "config": self.options()}}
        jobs = {"pipelines": pipelines, **config.pop("jobs", {})}
        self.server = start_mailpipe(workdir, {"rpc": {"listen": self.addr}, "jobs": jobs,
                                               **config})

    def options(self, **more: Any) -> dict[str, Any]:
        return {"path": str(self.db), "poll_interval": "20ms", **more}

    async def open(self, pipeline: str = "emails", **options: Any) -> SQLiteDriver:
        """The RoadRunner side's own driver for `pipeline`, in this process."""
        driver = SQLiteDriver(pipeline, SQLitePipelineOptions(**self.options(**options)),
                              data_dir=self.db.parent)
        await driver.connect()
        return driver


@pytest.fixture(scope="module")
def roadrunner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RoadRunner]:
    rr = RoadRunner(tmp_path_factory.mktemp("roadrunner"))
    yield rr
    rr.server.stop(signal.SIGKILL)


class PushedThrough(Driver):
    """Jobs go in through the roadrunner driver (under test); the rest is the RoadRunner
    side's own driver."""

    name = "roadrunner"

    def __init__(self, pusher: RoadRunnerDriver, own: SQLiteDriver) -> None:
        super().__init__(own.pipeline, own.options, data_dir=own.data_dir)
        self.pusher, self.own = pusher, own

    async def connect(self) -> None:
        await self.pusher.connect()
        await self.own.connect()

    async def push_batch(self, jobs: list[Job]) -> None:
        await self.pusher.push_batch(jobs)

    async def receive(self, max_items: int, timeout: float) -> list[Delivery]:
        return await self.own.receive(max_items, timeout)

    async def ack(self, delivery: Delivery) -> None:
        await self.own.ack(delivery)

    async def nack(self, delivery: Delivery, *, requeue: bool, delay: float = 0.0) -> None:
        await self.own.nack(delivery, requeue=requeue, delay=delay)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        await self.own.dead_letter(delivery, reason)

    async def stats(self) -> PipelineStats:
        return await self.own.stats()

    async def purge(self) -> int:
        return await self.own.purge()

    async def close(self) -> None:
        await self.pusher.close()
        await self.own.close()


@pytest.fixture
async def driver_factory(roadrunner: RoadRunner, tmp_path: Path) -> AsyncIterator[DriverFactory]:
    pipeline = f"contract-{uuid.uuid4().hex[:8]}"
    rpc = RPCClient(roadrunner.addr)
    declare = {"name": pipeline, "driver": "sqlite", **roadrunner.options()}
    await rpc.call_proto("jobs.Declare", pb.DeclareRequest(pipeline=declare), pb.Empty)
    made: list[PushedThrough] = []

    async def make(**options: Any) -> PushedThrough:
        pusher = RoadRunnerDriver(pipeline, RoadRunnerPipelineOptions(addr=roadrunner.addr),
                                  data_dir=tmp_path)
        driver = PushedThrough(pusher, await roadrunner.open(pipeline, **options))
        await driver.connect()
        made.append(driver)
        return driver

    yield make
    if made:
        await made[0].connect()
        await made[0].own.purge()
        await made[0].own.purge_dead()
    for driver in made:
        await driver.close()
    await rpc.call_proto("jobs.Destroy", pb.Pipelines(pipelines=[pipeline]), pb.Pipelines)
    await rpc.close()


def test_registered() -> None:
    assert DRIVERS["roadrunner"] == "mailpipe.jobs.drivers.roadrunner:RoadRunnerDriver"


async def test_push_only_and_its_stats(roadrunner: RoadRunner, tmp_path: Path) -> None:
    driver = RoadRunnerDriver("mine", RoadRunnerPipelineOptions(addr=roadrunner.addr,
                                                                pipeline="emails"),
                              data_dir=tmp_path)
    try:
        with pytest.raises(DriverError, match="only pushes"):
            await driver.receive(1, 0.1)
        stats = await driver.stats()
        assert (stats.pipeline, stats.queue, stats.extra) == (
            "mine", "emails", {"roadrunner_driver": "sqlite"})
        assert driver.health()["ok"]
    finally:
        await driver.close()


# ---- through SMTP ------------------------------------------------------------------------------


def pushing_config(addr: str, pipeline: str = "emails", **smtp_jobs: Any) -> dict[str, Any]:
    return {
        "smtp": {"jobs": {"pipeline": "rr", **smtp_jobs}},
        "jobs": {"pipelines": {"rr": {"driver": "roadrunner",
                                      "config": {"addr": addr, "pipeline": pipeline,
                                                 "timeout": "2s"}}}},
    }


async def test_each_250_is_a_job_at_roadrunner_even_after_kill_9(
    roadrunner: RoadRunner, mailpipe_factory: Callable[..., MailpipeServer],
    validate_event: Callable[[dict[str, Any]], None],
) -> None:
    pusher = mailpipe_factory(pushing_config(roadrunner.addr, priority=7,
                                             headers={"x-app": "rr"}))
    sent = await send_many(pusher.smtp_port, [f"to rr {i}" for i in range(200)], 20)
    ids = accepted(sent)
    assert len(ids) == 200, [s.reply for s in sent if s.code != 250][:3]
    pusher.process.send_signal(signal.SIGKILL)  # nothing is held back after a 250
    assert pusher.process.wait(10) == -signal.SIGKILL

    own = await roadrunner.open()
    try:
        got = await drain(own, len(ids), timeout=30)
    finally:
        await own.close()
    seen = Counter(d.job.id for d in got)
    assert set(seen) == set(ids) and max(seen.values()) == 1
    for delivery in got[:5]:
        job = delivery.job
        assert (job.name, job.pipeline, job.priority) == ("smtp.email", "emails", 7)
        assert job.headers == {"uuid": [job.id], "x-app": ["rr"]}
        event = json.loads(job.payload)
        validate_event(event)
        assert event["uuid"] == job.id


async def test_refused_or_unreachable_gives_451(
    roadrunner: RoadRunner, mailpipe_factory: Callable[..., MailpipeServer]
) -> None:
    refused = mailpipe_factory(pushing_config(roadrunner.addr, pipeline="no-such"))
    sent = await send_one(refused.smtp_port, "refused")
    assert sent.code == 451, sent.reply
    assert "451 4.3.0" in sent.reply
    assert "refused" in refused.log()
    # Unreachable from the start: mailpipe serves anyway, unhealthy, and answers 451.
    away = mailpipe_factory(pushing_config(f"tcp://127.0.0.1:{free_port()}"), wait=False)

    async def degraded() -> dict[str, Any]:
        for _ in range(400):
            try:
                status, body, _ = away.request("GET", "/healthz")
            except OSError:
                status = 0
            if status == 503:
                return json.loads(body)
            await asyncio.sleep(0.05)
        raise AssertionError(f"no 503 from /healthz:\n{away.log()}")

    doc = await degraded()
    assert doc["sinks"]["jobs"]["driver"] == "roadrunner"
    assert "is unreachable" in doc["sinks"]["jobs"]["last_error"]
    sent = await send_one(away.smtp_port, "unreachable")
    assert sent.code == 451, sent.reply
    assert "unreachable" in away.log()


async def test_roadrunners_own_consumers_take_the_jobs(
    tmp_path: Path, mailpipe_factory: Callable[..., MailpipeServer]
) -> None:
    php = require_tool("php")
    log = tmp_path / "consumer.jsonl"
    rr = RoadRunner(tmp_path / "rr", jobs={"consume": ["emails"],
                                           "pool": {"command": [php, str(PHP_CONSUMER)],
                                                    "num_workers": 1}},
                    server={"env": {"MAILPIPE_TEST_LOG": str(log)}})
    try:
        pusher = mailpipe_factory(pushing_config(rr.addr))
        sent = await send_many(pusher.smtp_port, [f"consumed {i}" for i in range(5)], 5)
        ids = accepted(sent)
        assert len(ids) == 5

        async def logged() -> list[dict[str, Any]]:
            for _ in range(400):
                lines = log.read_text().splitlines() if log.exists() else []
                if len(lines) >= 5:
                    return [json.loads(line) for line in lines]
                await asyncio.sleep(0.05)
            raise AssertionError("the RoadRunner side's PHP consumer did not take 5 jobs")

        lines = await logged()
        assert sorted(line["id"] for line in lines) == sorted(ids)
        assert {line["answer"] for line in lines} == {"ack"}
    finally:
        rr.server.stop(signal.SIGKILL)
