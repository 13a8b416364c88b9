"""Pipeline drivers, one module per broker, imported only when a pipeline uses it."""

from __future__ import annotations

import importlib
from pathlib import Path

from mailpipe.config import PipelineConfig
from mailpipe.jobs.base import Driver

DRIVERS = {
    "sqlite": "mailpipe.jobs.drivers.sqlite:SQLiteDriver",
    "memory": "mailpipe.jobs.drivers.memory:MemoryDriver",
    "redis": "mailpipe.jobs.drivers.redis:RedisDriver",
    "amqp": "mailpipe.jobs.drivers.amqp:AMQPDriver",
    "nats": "mailpipe.jobs.drivers.nats:NATSDriver",
    "roadrunner": "mailpipe.jobs.drivers.roadrunner:RoadRunnerDriver",
}


def make_driver(pipeline: str, config: PipelineConfig, *, data_dir: Path) -> Driver:
    module_name, _, class_name = DRIVERS[config.driver].partition(":")
    driver_class = getattr(importlib.import_module(module_name), class_name)
    return driver_class(pipeline, config.config, data_dir=data_dir)
