"""The test side of RoadRunner's worker protocol, for the worker and consumer SDK tests.

A few lines over mailpipe's frame codec doing what mailpipe's pool does: spawn a worker or
jobs consumer process (`spawner`), do the pid handshake and exchange frames with it over its
pipes or a socket relay (`Channel`).
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from mailpipe.workers.goridge import (
    CODEC_JSON,
    CODEC_RAW,
    Frame,
    FrameDecoder,
    encode_control,
    encode_payload,
)

if TYPE_CHECKING:
    from mailpipe.jobs.base import Delivery

TIMEOUT = 10.0


class Channel:
    """Frames over a pair of byte functions, with a timeout on every read."""

    def __init__(
        self,
        fileno: int,
        read: Callable[[], bytes],
        write: Callable[[bytes], None],
        peer: str = "worker",
    ) -> None:
        self.fileno = fileno
        self.peer = peer
        self._read = read
        self._write = write
        self.decoder = FrameDecoder()

    def send(self, data: bytes) -> None:
        self._write(data)

    def recv(self, timeout: float = TIMEOUT) -> Frame:
        deadline = time.monotonic() + timeout
        while (frame := self.decoder.next_frame()) is None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fileno], [], [], left)[0]:
                raise TimeoutError(f"no frame from the {self.peer}")
            data = self._read()
            if not data:
                raise EOFError(f"the {self.peer} closed its output")
            self.decoder.feed(data)
        return frame

    def expect_eof(self, timeout: float = TIMEOUT) -> None:
        with pytest.raises(EOFError):
            self.recv(timeout)

    def handshake(self, expected_pid: int | None = None) -> int:
        self.send(encode_control({"pid": os.getpid()}))
        frame = self.recv()
        assert frame.is_control, frame
        assert frame.options == ()
        pid = frame.json()["pid"]  # type: ignore[index]
        assert isinstance(pid, int) and pid > 0
        if expected_pid is not None:
            assert pid == expected_pid
        return pid

    def request(self, event: dict[str, Any], raw: bytes = b"") -> Frame:
        """One email, sent as mailpipe's worker pool sends it."""
        self.send(encode_payload(json.dumps(event).encode(), raw, flags=CODEC_JSON))
        return self.recv()

    def deliver(self, delivery: Delivery, driver: str = "sqlite") -> Frame:
        """One job, sent as mailpipe's PipelineConsumer._run sends it."""
        self.send(encode_payload(delivery.context(driver), delivery.job.payload,
                                 flags=CODEC_RAW))
        return self.recv()


def accept_channel(server: socket.socket) -> tuple[socket.socket, Channel]:
    """The server's end of a socket relay, once the peer connects."""
    server.settimeout(TIMEOUT)
    conn, _ = server.accept()
    conn.settimeout(TIMEOUT)
    return conn, Channel(conn.fileno(), lambda: conn.recv(65536), conn.sendall)


@dataclass
class PeerProc:
    """A spawned worker or consumer and the channel over its pipes."""

    proc: subprocess.Popen[bytes]
    chan: Channel
    stderr_path: Path

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait(self, timeout: float = TIMEOUT) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> int:
        """The server's stop control frame: the peer must exit 0."""
        self.chan.send(encode_control({"stop": True}))
        return self.wait()


def peer_env(mode: str, relay: str = "pipes", **extra: str) -> dict[str, str]:
    """The environment mailpipe gives a worker (mode "smtp") or a consumer (mode "jobs")."""
    env = {**os.environ, "RR_RELAY": relay, "RR_MODE": mode, "PYTHONUNBUFFERED": "1"}
    env.update(extra)
    return env


def spawner(
    tmp_path: Path, command: Callable[[str], list[str]], mode: str, peer: str
) -> Iterator[Callable[..., PeerProc]]:
    """The body of a `spawn` fixture: `spawn(kind, **env)` starts `command(kind)` with
    `peer_env(mode, **env)`; whatever is still running at the end is killed."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(kind: str, **env: str) -> PeerProc:
        stderr_path = tmp_path / f"{kind}-{len(procs)}.stderr"
        with stderr_path.open("wb") as stderr:
            proc = subprocess.Popen(
                command(kind),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=peer_env(mode, **env),
            )
        procs.append(proc)
        assert proc.stdin is not None and proc.stdout is not None
        stdin, stdout = proc.stdin, proc.stdout

        def write(data: bytes) -> None:
            stdin.write(data)
            stdin.flush()

        chan = Channel(stdout.fileno(), lambda: os.read(stdout.fileno(), 65536), write, peer)
        return PeerProc(proc, chan, stderr_path)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()
