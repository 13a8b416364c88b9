"""The admin operations over RoadRunner's RPC, by RoadRunner's names: the SMTP plugin's
`smtp.*` methods, and the `informer` and `resetter` plugins that `rr workers` and `rr reset`
call. Each method is one `AdminOps` call, as the HTTP routes are."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from mailpipe.admin.ops import AdminOps, NoWorkerPool
from mailpipe.rpc.registry import Registry, RPCError

# RoadRunner's worker states (pool's fsm package), by mailpipe's names for them.
STATUS_CODES = {"starting": 0, "ready": 1, "working": 2, "invalid": 3, "stopping": 4,
                "stopped": 5}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def process_state(worker: dict[str, Any]) -> dict[str, Any]:
    """One worker as RoadRunner's `process.State` (its JSON field names)."""
    created = datetime.fromisoformat(str(worker["created_at"]).replace("Z", "+00:00"))
    since = created - _EPOCH
    return {
        "pid": worker["pid"],
        "status": STATUS_CODES.get(str(worker["status"]), 0),
        "numExecs": worker["num_execs"],
        "created": (since.days * 86400 + since.seconds) * 10**9 + since.microseconds * 1000,
        "memoryUsage": worker["rss_bytes"] or 0,
        "CPUPercent": worker.get("cpu_percent", 0.0),
        "command": worker.get("command", ""),
        "statusStr": worker["status"],
    }


def _text(arg: Any, what: str) -> str:
    """A string argument (raw bytes too, for the raw codec)."""
    if isinstance(arg, bytes):
        return arg.decode("utf-8", "replace")
    if not isinstance(arg, str):
        raise RPCError(f"expected {what} (a string), got {type(arg).__name__}")
    return arg


def register(registry: Registry, ops: AdminOps) -> None:
    registry.expect(NoWorkerPool)

    async def add_worker(_: Any) -> bool:
        await ops.add_worker("smtp")
        return True

    async def remove_worker(_: Any) -> bool:
        await ops.remove_worker("smtp")
        return True

    async def workers_list(_: Any) -> list[dict[str, Any]]:
        return [process_state(w) for w in ops.workers("smtp")]

    async def list_connections(_: Any) -> list[dict[str, Any]]:
        return ops.connections()

    async def close_connection(arg: Any) -> bool:
        if not ops.close_connection(_text(arg, "a connection uuid")):
            raise RPCError("connection not found")
        return True

    async def plugins(_: Any) -> list[str]:
        return ops.worker_plugins()

    async def informer_workers(arg: Any) -> dict[str, Any]:
        plugin = _text(arg, "a plugin name")
        return {"workers": [process_state(w) for w in ops.workers(plugin)]}

    async def informer_add(arg: Any) -> bool:
        await ops.add_worker(_text(arg, "a plugin name"))
        return True

    async def informer_remove(arg: Any) -> bool:
        await ops.remove_worker(_text(arg, "a plugin name"))
        return True

    async def reset(arg: Any) -> bool:
        await ops.reset_workers(_text(arg, "a plugin name"))
        return True

    for name, handler in {
        "smtp.AddWorker": add_worker,
        "smtp.RemoveWorker": remove_worker,
        "smtp.WorkersList": workers_list,
        "smtp.ListConnections": list_connections,
        "smtp.CloseConnection": close_connection,
        "informer.List": plugins,
        "informer.Workers": informer_workers,
        "informer.AddWorker": informer_add,
        "informer.RemoveWorker": informer_remove,
        "resetter.List": plugins,
        "resetter.Reset": reset,
    }.items():
        registry.register(name, handler)
