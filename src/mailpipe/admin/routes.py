"""The admin routes: the worker pool, the live SMTP sessions, the jobs pipelines, the plugins
and stopping the process.

They sit beside the messages API under the same auth and act only through `AdminOps`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

import orjson
from aiohttp import web

from mailpipe.admin.ops import (
    AdminOps,
    NotConsumed,
    NoWorkerPool,
    UnknownPipeline,
    UnknownPlugin,
)
from mailpipe.jobs.base import DriverError
from mailpipe.web.app import ApiError, json_response

log = logging.getLogger(__name__)

NO_POOL = "no worker pool configured (set server.command)"
NO_ADMIN = "the admin API is not available in this server"
# Long enough for the 202 to leave before the shutdown begins.
STOP_DELAY = 0.05


class AdminRoutes:
    """Handlers over one `AdminOps`; with None every route answers 404."""

    def __init__(self, ops: AdminOps | None) -> None:
        self._ops = ops
        self._stopping = False

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/api/v1/workers", self.list_workers),
            web.post("/api/v1/workers", self.add_worker),
            web.delete("/api/v1/workers", self.remove_worker),
            web.post("/api/v1/workers/reset", self.reset_workers),
            web.get("/api/v1/connections", self.list_connections),
            web.delete("/api/v1/connections/{uuid}", self.close_connection),
            web.post("/api/v1/stop", self.stop),
            web.get("/api/v1/jobs/pipelines", self.list_pipelines),
            web.get("/api/v1/jobs/pipelines/{name}", self.pipeline_stats),
            web.post("/api/v1/jobs/pipelines/{name}/pause", self.pause_pipeline),
            web.post("/api/v1/jobs/pipelines/{name}/resume", self.resume_pipeline),
            web.delete("/api/v1/jobs/pipelines/{name}/jobs", self.purge_pipeline),
            web.get("/api/v1/plugins", self.list_plugins),
            web.get("/api/v1/plugins/{name}", self.plugin_status),
            web.post("/api/v1/plugins/reload", self.reload_plugins),
        ]

    @property
    def ops(self) -> AdminOps:
        if self._ops is None:
            raise ApiError(404, NO_ADMIN)
        return self._ops

    # ---- workers ------------------------------------------------------------------------

    async def list_workers(self, request: web.Request) -> web.Response:
        try:
            return json_response({"workers": self.ops.workers()})
        except NoWorkerPool:
            raise ApiError(404, NO_POOL) from None

    async def add_worker(self, request: web.Request) -> web.Response:
        try:
            worker = await self.ops.add_worker()
        except NoWorkerPool:
            raise ApiError(404, NO_POOL) from None
        except Exception as exc:
            log.exception("admin API: adding a worker failed")
            raise ApiError(500, f"cannot start a worker: {exc}") from None
        return json_response(worker, status=201)

    async def remove_worker(self, request: web.Request) -> web.Response:
        try:
            worker = await self.ops.remove_worker()
        except NoWorkerPool:
            raise ApiError(404, NO_POOL) from None
        if worker is None:
            raise ApiError(409, "no worker left to remove")
        return json_response(worker)

    async def reset_workers(self, request: web.Request) -> web.Response:
        try:
            return json_response({"reset": await self.ops.reset_workers()})
        except NoWorkerPool:
            raise ApiError(404, NO_POOL) from None

    # ---- connections and the process ----------------------------------------------------

    async def list_connections(self, request: web.Request) -> web.Response:
        return json_response({"connections": self.ops.connections()})

    async def close_connection(self, request: web.Request) -> web.Response:
        if not self.ops.close_connection(request.match_info["uuid"]):
            raise ApiError(404, "connection not found")
        return web.Response(status=204)

    async def stop(self, request: web.Request) -> web.Response:
        ops = self.ops
        if not self._stopping:  # a second request must not count as a second signal
            self._stopping = True
            asyncio.get_running_loop().call_later(STOP_DELAY, ops.stop)
            log.info("stop requested through the admin API",
                     extra={"remote": request.remote or ""})
        return json_response({"stopping": True}, status=202)

    # ---- jobs pipelines -----------------------------------------------------------------

    async def list_pipelines(self, request: web.Request) -> web.Response:
        return json_response({"pipelines": await self.ops.pipelines()})

    async def pipeline_stats(self, request: web.Request) -> web.Response:
        with _pipeline_errors():
            return json_response(await self.ops.pipeline_stats(request.match_info["name"]))

    async def pause_pipeline(self, request: web.Request) -> web.Response:
        with _pipeline_errors():
            self.ops.pause_pipeline(request.match_info["name"])
        return web.Response(status=204)

    async def resume_pipeline(self, request: web.Request) -> web.Response:
        with _pipeline_errors():
            self.ops.resume_pipeline(request.match_info["name"])
        return web.Response(status=204)

    async def purge_pipeline(self, request: web.Request) -> web.Response:
        with _pipeline_errors():
            purged = await self.ops.purge_pipeline(request.match_info["name"])
            return json_response({"purged": purged})

    # ---- plugins ------------------------------------------------------------------------

    async def list_plugins(self, request: web.Request) -> web.Response:
        return json_response(self.ops.plugin_list())

    async def plugin_status(self, request: web.Request) -> web.Response:
        try:
            return json_response(self.ops.plugin_status(request.match_info["name"]))
        except UnknownPlugin as exc:
            raise ApiError(404, str(exc)) from None

    async def reload_plugins(self, request: web.Request) -> web.Response:
        names = _plugin_names(await request.read())
        outcomes = await self.ops.reload_plugins(names)
        log.info("plugins reloaded through the admin API",
                 extra={"remote": request.remote or "", "outcomes": outcomes})
        return json_response({"plugins": outcomes})


def _plugin_names(body: bytes) -> list[str] | None:
    """The optional body of a reload: {"plugins": [names]}; none, or null, means every one."""
    if not body.strip():
        return None
    error = ApiError(400, 'the body must be {"plugins": [names]} (or empty: every plugin)')
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise error from None
    if not isinstance(doc, dict) or set(doc) - {"plugins"}:
        raise error
    names = doc.get("plugins")
    if names is None:
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise error
    return names


@contextlib.contextmanager
def _pipeline_errors() -> Iterator[None]:
    """NotConsumed -> 409, UnknownPipeline -> 404, DriverError (the broker) -> 503."""
    try:
        yield
    except NotConsumed as exc:
        raise ApiError(409, str(exc)) from None
    except UnknownPipeline as exc:
        raise ApiError(404, str(exc)) from None
    except DriverError as exc:
        raise ApiError(503, f"broker unavailable: {exc}") from None
