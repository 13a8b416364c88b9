"""One running plugin process: started, handshaken, dialled and checked, then closed.

`ExternalPlugin` (this package's __init__) holds one `Instance` at a time and replaces it
when it dies (restart) or on reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import stat
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from mailpipe.children import die_with_parent
from mailpipe.plugins.base import PluginError
from mailpipe.plugins.external import wire
from mailpipe.plugins.external.handshake import Handshake, parse_handshake
from mailpipe.plugins.external.logs import log_stderr_line
from mailpipe.plugins.external.proto import plugin_pb2 as pb
from mailpipe.plugins.hooks import HOOKS

SHUTDOWN_WAIT = 2.0  # go-plugin's host waits this long after Shutdown before killing
HEALTH_PATH = "/grpc.health.v1.Health/Check"
LINE_LIMIT = 1 << 20  # longer stderr/stdout lines are dropped, not fatal
_TOLERATED = (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAVAILABLE)


class StartError(PluginError):
    """The plugin process did not come up; the message names it and says why."""


def plugin_env(extra: dict[str, str], socket_dir: str) -> dict[str, str]:
    """go-plugin's host environment (no AutoMTLS, no gRPC multiplexing)."""
    return {
        **os.environ, **extra,
        wire.COOKIE_KEY: wire.COOKIE_VALUE,
        "PLUGIN_MIN_PORT": "10000",
        "PLUGIN_MAX_PORT": "25000",
        "PLUGIN_PROTOCOL_VERSIONS": str(wire.APP_PROTOCOL_VERSION),
        "PLUGIN_UNIX_SOCKET_DIR": socket_dir,
    }


class Instance:
    """A started plugin process and its gRPC channel."""

    def __init__(self, name: str, logger: logging.Logger, proc: asyncio.subprocess.Process,
                 socket_dir: str) -> None:
        self.name = name
        self.logger = logger
        self.proc = proc
        self.socket_dir = socket_dir
        self.handshake: Handshake | None = None
        self.channel: grpc.aio.Channel | None = None
        self.hooks: frozenset[str] = frozenset()
        self.started_at = time.monotonic()
        self.closing = False
        self.inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.stderr_tail: deque[str] = deque(maxlen=10)
        self._tasks: list[asyncio.Task[Any]] = []

    @classmethod
    async def launch(cls, name: str, argv: Sequence[str], env: dict[str, str],
                     timeout: float, logger: logging.Logger) -> Instance:
        socket_dir = tempfile.mkdtemp(prefix="mailpipe-plugin-")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, env=plugin_env(env, socket_dir), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # mailpipe manages its lifetime, not the terminal's ^C
                preexec_fn=die_with_parent(),
                limit=LINE_LIMIT,
            )
        except OSError as exc:
            shutil.rmtree(socket_dir, ignore_errors=True)
            raise StartError(f"plugin {name!r}: cannot run {argv[0]!r}: {exc}") from exc
        inst = cls(name, logger, proc, socket_dir)
        try:
            await asyncio.wait_for(inst._connect(timeout), timeout)
        except BaseException as exc:
            await inst.close(graceful=False)
            if isinstance(exc, TimeoutError):
                raise StartError(f"plugin {name!r} did not start within {timeout:g}s "
                                 f"{inst._stderr_hint()}") from None
            raise
        return inst

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None and not self.closing

    async def _connect(self, timeout: float) -> None:
        self._tasks.append(asyncio.create_task(self._read_stderr()))
        self.handshake = await self._read_handshake()
        self._tasks.append(asyncio.create_task(self._drain_stdout()))
        self.channel = grpc.aio.insecure_channel(self.handshake.target,
                                                 options=wire.CHANNEL_OPTIONS)
        await self._check_health(timeout)
        self._tasks.append(asyncio.create_task(self._relay_stdio()))
        self.hooks = await self._implemented(timeout)

    async def _read_handshake(self) -> Handshake:
        assert self.proc.stdout is not None
        try:
            line = await self.proc.stdout.readline()
        except ValueError:  # longer than LINE_LIMIT: not a handshake
            raise StartError(f"plugin {self.name!r}: its first stdout line is longer than "
                             f"{LINE_LIMIT} bytes, not a handshake") from None
        if not line:
            code = await self.proc.wait()
            await asyncio.wait(self._tasks[:1], timeout=1.0)  # its last stderr lines, to EOF
            raise StartError(f"plugin {self.name!r} exited with code {code} before its "
                             f"handshake {self._stderr_hint()}")
        return parse_handshake(self.name, line.decode("utf-8", "replace"))

    def _stderr_hint(self) -> str:
        if not self.stderr_tail:
            return "(nothing on stderr)"
        return "(stderr: " + " | ".join(self.stderr_tail) + ")"

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        async for line in _lines(self.proc.stderr):
            self.stderr_tail.append(line.decode("utf-8", "replace").strip()[:300])
            log_stderr_line(self.logger, self.name, line)

    async def _drain_stdout(self) -> None:
        # go-plugin discards what follows the handshake; a full pipe would block the plugin.
        assert self.proc.stdout is not None
        async for line in _lines(self.proc.stdout):
            self.logger.debug("stdout: %s", line.decode("utf-8", "replace").rstrip(),
                              extra={"plugin": self.name})

    async def _check_health(self, timeout: float) -> None:
        check = self.channel.unary_unary(  # type: ignore[union-attr]
            HEALTH_PATH, request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString)
        try:
            reply = await check(health_pb2.HealthCheckRequest(service=wire.HEALTH_SERVICE),
                                timeout=timeout, wait_for_ready=True)
        except grpc.aio.AioRpcError as exc:
            raise StartError(f"plugin {self.name!r}: health check failed: "
                             f"{exc.code().name}: {exc.details()}") from None
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            raise StartError(f"plugin {self.name!r} is not serving (health: {status})")

    async def healthy(self, timeout: float = 5.0) -> bool:
        if not self.alive or self.channel is None:
            return False
        try:
            await self._check_health(timeout)
        except StartError:
            return False
        return True

    async def _relay_stdio(self) -> None:
        """go-plugin >= 1.3 streams what the plugin writes to its own stdout/stderr once
        serving; 1.0.1 and other languages answer UNIMPLEMENTED (or UNAVAILABLE)."""
        stream = wire.stub(self.channel, wire.STDIO_STREAM)(wire.STDIO_STREAM.request())
        try:
            async for chunk in stream:
                channel = "stdout" if chunk.channel == 1 else "stderr"
                for line in chunk.data.splitlines():
                    self.logger.debug("%s: %s", channel, line.decode("utf-8", "replace"),
                                      extra={"plugin": self.name})
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in (*_TOLERATED, grpc.StatusCode.CANCELLED):
                self.logger.debug("plugin stdio stream ended: %s", exc.code().name,
                                  extra={"plugin": self.name})

    async def _implemented(self, timeout: float) -> frozenset[str]:
        call = wire.stub(self.channel, wire.HOOKS_IMPLEMENTED)
        try:
            reply = await call(pb.HooksRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return frozenset()  # no Hooks service: a selector-only plugin
            raise StartError(f"plugin {self.name!r}: Hooks.Implemented failed: "
                             f"{exc.code().name}: {exc.details()}") from None
        unknown = sorted(set(reply.hooks) - set(HOOKS))
        if unknown:
            self.logger.warning("plugin %s names unknown hooks (ignored): %s", self.name,
                                ", ".join(unknown), extra={"plugin": self.name})
        return frozenset(reply.hooks) & frozenset(HOOKS)

    async def call(self, method: wire.Method, request: Any, timeout: float | None) -> Any:
        """One RPC, counted so that a reload can wait for calls in flight."""
        self.inflight += 1
        self.idle.clear()
        try:
            return await wire.stub(self.channel, method)(request, timeout=timeout)
        finally:
            self.inflight -= 1
            if not self.inflight:
                self.idle.set()

    async def close(self, graceful: bool = True, drain: float = 0.0) -> None:
        """Shutdown over gRPC (any error tolerated: go-plugin 1.0.1 answers UNAVAILABLE as it
        stops), wait up to 2 s, SIGTERM, SIGKILL; then remove the socket and the temp dir."""
        self.closing = True
        if drain and self.inflight:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.idle.wait(), drain)
        if graceful and self.channel is not None and self.proc.returncode is None:
            with contextlib.suppress(Exception):
                shutdown = wire.stub(self.channel, wire.CONTROLLER_SHUTDOWN)
                await shutdown(wire.CONTROLLER_SHUTDOWN.request(), timeout=SHUTDOWN_WAIT)
        await self._stop_process(SHUTDOWN_WAIT if graceful else 0.0)
        if self.channel is not None:
            await self.channel.close()
        await self._finish_tasks()
        self.cleanup()

    async def _stop_process(self, wait: float) -> None:
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if self.proc.returncode is not None:
                break
            if sig is not None:
                self._signal_group(sig)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), wait if sig is None else 2.0)
        # What the plugin started itself would keep its pipes (and our readers) open.
        self._signal_group(signal.SIGKILL)

    def _signal_group(self, sig: int) -> None:
        # The plugin leads its own process group (start_new_session), so this reaches its
        # children too; the group outlives the leader only while members remain.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    async def _finish_tasks(self) -> None:
        # The readers end at EOF once the process is gone; the stdio stream with the channel.
        done, pending = await asyncio.wait(self._tasks, timeout=1.0) if self._tasks else ((), ())
        for task in pending:
            task.cancel()
        for task in (*done, *pending):
            with contextlib.suppress(BaseException):
                await task

    def cleanup(self) -> None:
        """Remove the unix socket (go-plugin 1.0.1 leaves it behind when killed) and our dir."""
        if self.handshake is not None and self.handshake.network == "unix":
            path = self.handshake.address
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(path).st_mode):  # never a file the line names
                    os.unlink(path)
        shutil.rmtree(self.socket_dir, ignore_errors=True)


async def _lines(stream: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """The stream's lines until EOF; one longer than LINE_LIMIT is dropped (StreamReader
    clears it) rather than ending the reader, which would leave the plugin blocked on a full
    pipe."""
    while True:
        try:
            line = await stream.readline()
        except ValueError:
            continue
        if not line:
            return
        yield line
