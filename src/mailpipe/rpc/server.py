"""The RPC endpoint (`rpc.listen`): Goridge RPC over TCP or a unix socket, as RoadRunner's.

Each connection carries calls one after another; an error a method raises goes back as an
error answer and the connection carries on. Bytes that are not an RPC frame (garbage, a
frame past `max_frame_size`, a frame left half-sent for `read_timeout`) get one error answer
(sequence id 0) and close that connection alone, with a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable

from mailpipe.config import is_loopback, parse_listen
from mailpipe.rpc.codec import (
    CODEC_JSON,
    Call,
    encode_error_reply,
    encode_reply,
    parse_call,
)
from mailpipe.rpc.registry import Registry
from mailpipe.workers.goridge import CRCError, FrameDecoder, FrameError

log = logging.getLogger("mailpipe.rpc")

READ_SIZE = 65536


def _describe(exc: FrameError) -> str:
    """A frame error worded for an RPC client (the decoder's own words are for workers that
    print on stdout)."""
    if isinstance(exc, CRCError):
        return "malformed frame: header CRC mismatch (not a Goridge frame)"
    text = str(exc)
    if text.startswith("validation failed"):
        return "malformed frame: bad version or header length (not a Goridge frame)"
    return f"malformed frame: {text}"


class RPCServer:
    def __init__(self, address: str, registry: Registry, *, max_frame_size: int,
                 read_timeout: float) -> None:
        self.address = address
        self.registry = registry
        self.max_frame_size = max_frame_size
        self.read_timeout = read_timeout
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        host, port = parse_listen(self.address)
        if host == "unix":
            path = str(port)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # left by a process that died
            self._server = await asyncio.start_unix_server(self._accepted, path)
        else:
            if not is_loopback(host):
                log.warning("RPC endpoint bound to %s, reachable from other machines: like "
                            "RoadRunner's it has no authentication and manages workers and "
                            "jobs; bind rpc.listen to tcp://127.0.0.1", self.address)
            self._server = await asyncio.start_server(self._accepted, host, int(port))
        log.info("RPC endpoint on %s", self.bound_address())

    def bound_address(self) -> str:
        """Where it listens (the port it bound when asked for port 0)."""
        assert self._server is not None
        sockname = self._server.sockets[0].getsockname()
        if isinstance(sockname, str):
            return f"unix://{sockname}"
        host, port = sockname[:2]
        return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            await self._server.wait_closed()
            self._server = None

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        peer = writer.get_extra_info("peername") or "unix socket"
        try:
            await self._serve(reader, writer.write, writer.drain, peer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, write: Callable[[bytes], None],
                     drain: Callable[[], Awaitable[None]], peer: object) -> None:
        decoder = FrameDecoder(max_payload=self.max_frame_size)
        try:
            while True:
                frame = decoder.next_frame()
                if frame is None:
                    # Between calls a client may stay quiet for as long as it likes (PHP keeps
                    # its connection for the process's life); inside a frame, read_timeout.
                    timeout = self.read_timeout if decoder.buffered else None
                    chunk = await asyncio.wait_for(reader.read(READ_SIZE), timeout)
                    if not chunk:
                        if decoder.buffered:
                            log.warning("RPC connection from %s ended inside a frame "
                                        "(%d bytes of it)", peer, decoder.buffered)
                        return
                    decoder.feed(chunk)
                    continue
                write(await self.answer(parse_call(frame)))
                await drain()
        except FrameError as exc:
            self._refuse(write, peer, _describe(exc))
        except TimeoutError:
            self._refuse(write, peer, f"malformed frame: incomplete after {self.read_timeout}s "
                                      "(rpc.read_timeout)")

    def _refuse(self, write: Callable[[bytes], None], peer: object, text: str) -> None:
        log.warning("RPC connection from %s closed: %s", peer, text)
        with contextlib.suppress(Exception):
            write(encode_error_reply(0, "", CODEC_JSON, text))

    async def answer(self, call: Call) -> bytes:
        """The answer frame to one call: its result, or its error."""
        try:
            return encode_reply(call, await self.registry.get(call.method).invoke(call))
        except self.registry.expected as exc:
            text = str(exc)
        except Exception as exc:
            # A method's own failure (a worker that would not start, a broker that is down):
            # the caller gets the text, the log the traceback.
            log.exception("RPC %s failed", call.method)
            text = str(exc) or type(exc).__name__
        return encode_error_reply(call.seq, call.method, call.codec, text)
