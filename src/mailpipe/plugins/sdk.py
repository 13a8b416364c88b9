"""Write an out-of-process mailpipe plugin in Python: the go-plugin SERVER side.

    from mailpipe.plugins.sdk import Reject, serve

    class Policy:
        def on_rcpt_to(self, ctx):            # ctx: the context JSON, decoded (a dict)
            if ctx["args"]["recipient"].startswith("blocked"):
                return Reject("No such user", 550, "5.1.1")
            return None                         # None: continue

    serve(hooks=Policy())

Hooks are the object's methods named after HOOKS (plain or async); they return a HookResult
(Continue, Accept, Reject, Tempfail, Disconnect, Modify) or None. A `selector` object has
`select(downstreams, envelope, message_uuid, event)` returning a downstream's name.
Anything printed goes to stderr: stdout carries only the handshake line.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import signal
import sys
import tempfile
import uuid
from datetime import UTC, datetime
from typing import Any

import grpc
import orjson
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from mailpipe.plugins.external import wire
from mailpipe.plugins.external.proto import plugin_pb2 as pb
from mailpipe.plugins.hooks import HOOKS
from mailpipe.plugins.results import (
    Accept,
    Continue,
    Disconnect,
    HookResult,
    Modify,
    Reject,
    Tempfail,
)

__all__ = ["Accept", "Continue", "Disconnect", "HookResult", "Modify", "Reject", "Tempfail",
           "config", "serve"]

NOT_A_PLUGIN = ("This binary is a plugin. These are not meant to be executed directly.\n"
                "Please execute the program that consumes these plugins, which will\n"
                "load any plugins automatically\n")
log = logging.getLogger("mailpipe.plugin")


def config() -> dict[str, Any]:
    """The plugin's `config` from mailpipe's configuration ({} if none)."""
    raw = os.environ.get("MAILPIPE_PLUGIN_CONFIG")
    return orjson.loads(raw) if raw else {}


def serve(hooks: Any = None, selector: Any = None, network: str = "unix") -> None:
    """Serve `hooks` and/or `selector` to the mailpipe that started this process; returns
    when mailpipe shuts the plugin down. Exits 1 if not started by mailpipe. `network`
    "tcp" listens on 127.0.0.1 within PLUGIN_MIN_PORT..PLUGIN_MAX_PORT instead of a socket."""
    if os.environ.get(wire.COOKIE_KEY) != wire.COOKIE_VALUE:
        sys.stderr.write(NOT_A_PLUGIN)
        sys.exit(1)
    handshake_out, sys.stdout = sys.stdout, sys.stderr  # a stray print must not break it
    _log_to_stderr()
    # Like go-plugin: the host manages our lifetime, a ^C in its terminal is not for us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(_serve(hooks, selector, network, handshake_out))


async def _serve(hooks: Any, selector: Any, network: str, handshake_out: Any) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # No SO_REUSEPORT (grpc's default): a port another process holds must count as taken.
    server = grpc.aio.server(options=[*wire.CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)])
    await _add_health(server)
    server.add_generic_rpc_handlers(_services(hooks, selector, stop))
    address = _listen(server, network)
    await server.start()
    try:
        version = wire.APP_PROTOCOL_VERSION
        handshake_out.write(f"{wire.CORE_PROTOCOL_VERSION}|{version}|{network}|{address}|grpc|\n")
        handshake_out.flush()
        log.info("plugin serving", extra={"network": network, "address": address,
                                          "pid": os.getpid()})
        await stop.wait()
        await server.stop(grace=0.5)
    finally:
        if network == "unix":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(address)


def _listen(server: grpc.aio.Server, network: str) -> str:
    """The address the server listens on: a new unix socket, or go-plugin's port range."""
    if network == "unix":
        directory = os.environ.get("PLUGIN_UNIX_SOCKET_DIR") or tempfile.gettempdir()
        path = os.path.join(directory, f"plugin{uuid.uuid4().hex[:10]}")
        server.add_insecure_port(f"unix:{path}")
        return path
    if network != "tcp":
        raise ValueError(f"network must be unix or tcp, not {network!r}")
    low = int(os.environ.get("PLUGIN_MIN_PORT") or 10000)
    high = int(os.environ.get("PLUGIN_MAX_PORT") or 25000)
    for port in range(low, high + 1):
        with contextlib.suppress(RuntimeError):  # taken
            if server.add_insecure_port(f"127.0.0.1:{port}"):
                return f"127.0.0.1:{port}"
    raise RuntimeError(f"no free port in {low}..{high}")


async def _add_health(server: grpc.aio.Server) -> None:
    servicer = health.aio.HealthServicer()
    for name in ("", wire.HEALTH_SERVICE):
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)


def _services(hooks: Any, selector: Any, stop: asyncio.Event) -> list[Any]:
    async def shutdown(request: Any, context: Any) -> Any:
        stop.set()  # go-plugin stops its server; we answer first, then stop
        return wire.CONTROLLER_SHUTDOWN.response()

    async def stdio(request: Any, context: Any) -> Any:
        # Held open until shutdown: our output goes to stderr, not this stream.
        await stop.wait()
        return
        yield  # pragma: no cover - makes this an async generator

    services = [
        wire.service("plugin.GRPCController",
                     {"Shutdown": wire.handler(wire.CONTROLLER_SHUTDOWN, shutdown)}),
        wire.service("plugin.GRPCStdio", {"StreamStdio": wire.handler(wire.STDIO_STREAM, stdio)}),
    ]
    if hooks is not None:
        services.append(_hooks_service(hooks))
    if selector is not None:
        services.append(_selector_service(selector))
    return services


def _implemented(hooks: Any) -> list[str]:
    return sorted(name for name in HOOKS if callable(getattr(hooks, name, None)))


def _hooks_service(hooks: Any) -> Any:
    names = _implemented(hooks)

    async def implemented(request: Any, context: Any) -> Any:
        return pb.HooksResponse(hooks=names)

    async def call(request: Any, context: Any) -> Any:
        if request.hook not in names:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"no hook {request.hook}")
        ctx = orjson.loads(request.context_json) if request.context_json else {}
        try:
            result = await _maybe_await(getattr(hooks, request.hook)(ctx))
        except Exception as exc:
            log.exception("hook %s raised", request.hook)
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        return _to_wire(result)

    return wire.service("mailpipe.plugin.v1.Hooks", {
        "Implemented": wire.handler(wire.HOOKS_IMPLEMENTED, implemented),
        "Call": wire.handler(wire.HOOKS_CALL, call),
    })


def _to_wire(result: HookResult | None) -> Any:
    if result is None:
        return pb.HookResult()
    mods = {}
    if result.add_headers:
        mods["add_headers"] = [list(pair) for pair in result.add_headers]
    if result.set_headers:
        mods["set_headers"] = [list(pair) for pair in result.set_headers]
    if result.rcpt_to is not None:
        mods["rcpt_to"] = list(result.rcpt_to)
    if result.tags:
        mods["tags"] = list(result.tags)
    return pb.HookResult(action=int(result.action), code=result.code,
                         enhanced_code=result.enhanced, message=result.message,
                         modifications_json=orjson.dumps(mods) if mods else b"")


def _selector_service(selector: Any) -> Any:
    async def select(request: Any, context: Any) -> Any:
        downstreams = [{"name": d.name, "host": d.host, "port": d.port, "weight": d.weight,
                        "labels": dict(d.labels), "healthy": d.healthy}
                       for d in request.downstreams]
        envelope = {"mail_from": request.envelope.mail_from,
                    "rcpt_to": list(request.envelope.rcpt_to)}
        event = orjson.loads(request.event_json) if request.event_json else None
        try:
            name = await _maybe_await(selector.select(downstreams, envelope,
                                                      request.message_uuid, event))
        except Exception as exc:
            log.exception("select raised")
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        return pb.SelectResponse(name=name or "")

    return wire.service("mailpipe.plugin.v1.Selector",
                        {"Select": wire.handler(wire.SELECTOR_SELECT, select)})


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class HclogFormatter(logging.Formatter):
    """hclog's JSON lines, which mailpipe maps to its own log levels and context."""

    _LEVELS = {"DEBUG": "debug", "INFO": "info", "WARNING": "warn", "ERROR": "error",
               "CRITICAL": "error"}
    _STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "@level": self._LEVELS.get(record.levelname, "debug"),
            "@message": record.getMessage(),
            "@module": record.name,
            "@timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(),
        }
        doc.update({k: v for k, v in vars(record).items() if k not in self._STANDARD})
        if record.exc_info:
            doc["error"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


def _log_to_stderr() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(HclogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("MAILPIPE_PLUGIN_LOG_LEVEL", "INFO").upper())
