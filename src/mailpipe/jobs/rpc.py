"""RoadRunner's jobs plugin RPC (`jobs.*`, protobuf messages of jobs.v1) over the jobs
operations of `AdminOps`: a job pushed from PHP's `Spiral\\RoadRunner\\Jobs\\Jobs` lands on
its pipeline like any job mailpipe pushes, and is consumed the same way."""

from __future__ import annotations

from typing import Any

from mailpipe.admin.ops import AdminOps, UnknownPipeline
from mailpipe.config import Config
from mailpipe.jobs.base import DriverError, Job
from mailpipe.rpc.proto import jobs_pb2 as pb
from mailpipe.rpc.registry import Registry, RPCError


def job_from_proto(message: Any) -> Job:
    options = message.options
    return Job(
        id=message.id,
        payload=message.payload,
        name=message.job,
        headers={key: list(value.value) for key, value in message.headers.items()},
        pipeline=options.pipeline,
        priority=options.priority,
        delay=float(options.delay),
        auto_ack=options.auto_ack,
    )


def job_to_proto(job: Job, pipeline: str) -> Any:
    """`job` as RoadRunner's Job message, on RoadRunner's pipeline `pipeline`. RoadRunner's
    delay is whole seconds: a part second is rounded up, never delivered early."""
    return pb.Job(
        job=job.name,
        id=job.id,
        payload=job.payload,
        headers={key: pb.HeaderValue(value=values) for key, values in job.headers.items()},
        options=pb.Options(priority=job.priority, pipeline=pipeline, delay=-int(-job.delay // 1),
                           auto_ack=job.auto_ack),
    )


def _stat(entry: dict[str, Any], priority: int) -> Any:
    """One pipeline of AdminOps.pipelines() as RoadRunner's Stat (`active` = jobs ready;
    `ready` = consumed here and not paused)."""
    return pb.Stat(
        pipeline=entry["pipeline"], driver=entry.get("driver", ""), queue=entry.get("queue", ""),
        active=entry.get("ready", 0), delayed=entry.get("delayed", 0),
        reserved=entry.get("reserved", 0),
        ready=bool(entry.get("consumed")) and not entry.get("paused"), priority=priority,
    )


def register(registry: Registry, ops: AdminOps, config: Config) -> None:
    """`config`: where jobs.Stat reads each pipeline's priority."""
    registry.expect(UnknownPipeline, DriverError, ValueError)

    async def push(request: Any) -> Any:
        if not request.HasField("job"):
            raise RPCError("job is required")
        if not request.job.id:
            raise RPCError("empty ID field not allowed")
        await ops.push_jobs([job_from_proto(request.job)])
        return pb.Empty()

    async def push_batch(request: Any) -> Any:
        await ops.push_jobs([job_from_proto(job) for job in request.jobs])
        return pb.Empty()

    async def pause(request: Any) -> Any:
        for name in request.pipelines:
            ops.pause_pipeline(name)
        return pb.Empty()

    async def resume(request: Any) -> Any:
        for name in request.pipelines:
            ops.resume_pipeline(name)
        return pb.Empty()

    async def list_pipelines(_: Any) -> Any:
        return pb.Pipelines(pipelines=ops.pipeline_names())

    async def stat(_: Any) -> Any:
        entries = await ops.pipelines()
        pipelines = config.jobs.pipelines
        return pb.Stats(stats=[
            _stat(e, pipelines[e["pipeline"]].config.priority if e["pipeline"] in pipelines else 0)
            for e in entries
        ])

    async def declare(request: Any) -> Any:
        options = dict(request.pipeline)
        name, driver = options.pop("name", ""), options.pop("driver", "")
        if not name or not driver:
            raise RPCError("a declared pipeline needs a name and a driver")
        ops.declare_pipeline(name, {"driver": driver, "config": options})
        return pb.Empty()

    async def destroy(request: Any) -> Any:
        for name in request.pipelines:
            await ops.destroy_pipeline(name)
        return pb.Pipelines(pipelines=list(request.pipelines))

    for name, handler, request, response in (
        ("jobs.Push", push, pb.PushRequest, pb.Empty),
        ("jobs.PushBatch", push_batch, pb.PushBatchRequest, pb.Empty),
        ("jobs.Pause", pause, pb.Pipelines, pb.Empty),
        ("jobs.Resume", resume, pb.Pipelines, pb.Empty),
        ("jobs.List", list_pipelines, pb.Empty, pb.Pipelines),
        ("jobs.Stat", stat, pb.Empty, pb.Stats),
        ("jobs.Declare", declare, pb.DeclareRequest, pb.Empty),
        ("jobs.Destroy", destroy, pb.Pipelines, pb.Pipelines),
    ):
        registry.register(name, handler, request=request, response=response)
