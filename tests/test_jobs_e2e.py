"""Jobs through the front door: a real `mailpipe serve`, real SMTP sessions, real brokers.

Every test runs against each driver (embedded SQLite, and the machine's Redis, RabbitMQ and NATS
JetStream; unreachable brokers skip, or fail under CI), each on a pipeline of its own (unique
stream, queue and exchange names, removed afterwards). What the SMTP side pushed is checked by
draining the pipeline from the test with the driver class itself (`make_driver`). Each test
starts its mailpipe and pipelines with one call of the `serve_with_pipeline` fixture (through
`behind_proxy` when the broker is reached through a BrokerProxy).

- producer: each email that got 250 is one job in RoadRunner's push format (name, id = the
  event uuid, payload = the schema-valid event, headers, options) and the stored event says so;
  `smtp.jobs.delay` is honoured and the store can be off; a 2 MB email in a batch of small ones
  fails (if at all) alone;
- batching: concurrent emails share one confirmed batch (by size), a lone one waits for the timer;
- volume: 10,000 emails over 100 pipelined connections, every 250 in the pipeline exactly once;
- broker failure: a TCP proxy between mailpipe and the broker is cut (refused) or stalled
  (silent): 451 meanwhile, never 250; /healthz degraded; 250 again once it is back; the same
  with the broker away when mailpipe starts;
- `kill -9` of mailpipe after the 250s and before any consumer, or while its in-process
  consumers hold jobs (then restarted): nothing lost;
- consumers: the PHP (php-cli) and Python example consumers in the in-process jobs pool; a
  consumer that crashes mid-job gets the job again (attempt 2); one that crashes on every
  delivery, `[fail]` and `[dead]` end in dead letters after max_attempts (the driver's own, or a
  dead_letter pipeline, also when several arrive at once); jobs waiting for a free worker are
  not delivered twice; `mailpipe jobs consume` as a process, killed -9 mid-job and replaced;
- config: `smtp.jobs.pipeline` (or `jobs.consume`) naming an undeclared pipeline exits 2 and
  names the key.

Consumers run tests/jobs/consumer.py (Goridge only, no SDK) where a test needs hooks the
examples do not have (`[crash-once]`, `[hang-once]`, attempts counted across processes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    ROOT,
    MailpipeServer,
    free_port,
    require_service,
    require_tool,
    start_mailpipe,
)
from mailpipe.config import PipelineConfig
from mailpipe.jobs.base import Delivery, Driver, PipelineStats
from mailpipe.jobs.drivers import make_driver

DRIVERS = ["sqlite", "redis", "amqp", "nats"]
BROKER_DRIVERS = ["redis", "amqp", "nats"]
BROKERS = {"redis": ("127.0.0.1", 6379), "amqp": ("127.0.0.1", 5672), "nats": ("127.0.0.1", 4222)}
CONSUMER = ROOT / "tests" / "jobs" / "consumer.py"
PHP_CONSUMER = ROOT / "examples" / "php" / "goridge_consumer.php"
PY_CONSUMER = ROOT / "examples" / "consumer.py"


def broker_addr(driver: str, port: int | None = None) -> str:
    host, default = BROKERS[driver]
    port = port or default
    return {
        "redis": f"redis://{host}:{port}/0",
        "amqp": f"amqp://guest:guest@{host}:{port}/",
        "nats": f"nats://{host}:{port}",
    }[driver]


def require_broker(driver: str) -> None:
    if driver not in BROKERS:
        return
    require_service(f"{driver} broker", *BROKERS[driver])


# ---- pipelines: names, configs, the test's own drivers, cleanup ----------------------------


@dataclass
class Pipe:
    """One pipeline of one test: its config for mailpipe, and drivers for the test."""

    name: str
    driver: str
    options: dict[str, Any]
    data_dir: Path
    opened: list[Driver] = field(default_factory=list)

    def yaml(self) -> dict[str, Any]:
        return {"driver": self.driver, "config": dict(self.options)}

    def instance(self, **overrides: Any) -> Driver:
        config = PipelineConfig.model_validate(
            {"driver": self.driver, "config": {**self.options, **overrides}}
        )
        return make_driver(self.name, config, data_dir=self.data_dir)

    async def open(self, **overrides: Any) -> Driver:
        """A connected driver on this pipeline, talking to the real broker (never the proxy),
        with a big prefetch so that draining is quick."""
        overrides.setdefault("prefetch", 1000)
        if self.driver in BROKERS:
            overrides.setdefault("addr", broker_addr(self.driver))
        driver = self.instance(**overrides)
        await driver.connect()
        self.opened.append(driver)
        return driver

    async def stats(self) -> PipelineStats:
        driver = self.opened[0] if self.opened else await self.open()
        return await driver.stats()


class Pipes:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.made: list[Pipe] = []

    def new(self, driver: str, *, addr: str | None = None, **options: Any) -> Pipe:
        require_broker(driver)
        tag = uuid.uuid4().hex[:10]
        name = f"e2e-{tag}"
        opts: dict[str, Any] = dict(options)
        if driver == "sqlite":
            opts.setdefault("path", str(self.tmp_path / "jobs.db"))
            opts.setdefault("poll_interval", "20ms")
        elif driver == "amqp":
            opts.setdefault("exchange", f"e2e-ex-{tag}")
        if driver in BROKERS:
            opts["addr"] = addr or broker_addr(driver)
        pipe = Pipe(name, driver, opts, self.tmp_path)
        self.made.append(pipe)
        return pipe

    async def cleanup(self) -> None:
        for pipe in self.made:
            for driver in pipe.opened:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(driver.close(), 10)
        for pipe in self.made:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(remove_pipeline(pipe), 15)


async def remove_pipeline(pipe: Pipe) -> None:
    names = pipe.instance(addr=broker_addr(pipe.driver)) if pipe.driver in BROKERS else None
    if pipe.driver == "redis":
        from redis.asyncio import Redis

        client = Redis.from_url(broker_addr("redis"), socket_timeout=5)
        try:
            stream = names.stream  # type: ignore[union-attr]
            await client.delete(stream, f"{stream}:delayed", f"{stream}:dead")
        finally:
            await client.aclose()
    elif pipe.driver == "amqp":
        import aio_pika

        connection = await aio_pika.connect(broker_addr("amqp"), timeout=5)
        async with connection:
            queue = names.queue  # type: ignore[union-attr]
            for name in (queue, f"{queue}.dead", f"{queue}.delay.1000"):
                channel = await connection.channel()
                with contextlib.suppress(Exception):
                    await channel.queue_delete(name)
            exchange = pipe.options["exchange"]
            for name in (exchange, f"{exchange}.dlx"):
                channel = await connection.channel()
                with contextlib.suppress(Exception):
                    await channel.exchange_delete(name)
    elif pipe.driver == "nats":
        import nats

        nc = await nats.connect(broker_addr("nats"), connect_timeout=2, allow_reconnect=False)
        try:
            js = nc.jetstream()
            for stream in (names.stream, names.dead_stream):  # type: ignore[union-attr]
                with contextlib.suppress(Exception):
                    await js.delete_stream(stream)
        finally:
            await nc.close()


@pytest.fixture
async def pipes(tmp_path: Path) -> AsyncIterator[Pipes]:
    made = Pipes(tmp_path)
    yield made
    await made.cleanup()


async def gather_limited(coros: Iterable[Awaitable[Any]], limit: int = 64) -> list[Any]:
    gate = asyncio.Semaphore(limit)

    async def one(coro: Awaitable[Any]) -> Any:
        async with gate:
            return await coro

    return await asyncio.gather(*(one(c) for c in coros))


async def drain(
    driver: Driver, expected: int, timeout: float = 30.0, settle: float = 0.5
) -> list[Delivery]:
    """Receive and ack until `expected` deliveries came (then look once more for `settle`
    seconds: a duplicate would show up there) or `timeout` passed."""
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(got) < expected and time.monotonic() < deadline:
        batch = await driver.receive(1000, 0.3)
        await gather_limited(driver.ack(d) for d in batch)
        got.extend(batch)
    extra = await driver.receive(1000, settle)
    await gather_limited(driver.ack(d) for d in extra)
    return got + extra


# ---- SMTP: many sessions, pipelined, each 250's uuid kept -----------------------------------


@dataclass
class Sent:
    subject: str
    code: int  # 0: no reply (the connection failed)
    reply: str
    latency: float = 0.0
    done_at: float = 0.0

    @property
    def uuid(self) -> str | None:
        match = re.search(r"queued as ([0-9a-f-]{36})", self.reply)
        return match.group(1) if match else None


def message(subject: str, size: int = 0) -> bytes:
    body = ("x" * 70 + "\r\n") * max(1, size // 72)
    return (
        f"From: E2E <sender@e2e.test>\r\nTo: <rcpt@e2e.test>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{uuid.uuid4()}@e2e.test>\r\nDate: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
        f"\r\n{body}.\r\n"
    ).encode()


ENVELOPE = b"MAIL FROM:<sender@e2e.test>\r\nRCPT TO:<rcpt@e2e.test>\r\nDATA\r\n"


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    text = ""
    while True:
        line = (await reader.readline()).decode(errors="replace")
        if not line:
            raise ConnectionError("connection closed")
        text += line
        if len(line) < 4 or line[3] != "-":
            return int(line[:3]), text.strip()


class Session:
    """One SMTP connection that sends emails as MAIL+RCPT+DATA in one write (PIPELINING)."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def __aenter__(self) -> Session:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        code, text = await read_reply(self.reader)
        assert code == 220, text
        self.writer.write(b"EHLO e2e.test\r\n")
        code, text = await read_reply(self.reader)
        assert code == 250, text
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.writer.write(b"QUIT\r\n")
            await asyncio.wait_for(read_reply(self.reader), 2)
        self.writer.close()

    async def start(self) -> None:
        """MAIL, RCPT and DATA; after this the body can go."""
        self.writer.write(ENVELOPE)
        for expected in (250, 250, 354):
            code, text = await read_reply(self.reader)
            assert code == expected, text

    async def finish(self, subject: str, size: int = 0) -> Sent:
        started = time.monotonic()
        self.writer.write(message(subject, size))
        code, text = await read_reply(self.reader)
        done = time.monotonic()
        return Sent(subject, code, text, done - started, done)

    async def send(self, subject: str, size: int = 0) -> Sent:
        await self.start()
        return await self.finish(subject, size)


async def send_many(
    port: int, subjects: list[str], connections: int = 10, size: int = 0
) -> list[Sent]:
    """Every subject as one email, spread over `connections` concurrent sessions."""
    lanes: list[list[str]] = [subjects[i::connections] for i in range(connections)]

    async def lane(items: list[str]) -> list[Sent]:
        out: list[Sent] = []
        try:
            async with Session(port) as session:
                for subject in items:
                    out.append(await session.send(subject, size))
        except (OSError, ConnectionError, AssertionError) as exc:
            out.extend(Sent(s, 0, f"{type(exc).__name__}: {exc}") for s in items[len(out) :])
        return out

    results = await asyncio.gather(*(lane(items) for items in lanes if items))
    return [sent for lane_results in results for sent in lane_results]


async def send_one(port: int, subject: str) -> Sent:
    try:
        async with Session(port) as session:
            return await session.send(subject)
    except (OSError, ConnectionError, AssertionError) as exc:
        return Sent(subject, 0, f"{type(exc).__name__}: {exc}")


async def finish_together(port: int, emails: list[tuple[str, int]]) -> list[Sent]:
    """One session per (subject, size), each held at DATA's end, then every body sent at once:
    the emails reach their final dot at the same moment."""
    sessions = [Session(port) for _ in emails]
    async with contextlib.AsyncExitStack() as stack:
        for session in sessions:
            await stack.enter_async_context(session)
            await session.start()
        pairs = zip(sessions, emails, strict=True)
        return list(await asyncio.gather(*(s.finish(*email) for s, email in pairs)))


def accepted(sent: list[Sent]) -> list[str]:
    ids = [s.uuid for s in sent if s.code == 250]
    assert all(ids), "a 250 without `queued as <uuid>`"
    return [i for i in ids if i]


# ---- mailpipe ----------------------------------------------------------------------------------


def jobs_config(
    pipe: Pipe,
    *,
    extra: Iterable[Pipe] = (),
    consume: bool = False,
    pool: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    **smtp_jobs: Any,
) -> dict[str, Any]:
    pipelines = {p.name: p.yaml() for p in (pipe, *extra)}
    config: dict[str, Any] = {
        "smtp": {"jobs": {"pipeline": pipe.name, **smtp_jobs}},
        "jobs": {"pipelines": pipelines},
        "store": {"max_messages": 100_000},
    }
    if consume:
        config["jobs"]["consume"] = [pipe.name]
    if pool is not None:
        config["jobs"]["pool"] = pool
    if env:
        config["server"] = {"env": env}
    return config


def metric(server: MailpipeServer, name: str, pipeline: str) -> float:
    status, body, _ = server.request("GET", "/metrics")
    assert status == 200
    pattern = re.compile(rf'^{re.escape(name)}\{{pipeline="{re.escape(pipeline)}"\}} (\S+)$', re.M)
    match = pattern.search(body.decode())
    return float(match.group(1)) if match else 0.0


def health(server: MailpipeServer) -> tuple[int, dict[str, Any]]:
    status, body, _ = server.request("GET", "/healthz")
    return status, json.loads(body)


async def wait_for(
    check: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll `check` (sync or async) until it returns something truthy; fail after timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        await asyncio.sleep(interval)


def consumer_command(kind: str) -> list[str]:
    if kind == "php":
        require_tool("php")
        assert PHP_CONSUMER.is_file(), f"{PHP_CONSUMER} is missing"
        return [shutil.which("php") or "php", str(PHP_CONSUMER)]
    if kind == "python":
        assert PY_CONSUMER.is_file(), f"{PY_CONSUMER} is missing"
        return [sys.executable, str(PY_CONSUMER)]
    return [sys.executable, str(CONSUMER)]


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def test_log(tmp_path: Path) -> Path:
    return tmp_path / "consumer.jsonl"


def consumer_env(tmp_path: Path, log: Path) -> dict[str, str]:
    state = tmp_path / "consumer-state"
    state.mkdir(exist_ok=True)
    return {"MAILPIPE_TEST_LOG": str(log), "E2E_STATE_DIR": str(state)}


@dataclass
class Served:
    """A running mailpipe whose SMTP emails go to `pipe` (and its dead letters to `dead`)."""

    pipe: Pipe
    server: MailpipeServer
    config: dict[str, Any]
    dead: Pipe | None
    start: Callable[..., MailpipeServer]

    @property
    def port(self) -> int:
        return self.server.smtp_port

    def metric(self, name: str) -> float:
        return metric(self.server, name, self.pipe.name)

    def another(self) -> MailpipeServer:
        """A second mailpipe with the same config: same pipeline, same consumers."""
        return self.start(self.config)


ServeWithPipeline = Callable[..., Served]


@pytest.fixture
def serve_with_pipeline(
    pipes: Pipes,
    mailpipe_factory: Callable[..., MailpipeServer],
    tmp_path: Path,
    test_log: Path,
) -> ServeWithPipeline:
    """Start a mailpipe on a new pipeline of `driver` (smtp.jobs.pipeline), removed afterwards.

    - `pipeline`: the pipeline's driver options (`addr` points it at a proxy);
    - `dead_letter`: give it a dead_letter pipeline of the same driver (`Served.dead`);
    - `consume`: run that consumer ("php", "python" or "own", see `consumer_command`) in the
      in-process jobs pool, `workers` of them, logging each delivery to `test_log`;
    - `config`: more sections, merged into the generated ones; `wait`: for /healthz;
    - any other keyword is an `smtp.jobs` key (batch_size, flush_interval, delay, ...).
    """

    def serve(
        driver: str,
        *,
        pipeline: dict[str, Any] | None = None,
        dead_letter: bool = False,
        consume: str | None = None,
        workers: int = 2,
        config: dict[str, dict[str, Any]] | None = None,
        wait: bool = True,
        **smtp_jobs: Any,
    ) -> Served:
        dead = pipes.new(driver) if dead_letter else None
        options = dict(pipeline or {}, **({"dead_letter": dead.name} if dead else {}))
        pipe = pipes.new(driver, **options)
        consumers: dict[str, Any] = {}
        if consume is not None:
            consumers = {
                "consume": True,
                "env": consumer_env(tmp_path, test_log),
                "pool": {"command": consumer_command(consume), "num_workers": workers},
            }
        full = jobs_config(pipe, extra=[dead] if dead else [], **consumers, **smtp_jobs)
        for section, values in (config or {}).items():
            full.setdefault(section, {}).update(values)
        return Served(pipe, mailpipe_factory(full, wait=wait), full, dead, mailpipe_factory)

    return serve


# ---- producer -------------------------------------------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
async def test_emails_become_jobs_in_roadrunner_push_format(
    driver: str,
    serve_with_pipeline: ServeWithPipeline,
    validate_event: Callable[[dict[str, Any]], None],
) -> None:
    served = serve_with_pipeline(driver, priority=7, headers={"x-app": "e2e", "x-tags": ["a", "b"]})
    pipe = served.pipe
    sent = await send_many(served.port, [f"producer {i} caf\u00e9" for i in range(5)], 5)
    ids = accepted(sent)
    assert len(ids) == 5, [s.reply for s in sent]

    deliveries = await drain(await pipe.open(), 5, timeout=15)
    by_id = {d.job.id: d for d in deliveries}
    assert sorted(by_id) == sorted(ids) and len(deliveries) == 5
    for job_id in ids:
        job = by_id[job_id].job
        assert job.name == "smtp.email"
        assert job.headers == {"uuid": [job_id], "x-app": ["e2e"], "x-tags": ["a", "b"]}
        assert (job.pipeline, job.priority, job.delay, job.auto_ack) == (pipe.name, 7, 0.0, False)
        assert by_id[job_id].attempt == 1
        event = json.loads(job.payload)
        validate_event(event)
        assert event["uuid"] == job_id and event["event"] == "EMAIL_RECEIVED"
        assert event["message"]["subject"].startswith("producer ")
        stored = served.server.event(job_id)
        assert stored["mailpipe"]["outcomes"]["job"] == {
            "id": job_id,
            "pipeline": pipe.name,
            "driver": driver,
        }
    assert served.metric("mailpipe_jobs_confirmed_total") == 5


# ---- batching --------------------------------------------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
async def test_batches_by_size_and_by_timer(
    driver: str, serve_with_pipeline: ServeWithPipeline
) -> None:
    served = serve_with_pipeline(driver, batch_size=10, flush_interval="200ms")

    def batches() -> tuple[float, float]:
        """(batches pushed, jobs in them)."""
        return (
            served.metric("mailpipe_jobs_batch_size_count"),
            served.metric("mailpipe_jobs_batch_size_sum"),
        )

    # Warm the connection up (first batch: one job, by the timer).
    first = await send_one(served.port, "warm-up")
    assert first.code == 250, first.reply
    assert batches() == (1, 1)

    # Ten sessions bring their emails to the final dot at the same moment: one batch of ten.
    sent = await finish_together(served.port, [(f"batch {i}", 0) for i in range(10)])
    assert [s.code for s in sent] == [250] * 10, [s.reply for s in sent]
    assert batches() == (2, 11)
    # Confirmed together, and sooner than the timer would have flushed them.
    assert max(s.done_at for s in sent) - min(s.done_at for s in sent) < 0.15
    assert max(s.latency for s in sent) < 0.2 + 1.0

    # A lone email is not stuck waiting for nine more: the timer flushes it.
    lone = await send_one(served.port, "lone")
    assert lone.code == 250, lone.reply
    assert 0.18 <= lone.latency < 2.0, lone.latency
    assert batches() == (3, 12)

    ids = [first.uuid, *accepted(sent), lone.uuid]
    got = await drain(await served.pipe.open(), 12, timeout=15)
    assert sorted(d.job.id for d in got) == sorted(ids)


# ---- volume ---------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("driver", DRIVERS)
async def test_ten_thousand_emails_none_lost_none_twice(
    driver: str, serve_with_pipeline: ServeWithPipeline
) -> None:
    total, connections = 10_000, 100
    served = serve_with_pipeline(driver, config={"smtp": {"max_connections": 2000}})
    started = time.monotonic()
    sent = await send_many(served.port, [f"load {i}" for i in range(total)], connections)
    send_s = time.monotonic() - started
    ids = accepted(sent)
    codes = Counter(s.code for s in sent)
    assert codes == {250: total}, f"{codes}: {[s.reply for s in sent if s.code != 250][:3]}"
    assert len(set(ids)) == total
    assert served.metric("mailpipe_jobs_confirmed_total") == total

    started = time.monotonic()
    got = await drain(await served.pipe.open(), total, timeout=60, settle=1.0)
    drain_s = time.monotonic() - started
    seen = Counter(d.job.id for d in got)
    twice = [i for i, n in seen.items() if n > 1]
    assert not twice, f"{len(twice)} jobs delivered twice"
    missing = set(ids) - set(seen)
    assert not missing, f"{len(missing)} of {total} emails answered 250 are not in the pipeline"
    assert set(seen) == set(ids)
    stats = await served.pipe.stats()
    assert (stats.ready, stats.reserved) == (0, 0)
    print(
        f"{driver}: {total} emails sent in {send_s:.1f}s ({total / send_s:.0f}/s), "
        f"drained in {drain_s:.1f}s"
    )


# ---- broker failure -----------------------------------------------------------------------------


class BrokerProxy:
    """A TCP proxy in front of a real broker, in its own thread and event loop, that the test
    can cut (connections dropped, new ones refused) or stall (connections kept, nothing
    forwarded: a broker that went silent) and restore, without touching the shared broker."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.stalled = False
        self.accepted = 0
        self._server: asyncio.base_events.Server | None = None
        self._transports: set[asyncio.Transport] = set()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="broker-proxy", daemon=True
        )
        self.thread.start()
        self._call(self._listen())

    def _call(self, coro: Awaitable[Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)  # type: ignore[arg-type]

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(
                self._handle, "127.0.0.1", self.port, reuse_address=True
            )

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._transports.add(writer.transport)  # type: ignore[arg-type]
        upstream: asyncio.StreamWriter | None = None
        try:
            if self.stalled:  # a silent broker: accept, never answer
                while await reader.read(65536):
                    pass
                return
            up_reader, upstream = await asyncio.open_connection(*self.target)
            self._transports.add(upstream.transport)  # type: ignore[arg-type]
            await asyncio.gather(
                self._pump(reader, upstream), self._pump(up_reader, writer), return_exceptions=True
            )
        except OSError:
            pass
        finally:
            for side in (writer, upstream):
                if side is not None:
                    side.transport.abort()
                    self._transports.discard(side.transport)  # type: ignore[arg-type]

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if self.stalled:
                    continue  # swallowed
                writer.write(data)
                await writer.drain()
        finally:
            writer.transport.abort()

    async def _drop_all(self) -> None:
        for transport in list(self._transports):
            transport.abort()
        self._transports.clear()

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        await self._drop_all()

    async def _stall(self) -> None:
        self.stalled = True

    async def _restore(self) -> None:
        if self.stalled:
            self.stalled = False
            await self._drop_all()  # their bytes were swallowed: they are broken for good
        await self._listen()

    def cut(self) -> None:
        self._call(self._cut())

    def stall(self) -> None:
        self._call(self._stall())

    def restore(self) -> None:
        self._call(self._restore())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self._cut())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def proxies() -> Iterable[Callable[[str], BrokerProxy]]:
    made: list[BrokerProxy] = []

    def make(driver: str) -> BrokerProxy:
        proxy = BrokerProxy(BROKERS[driver])
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.close()


@pytest.fixture
def behind_proxy(
    proxies: Callable[[str], BrokerProxy], serve_with_pipeline: ServeWithPipeline
) -> Callable[..., tuple[Served, BrokerProxy]]:
    """serve_with_pipeline, its pipeline reaching the broker through a new BrokerProxy (cut at
    once with `cut=True`: the broker is away when mailpipe starts)."""

    def serve(driver: str, *, cut: bool = False, **kwargs: Any) -> tuple[Served, BrokerProxy]:
        require_broker(driver)
        proxy = proxies(driver)
        if cut:
            proxy.cut()
        addr = broker_addr(driver, proxy.port)
        return serve_with_pipeline(driver, pipeline={"addr": addr}, **kwargs), proxy

    return serve


async def expect_451s(port: int, count: int, label: str) -> list[Sent]:
    sent = [await send_one(port, f"{label} {i}") for i in range(count)]
    codes = [s.code for s in sent]
    assert 250 not in codes, f"an email got 250 while the broker was {label}: {codes}"
    assert set(codes) == {451}, [s.reply for s in sent]
    assert all(s.reply.startswith("451 4.3.0") for s in sent), sent[0].reply
    return sent


async def back_to_250(port: int, label: str, timeout: float = 20.0) -> list[Sent]:
    """Emails until one gets 250 again (the 451s meanwhile are fine), then 20 that all must."""
    tries: list[Sent] = []

    async def one() -> bool:
        tries.append(await send_one(port, f"{label} retry {len(tries)}"))
        assert tries[-1].code in (250, 451), tries[-1].reply
        return tries[-1].code == 250

    await wait_for(one, timeout, f"a 250 after the broker came back ({label})", interval=0.1)
    after = await send_many(port, [f"{label} after {i}" for i in range(20)], 5)
    assert [s.code for s in after] == [250] * 20, [s.reply for s in after if s.code != 250]
    return tries + after


@pytest.mark.timeout(120)
@pytest.mark.parametrize("driver", BROKER_DRIVERS)
async def test_broker_cut_or_silent_gives_451_then_recovers(
    driver: str, behind_proxy: Callable[..., tuple[Served, BrokerProxy]]
) -> None:
    served, proxy = behind_proxy(driver, push_timeout="1s")
    server, port = served.server, served.port
    before = await send_many(port, [f"before {i}" for i in range(10)], 5)
    assert [s.code for s in before] == [250] * 10
    assert health(server)[0] == 200
    assert proxy.accepted > 0, "mailpipe did not go through the proxy"

    # 1. Cut: connections dropped, new ones refused.
    proxy.cut()
    refused = await expect_451s(port, 5, "cut")
    assert all(s.latency < 3 for s in refused), [s.latency for s in refused]

    def degraded() -> dict[str, Any] | None:
        status, doc = health(server)
        return doc if status == 503 and doc["status"] == "degraded" else None

    doc = await wait_for(degraded, 10, "/healthz to report the broker")
    assert doc["sinks"]["jobs"]["ok"] is False and doc["sinks"]["jobs"]["driver"] == driver
    proxy.restore()
    back = await back_to_250(port, "cut")
    await wait_for(lambda: health(server)[0] == 200, 10, "/healthz to recover")

    # 2. Silent: connections stay open but nothing comes back; push_timeout gives 451s.
    proxy.stall()
    started = time.monotonic()
    silent = await expect_451s(port, 2, "silent")
    assert all(0.9 <= s.latency < 8 for s in silent), [s.latency for s in silent]
    await wait_for(degraded, 10, "/healthz to report the silent broker")
    proxy.restore()
    back += await back_to_250(port, "silent")
    await wait_for(lambda: health(server)[0] == 200, 10, "/healthz to recover")
    took = time.monotonic() - started
    print(
        f"{driver}: cut 451 latencies {[round(s.latency, 3) for s in refused]}, silent "
        f"{[round(s.latency, 3) for s in silent]}, silent phase {took:.1f}s"
    )

    # Every 250 is in the pipeline, once; a 451'd email may be there too (at least once).
    ids = accepted(before) + accepted(back)
    got = await drain(await served.pipe.open(), len(ids), timeout=30)
    seen = Counter(d.job.id for d in got)
    assert not [i for i, n in seen.items() if n > 1], "a job was pushed twice"
    assert set(ids) <= set(seen), f"{len(set(ids) - set(seen))} emails answered 250 were lost"
    failed = {s.uuid for s in refused + silent} - {None}
    assert not failed & set(ids)


# ---- kill -9 -----------------------------------------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
async def test_kill_9_after_250_loses_nothing(
    driver: str, serve_with_pipeline: ServeWithPipeline
) -> None:
    served = serve_with_pipeline(driver)
    sent = await send_many(served.port, [f"kill {i}" for i in range(300)], 20)
    ids = accepted(sent)
    assert len(ids) == 300
    process = served.server.process
    process.send_signal(signal.SIGKILL)  # no consumer ever saw them
    assert process.wait(10) == -signal.SIGKILL
    got = await drain(await served.pipe.open(), len(ids), timeout=30)
    seen = Counter(d.job.id for d in got)
    assert set(seen) == set(ids), f"{len(set(ids) - set(seen))} lost after kill -9"
    assert max(seen.values()) == 1


# ---- consumers ----------------------------------------------------------------------------


async def wait_settled(pipe: Pipe, timeout: float = 15.0) -> PipelineStats:
    async def empty() -> PipelineStats | None:
        stats = await pipe.stats()
        return stats if stats.ready == stats.reserved == stats.delayed == 0 else None

    return await wait_for(empty, timeout, f"pipeline {pipe.name} to empty", interval=0.1)


@pytest.mark.parametrize("kind", ["php", "python"])
@pytest.mark.parametrize("driver", DRIVERS)
async def test_in_process_consumers_take_and_ack_every_job(
    driver: str, kind: str, serve_with_pipeline: ServeWithPipeline, test_log: Path
) -> None:
    served = serve_with_pipeline(driver, consume=kind, workers=2)
    sent = await send_many(served.port, [f"consume {kind} {i}" for i in range(20)], 4)
    ids = accepted(sent)
    assert len(ids) == 20

    lines = await wait_for(
        lambda: len(read_log(test_log)) >= 20 and read_log(test_log),
        20,
        "the consumer to log 20 jobs",
    )
    assert sorted(line["id"] for line in lines) == sorted(ids)
    assert {line["answer"] for line in lines} == {"ack"}
    assert all(line["subject"].startswith(f"consume {kind} ") for line in lines)
    await wait_for(lambda: served.metric("mailpipe_jobs_acked_total") == 20, 10, "20 acks")
    await wait_settled(served.pipe)
    assert served.metric("mailpipe_jobs_consumed_total") == 20
    assert (await served.pipe.stats()).dead == 0


@pytest.mark.parametrize("driver", DRIVERS)
async def test_consumer_crashing_mid_job_gets_the_job_again(
    driver: str, serve_with_pipeline: ServeWithPipeline, test_log: Path
) -> None:
    served = serve_with_pipeline(driver, consume="own", workers=2)
    crash = await send_one(served.port, "boom [crash-once]")
    others = await send_many(served.port, [f"fine {i}" for i in range(5)], 5)
    assert crash.code == 250 and [s.code for s in others] == [250] * 5

    def processed() -> list[dict[str, Any]]:
        lines = read_log(test_log)
        done = {line["id"] for line in lines if line["answer"] == "ack"}
        return lines if done >= {crash.uuid, *accepted(others)} else []

    lines = await wait_for(processed, 30, "the crashed job to be delivered again and acked")
    mine = [line for line in lines if line["id"] == crash.uuid]
    assert [(line["attempt"], line["answer"]) for line in mine] == [(1, "crash"), (2, "ack")]
    assert [line["mp_attempt"] for line in mine] == [1, 2]  # mailpipe counts it too
    assert mine[0]["pid"] != mine[1]["pid"]  # the crashed worker was replaced
    assert mine[1]["context"]["driver"] == driver
    assert mine[1]["context"]["pipeline"] == served.pipe.name
    assert mine[1]["context"]["headers"]["uuid"] == [crash.uuid]
    await wait_settled(served.pipe)
    assert served.metric("mailpipe_jobs_acked_total") == 6
    assert served.metric("mailpipe_jobs_nacked_total") == 1
    assert (await served.pipe.stats()).dead == 0


@pytest.mark.parametrize(
    ("driver", "kind", "dlq"),
    [
        ("sqlite", "php", False),
        ("redis", "php", False),
        ("amqp", "php", False),
        ("nats", "php", False),
        ("sqlite", "python", True),
        ("redis", "python", True),
        ("amqp", "own", True),
        ("nats", "own", True),
    ],
)
async def test_failing_job_is_retried_then_dead_lettered(
    driver: str, kind: str, dlq: bool, serve_with_pipeline: ServeWithPipeline, test_log: Path
) -> None:
    served = serve_with_pipeline(
        driver, pipeline={"max_attempts": 3}, dead_letter=dlq, consume=kind, workers=2
    )
    pipe, dead = served.pipe, served.dead
    bad = await send_one(served.port, "refused [fail]")
    good = await send_many(served.port, [f"fine {i}" for i in range(3)], 3)
    assert bad.code == 250 and [s.code for s in good] == [250] * 3
    await wait_for(
        lambda: served.metric("mailpipe_jobs_dead_lettered_total") == 1,
        15,
        "the failing job to be dead-lettered",
    )
    # One at a time: concurrent dead letters have a test of their own.
    doomed = await send_one(served.port, "refused for good [dead]")
    assert doomed.code == 250
    await wait_for(
        lambda: served.metric("mailpipe_jobs_dead_lettered_total") == 2,
        15,
        "the refused job to be dead-lettered",
    )
    await wait_for(
        lambda: served.metric("mailpipe_jobs_acked_total") == 3,
        10,
        "the other jobs to be acked",
    )
    lines = read_log(test_log)
    tries = [line["answer"] for line in lines if line["id"] == bad.uuid]
    assert tries == ["nack-requeue"] * 3, tries  # max_attempts deliveries, no more
    if kind != "php":  # the Python consumers log the attempt of the job's context
        assert [x.get("mp_attempt", x.get("attempt")) for x in lines if x["id"] == bad.uuid] == [
            1,
            2,
            3,
        ]
    assert [line["answer"] for line in lines if line["id"] == doomed.uuid] == ["nack"]
    assert {line["id"] for line in lines if line["answer"] == "ack"} == set(accepted(good))
    assert served.metric("mailpipe_jobs_nacked_total") == 2
    await wait_settled(pipe)
    if dead is None:
        assert (await pipe.stats()).dead == 2
    else:
        assert (await pipe.stats()).dead == 0
        letters = await drain(await dead.open(), 2, timeout=10)
        assert sorted(d.job.id for d in letters) == sorted([bad.uuid, doomed.uuid])
        for letter in letters:
            assert letter.job.pipeline == dead.name
            assert letter.job.headers["uuid"] == [letter.job.id]
            assert letter.job.headers["x-dead-from"] == [pipe.name]
            assert letter.job.headers["x-dead-reason"]
            assert json.loads(letter.job.payload)["uuid"] == letter.job.id


@pytest.mark.parametrize(
    "driver",
    DRIVERS,
)
async def test_concurrent_dead_letters_reach_the_dead_letter_pipeline_at_once(
    driver: str, serve_with_pipeline: ServeWithPipeline, test_log: Path
) -> None:
    """Eight workers refuse eight jobs for good within a few milliseconds of each other (the
    first dead letter connects the dead_letter pipeline's driver, the others arrive while it
    does): all eight are in the dead_letter pipeline right away, each delivered once."""
    count = 8
    served = serve_with_pipeline(driver, dead_letter=True, consume="own", workers=count)
    assert served.dead is not None
    # Held at DATA's end, then released together; each worker waits a little longer.
    sent = await finish_together(
        served.port, [(f"refused {i} [dead] [sleep {0.0015 * i:.4f}]", 0) for i in range(count)]
    )
    ids = accepted(sent)
    assert len(ids) == count
    await wait_for(
        lambda: served.metric("mailpipe_jobs_dead_lettered_total") == count,
        5,
        "the dead letters",
    )
    letters = await drain(await served.dead.open(), count, timeout=10)
    assert sorted(d.job.id for d in letters) == sorted(ids)
    assert Counter(x["id"] for x in read_log(test_log)) == dict.fromkeys(ids, 1)


@pytest.mark.parametrize("driver", DRIVERS)
async def test_consumer_crashing_on_every_delivery_is_dead_lettered(
    driver: str, serve_with_pipeline: ServeWithPipeline, test_log: Path
) -> None:
    """The PHP example consumer exits on `[crash]` every time: the job must not loop forever
    (nor take the pool down with it): max_attempts deliveries, then dead letters."""
    served = serve_with_pipeline(driver, pipeline={"max_attempts": 2}, consume="php", workers=1)
    crash = await send_one(served.port, "boom [crash]")
    assert crash.code == 250
    await wait_for(
        lambda: served.metric("mailpipe_jobs_dead_lettered_total") == 1,
        30,
        "the crashing job to be dead-lettered",
    )
    fine = await send_one(served.port, "after the crashes")
    await wait_for(
        lambda: any(line["id"] == fine.uuid for line in read_log(test_log)),
        20,
        "the pool to work again after the crashes",
    )
    assert served.metric("mailpipe_jobs_consumed_total") == 3
    await wait_settled(served.pipe)
    assert (await served.pipe.stats()).dead == 1


@pytest.mark.timeout(90)
@pytest.mark.parametrize("driver", DRIVERS)
async def test_kill_9_mid_consumption_then_restart_loses_nothing(
    driver: str, serve_with_pipeline: ServeWithPipeline, test_log: Path
) -> None:
    """mailpipe killed -9 while its in-process consumers hold jobs: a new mailpipe on the same
    pipeline gets them (visibility timeout, or the broker's redelivery) and acks them."""
    served = serve_with_pipeline(
        driver, pipeline={"visibility_timeout": "1s"}, consume="own", workers=2
    )
    first = served.server
    held = await send_many(first.smtp_port, [f"held {i} [hang-once]" for i in range(2)], 2)
    assert [s.code for s in held] == [250, 250]
    await wait_for(
        lambda: len([x for x in read_log(test_log) if x["answer"] == "hang"]) == 2,
        15,
        "both workers to be busy with a job",
    )
    workers = children_of(first.process.pid)
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(10)
    for pid in workers:  # the orphaned consumers, still asleep in the job
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    second = served.another()
    later = await send_many(second.smtp_port, [f"later {i}" for i in range(3)], 3)
    ids = accepted(held) + accepted(later)
    assert len(ids) == 5

    def all_acked() -> bool:
        return {x["id"] for x in read_log(test_log) if x["answer"] == "ack"} == set(ids)

    await wait_for(all_acked, 30, "every job, the abandoned ones included, to be acked")
    for job_id in accepted(held):
        tries = [(x["attempt"], x["answer"]) for x in read_log(test_log) if x["id"] == job_id]
        assert tries == [(1, "hang"), (2, "ack")], tries
        counted = [x["mp_attempt"] for x in read_log(test_log) if x["id"] == job_id]
        assert counted[0] == 1 and counted[1] >= 2, f"mailpipe's attempts: {counted}"
    await wait_settled(served.pipe)


def children_of(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


@pytest.mark.parametrize("driver", DRIVERS)
async def test_an_email_too_big_for_the_broker_fails_alone(
    driver: str, serve_with_pipeline: ServeWithPipeline
) -> None:
    """A 2 MB email in the same batch as five small ones (one batch: it is sent when the sixth
    job arrives, not on a timer, so a slow machine cannot split it).
    The small ones must get 250 whatever happens to the big one; the big one gets 250 and is
    in the pipeline whole, or an error, never 250-then-lost."""
    served = serve_with_pipeline(driver, batch_size=6, flush_interval="10s")
    sent = await finish_together(
        served.port, [("big", 2_000_000), *((f"small {i}", 0) for i in range(1, 6))]
    )
    assert served.metric("mailpipe_jobs_batch_size_count") == 1  # one batch
    big, small = sent[0], sent[1:]
    assert big.code in (250, 451, 552, 554), big.reply
    assert [s.code for s in small] == [250] * 5, [s.reply for s in small]
    expected = accepted(small) + ([big.uuid] if big.code == 250 else [])
    got = await drain(await served.pipe.open(), len(expected), timeout=15)
    assert sorted(d.job.id for d in got) == sorted(expected)
    if big.code == 250:
        [job] = [d.job for d in got if d.job.id == big.uuid]
        assert len(job.payload) > 2_000_000


@pytest.mark.parametrize("driver", DRIVERS)
async def test_jobs_waiting_for_a_free_worker_are_not_delivered_twice(
    driver: str, serve_with_pipeline: ServeWithPipeline, test_log: Path
) -> None:
    """One worker, four jobs of 0.6 s each, visibility_timeout 1 s: the consumer is healthy
    and every job is answered within 0.6 s of reaching a worker, so each runs once."""
    served = serve_with_pipeline(
        driver, pipeline={"visibility_timeout": "1s"}, consume="own", workers=1
    )
    sent = await send_many(served.port, [f"queued {i} [sleep 0.6]" for i in range(4)], 4)
    ids = accepted(sent)
    await wait_for(lambda: served.metric("mailpipe_jobs_acked_total") >= 4, 8, "four acks")
    # Every delivery counts in `consumed` as soon as the consumer holds it.
    assert served.metric("mailpipe_jobs_consumed_total") == 4
    await wait_settled(served.pipe, timeout=3)
    runs = Counter(x["id"] for x in read_log(test_log))
    assert runs == dict.fromkeys(ids, 1), f"runs per job: {sorted(runs.values())}"


@pytest.mark.parametrize("driver", DRIVERS)
async def test_delay_is_honoured_and_the_store_can_be_off(
    driver: str, serve_with_pipeline: ServeWithPipeline
) -> None:
    served = serve_with_pipeline(driver, delay="1s", config={"store": {"enabled": False}})
    sent = await send_one(served.port, "later")
    assert sent.code == 250, sent.reply
    assert served.server.request("GET", f"/api/v1/messages/{sent.uuid}")[0] != 200  # no store
    driver_ = await served.pipe.open()
    assert await driver_.receive(10, 0.4) == []  # not before its delay
    [delivery] = await drain(driver_, 1, timeout=10)
    assert delivery.job.id == sent.uuid and delivery.job.delay == 1.0
    assert json.loads(delivery.job.payload)["uuid"] == sent.uuid


@pytest.mark.parametrize("driver", BROKER_DRIVERS)
async def test_broker_down_at_start_then_up(
    driver: str, behind_proxy: Callable[..., tuple[Served, BrokerProxy]]
) -> None:
    """mailpipe starts with its broker unreachable: it serves (451s, /healthz degraded) and
    turns to 250s by itself once the broker is there."""
    served, proxy = behind_proxy(driver, cut=True, push_timeout="2s", wait=False)
    server = served.server

    def answering() -> tuple[int, dict[str, Any]] | None:
        assert server.process.poll() is None, server.log()
        with contextlib.suppress(OSError):
            return health(server)
        return None

    status, doc = await wait_for(answering, 20, "mailpipe to serve without its broker")
    assert status == 503 and doc["status"] == "degraded", doc
    assert doc["sinks"]["jobs"]["ok"] is False
    await expect_451s(served.port, 2, "down at start")
    proxy.restore()
    back = await back_to_250(served.port, "down at start")
    await wait_for(lambda: health(server)[0] == 200, 10, "/healthz to recover")
    ids = accepted(back)
    got = await drain(await served.pipe.open(), len(ids), timeout=15)
    assert set(ids) <= {d.job.id for d in got}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("driver", DRIVERS)
async def test_jobs_consume_command_and_a_consumer_killed_mid_job(
    driver: str,
    serve_with_pipeline: ServeWithPipeline,
    tmp_path: Path,
    test_log: Path,
) -> None:
    served = serve_with_pipeline(driver, pipeline={"visibility_timeout": "2s"})
    pipe = served.pipe
    consumer_cfg = tmp_path / "consumer.yaml"
    consumer_cfg.write_text(
        json.dumps(
            {
                "data_dir": str(tmp_path / "consumer-data"),
                "http": {"addr": f"127.0.0.1:{free_port()}"},
                "server": {"env": consumer_env(tmp_path, test_log)},
                "shutdown_timeout": "5s",
                "jobs": {
                    "pipelines": {pipe.name: pipe.yaml()},
                    "pool": {"command": consumer_command("own"), "num_workers": 2},
                },
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILPIPE_")}

    def consume() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mailpipe",
                "jobs",
                "consume",
                pipe.name,
                "-c",
                str(consumer_cfg),
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "consume.log", "ab"),
            start_new_session=True,
        )

    first = consume()
    try:
        slow = await send_one(served.port, "slow [hang-once]")
        quick = await send_many(served.port, [f"quick {i}" for i in range(5)], 5)
        assert slow.code == 250 and [s.code for s in quick] == [250] * 5

        def taken() -> bool:
            lines = read_log(test_log)
            acked = {x["id"] for x in lines if x["answer"] == "ack"}
            hung = {x["id"] for x in lines if x["answer"] == "hang"}
            return acked >= set(accepted(quick)) and slow.uuid in hung

        await wait_for(taken, 20, "the consumer process to take every job")
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # mid-job: the slow one is never answered
        first.wait(10)
    assert first.returncode == -signal.SIGKILL
    lines = read_log(test_log)
    assert {x["id"] for x in lines if x["answer"] == "ack"} == set(accepted(quick))
    assert [x["answer"] for x in lines if x["id"] == slow.uuid] == ["hang"]

    # Another consumer process gets the abandoned job (visibility timeout, or the broker's
    # redelivery when the connection dies) and acks it; SIGTERM then stops it with status 0.
    second = consume()
    try:

        def redelivered() -> list[dict[str, Any]]:
            return [x for x in read_log(test_log) if x["id"] == slow.uuid and x["answer"] == "ack"]

        [again] = await wait_for(redelivered, 30, "the abandoned job to come back")
        assert again["attempt"] == 2 and again["mp_attempt"] >= 2, again
        await wait_settled(pipe)
    finally:
        second.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            second.wait(15)
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
            second.wait(5)
    assert second.returncode == 0, (tmp_path / "consume.log").read_text()[-2000:]


# ---- config ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "key"),
    [
        (
            {
                "smtp": {"jobs": {"pipeline": "nowhere"}},
                "jobs": {"pipelines": {"emails": {"driver": "sqlite"}}},
            },
            "smtp.jobs.pipeline",
        ),
        (
            {
                "smtp": {"jobs": {"pipeline": "emails"}},
                "jobs": {"pipelines": {"emails": {"driver": "sqlite"}}, "consume": ["other"]},
            },
            "jobs.consume",
        ),
    ],
)
def test_undeclared_pipeline_exits_2_naming_the_key(
    config: dict[str, Any],
    key: str,
    tmp_path: Path,
) -> None:
    server = start_mailpipe(tmp_path / "bad", config, wait=False)
    try:
        assert server.process.wait(20) == 2
    finally:
        server.stop(signal.SIGKILL)
    output = server.log() + (server.workdir / "stdout.log").read_text()
    assert key in output and "not declared" in output, output
