"""One worker process and the RoadRunner worker protocol spoken with it.

Frames are Goridge v3 (see `goridge.py`); the conversation is RoadRunner's: a pid handshake,
then one request frame per email (context = the event JSON, body = the raw message or empty)
answered by one response frame (context = CONTINUE or CLOSE) or an error frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import grp
import logging
import os
import pwd
import shlex
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from mailpipe.children import die_with_parent
from mailpipe.workers.goridge import (
    BYTE10_PING,
    BYTE10_PONG,
    BYTE10_STREAM,
    CODEC_JSON,
    Frame,
    FrameError,
    encode_control,
    encode_frame,
    encode_payload,
    read_frame,
)

log = logging.getLogger("mailpipe.workers")

WORKER_STOP_CONTEXT = b'{"stop":true}'


class WorkerState(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    WORKING = "working"
    INVALID = "invalid"
    STOPPING = "stopping"
    STOPPED = "stopped"


class WorkerError(Exception):
    """The worker cannot be used any more (died, broke the protocol, ran past exec_ttl)."""


class WorkerStartError(WorkerError):
    """The worker did not start or did not complete the pid handshake."""


class WorkerTimeout(WorkerError):
    """The worker took longer than exec_ttl; it has been killed."""


class WorkerStopped(Exception):
    """The worker asked to stop instead of handling the request (RoadRunner's Worker::stop())."""


@dataclass(frozen=True, slots=True)
class WorkerResponse:
    pid: int
    context: bytes = b""
    body: bytes = b""
    error: str | None = None  # the worker's error frame: a soft failure, the worker lives on


def run_as(user: str | None, group: str | None) -> dict[str, object]:
    """create_subprocess_exec's arguments for server.user and server.group: the child takes
    the user's ids and groups (its own group unless `group` is given), not root's, and dies
    with mailpipe (children.py). Raises WorkerStartError."""
    if not user and not group:
        return _preexec(None)
    try:
        account = _lookup(pwd.getpwuid, pwd.getpwnam, user or str(os.geteuid()))
    except KeyError:
        raise WorkerStartError(f"server.user: no such user {user!r}") from None
    try:
        gid = _lookup(grp.getgrgid, grp.getgrnam, group).gr_gid if group else account.pw_gid
    except KeyError:
        raise WorkerStartError(f"server.group: no such group {group!r}") from None
    if os.geteuid() != 0:
        if (account.pw_uid, gid) == (os.geteuid(), os.getegid()):
            return _preexec(None)  # already that user
        raise WorkerStartError(
            f"server.user/server.group: starting workers as {account.pw_name}:{gid} needs "
            f"mailpipe to run as root (it runs as uid {os.geteuid()})")
    groups = os.getgrouplist(account.pw_name, gid)

    def switch_user() -> None:  # in the child, before exec (uvloop has no user= argument)
        os.setgroups(groups)
        os.setgid(gid)
        os.setuid(account.pw_uid)

    return _preexec(switch_user)


def _preexec(switch_user: Callable[[], None] | None) -> dict[str, object]:
    fn = die_with_parent(switch_user)
    return {"preexec_fn": fn} if fn is not None else {}


def _lookup(by_id: Callable[[int], Any], by_name: Callable[[str], Any], name: str) -> Any:
    return by_id(int(name)) if name.isdigit() else by_name(name)


def split_command(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else list(command)


class Connection:
    """The frame channel to one worker: its stdin/stdout pipes, or a relay socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        try:
            self.writer.write(data)
            await self.writer.drain()
        except RuntimeError as exc:
            # uvloop raises this (not an OSError) when the worker's pipe is already closed: a
            # worker that died. Unhandled, the worker stayed "working" for ever, never replaced.
            raise WorkerError("the worker closed its input (did it exit?)") from exc

    async def receive(self) -> Frame:
        try:
            return await read_frame(self.reader)
        except asyncio.IncompleteReadError as exc:
            raise WorkerError("the worker closed its output (did it exit?)") from exc

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


async def handshake(conn: Connection) -> int:
    """RoadRunner's start handshake: our pid in a control frame, the worker's pid back."""
    await conn.send(encode_control({"pid": os.getpid()}))
    frame = await conn.receive()
    if not frame.is_control:
        raise WorkerStartError(f"expected the pid handshake, got a frame with flags {frame.flags}")
    try:
        pid = orjson.loads(frame.payload)["pid"]
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise WorkerStartError(f"bad pid handshake payload: {frame.payload[:80]!r}") from exc
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise WorkerStartError(f"bad pid in handshake: {pid!r}")
    return pid


class WorkerProcess:
    """A spawned worker: lifecycle, the request/response exchange, and its stats."""

    def __init__(self, command: list[str], env: dict[str, str], *,
                 user: str | None = None, group: str | None = None) -> None:
        self.command = command
        self.env = env
        self.user, self.group = user, group
        self.process: asyncio.subprocess.Process | None = None
        self.conn: Connection | None = None
        self.pid = 0
        self.state = WorkerState.STARTING
        self.num_execs = 0
        self.created_at = datetime.now(UTC)
        self.created = time.monotonic()
        self.last_used = self.created
        self.last_error: str | None = None
        self.retire_when_idle = False
        self._stderr_task: asyncio.Task[None] | None = None

    async def spawn(self, *, pipes: bool) -> asyncio.subprocess.Process:
        pipe = asyncio.subprocess.PIPE
        self.process = await asyncio.create_subprocess_exec(
            *self.command,
            stdin=pipe if pipes else asyncio.subprocess.DEVNULL,
            stdout=pipe if pipes else None,
            stderr=pipe,
            env=self.env,
            limit=1 << 20,
            start_new_session=True,  # our Ctrl-C goes to mailpipe, which stops workers in order
            **run_as(self.user, self.group),  # type: ignore[arg-type]
        )
        self.pid = self.process.pid
        self._stderr_task = asyncio.create_task(self._relay_stderr())
        if pipes:
            assert self.process.stdout is not None and self.process.stdin is not None
            self.conn = Connection(self.process.stdout, self.process.stdin)  # type: ignore[arg-type]
        return self.process

    async def start_pipes(self, timeout: float) -> None:
        await self.spawn(pipes=True)
        assert self.conn is not None
        try:
            pid = await asyncio.wait_for(handshake(self.conn), timeout)
        except (WorkerError, FrameError, OSError, TimeoutError) as exc:
            raise WorkerStartError(self._start_failure(exc)) from exc
        log.debug("worker ready", extra={"pid": self.pid, "handshake_pid": pid})
        self.state = WorkerState.READY

    def attach(self, conn: Connection) -> None:
        """A socket relay connection whose handshake named this process."""
        self.conn = conn
        self.state = WorkerState.READY

    def _start_failure(self, exc: BaseException) -> str:
        status = self.process.returncode if self.process else None
        reason = "timed out" if isinstance(exc, TimeoutError) else str(exc)
        text = f"worker {shlex.join(self.command)} failed to start: {reason}"
        if status is not None:
            text += f" (exited with status {status})"
        return text

    async def _relay_stderr(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        stream = self.process.stderr
        while True:
            try:
                line = await stream.readline()
            except (ValueError, asyncio.LimitOverrunError):
                line = await stream.read(65536)
            if not line:
                return
            log.info("%s", line.decode("utf-8", "replace").rstrip(), extra={"worker": self.pid})

    async def exec(self, context: bytes, body: bytes, timeout: float | None,
                   flags: int = CODEC_JSON) -> WorkerResponse:
        """One request, one answer. Raises WorkerError (the worker is then unusable) or
        WorkerStopped (it asked to be replaced; the request was not handled)."""
        if self.conn is None:
            raise WorkerError("worker has no connection")
        self.state = WorkerState.WORKING
        self.num_execs += 1
        try:
            response = await asyncio.wait_for(self._exchange(context, body, flags), timeout)
        except TimeoutError:
            self.mark_invalid(f"exec_ttl of {timeout}s exceeded")
            self.kill()
            raise WorkerTimeout(f"worker {self.pid} exceeded exec_ttl ({timeout}s)") from None
        except (WorkerError, FrameError, OSError) as exc:
            self.mark_invalid(str(exc))
            raise WorkerError(f"worker {self.pid}: {exc}") from exc
        except WorkerStopped:
            self.mark_invalid("the worker asked to stop")
            raise
        except asyncio.CancelledError:
            # Whoever waited gave up: the request is still in the worker, and its answer
            # would be read as the next request's. This worker is done.
            self.mark_invalid("its request was cancelled")
            self.kill()
            raise
        self.last_used = time.monotonic()
        if response.error is not None:
            self.last_error = response.error
        self.state = WorkerState.READY
        return response

    async def _exchange(self, context: bytes, body: bytes, flags: int) -> WorkerResponse:
        assert self.conn is not None
        await self.conn.send(encode_payload(context, body, flags=flags))
        while True:
            frame = await self.conn.receive()
            if frame.is_error:
                return WorkerResponse(self.pid, error=frame.payload.decode("utf-8", "replace"))
            if frame.is_control:
                continue  # a stray control frame (a late pid answer) carries no response
            if frame.byte10 & BYTE10_PING:
                await self.conn.send(encode_frame(Frame(flags=0, byte10=BYTE10_PONG)))
            if frame.byte10 & BYTE10_STREAM:
                continue  # streamed responses: only the last frame's context counts
            response_context, response_body = frame.split()
            if response_context == WORKER_STOP_CONTEXT and not response_body:
                raise WorkerStopped()
            return WorkerResponse(self.pid, response_context, response_body)

    def mark_invalid(self, reason: str) -> None:
        self.state = WorkerState.INVALID
        self.last_error = reason

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def stop(self, timeout: float) -> None:
        """The stop control frame, then SIGTERM, then SIGKILL, all within `timeout`: most of
        it for a clean exit, the rest for SIGTERM; SIGKILL is immediate."""
        self.state = WorkerState.STOPPING
        deadline = time.monotonic() + timeout
        if self.conn is not None and self.alive:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.conn.send(encode_control({"stop": True})),
                                       min(1.0, timeout))
        if not await self._wait_exit(max(0.0, deadline - time.monotonic()) * 0.75):
            self._signal(signal.SIGTERM)
            if not await self._wait_exit(max(0.05, deadline - time.monotonic())):
                self.kill()
                await self._wait_exit(5.0)
        self._finish()

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                assert self.process is not None
                self.process.send_signal(sig)

    async def _wait_exit(self, timeout: float) -> bool:
        if self.process is None:
            return True
        try:
            await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _finish(self) -> None:
        self.state = WorkerState.STOPPED
        if self.conn is not None:
            self.conn.close()
        if self._stderr_task is not None:
            self._stderr_task.cancel()

    def rss_bytes(self) -> int:
        try:
            with open(f"/proc/{self.pid}/status", "rb") as fh:
                for line in fh:
                    if line.startswith(b"VmRSS:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        return 0

    def cpu_percent(self) -> float:
        """CPU time used over the process's life, in percent of one CPU (what RoadRunner's
        process.State reports, through gopsutil)."""
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as fh:
                fields = fh.read().rpartition(b")")[2].split()
            with open("/proc/uptime", "rb") as fh:
                uptime = float(fh.read().split()[0])
        except (OSError, ValueError, IndexError):
            return 0.0
        ticks = os.sysconf("SC_CLK_TCK")
        # After the ")" that ends the command name: utime is field 14, stime 15, starttime 22.
        used = (int(fields[11]) + int(fields[12])) / ticks
        alive = uptime - int(fields[19]) / ticks
        return round(100.0 * used / alive, 2) if alive > 0 else 0.0

    def info(self) -> dict[str, object]:
        return {
            "pid": self.pid,
            "status": self.state.value,
            "num_execs": self.num_execs,
            "created_at": self.created_at.isoformat().replace("+00:00", "Z"),
            "rss_bytes": self.rss_bytes(),
            "cpu_percent": self.cpu_percent(),
            "command": shlex.join(self.command),
            "last_error": self.last_error,
        }
