"""The `roadrunner` pipeline: mailpipe's jobs pushed into an existing RoadRunner server.

PUSH ONLY. Each batch goes to RoadRunner's `jobs.PushBatch` over Goridge RPC (protobuf, on
its `rpc.listen`), onto RoadRunner's pipeline `config.pipeline`; the call returns once
RoadRunner's driver has the jobs, and only then does the SMTP client get its 250. A refusal
(an unknown pipeline, a broker down behind RoadRunner) or a RoadRunner that cannot be reached
is a DriverError: 451. RoadRunner's own consumers take the jobs, so nothing here receives,
acks or purges them; `stats` reads RoadRunner's `jobs.Stat`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mailpipe.config import RoadRunnerPipelineOptions
from mailpipe.jobs.base import Delivery, Driver, DriverError, Job, PipelineStats
from mailpipe.jobs.rpc import job_to_proto
from mailpipe.rpc.client import RPCClient
from mailpipe.rpc.proto import jobs_pb2 as pb
from mailpipe.rpc.registry import RPCError
from mailpipe.workers.goridge import FrameError

PUSH_ONLY = ("the roadrunner driver only pushes: RoadRunner's consumers take the jobs "
             "(consume them there, not with jobs.consume)")


class RoadRunnerDriver(Driver):
    name = "roadrunner"
    options: RoadRunnerPipelineOptions

    def __init__(self, pipeline: str, options: Any, *, data_dir: Path) -> None:
        super().__init__(pipeline, options, data_dir=data_dir)
        self.remote = options.pipeline or pipeline
        self._client = RPCClient(options.addr, timeout=options.timeout)
        self._last_error: str | None = None

    async def connect(self) -> None:
        await self._guarded(self._client.connect())

    async def push_batch(self, jobs: list[Job]) -> None:
        request = pb.PushBatchRequest(jobs=[job_to_proto(job, self.remote) for job in jobs])
        await self._guarded(self._client.call("jobs.PushBatch", request.SerializeToString()))

    async def stats(self) -> PipelineStats:
        reply = await self._guarded(self._client.call_proto("jobs.Stat", pb.Empty(), pb.Stats))
        for stat in reply.stats:
            if stat.pipeline == self.remote:
                return PipelineStats(
                    pipeline=self.pipeline, driver=self.name, queue=self.remote,
                    ready=stat.active, delayed=stat.delayed, reserved=stat.reserved,
                    extra={"roadrunner_driver": stat.driver},
                )
        raise DriverError(f"RoadRunner at {self.options.addr} has no pipeline {self.remote!r}")

    async def _guarded(self, call: Any) -> Any:
        """The call's result; what goes wrong as a DriverError naming RoadRunner."""
        try:
            result = await call
        except RPCError as exc:  # RoadRunner answered, with a refusal
            self._last_error = f"RoadRunner at {self.options.addr} refused: {exc}"
            raise DriverError(self._last_error) from None
        except (OSError, FrameError, TimeoutError, EOFError) as exc:
            self._last_error = (f"RoadRunner at {self.options.addr} is unreachable: "
                                f"{str(exc) or type(exc).__name__}")
            raise DriverError(self._last_error) from None
        self._last_error = None
        return result

    def health(self) -> dict[str, Any]:
        status: dict[str, Any] = {"ok": self._last_error is None, "driver": self.name,
                                  "addr": self.options.addr, "pipeline": self.remote}
        if self._last_error:
            status["last_error"] = self._last_error
        return status

    async def close(self) -> None:
        await self._client.close()

    # ---- what RoadRunner's consumers do, not mailpipe ---------------------------------------

    async def receive(self, max_items: int, timeout: float) -> list[Delivery]:
        raise DriverError(PUSH_ONLY)

    async def ack(self, delivery: Delivery) -> None:
        raise DriverError(PUSH_ONLY)

    async def nack(self, delivery: Delivery, *, requeue: bool, delay: float = 0.0) -> None:
        raise DriverError(PUSH_ONLY)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        raise DriverError(PUSH_ONLY)

    async def purge(self) -> int:
        raise DriverError(PUSH_ONLY)
