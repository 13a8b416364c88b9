"""Building the jobs parts from the config: the SMTP side's sink and the consumers."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from mailpipe.config import Config
from mailpipe.jobs.base import Driver, DriverError, Notify
from mailpipe.jobs.consumer import JobsConsumer, PipelineConsumer
from mailpipe.jobs.drivers import make_driver
from mailpipe.jobs.sink import JobsSink
from mailpipe.lifecycle import Lifecycle
from mailpipe.metrics import Metrics
from mailpipe.workers.on_init import run_on_init
from mailpipe.workers.pool import WorkerPool

log = logging.getLogger("mailpipe.jobs")

DEPTH_INTERVAL = 5.0


async def watch_queue_depth(drivers: list[Driver], metrics: Metrics,
                            interval: float = DEPTH_INTERVAL) -> None:
    """Keep `mailpipe_jobs_queue_depth` current: jobs ready or delayed in each pipeline."""
    while True:
        for driver in drivers:
            try:
                stats = await driver.stats()
            except DriverError:
                continue  # the broker is down: /healthz says so; keep the last figure
            metrics.jobs_depth.labels(driver.pipeline).set(stats.ready + stats.delayed)
        await asyncio.sleep(interval)


def pipeline_driver(config: Config, name: str) -> Driver:
    return make_driver(name, config.jobs.pipelines[name], data_dir=Path(config.data_dir))


def build_jobs_sink(config: Config, metrics: Metrics) -> JobsSink:
    assert config.smtp.jobs is not None
    driver = pipeline_driver(config, config.smtp.jobs.pipeline)
    return JobsSink(driver, config.smtp.jobs, metrics)


def build_consumer(config: Config, names: list[str], metrics: Metrics,
                   notify: Notify | None = None) -> JobsConsumer:
    """Consumers for `names` sharing one pool of jobs workers (RR_MODE=jobs); `notify` fires
    the plugins' on_dequeue and on_queue_retry."""
    pool = WorkerPool(config.jobs.pool, config.server, metrics=metrics, mode="jobs",
                      rpc_address=config.rr_rpc)
    consumers = {}
    workers = asyncio.Semaphore(max(1, pool.target))
    for name in names:
        options = config.jobs.pipelines[name].config
        dead = pipeline_driver(config, options.dead_letter) if options.dead_letter else None
        consumers[name] = PipelineConsumer(pipeline_driver(config, name), options, pool,
                                           metrics=metrics, dead_letter=dead, workers=workers,
                                           notify=notify)
    return JobsConsumer(consumers, pool)


async def close_drivers(consumer: JobsConsumer) -> None:
    """Close the consumer's drivers (its pipelines and their dead-letter ones), each whatever
    the others do."""
    for pipeline in consumer.consumers.values():
        for driver in (pipeline.driver, pipeline.dead_letter_driver):
            if driver is not None:
                try:
                    await driver.close()
                except Exception:
                    log.exception("closing pipeline %s failed", driver.pipeline)


async def run_consumer(config: Config, names: list[str], metrics: Metrics) -> None:
    """`mailpipe jobs consume`: drain pipelines until SIGINT/SIGTERM (lifecycle.py), then stop
    in order: no more pulling, the jobs in hand finish (unless hurried), drivers closed.

    The configured plugins are loaded here too, so their on_dequeue and on_queue_retry fire in
    this process (their SMTP hooks are never called: there is no SMTP here)."""
    from mailpipe.capture.verdicts import Verdicts
    from mailpipe.plugins.manager import PluginManager

    plugins = PluginManager(config.plugins, Verdicts())
    consumer = build_consumer(config, names, metrics, notify=plugins.notify)
    tasks: list[asyncio.Task[None]] = []

    async def start() -> None:
        await run_on_init(config.server)
        await plugins.start()
        await consumer.start()
        drivers = [c.driver for c in consumer.consumers.values()]
        tasks.append(asyncio.create_task(watch_queue_depth(drivers, metrics)))

    async def drain(hurry: bool) -> None:
        if hurry:  # busy workers are stopped now, not after destroy_timeout
            await consumer.pool.stop(0.0)
        await consumer.stop(0.0 if hurry else config.shutdown_timeout)

    async def close() -> None:
        for task in tasks:
            task.cancel()
        await close_drivers(consumer)
        await plugins.close()

    await Lifecycle().run(start, drain, close)
