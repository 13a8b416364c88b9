"""The jobs pipeline as a sink: each email becomes one job, in RoadRunner's push format."""

from __future__ import annotations

import contextlib

from mailpipe.config import SMTPJobsConfig
from mailpipe.event import CapturedEmail
from mailpipe.jobs.base import JOB_NAME, Driver, DriverError, Job, Notify
from mailpipe.jobs.producer import BatchPusher
from mailpipe.metrics import Metrics
from mailpipe.sinks.base import DELIVER, Sink, SinkContext, SinkError, SinkSettings
from mailpipe.sinks.results import Accepted


class JobsSink(Sink):
    name = "jobs"
    required = True
    stage = DELIVER
    timeout = 0.0  # smtp.jobs.push_timeout bounds the wait for the broker's confirm
    outcome_key = "job"
    needs_section = False  # on when smtp.jobs is set (see Config.delivers_to_jobs)

    @classmethod
    def create(cls, settings: SinkSettings, context: SinkContext) -> JobsSink | None:
        if not context.config.delivers_to_jobs():
            return None
        from mailpipe.jobs.runner import build_jobs_sink  # runner imports this module

        return build_jobs_sink(context.config, context.metrics)

    def __init__(self, driver: Driver, config: SMTPJobsConfig, metrics: Metrics,
                 notify: Notify | None = None) -> None:
        self.driver = driver
        self.notify = notify  # on_enqueue, once the broker confirmed the job
        self.config = config
        self.pusher = BatchPusher(
            driver,
            batch_size=config.batch_size,
            flush_interval=config.flush_interval,
            push_timeout=config.push_timeout,
            metrics=metrics,
        )
        self.headers = {
            key: value if isinstance(value, list) else [value]
            for key, value in config.headers.items()
        }

    async def start(self) -> None:
        # A broker that is down at start is like one that goes down later: emails get 451
        # until it is back; mailpipe itself starts and serves the rest.
        with contextlib.suppress(DriverError):
            await self.driver.connect()

    async def close(self) -> None:
        await self.pusher.close()
        await self.driver.close()

    def job_for(self, email: CapturedEmail) -> Job:
        return Job(
            id=email.uuid,
            payload=email.json(),
            name=JOB_NAME,
            headers={"uuid": [email.uuid], **self.headers},
            pipeline=self.config.pipeline,
            priority=self.config.priority,
            delay=self.config.delay,
            auto_ack=self.config.auto_ack,
        )

    async def submit(self, email: CapturedEmail) -> Accepted:
        try:
            await self.pusher.push(self.job_for(email))
        except DriverError as exc:
            raise SinkError(str(exc)) from exc
        if self.notify is not None:
            self.notify("on_enqueue", {"queue_id": email.uuid}, event=email.event)
        return Accepted(note={"id": email.uuid, "pipeline": self.config.pipeline,
                              "driver": self.driver.name})

    def health(self) -> dict[str, object]:
        status = dict(self.driver.health())
        if self.pusher.last_error:
            status.update(ok=False, last_error=self.pusher.last_error)
        return status
