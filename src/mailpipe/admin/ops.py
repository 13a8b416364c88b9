"""What the admin API and CLI may do to a running mailpipe: the one seam between the web layer
and the parts it manages (worker pool, SMTP sessions, the process itself)."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any, Protocol

from mailpipe.capture.server import REPLY_CLOSED_BY_ADMIN
from mailpipe.config import Config
from mailpipe.jobs.base import DriverError

if TYPE_CHECKING:
    from mailpipe.capture.server import CaptureServer
    from mailpipe.jobs.base import Driver, Job
    from mailpipe.jobs.consumer import JobsConsumer, PipelineConsumer
    from mailpipe.jobs.sink import JobsSink
    from mailpipe.plugins.manager import PluginManager
    from mailpipe.workers.pool import WorkerPool

log = logging.getLogger("mailpipe.admin")


class NoWorkerPool(Exception):
    """Worker management was asked for, but no worker pool is configured (server.command)."""


class UnknownPipeline(Exception):
    """A jobs pipeline that is not declared, or not consumed by this process."""


class NotConsumed(UnknownPipeline):
    """A declared pipeline that this process does not consume (pause and resume need one)."""


class UnknownPlugin(Exception):
    """A plugin name that is not loaded in this process."""


class AdminOps(Protocol):
    """Worker management takes the plugin whose pool is meant: "smtp" (the SMTP workers, the
    default) or "jobs" (the consumers' pool), as RoadRunner's informer names them."""

    def worker_plugins(self) -> list[str]:
        """The plugins that have a worker pool in this process."""
        ...

    def workers(self, plugin: str = "smtp") -> list[dict[str, Any]]:
        """Each worker: pid, status (ready/working/invalid/...), num_execs, created_at (RFC 3339),
        rss_bytes, cpu_percent, command, last_error. Raises NoWorkerPool."""
        ...

    async def add_worker(self, plugin: str = "smtp") -> dict[str, Any]:
        """Start one more worker; its info once ready. Raises NoWorkerPool."""
        ...

    async def remove_worker(self, plugin: str = "smtp") -> dict[str, Any] | None:
        """Stop one worker (an idle one first); its info, or None when none is left."""
        ...

    async def reset_workers(self, plugin: str = "smtp") -> int:
        """Replace every worker without failing emails in flight; how many were replaced."""
        ...

    def connections(self) -> list[dict[str, Any]]:
        """Each SMTP session: uuid, remote_addr, server, since, state, emails, tls."""
        ...

    def close_connection(self, uuid: str) -> bool:
        """Close one session with 421 (after the email the client is sending, if any; an email
        waiting on a worker is not waited for); False if unknown."""
        ...

    def stop(self) -> None:
        """Begin a graceful shutdown, as SIGTERM does."""
        ...

    def pipeline_names(self) -> list[str]:
        """The declared jobs pipelines (the config's and those declared at run time)."""
        ...

    async def pipelines(self) -> list[dict[str, Any]]:
        """Each declared jobs pipeline: name, driver, stats (ready, delayed, reserved, dead),
        consumed (by this process), paused."""
        ...

    async def pipeline_stats(self, name: str) -> dict[str, Any]:
        """One pipeline's entry as in pipelines(). Raises UnknownPipeline."""
        ...

    def pause_pipeline(self, name: str) -> None:
        """Stop taking jobs from a pipeline this process consumes. Raises UnknownPipeline,
        NotConsumed (its subclass) for a declared pipeline this process does not consume."""
        ...

    def resume_pipeline(self, name: str) -> None:
        ...

    async def purge_pipeline(self, name: str) -> int:
        """Delete the pipeline's waiting jobs; how many. Raises UnknownPipeline."""
        ...

    async def push_jobs(self, jobs: list[Job]) -> None:
        """Store the jobs on their pipelines (job.pipeline), each pipeline's in one confirmed
        batch; a priority of 0 takes the pipeline's. Raises UnknownPipeline, DriverError."""
        ...

    def declare_pipeline(self, name: str, pipeline: dict[str, Any]) -> None:
        """Declare a pipeline at run time ({"driver": ..., "config": {...}}), as the config's
        jobs.pipelines does. Raises ValueError (bad or taken)."""
        ...

    async def destroy_pipeline(self, name: str) -> None:
        """Forget a pipeline declared at run time. Raises UnknownPipeline, ValueError (one of
        the config's)."""
        ...

    def plugin_list(self) -> dict[str, Any]:
        """{"plugins": each loaded plugin's status (PluginManager.status), "reloads": n}."""
        ...

    def plugin_status(self, name: str) -> dict[str, Any]:
        """One loaded plugin's status. Raises UnknownPlugin."""
        ...

    async def reload_plugins(self, names: list[str] | None) -> dict[str, str]:
        """Reload the named plugins (every one when None); each name's outcome ("reloaded"
        or "error: ...")."""
        ...


# ---- the implementation, over a running Mailpipe's parts --------------------------------


WORKER_PLUGINS = ("smtp", "jobs")


class AdminMixin:
    """`AdminOps` (see admin.py) over a running Mailpipe."""

    pool: WorkerPool | None
    consumer: JobsConsumer | None
    capture: CaptureServer

    def _pool(self, plugin: str = "smtp") -> WorkerPool:
        if plugin not in WORKER_PLUGINS:
            raise NoWorkerPool(f"no plugin {plugin!r} has workers (mailpipe's are smtp "
                               "and jobs)")
        pool = self.pool if plugin == "smtp" else (self.consumer.pool if self.consumer
                                                   else None)
        if pool is None:
            raise NoWorkerPool("no worker pool configured (set server.command)"
                               if plugin == "smtp" else
                               "no jobs worker pool (no pipeline in jobs.consume)")
        return pool

    def worker_plugins(self) -> list[str]:
        return [name for name, pool in (("smtp", self.pool),
                                        ("jobs", self.consumer.pool if self.consumer else None))
                if pool is not None]

    def workers(self, plugin: str = "smtp") -> list[dict[str, Any]]:
        return self._pool(plugin).info()

    async def add_worker(self, plugin: str = "smtp") -> dict[str, Any]:
        return await self._pool(plugin).add_worker()

    async def remove_worker(self, plugin: str = "smtp") -> dict[str, Any] | None:
        return await self._pool(plugin).remove_worker()

    async def reset_workers(self, plugin: str = "smtp") -> int:
        return await self._pool(plugin).reset()

    def connections(self) -> list[dict[str, Any]]:
        return [session.info() for session in self.capture.sessions()]

    def close_connection(self, uuid: str) -> bool:
        for session in self.capture.sessions():
            if session.id == uuid:
                log.info("closing connection at an administrator's request",
                         extra={"session": uuid, "state": session.info()["state"]})
                session.request_close(REPLY_CLOSED_BY_ADMIN)
                return True
        return False


class JobsAdminMixin:
    """The jobs part of `AdminOps`."""

    config: Config
    consumer: JobsConsumer | None
    jobs_sink: JobsSink | None
    jobs_drivers: dict[str, Driver]
    declared_at_runtime: set[str]

    def _declared(self, name: str) -> None:
        if name not in self.config.jobs.pipelines:
            raise UnknownPipeline(f"no pipeline {name!r} is declared in jobs.pipelines")

    def _driver(self, name: str) -> Driver:
        self._declared(name)
        consumer = self.consumer.get(name) if self.consumer else None
        if consumer is not None:
            return consumer.driver
        if self.jobs_sink is not None and self.jobs_sink.driver.pipeline == name:
            return self.jobs_sink.driver
        if name not in self.jobs_drivers:
            from mailpipe.jobs.runner import pipeline_driver

            self.jobs_drivers[name] = pipeline_driver(self.config, name)
        return self.jobs_drivers[name]

    def _consumer(self, name: str) -> PipelineConsumer:
        self._declared(name)
        consumer = self.consumer.get(name) if self.consumer else None
        if consumer is None:
            raise NotConsumed(f"pipeline {name!r} is not consumed by this process "
                              "(not in its jobs.consume)")
        return consumer

    async def pipeline_stats(self, name: str) -> dict[str, Any]:
        driver = self._driver(name)
        await driver.connect()
        stats = (await driver.stats()).as_dict()
        consumer = self.consumer.get(name) if self.consumer else None
        stats.update(consumed=consumer is not None,
                     paused=consumer.paused if consumer else False)
        return stats

    def pipeline_names(self) -> list[str]:
        return list(self.config.jobs.pipelines)

    async def pipelines(self) -> list[dict[str, Any]]:
        out = []
        for name in self.pipeline_names():
            try:
                out.append(await self.pipeline_stats(name))
            except DriverError as exc:
                out.append({"pipeline": name, "error": str(exc)})
        return out

    def pause_pipeline(self, name: str) -> None:
        self._consumer(name).pause()

    def resume_pipeline(self, name: str) -> None:
        self._consumer(name).resume()

    async def purge_pipeline(self, name: str) -> int:
        driver = self._driver(name)
        await driver.connect()
        return await driver.purge()

    async def push_jobs(self, jobs: list[Job]) -> None:
        by_pipeline: dict[str, list[Job]] = {}
        for job in jobs:
            self._declared(job.pipeline)
            by_pipeline.setdefault(job.pipeline, []).append(job)
        for name, batch in by_pipeline.items():
            default = self.config.jobs.pipelines[name].config.priority
            for job in batch:
                job.priority = job.priority or default  # RoadRunner's rule for 0
            driver = self._driver(name)
            await driver.connect()
            await driver.push_batch(batch)

    def declare_pipeline(self, name: str, pipeline: dict[str, Any]) -> None:
        from mailpipe.config import PipelineConfig

        if name in self.config.jobs.pipelines:
            raise ValueError(f"pipeline {name!r} is already declared")
        self.config.jobs.pipelines[name] = PipelineConfig.model_validate(pipeline)
        self.declared_at_runtime.add(name)
        log.info("pipeline declared over RPC", extra={"pipeline": name,
                                                      "driver": pipeline.get("driver")})

    async def destroy_pipeline(self, name: str) -> None:
        self._declared(name)
        if name not in self.declared_at_runtime:
            raise ValueError(f"pipeline {name!r} is declared in the config file; only "
                             "pipelines declared at run time (jobs.Declare) can be destroyed")
        driver = self.jobs_drivers.pop(name, None)
        if driver is not None:
            with contextlib.suppress(Exception):
                await driver.close()
        del self.config.jobs.pipelines[name]
        self.declared_at_runtime.discard(name)

    async def close_jobs_drivers(self) -> None:
        for driver in self.jobs_drivers.values():
            with contextlib.suppress(Exception):
                await driver.close()


class PluginsAdminMixin:
    """The plugins part of `AdminOps`."""

    plugins: PluginManager

    def plugin_list(self) -> dict[str, Any]:
        return {"plugins": self.plugins.status(), "reloads": self.plugins.reloads}

    def plugin_status(self, name: str) -> dict[str, Any]:
        for status in self.plugins.status():
            if status["name"] == name:
                return status
        raise UnknownPlugin(f"no plugin {name!r} is loaded")

    async def reload_plugins(self, names: list[str] | None) -> dict[str, str]:
        log.info("plugin reload requested through the admin API",
                 extra={"plugins": ",".join(names) if names is not None else "all"})
        return await self.plugins.reload(names)
